"""Opt-in end-to-end tests: drive a running WebUI (AUTOMATIC1111 v1.10 or Forge) with this extension over HTTP.

Skipped unless `DYNFUSE_WEBUI_URL` gives the WebUI's base URL (e.g. `http://127.0.0.1:7861`). The WebUI must run
with `--api` and have this project installed as an extension; a small SD1.5 checkpoint makes the run fast (the
requests use 64x64 images and 2 steps). LoRA names (files in the host's Lora folder), with their defaults:

    DYNFUSE_LIVE_SUBJECT  dyn_subject   a subject LoRA for the loaded checkpoint (non-zero weights)
    DYNFUSE_LIVE_STYLE    dyn_style     a style LoRA for the loaded checkpoint (non-zero weights)
    DYNFUSE_LIVE_ZERO     dyn_zero      a LoRA whose weights are all zero (the same layers as the other two)
    DYNFUSE_LIVE_SDXL     dyn_sdxl      a LoRA for another base model (an SDXL LoRA when an SD1.5 checkpoint is loaded)
    DYNFUSE_LIVE_BROKEN   dyn_broken    a .safetensors file that does not parse
    DYNFUSE_LIVE_LORA_DIR (none)        the host's Lora folder, writable (test_webui_robustness.py's file tests)

The latent-refinement tests need guidance weights in the host (models/dynfuse: CLIP and DINO, any weights, random
ones too); they skip when the host says its weights are missing. DYNFUSE_LIVE_CLIP_ARCH (e.g. ViT-B-32) sends
`dynfuse_clip_arch` as an override setting with each guided request; empty uses the host's setting.

Run: `DYNFUSE_WEBUI_URL=http://127.0.0.1:7861 .venv/bin/python -m pytest -q tests/live` (about 2-3 minutes on
2 CPU cores with a tiny checkpoint). On an SDXL checkpoint, point the names at SDXL LoRAs and DYNFUSE_LIVE_SDXL at an
SD1.5 LoRA. The tests that use the builtin's functional mode switch the host option `lora_functional` and restore
it; they change the host's settings for as long as they run, so give the tests a WebUI of their own.

Tolerances: the host's builtin Lora merges W + dW into the weights, while DynFuse adds the LoRA's output in low
rank (W x + up(down(x))); both are exact maths but round differently, so `<dynlora:A:zero>` matches
`<lora:A:1>` within MERGE_TOLERANCE (mean |diff| over pixels, 0..255). With the builtin's functional mode
(`lora_functional`, A1111 only) the builtin also adds the low-rank output, but DynFuse computes both LoRAs side by
side with the scale folded into the up weights (lib_dynfuse/branches.py), so these are compared within the same
tolerance. Everything else here (extension off, repeated requests, plain images after fused ones) is compared
bit-exactly.
HTTP and image helpers are in tests/live/webui.py; load, interrupt and file tests in test_webui_robustness.py.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Dict

import pytest

from lib_dynfuse.args import CRITERIA, METHODS, FuseArgs
from tests.live.webui import (BASE, BROKEN, CLIP_ARCH, INFOTEXT_KEY, MERGE_TOLERANCE, PROMPT, SCRIPT_KEY, SDXL,
                              STYLE, SUBJECT, TIMEOUT, ZERO, Result, assert_same, call, decode, guided_txt2img,
                              mean_abs_diff, named, needs_webui, ok, require_guidance, txt2img)

pytestmark = needs_webui


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plain() -> Result:
    """The host's own image for the base request (no alwayson_scripts, no tags)."""
    return txt2img()


@pytest.fixture(scope="module")
def subject_lora() -> Result:
    return txt2img(f"{PROMPT} <lora:{SUBJECT}:1>")


@pytest.fixture()
def functional_mode():
    """Turn the builtin Lora's functional mode on for one test and restore the previous value."""
    options = ok("GET", "/sdapi/v1/options")
    if "lora_functional" not in options:
        pytest.skip("this host has no lora_functional option (Forge)")
    before = options["lora_functional"]
    ok("POST", "/sdapi/v1/options", {"lora_functional": True})
    try:
        yield
    finally:
        ok("POST", "/sdapi/v1/options", {"lora_functional": before})


# ----------------------------------------------------------------------------- the host itself
def test_host_is_deterministic_and_lora_changes_the_image(plain, subject_lora):
    """Preconditions of every comparison below: same seed = same pixels; the subject LoRA does something."""
    assert_same(txt2img().image, plain.image)
    assert mean_abs_diff(subject_lora.image, plain.image) > 5.0


# ----------------------------------------------------------------------------- routes
def test_info_route_describes_version_methods_criteria_defaults():
    info = ok("GET", "/dynfuse/v1/info")
    assert isinstance(info["version"], str) and info["version"]
    assert list(info["methods"]) == list(METHODS)
    assert list(info["criteria"]) == list(CRITERIA)
    defaults = FuseArgs()
    expected = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(FuseArgs)}
    assert info["defaults"] == expected


def test_script_info_lists_the_fields_in_order():
    scripts = ok("GET", "/sdapi/v1/script-info")
    ours = [s for s in scripts if s["name"] == SCRIPT_KEY and not s["is_img2img"]]
    assert len(ours) == 1, [s["name"] for s in scripts]
    assert ours[0]["is_alwayson"] is True
    args = ours[0]["args"]
    shown = [f for f in dataclasses.fields(FuseArgs) if not f.metadata["api_only"]]
    assert [a["label"] for a in args] == [f.metadata["label"] for f in shown]
    by_label = {a["label"]: a for a in args}
    defaults = FuseArgs()
    for f in shown:
        arg = by_label[f.metadata["label"]]
        if f.metadata["choices"]:
            assert arg["choices"] == list(f.metadata["choices"]), f.name
        if f.metadata["minimum"] is not None:
            assert (arg["minimum"], arg["maximum"]) == (f.metadata["minimum"], f.metadata["maximum"]), f.name
        if f.metadata["ui"] != "image" and f.metadata["ui"] != "lora":
            assert arg["value"] == getattr(defaults, f.name), f.name
    lora_choices = by_label[FuseArgs.__dataclass_fields__["subject"].metadata["label"]]["choices"]
    assert SUBJECT in lora_choices and STYLE in lora_choices


# ----------------------------------------------------------------------------- extension off = the host's image
def test_extension_off_gives_the_host_image(plain):
    assert_same(txt2img(fuse=[False]).image, plain.image)
    assert_same(txt2img(fuse=[False, SUBJECT, STYLE]).image, plain.image)
    off = txt2img(fuse=named(enabled=False, subject=SUBJECT, style=STYLE, method="merge"))
    assert_same(off.image, plain.image)
    assert INFOTEXT_KEY not in off.params


# ----------------------------------------------------------------------------- zero style LoRA = the subject LoRA alone
def test_zero_style_matches_builtin_lora_within_rounding(plain, subject_lora):
    fused = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{ZERO}>")
    assert fused.messages() == []
    assert mean_abs_diff(fused.image, subject_lora.image) <= MERGE_TOLERANCE
    assert mean_abs_diff(fused.image, plain.image) > 5.0


def test_zero_style_matches_builtin_functional_lora_within_rounding(functional_mode, plain):
    reference = txt2img(f"{PROMPT} <lora:{SUBJECT}:1>")
    fused = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{ZERO}>")
    assert fused.messages() == []
    assert mean_abs_diff(fused.image, reference.image) <= MERGE_TOLERANCE
    assert mean_abs_diff(fused.image, plain.image) > 5.0


def test_functional_mode_fusion_ignores_weights_a_merge_mode_job_left_merged():
    """The builtin leaves a merge-mode LoRA merged after its job and, in functional mode with no <lora> tag,
    does not restore it (networks.network_forward returns early when loaded_networks is empty): the fusion
    must still start from the checkpoint's own weights, as <lora:A:1> in functional mode does."""
    options = ok("GET", "/sdapi/v1/options")
    if "lora_functional" not in options:
        pytest.skip("this host has no lora_functional option (Forge)")
    before = options["lora_functional"]
    ok("POST", "/sdapi/v1/options", {"lora_functional": False})
    txt2img(f"{PROMPT} <lora:{STYLE}:1>")
    ok("POST", "/sdapi/v1/options", {"lora_functional": True})
    try:
        fused = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{ZERO}>")
        reference = txt2img(f"{PROMPT} <lora:{SUBJECT}:1>")
    finally:
        ok("POST", "/sdapi/v1/options", {"lora_functional": before})
    assert mean_abs_diff(fused.image, reference.image) <= MERGE_TOLERANCE


def test_zero_subject_with_merge_matches_style_lora(functional_mode):
    """merge = w_c dW_c + w_s dW_s: with a zero subject it is the style LoRA alone (within rounding)."""
    reference = txt2img(f"{PROMPT} <lora:{STYLE}:1>")
    fused = txt2img(fuse=named(enabled=True, subject=ZERO, style=STYLE, method="merge"))
    assert fused.messages() == []
    assert mean_abs_diff(fused.image, reference.image) <= MERGE_TOLERANCE


def test_merge_is_the_hosts_own_weight_merge_where_the_host_owns_the_weights():
    """Forge: `merge` goes to Forge's own weight merge as two patch sets, so a zero subject with the style is
    <lora:style:1> bit for bit (AUTOMATIC1111 bakes merge itself: its functional-mode test above)."""
    if "lora_functional" in ok("GET", "/sdapi/v1/options"):
        pytest.skip("AUTOMATIC1111: merge is baked by DynFuse, see test_zero_subject_with_merge_matches_style_lora")
    reference = txt2img(f"{PROMPT} <lora:{STYLE}:1>")
    fused = txt2img(fuse=named(enabled=True, subject=ZERO, style=STYLE, method="merge"))
    assert fused.messages() == []
    assert_same(fused.image, reference.image)


# ----------------------------------------------------------------------------- API forms
def test_named_dict_form_equals_tag_and_positional_forms(plain):
    by_tag = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{STYLE}:m=dynamic>")
    by_name = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="dynamic"))
    by_position = txt2img(fuse=[True, SUBJECT, STYLE, 1.0, 1.0, "dynamic"])
    assert by_name.messages() == []
    assert_same(by_name.image, by_tag.image)
    assert_same(by_position.image, by_name.image)
    assert mean_abs_diff(by_name.image, plain.image) > 5.0
    assert INFOTEXT_KEY in by_name.params


def test_methods_give_different_images():
    images = {m: txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method=m)) for m in METHODS}
    for r in images.values():
        assert r.messages() == []
    assert mean_abs_diff(images["dynamic"].image, images["merge"].image) > 0.5
    assert mean_abs_diff(images["klora"].image, images["merge"].image) > 0.5


def test_tag_items_override_the_ui_values():
    by_tag = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{STYLE}:method=merge:ws=0.5>")
    by_name = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="merge", style_weight=0.5))
    assert by_tag.messages() == []
    assert_same(by_tag.image, by_name.image)


def test_other_lora_tags_keep_working_beside_the_fusion():
    reference = txt2img(f"{PROMPT} <lora:{STYLE}:1> <lora:{SUBJECT}:1>")
    fused = txt2img(f"{PROMPT} <lora:{STYLE}:1> <dynlora:{SUBJECT}:{ZERO}>")
    assert fused.messages() == []
    assert mean_abs_diff(fused.image, reference.image) <= MERGE_TOLERANCE


def test_a_fused_lora_also_in_a_lora_tag_is_applied_once_with_a_message():
    alone = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{ZERO}>")
    both = txt2img(f"{PROMPT} <lora:{SUBJECT}:1> <dynlora:{SUBJECT}:{ZERO}>")
    assert_same(both.image, alone.image)
    assert any(SUBJECT in m for m in both.messages()), both.params


def test_heatmap_is_returned_only_when_asked():
    without = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE))
    asked = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, heatmap=True))
    assert len(without.images) == 1
    assert len(asked.images) == 2
    assert_same(asked.images[0], without.images[0])
    assert asked.images[1].shape != asked.images[0].shape


# ----------------------------------------------------------------------------- infotext round trip
def test_infotext_round_trip_reproduces_the_image():
    asked = FuseArgs(enabled=True, subject=SUBJECT, style=STYLE, method="klora", klora_alpha=2.0,
                     klora_scale="star", style_weight=0.8)
    first = txt2img(fuse=named(**{k: v for k, v in dataclasses.asdict(asked).items() if v is not None}))
    assert first.messages() == []
    assert f"{INFOTEXT_KEY}: " in first.info["infotexts"][0]

    parsed = ok("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + first.png_b64})
    value = parsed["parameters"][INFOTEXT_KEY]
    assert value == first.params[INFOTEXT_KEY]
    restored = FuseArgs.from_infotext(value)
    for f in dataclasses.fields(FuseArgs):
        if f.metadata["infotext"] is not None:
            assert getattr(restored, f.name) == getattr(asked, f.name), f.name

    again = txt2img(fuse=named(**{k: v for k, v in dataclasses.asdict(restored).items() if v is not None}))
    assert_same(again.image, first.image)


# ----------------------------------------------------------------------------- bad input: an image and a message
@pytest.mark.parametrize("case", ["unknown_subject", "unknown_style", "one_name", "wrong_base_model", "broken_file",
                                  "bad_method", "unknown_field", "bad_positional_type"])
def test_bad_input_gives_the_plain_image_and_a_message(case, plain):
    prompt, fuse, needle = PROMPT, None, None
    if case == "unknown_subject":
        fuse, needle = named(enabled=True, subject="no_such_lora_x", style=STYLE), "no_such_lora_x"
    elif case == "unknown_style":
        prompt, needle = f"{PROMPT} <dynlora:{SUBJECT}:no_such_lora_y>", "no_such_lora_y"
    elif case == "one_name":
        prompt, needle = f"{PROMPT} <dynlora:{SUBJECT}>", "two"
    elif case == "wrong_base_model":
        prompt, needle = f"{PROMPT} <dynlora:{SUBJECT}:{SDXL}>", SDXL
    elif case == "broken_file":
        fuse, needle = named(enabled=True, subject=SUBJECT, style=BROKEN), BROKEN
    elif case == "bad_method":
        fuse, needle = named(enabled=True, subject=SUBJECT, style=STYLE, method="nope"), "method"
    elif case == "unknown_field":
        fuse, needle = named(enabled=True, subject=SUBJECT, style=STYLE, no_such_field=1), "no_such_field"
    elif case == "bad_positional_type":
        fuse, needle = [True, SUBJECT, STYLE, "heavy"], "subject_weight"
    status, out = call("POST", "/sdapi/v1/txt2img", dict(BASE, prompt=prompt,
                       **({"alwayson_scripts": {SCRIPT_KEY: {"args": fuse}}} if fuse else {})))
    assert status == 200, f"{case}: {status} {str(out)[:2000]}"
    result = Result(decode(out["images"][0]), [], json.loads(out["info"]), out["images"][0])
    messages = result.messages()
    assert any(needle in m for m in messages), f"{case}: no message naming {needle!r} in {result.params}"
    assert_same(result.image, plain.image, case)


# ----------------------------------------------------------------------------- the model is restored
def test_plain_image_unchanged_after_fused_runs(plain):
    for method in METHODS:
        txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method=method, heatmap=True))
    txt2img(f"{PROMPT} <lora:{STYLE}:0.7> <dynlora:{SUBJECT}:{STYLE}:te=merge>")
    assert_same(txt2img().image, plain.image)
    assert_same(txt2img(f"{PROMPT} <lora:{SUBJECT}:1>").image, txt2img(f"{PROMPT} <lora:{SUBJECT}:1>").image)


def test_plain_and_fused_images_unchanged_after_an_interrupted_fused_run(plain):
    fused_before = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE))
    done: Dict[str, Any] = {}

    def long_run():
        done["result"] = call("POST", "/sdapi/v1/txt2img", dict(
            BASE, steps=150, alwayson_scripts={SCRIPT_KEY: {"args": named(enabled=True, subject=SUBJECT, style=STYLE)}}))

    worker = threading.Thread(target=long_run, daemon=True)
    worker.start()
    deadline = time.time() + 120
    started = False
    while time.time() < deadline and worker.is_alive():
        progress = ok("GET", "/sdapi/v1/progress?skip_current_image=true")
        if progress["state"].get("sampling_step", 0) >= 2:
            started = True
            break
        time.sleep(0.05)
    assert started, "the long run never reached step 2"
    ok("POST", "/sdapi/v1/interrupt")
    worker.join(timeout=TIMEOUT)
    assert not worker.is_alive()
    status, out = done["result"]
    assert status == 200, str(out)[:2000]
    assert ok("GET", "/sdapi/v1/progress?skip_current_image=true")["state"]["interrupted"] is True
    assert_same(txt2img().image, plain.image)
    assert_same(txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE)).image, fused_before.image)


# ----------------------------------------------------------------------------- latent refinement (guidance)
GUIDED = dict(enabled=True, subject=SUBJECT, style=STYLE, guidance=True, reference_steps=1)


def test_guidance_by_the_tag_alone_equals_guidance_by_api_args():
    """`<dynlora:...:g=1>` with no script args turns guidance on: references, corrections, the same pixels as the
    API's fields (the references of the second request come from the cache)."""
    tag = guided_txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{STYLE}:m=dynamic:g=1:refsteps=1>", seed=4242)
    require_guidance(tag)
    assert "DynFuse guidance" in tag.params, tag.params
    assert "guidance: True" in tag.params[INFOTEXT_KEY]
    api = guided_txt2img(fuse=named(**GUIDED), seed=4242)
    assert "DynFuse guidance" in api.params
    assert_same(tag.image, api.image, "tag-only vs API-field guidance")
    unguided = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE), seed=4242)
    assert "DynFuse guidance" not in unguided.params


def test_guidance_references_come_back_only_when_asked():
    shown = guided_txt2img(fuse=named(**GUIDED), seed=4243, settings={"dynfuse_show_references": True})
    require_guidance(shown)
    assert len(shown.images) == 3 and shown.info["infotexts"][1:] == ["DynFuse subject reference",
                                                                       "DynFuse style reference"]
    again = guided_txt2img(fuse=named(**GUIDED), seed=4243)
    assert len(again.images) == 1
    assert_same(again.image, shown.image, "cached references")


def test_missing_guidance_weights_give_the_unguided_image_and_a_one_line_message():
    """An architecture nobody has weights for: 200, the fused image without guidance, the reason on one line."""
    missing = txt2img(fuse=named(**GUIDED), seed=4244, override_settings={"dynfuse_clip_arch": "RN50"})
    unguided = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE), seed=4244)
    assert_same(missing.image, unguided.image, "missing weights")
    message = missing.params.get("DynFuse message", "")
    assert "guidance is off" in message and "RN50" in message and "\n" not in message, message
    assert "DynFuse guidance" not in missing.params
    assert missing.info["infotexts"][0].count("\n") <= 2      # prompt, negative prompt, one parameters line


# ----------------------------------------------------------------------------- scores (Table 1 metrics)
@pytest.fixture()
def score_clip_arch():
    """DYNFUSE_LIVE_CLIP_ARCH as the host's scoring CLIP for one test (the score route reads the host's settings)."""
    if not CLIP_ARCH:
        yield
        return
    before = ok("GET", "/sdapi/v1/options").get("dynfuse_score_clip_arch", "")
    ok("POST", "/sdapi/v1/options", {"dynfuse_score_clip_arch": CLIP_ARCH})
    try:
        yield
    finally:
        ok("POST", "/sdapi/v1/options", {"dynfuse_score_clip_arch": before})


def test_score_route_answers_scores_or_a_clear_message(plain, subject_lora, score_clip_arch):
    status, out = call("POST", "/dynfuse/v1/score", {"images": [plain.png_b64, subject_lora.png_b64],
                                                     "subject_refs": [plain.png_b64],
                                                     "style_refs": subject_lora.png_b64, "names": ["plain", "lora"]})
    if status == 503:
        pytest.skip(f"the host has no scoring weights: {out['error'][:200]}")
    assert status == 200, out
    rows = {r["image"]: r for r in out["per_image"]}
    assert rows["plain"]["clip_score"] == pytest.approx(1.0, abs=1e-3)      # an image is its own subject reference
    assert rows["lora"]["style_sim"] == pytest.approx(1.0, abs=1e-3)
    assert out["clip_score"] == pytest.approx((rows["plain"]["clip_score"] + rows["lora"]["clip_score"]) / 2)
    status, bad = call("POST", "/dynfuse/v1/score", {"images": ["not base64!"], "subject_refs": plain.png_b64,
                                                     "style_refs": plain.png_b64})
    assert status == 400 and "images[0]" in bad["error"], bad


def test_scores_go_into_the_infotext_and_leave_the_image(plain, subject_lora):
    fields = dict(enabled=True, subject=SUBJECT, style=STYLE, subject_image=plain.png_b64,
                  style_image=subject_lora.png_b64)
    settings = {"override_settings": {"dynfuse_clip_arch": CLIP_ARCH}} if CLIP_ARCH else {}
    scored = txt2img(fuse=named(score=True, **fields), seed=4245, **settings)
    unscored = txt2img(fuse=named(**fields), seed=4245)
    assert_same(scored.image, unscored.image, "scores change nothing")
    message = scored.params.get("DynFuse message", "")
    if "no CLIP" in message or "no DINO" in message:
        pytest.skip(f"the host has no scoring weights: {message[:200]}")
    value = scored.params.get("DynFuse scores", "")
    assert value.startswith("CLIP score ") and "Style Sim " in value and "DINO score " in value, scored.params
    assert "DynFuse scores: CLIP score" in scored.info["infotexts"][0]
    assert "score: True" in scored.params[INFOTEXT_KEY]


def test_default_method_is_merge_and_balance_tilts_it_like_the_style_weight():
    """A request that names no method gets merge; balance 0.3 is style weight 0.6 pixel for pixel, through the host's
    own weight handling (A1111's baked weights, Forge's patch sets), and the infotext names it."""
    default = txt2img(fuse=[{"enabled": True, "subject": SUBJECT, "style": STYLE}])
    merge = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="merge"))
    assert_same(default.image, merge.image, "no method named: merge")
    tilted = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="merge", balance=0.3))
    weighted = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="merge", style_weight=0.6))
    assert_same(tilted.image, weighted.image, "balance 0.3 against style weight 0.6")
    assert "balance: 0.3" in str(tilted.params[INFOTEXT_KEY]) and "method: merge" in str(default.params[INFOTEXT_KEY])
