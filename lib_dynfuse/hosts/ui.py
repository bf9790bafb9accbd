"""Gradio controls of the DynFuse accordion, built from the FuseArgs field metadata (labels, tips, ranges).

Works on gradio 3.41 (AUTOMATIC1111) and 4.x (Forge): only constructor arguments both accept, `gr.update`,
no `.style()`. gradio is imported inside `build`, so this module imports without it. `build` has no side
effect besides creating components: the host calls `ui()` several times (api.py:315-333).
"""
from __future__ import annotations

import html
import json
from dataclasses import fields
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..args import FuseArgs
from .common import INFOTEXT_KEY, infotext_field_value

GUIDANCE_FIRST = "guidance"     # fields from here on go into the nested "latent refinement" accordion


def tips() -> Dict[str, Dict[str, str]]:
    """field name -> {label, tip}: what the JS puts into the host's hints (`titles`) and element titles."""
    return {f.name: {"label": f.metadata["label"], "tip": f.metadata["tip"]} for f in fields(FuseArgs)}


def elem_id(tab: str, name: str) -> str:
    return f"dynfuse_{tab}_{name}"


def lora_dropdown_choices(names) -> List[str]:
    """The LoRA dropdowns' choices: "" (none picked) first, then the host's LoRA names."""
    return [""] + [n for n in names if n]


def build(gr: Any, accordion_cls: Any, tab: str, lora_choices: Callable[[], List[str]],
          refresh: Callable[[], List[str]], tooltip_kw: bool = False) -> List[Any]:
    """Create the controls in FuseArgs field order (= the order of the positional API args) and return them.

    `accordion_cls` is the host's InputAccordion (a hidden checkbox that is the `enabled` value);
    `tooltip_kw`: the host's gradio accepts `tooltip=` (A1111's gradio_extensons.py IOComponent_init).
    """
    defaults = FuseArgs()
    by_name = {f.name: f for f in fields(FuseArgs)}
    controls: Dict[str, Any] = {}
    # "" = no LoRA picked: it must be a choice, or gradio 4 shows the first LoRA while the value stays empty
    choices = lora_dropdown_choices(lora_choices())

    def kw(name: str) -> Dict[str, Any]:
        m = by_name[name].metadata
        out = dict(label=m["label"], elem_id=elem_id(tab, name), elem_classes=["dynfuse-control"])
        if tooltip_kw:
            out["tooltip"] = m["tip"]
        return out

    def make(name: str) -> Any:
        f = by_name[name]
        m, value = f.metadata, getattr(defaults, name)
        if m["ui"] == "lora":
            return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **kw(name))
        if m["ui"] == "image":
            return gr.Image(type="pil", **kw(name))
        if m["choices"]:
            return gr.Radio(choices=list(m["choices"]), value=value, **kw(name))
        if f.type in ("bool", bool):
            return gr.Checkbox(value=value, **kw(name))
        if m["minimum"] is not None:
            return gr.Slider(minimum=m["minimum"], maximum=m["maximum"], step=m["step"], value=value, **kw(name))
        return gr.Textbox(value=value, lines=1, **kw(name))

    names = [f.name for f in fields(FuseArgs)]
    first_guidance = names.index(GUIDANCE_FIRST)
    acc_kw = kw("enabled")
    acc_kw.pop("elem_classes")
    acc_kw.pop("tooltip", None)
    with accordion_cls(False, **acc_kw) as enabled:
        controls["enabled"] = enabled
        gr.HTML(value=tips_html(tab), visible=True, elem_classes=["dynfuse-tips"])
        with gr.Row():
            controls["subject"] = make("subject")
            controls["style"] = make("style")
            refresh_button = gr.Button(value="\U0001f504", elem_id=elem_id(tab, "refresh"),
                                       elem_classes=["tool", "dynfuse-refresh"])
        with gr.Row():
            controls["subject_weight"] = make("subject_weight")
            controls["style_weight"] = make("style_weight")
        for name in names[3:first_guidance]:
            if name in ("subject_weight", "style_weight"):
                continue
            controls[name] = make(name)
        with gr.Accordion(label="Latent refinement (CLIP/DINO guidance)", open=False,
                          elem_id=elem_id(tab, "guidance_group")):
            for name in names[first_guidance:]:
                controls[name] = make(name)

        # javascript/dynfuse.js writes "role\nname\ncounter" here from a Lora card's "use as subject/style"
        card_action = gr.Textbox(value="", elem_id=elem_id(tab, "card_action"), elem_classes=["dynfuse-hidden"],
                                 show_label=False)

    def on_refresh():
        new = lora_dropdown_choices(refresh())
        return gr.update(choices=new), gr.update(choices=new)

    def on_card_action(text):
        role, name = parse_card_action(text)
        if role is None:
            return gr.update(), gr.update(), gr.update()
        return (gr.update(value=name) if role == "subject" else gr.update(),
                gr.update(value=name) if role == "style" else gr.update(),
                gr.update(value=True))

    refresh_button.click(fn=on_refresh, inputs=[], outputs=[controls["subject"], controls["style"]])
    card_action.change(fn=on_card_action, inputs=[card_action],
                       outputs=[controls["subject"], controls["style"], controls["enabled"]])
    return [controls[name] for name in names]


def parse_card_action(text: str):
    """"subject\nNAME\nN" -> ("subject", "NAME"); anything else -> (None, None)."""
    parts = (text or "").split("\n")
    if len(parts) >= 2 and parts[0] in ("subject", "style") and parts[1].strip():
        return parts[0], parts[1].strip()
    return None, None


def tips_html(tab: str) -> str:
    """A hidden element carrying the tips as JSON for javascript/dynfuse.js (works without any route)."""
    data = html.escape(json.dumps({elem_id(tab, k): v for k, v in tips().items()}), quote=True)
    return f'<div class="dynfuse-tips-data" style="display:none" data-tab="{tab}" data-tips="{data}"></div>'


def infotext_fields(controls: Sequence[Any]) -> List[Any]:
    """(control, getter) pairs for paste / send-to: each getter reads its field from the `DynFuse` entry."""
    out = []
    for f, control in zip(fields(FuseArgs), controls):
        if f.metadata["infotext"] is None and f.name != "enabled":
            continue
        out.append((control, _getter(f.name)))
    return out


def _getter(name: str) -> Callable[[Dict[str, Any]], Optional[Any]]:
    def get(params: Dict[str, Any]) -> Optional[Any]:
        return infotext_field_value(params, name)
    get.__name__ = f"dynfuse_{name}_from_infotext"
    return get


PASTE_FIELD_NAMES = [INFOTEXT_KEY]
