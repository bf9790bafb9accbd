"""lib_dynfuse/hosts/ui.py with a recording gradio stand-in: controls from FuseArgs metadata, no side effects."""
import importlib.util
import json
import os
import re
from dataclasses import fields
from html import unescape

import pytest

from lib_dynfuse.args import METHODS, FuseArgs
from lib_dynfuse.hosts import ui
from tests.fixtures.grown_args import GrownArgs

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture()
def gr():
    spec = importlib.util.spec_from_file_location("gradio_standin", os.path.join(HERE, "standins", "gradio.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accordion_class(gr):
    class Accordion(gr.Checkbox):       # modules/ui_components.py:88-144: a checkbox that is also a block
        def __init__(self, value, **kwargs):
            super().__init__(value, **kwargs)
            self.open = value
    return Accordion


def build(gr, names=("a", "b"), refreshed=("a", "b", "c"), tooltip_kw=True):
    with gr.Blocks():
        return ui.build(gr, accordion_class(gr), "txt2img", lambda: list(names), lambda: list(refreshed),
                        tooltip_kw=tooltip_kw)


def test_controls_follow_fuseargs_fields(gr):
    controls = build(gr)
    specs = list(fields(FuseArgs))
    assert len(controls) == len(specs)
    defaults = FuseArgs()
    for control, f in zip(controls, specs):
        m = f.metadata
        assert control.kwargs["label"] == m["label"] and control.kwargs.get("tooltip") == (
            None if f.name == "enabled" else m["tip"])
        assert control.elem_id == f"dynfuse_txt2img_{f.name}"
        if m["ui"] != "image":
            assert control.value == getattr(defaults, f.name), f.name
        if m["choices"]:
            assert isinstance(control, gr.Radio) and control.choices == list(m["choices"])
        if m["minimum"] is not None:
            assert isinstance(control, gr.Slider)
            assert (control.minimum, control.maximum, control.step) == (m["minimum"], m["maximum"], m["step"])
    assert controls[0].open is False                     # the accordion is off by default
    # "" is a choice so that gradio 4 shows an empty dropdown for the empty default, not the first LoRA
    assert controls[1].choices == ["", "a", "b"] and controls[2].choices == ["", "a", "b"]
    assert controls[1].value == "" and controls[2].value == ""


def test_build_is_repeatable_without_side_effects(gr):
    first = [(type(c).__name__, c.kwargs, c.value) for c in build(gr)]
    second = [(type(c).__name__, c.kwargs, c.value) for c in build(gr)]
    assert first == second


def test_no_tooltip_keyword_where_the_host_lacks_it(gr):
    assert all("tooltip" not in c.kwargs for c in build(gr, tooltip_kw=False))


def test_refresh_button_updates_both_dropdowns(gr):
    controls = build(gr)
    refresh = next(b for b in gr.created if isinstance(b, gr.Button) and "dynfuse-refresh" in b.kwargs["elem_classes"])
    (kind, fn, inputs, outputs, _), = refresh.events
    assert kind == "click" and outputs == [controls[1], controls[2]]
    assert fn() == (gr.update(choices=["", "a", "b", "c"]), gr.update(choices=["", "a", "b", "c"]))


def test_card_action_fills_one_dropdown_and_opens_the_accordion(gr):
    controls = build(gr)
    box = next(b for b in gr.created if getattr(b, "elem_id", None) == "dynfuse_txt2img_card_action")
    (kind, fn, inputs, outputs, _), = box.events
    assert outputs == [controls[1], controls[2], controls[0]]
    assert fn("style\nmy lora\n3") == (gr.update(), gr.update(value="my lora"), gr.update(value=True))
    assert fn("subject\nx\n1") == (gr.update(value="x"), gr.update(), gr.update(value=True))
    assert fn("nonsense") == (gr.update(), gr.update(), gr.update())


def test_tips_for_the_javascript_cover_every_field(gr):
    build(gr)
    html = next(b for b in gr.created if isinstance(b, gr.HTML)).value
    data = json.loads(unescape(re.search(r'data-tips="([^"]*)"', html).group(1)))
    assert set(data) == {f"dynfuse_txt2img_{f.name}" for f in fields(FuseArgs)}
    assert data["dynfuse_txt2img_method"]["tip"] == next(f for f in fields(FuseArgs) if f.name == "method").metadata["tip"]


def test_javascript_reads_the_same_ids():
    js = open(os.path.join(os.path.dirname(HERE), "javascript", "dynfuse.js"), encoding="utf8").read()
    assert "dynfuse-tips-data" in js and "_card_action" in js and "titles" in js


def _inside(block):
    """Every block created inside `block`, depth first."""
    out = []
    for child in block.children:
        out.append(child)
        out.extend(_inside(child))
    return out


def _group(gr, name):
    return next(b for b in gr.created if isinstance(b, gr.Accordion) and b.kwargs.get("elem_id") == name)


def test_method_dependent_controls_show_only_for_their_methods(gr):
    controls = dict(zip(FuseArgs.field_names(), build(gr)))
    dependent = ui.method_dependent()
    assert {"criterion", "klora_alpha", "klora_beta", "klora_scale"} <= set(dependent)
    for f in fields(FuseArgs):   # at first: what the default method shows
        hidden = controls[f.name].kwargs.get("visible", True) is False
        assert hidden == (f.name in dependent and FuseArgs().method not in f.metadata["methods"]), f.name
    (kind, fn, inputs, outputs, _), = controls["method"].events
    assert kind == "change" and inputs == [controls["method"]] and outputs == [controls[n] for n in dependent]
    for method in METHODS:
        shown = {n: u["visible"] for n, u in zip(dependent, fn(method))}
        assert shown["criterion"] == (method == "dynamic")
        assert shown["klora_alpha"] == shown["klora_beta"] == shown["klora_scale"] == (method == "klora")


def test_a_new_method_and_its_field_take_their_visibility_from_the_metadata(gr, monkeypatch):
    monkeypatch.setattr(ui, "FuseArgs", GrownArgs)
    controls = dict(zip(GrownArgs.field_names(), build(gr)))
    assert controls["balance"].kwargs["visible"] is False and "blend" in controls["method"].choices
    (_, fn, _, outputs, _), = controls["method"].events
    shown = {o.elem_id: u["visible"] for o, u in zip(outputs, fn("blend"))}
    assert shown["dynfuse_txt2img_balance"] is True and shown["dynfuse_txt2img_criterion"] is False


def test_windows_and_guidance_sit_in_their_own_sub_accordions(gr):
    controls = dict(zip(FuseArgs.field_names(), build(gr)))
    windows, guidance = _group(gr, "dynfuse_txt2img_windows_group"), _group(gr, "dynfuse_txt2img_guidance_group")
    in_windows, in_guidance = _inside(windows), _inside(guidance)
    for f in fields(FuseArgs):
        section = f.metadata["section"]
        assert (controls[f.name] in in_windows) == (section == "windows"), f.name
        assert (controls[f.name] in in_guidance) == (section == "guidance"), f.name
    assert [c.elem_id for c in in_windows if isinstance(c, gr.Slider)] == [
        "dynfuse_txt2img_subject_start", "dynfuse_txt2img_subject_end", "dynfuse_txt2img_style_start",
        "dynfuse_txt2img_style_end"]
    assert gr.created.index(windows) < gr.created.index(guidance)   # windows first: a fusion setting
    assert windows.kwargs["open"] is False and guidance.kwargs["open"] is False


def test_the_guidance_checkbox_does_not_repeat_its_header(gr):
    controls = dict(zip(FuseArgs.field_names(), build(gr)))
    guidance = _group(gr, "dynfuse_txt2img_guidance_group")
    first = next(c for c in _inside(guidance) if isinstance(c, gr.Component))
    assert first is controls["guidance"]
    header, label = guidance.kwargs["label"].lower(), first.label.lower()
    words = {w.strip("(),.") for w in label.split()} & {w.strip("(),.") for w in header.split()}
    assert label not in header and header.split("(")[0].strip() not in label
    assert not words & {"latent", "refinement", "clip/dino", "guidance"}, words


def test_the_method_the_page_starts_with_sets_what_shows(gr, tmp_path):
    """The WebUI's ui-config.json keeps the default of the version that wrote it and sets the radio to it after
    the controls exist, with no change event: the dependent controls must start right for that method."""
    config = tmp_path / "ui-config.json"
    config.write_text(json.dumps({"customscript/dynfuse.py/txt2img/Method/value": "dynamic",
                                  "customscript/dynfuse.py/img2img/Method/value": "klora"}))
    assert ui.saved_value(str(config), "dynfuse.py", "txt2img", "method") == "dynamic"
    assert ui.saved_value(str(config), "dynfuse.py", "img2img", "method") == "klora"
    assert ui.saved_value(str(config), "other.py", "txt2img", "method") is None
    assert ui.saved_value(str(tmp_path / "missing.json"), "dynfuse.py", "txt2img", "method") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert ui.saved_value(str(tmp_path / "bad.json"), "dynfuse.py", "txt2img", "method") is None
    assert ui.saved_value(None, "dynfuse.py", "txt2img", "method") is None
    for method in (*METHODS, None, "gone"):
        with gr.Blocks():
            controls = dict(zip(FuseArgs.field_names(), ui.build(gr, accordion_class(gr), "txt2img", list, list,
                                                                 method=method)))
        start = method if method in METHODS else FuseArgs().method
        for name in ui.method_dependent():
            shown = controls[name].kwargs.get("visible", True) is not False
            assert shown == (start in {f.name: f for f in fields(FuseArgs)}[name].metadata["methods"]), (method, name)
