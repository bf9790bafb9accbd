"""FuseArgs: positional vs dict values, the prompt tag, validation messages, the infotext round trip."""
from dataclasses import fields

import pytest

from lib_dynfuse.args import ArgsError, FuseArgs


def positional(args: FuseArgs):
    return [getattr(args, f.name) for f in fields(FuseArgs)]


def test_positional_values_follow_field_order():
    want = FuseArgs(enabled=True, subject="a", style="b", subject_weight=0.7, method="klora", klora_beta=0.9)
    assert FuseArgs.from_values(positional(want)) == want


def test_dict_followed_by_ui_defaults_is_the_dict_over_the_defaults():
    # the host fills the slots the request leaves out with the ui() defaults (api.py:335-361)
    tail = positional(FuseArgs(klora_alpha=2.0))[1:]
    got = FuseArgs.from_values([{"subject": "a", "style": "b", "method": "merge"}] + tail)
    assert got == FuseArgs(enabled=True, subject="a", style="b", method="merge", klora_alpha=2.0)


def test_dict_alone_and_explicit_disable():
    assert FuseArgs.from_values([{"subject": "a", "style": "b"}]) == FuseArgs(enabled=True, subject="a", style="b")
    assert FuseArgs.from_values([{"enabled": False, "subject": "a"}]).enabled is False


def test_none_values_mean_not_given():
    assert FuseArgs.from_values([True, "a", "b", None, None]) == FuseArgs(enabled=True, subject="a", style="b")


def test_too_many_values_and_unknown_names_are_refused():
    with pytest.raises(ArgsError, match="expected at most"):
        FuseArgs.from_values([False] * (len(fields(FuseArgs)) + 1))
    with pytest.raises(ArgsError, match="unknown field.*'colour'"):
        FuseArgs.from_values([{"colour": "red"}])


@pytest.mark.parametrize("data, message", [
    ({"method": "best"}, "method must be one of dynamic, klora, merge, got 'best'"),
    ({"criterion": "l2"}, "criterion must be one of kl, js, cosine, dot"),
    ({"subject_weight": 7}, "subject_weight must be between -2.0 and 3.0, got 7.0"),
    ({"subject_weight": "heavy"}, "subject_weight must be a float, got 'heavy'"),
    ({"heatmap": "maybe"}, "heatmap must be a bool"),
    ({"subject": "a", "style": ""}, "needs two LoRAs, a subject and a style"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start must not be after guidance_end"),
    ({"subject_start": 0.6, "subject_end": 0.4}, "subject_start must not be after subject_end (0.6 > 0.4)"),
    ({"style_start": 0.9, "style_end": 0.1}, "style_start must not be after style_end"),
    ({"style_end": 1.5}, "style_end must be between 0.0 and 1.0, got 1.5"),
])
def test_validation_messages(data, message):
    with pytest.raises(ArgsError) as err:
        FuseArgs.from_values([{"subject": "a", "style": "b", **data}]).validate()
    assert message in str(err.value)


def test_tag_names_and_overrides_on_top_of_ui_settings():
    ui = FuseArgs(criterion="js", style_weight=0.5)
    got = ui.with_tag(["subj", "sty"], {"method": "klora", "ws": "0.8", "alpha": "2", "te": "off"})
    assert got == FuseArgs(enabled=True, subject="subj", style="sty", criterion="js", style_weight=0.8,
                           method="klora", klora_alpha=2.0, text_encoder="off")


def test_tag_errors_name_the_problem():
    with pytest.raises(ArgsError, match=r"two LoRA names \(got 1: 'subj'\)"):
        FuseArgs().with_tag(["subj"], {})
    with pytest.raises(ArgsError, match="unknown tag item 'mode'"):
        FuseArgs().with_tag(["a", "b"], {"mode": "kl"})
    with pytest.raises(ArgsError, match="ws must|style_weight must be a float"):
        FuseArgs().with_tag(["a", "b"], {"ws": "lots"})


def test_infotext_round_trip_with_quoting():
    args = FuseArgs(enabled=True, subject="my, lora: v2", style='st"yle', subject_weight=0.75, method="klora",
                    klora_scale="star", text_encoder="merge", guidance=True, subject_prompt="a dog, sitting")
    text = args.infotext({"subject": "abc123", "style": "def456"})
    assert "hash_subject: abc123" in text and "hash_style: def456" in text
    back = FuseArgs.from_infotext(text)
    assert back == args


def test_infotext_keeps_defaults_out_but_names_and_method_in():
    assert FuseArgs(enabled=True, subject="a", style="b").infotext() == "subject: a, style: b, method: merge"
    assert FuseArgs(enabled=True, subject="a", style="b", method="merge", balance=0.3).infotext() == \
        "subject: a, style: b, method: merge, balance: 0.3"
    assert FuseArgs.from_infotext("subject: a, style: b, method: merge, balance: 0.3").balance == 0.3


# the positional API order of every field before the step windows (a client that sends positional values keeps
# working): new fields go at the end
FIELDS_BEFORE_WINDOWS = [
    "enabled", "subject", "style", "subject_weight", "style_weight", "method", "criterion", "klora_alpha",
    "klora_beta", "klora_scale", "text_encoder", "heatmap", "guidance", "guidance_scale", "guidance_start",
    "guidance_end", "guidance_grad", "guidance_decoder", "subject_prompt", "style_prompt", "reference_steps",
    "subject_image", "style_image", "score"]


def test_step_windows_come_after_the_older_fields():
    names = FuseArgs.field_names()
    assert names[:len(FIELDS_BEFORE_WINDOWS)] == FIELDS_BEFORE_WINDOWS
    assert {"subject_start", "subject_end", "style_start", "style_end"} <= set(names[len(FIELDS_BEFORE_WINDOWS):])
    old_client = positional(FuseArgs(enabled=True, subject="a", style="b", method="merge"))[:len(FIELDS_BEFORE_WINDOWS)]
    got = FuseArgs.from_values(old_client)
    assert got.method == "merge" and got.window("subject") == (0.0, 1.0) and got.window("style") == (0.0, 1.0)


def test_step_windows_in_the_tag_the_infotext_and_the_api():
    got = FuseArgs().with_tag(["a", "b"], {"cs": "0.2", "ce": "0.9", "ss": "0.5", "se": "1"}).validate()
    assert got.window("subject") == (0.2, 0.9) and got.window("style") == (0.5, 1.0)
    assert got.windowed() == ("subject", "style")
    assert FuseArgs().with_tag(["a", "b"], {"s_start": "0.3"}).window("style") == (0.3, 1.0)
    text = got.infotext()
    assert "c_start: 0.2" in text and "c_end: 0.9" in text and "s_start: 0.5" in text and "s_end" not in text
    assert FuseArgs.from_infotext(text) == got
    named = FuseArgs.from_values([{"subject": "a", "style": "b", "style_start": 0.5, "style_end": 0.75}])
    assert named.window("style") == (0.5, 0.75) and named.windowed() == ("style",)
    assert FuseArgs(subject_start=0.0, subject_end=1.0).windowed() == ()


def test_with_changes_reads_each_value_as_its_field_type():
    base = FuseArgs(enabled=True, subject="a", style="b")
    got = base.with_changes({"method": "klora", "guidance": "False", "style_weight": "0.5", "subject_end": 0.5})
    assert got == FuseArgs(enabled=True, subject="a", style="b", method="klora", style_weight=0.5, subject_end=0.5)
    assert base.with_changes({"guidance": "True"}).guidance is True
    with pytest.raises(ArgsError, match="unknown field"):
        base.with_changes({"colour": "red"})
    with pytest.raises(ArgsError, match="style_weight must be a float"):
        base.with_changes({"style_weight": "lots"})
