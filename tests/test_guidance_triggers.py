"""Reference prompts (paper Eq. 14-15): the main prompt without the other LoRA's trigger words, from metadata."""
import json

from lib_dynfuse.guidance.triggers import frequent_tags, reference_prompt, trigger_words, without_words


def test_trigger_words_come_from_user_metadata_then_file_keys_then_caption_tags():
    tags = {"10_wc": {"wc_style": 12, "watercolor": 4, "1girl": 3}, "5_more": {"wc_style": 5, "paper": 5}}
    meta = {"ss_tag_frequency": tags}
    assert trigger_words(meta) == ["wc_style"]
    assert trigger_words(dict(meta, ss_activation_text="wcs, wet paint")) == ["wcs", "wet paint"]
    assert trigger_words(dict(meta, **{"modelspec.trigger_phrase": "wc art"}, ss_activation_text="wcs")) == ["wc art"]
    assert trigger_words(dict(meta, ss_activation_text="wcs"), {"activation text": " my wc , style2 "}) == ["my wc", "style2"]
    assert trigger_words({}, {"activation text": ""}) == [] and trigger_words(None, None) == []


def test_caption_tags_as_the_host_reads_them():
    """kohya writes ss_tag_frequency as JSON text; the WebUI parses it (sd_models.py:301-305): both are read."""
    tags = {"20_sks dog": {"sks dog": 20, "grass": 4}, "3_extra": {"sks dog": 3, "sofa": 3}}
    assert frequent_tags(tags) == frequent_tags(json.dumps(tags)) == ["sks dog"]
    assert frequent_tags({"a": {"x": 2, "yy": 2, "z": 1}}) == ["yy", "x"]                       # ties
    assert frequent_tags({"a": {f"t{i}": 1 for i in range(9)}}, limit=3) == ["t0", "t1", "t2"]
    sentences = {"a": {"a photo of a dog sitting on the grass": 1, "a dog running along the beach": 1}}
    assert frequent_tags(sentences) == []                        # captions, not tags (ui_edit_user_metadata.py:11)
    assert frequent_tags("not json") == [] and frequent_tags({"a": {"x": "many"}}) == []


def test_words_leave_the_prompt_whole_with_their_emphasis():
    prompt = "a photo of sks dog, (wc_style:1.2), watercolor, [sks], WC_STYLE"
    assert without_words(prompt, ["wc_style"]) == "a photo of sks dog, watercolor, [sks]"
    assert without_words(prompt, ["sks"]) == "a photo of dog, (wc_style:1.2), watercolor, WC_STYLE"
    assert without_words("wc_styles and wc_style, a dog", ["wc_style"]) == "wc_styles and, a dog"   # whole words
    assert without_words("a sks   dog on grass", ["sks dog"]) == "a on grass"
    assert without_words("(sks:0.8) cat", ["sks"]) == "cat"
    assert reference_prompt("sks", ["sks"]) == "sks"             # nothing would be left: the prompt itself
    assert reference_prompt("a cat", []) == "a cat"
