"""Opt-in end-to-end tests of the X/Y/Z plot axes and the step windows against a running WebUI (see
test_webui_http.py for the set-up: `DYNFUSE_WEBUI_URL`, the LoRA names, the tolerances; helpers in webui.py).

The plot is driven as a user of the API drives it: `script_name` "x/y/z plot", the axes by their index in the
plot's "X type" choices from `GET /sdapi/v1/script-info`, values of an axis with choices in its dropdown
argument (xyz_grid.py:546-553), `include_lone_images` so the cells come back after the grid.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

from lib_dynfuse.hosts.xyz import PAIR_LABEL
from tests.live.webui import (BASE, MERGE_TOLERANCE, PROMPT, SCRIPT_KEY, STYLE, SUBJECT, ZERO, assert_same, decode,
                              mean_abs_diff, named, needs_webui, ok, txt2img)

PLOT = "x/y/z plot"

pytestmark = needs_webui


def axis_labels() -> List[str]:
    """The plot's txt2img axis labels, in index order (the choices of its first argument, "X type")."""
    info = ok("GET", "/sdapi/v1/script-info")
    plot = next((s for s in info if s["name"] == PLOT and not s["is_img2img"]), None)
    if plot is None:
        pytest.skip("this WebUI has no X/Y/Z plot script")
    choices = plot["args"][0]["choices"]
    return [c[0] if isinstance(c, (list, tuple)) else c for c in choices]   # gradio 4 lists (label, value)


def plot_request(x: tuple, y: tuple, fuse: Dict[str, Any], **overrides) -> Dict[str, Any]:
    """x, y: (label, text values, dropdown values) -> a txt2img body running the plot with lone images."""
    labels = axis_labels()
    args = [labels.index(x[0]), x[1], x[2], labels.index(y[0]), y[1], y[2], 0, "", [],
            True, True, False, False, False, False, False, 0, False]
    return dict(BASE, script_name=PLOT, script_args=args, alwayson_scripts={SCRIPT_KEY: {"args": [fuse]}},
                **overrides)


def cells(body: Dict[str, Any]) -> tuple:
    out = ok("POST", "/sdapi/v1/txt2img", body)
    info = json.loads(out["info"])
    images = [decode(b) for b in out["images"]]
    return images[1:], info.get("infotexts", [])[1:]     # the grid comes first


def test_the_plot_lists_the_dynfuse_axes():
    labels = axis_labels()
    for want in ("DynFuse Method", "DynFuse Criterion", "DynFuse Subject weight", "DynFuse Style weight",
                 "DynFuse guidance (on/off)", "DynFuse Guidance strength m", "DynFuse Style from", PAIR_LABEL):
        assert want in labels, (want, labels)
    assert len(labels) == len(set(labels))          # registered once, however often the host ran our callbacks


def test_a_2x2_plot_over_method_and_style_weight_gives_four_different_images():
    body = plot_request(("DynFuse Method", "", ["dynamic", "merge"]), ("DynFuse Style weight", "0.5, 1", []),
                        {"subject": SUBJECT, "style": STYLE})
    images, infotexts = cells(body)
    assert len(images) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert mean_abs_diff(images[i], images[j]) > 0.05, (i, j)
    want = [("dynamic", "0.5"), ("merge", "0.5"), ("dynamic", None), ("merge", None)]   # ws 1.0 is the default
    for text, (method, ws) in zip(infotexts, want):
        assert f"method: {method}" in text and (f"ws: {ws}" in text if ws else "ws:" not in text), text
    # a cell is the generation its settings give on their own
    alone = txt2img(fuse=named(subject=SUBJECT, style=STYLE, method="merge", style_weight=0.5))
    assert_same(images[1], alone.image, "the merge / 0.5 cell")


def test_a_lora_pair_axis_fuses_each_pair_with_the_accordion_off():
    body = plot_request((PAIR_LABEL, f"{SUBJECT}|{STYLE}, {SUBJECT}|{ZERO}", []), ("Nothing", "", []),
                        {"enabled": False})
    images, infotexts = cells(body)
    assert len(images) == 2 and mean_abs_diff(images[0], images[1]) > 0.05
    assert f"style: {STYLE}" in infotexts[0] and f"style: {ZERO}" in infotexts[1]


def test_a_style_window_changes_the_image_and_an_empty_one_is_the_subject_alone():
    full = txt2img(fuse=named(subject=SUBJECT, style=STYLE), steps=4)
    late = txt2img(fuse=named(subject=SUBJECT, style=STYLE, style_start=0.5, style_end=1.0), steps=4)
    assert "s_start: 0.5" in late.params.get("DynFuse", "")
    assert mean_abs_diff(full.image, late.image) > 0.05
    # (0, 0): the style never acts in the UNet; with the text encoder off this is the subject's UNet part alone
    empty = txt2img(fuse=named(subject=SUBJECT, style=STYLE, style_start=0.0, style_end=0.0, text_encoder="off"),
                    steps=4)
    subject_unet = txt2img(f"{PROMPT} <lora:{SUBJECT}:0:1>", steps=4)
    plain = txt2img(steps=4)
    assert mean_abs_diff(empty.image, subject_unet.image) < MERGE_TOLERANCE, mean_abs_diff(empty.image, subject_unet.image)
    assert mean_abs_diff(subject_unet.image, plain.image) > 5 * MERGE_TOLERANCE


def test_windows_by_the_tag_equal_windows_by_the_api():
    by_api = txt2img(fuse=named(subject=SUBJECT, style=STYLE, subject_end=0.5, style_start=0.25), steps=4)
    by_tag = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{STYLE}:m=dynamic:ce=0.5:ss=0.25>", steps=4)
    assert_same(by_api.image, by_tag.image, "windows by the tag vs the API")
