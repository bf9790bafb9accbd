"""Gradio controls of the DynFuse accordion, built from the FuseArgs field metadata (labels, tips, ranges).

Works on gradio 3.41 (AUTOMATIC1111) and 4.x (Forge): only constructor arguments both accept, `gr.update`,
no `.style()`. gradio is imported inside `build`, so this module imports without it. `build` has no side
effect besides creating components: the host calls `ui()` several times (api.py:315-333).
"""
from __future__ import annotations

import html
import json
from dataclasses import fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..args import FuseArgs
from .common import INFOTEXT_KEY, infotext_field_value

# sub-accordions of the DynFuse accordion, by FuseArgs `section` metadata, in this order (others after them)
SECTIONS = {"windows": "Step windows (UNet)", "guidance": "Latent refinement (CLIP/DINO guidance, paper Sec. 4.2)"}
PAIRED_ROWS = ("subject", "style"), ("subject_weight", "style_weight")   # main fields shown side by side


def tips() -> Dict[str, Dict[str, str]]:
    """field name -> {label, tip}: what the JS puts into the host's hints (`titles`) and element titles."""
    return {f.name: {"label": f.metadata["label"], "tip": f.metadata["tip"]} for f in fields(FuseArgs)}


def elem_id(tab: str, name: str) -> str:
    return f"dynfuse_{tab}_{name}"


def lora_dropdown_choices(names) -> List[str]:
    """The LoRA dropdowns' choices: "" (none picked) first, then the host's LoRA names."""
    return [""] + [n for n in names if n]


def method_dependent() -> List[str]:
    """The fields that matter for some methods only (FuseArgs `methods` metadata), in field order."""
    return [f.name for f in fields(FuseArgs) if f.metadata["methods"]]


def shown_for(method: str) -> Dict[str, bool]:
    """field name -> whether its control shows when `method` is picked (every field without `methods` does)."""
    return {f.name: not f.metadata["methods"] or method in f.metadata["methods"] for f in fields(FuseArgs)}


def sections() -> List[Tuple[str, List[str]]]:
    """(section, its field names) for the sub-accordions: SECTIONS' order first, then any other section."""
    by_section: Dict[str, List[str]] = {}
    for f in fields(FuseArgs):
        if f.metadata["section"]:
            by_section.setdefault(f.metadata["section"], []).append(f.name)
    order = [s for s in SECTIONS if s in by_section] + [s for s in by_section if s not in SECTIONS]
    return [(s, by_section[s]) for s in order]


def saved_value(config_file: Optional[str], script_file: str, tab: str, name: str) -> Optional[Any]:
    """The value the WebUI will give the control of field `name` at start from its ui-config.json (key
    `customscript/<script file>/<tab>/<label>/value`, modules/ui_loadsave.py add_component), or None."""
    if not config_file:
        return None
    label = {f.name: f for f in fields(FuseArgs)}[name].metadata["label"]
    try:
        with open(config_file, encoding="utf8") as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    return settings.get(f"customscript/{script_file}/{tab}/{label}/value") if isinstance(settings, dict) else None


def build(gr: Any, accordion_cls: Any, tab: str, lora_choices: Callable[[], List[str]],
          refresh: Callable[[], List[str]], tooltip_kw: bool = False, method: Optional[str] = None) -> List[Any]:
    """Create the controls and return them in FuseArgs field order (= the order of the positional API args).

    Layout: the main fields (no `section`) in field order, both LoRAs and both weights side by side, then one
    closed sub-accordion per section. A field with `methods` metadata shows only while one of those is picked.
    `accordion_cls` is the host's InputAccordion (a hidden checkbox that is the `enabled` value);
    `tooltip_kw`: the host's gradio accepts `tooltip=` (A1111's gradio_extensons.py IOComponent_init).
    `method`: the method the page will show at start (`saved_value`: the WebUI's ui-config.json keeps the default
    of the version that wrote it, and sets the radio to it after this returns, with no change event); the
    controls that depend on the method start shown or hidden for it. The default method when None or unknown.
    """
    defaults = FuseArgs()
    by_name = {f.name: f for f in fields(FuseArgs)}
    visible = shown_for(method if method in by_name["method"].metadata["choices"] else defaults.method)
    controls: Dict[str, Any] = {}
    # "" = no LoRA picked: it must be a choice, or gradio 4 shows the first LoRA while the value stays empty
    choices = lora_dropdown_choices(lora_choices())

    def kw(name: str) -> Dict[str, Any]:
        m = by_name[name].metadata
        out = dict(label=m["label"], elem_id=elem_id(tab, name), elem_classes=["dynfuse-control"])
        if tooltip_kw:
            out["tooltip"] = m["tip"]
        if not visible[name]:
            out["visible"] = False
        return out

    def make(name: str) -> Any:
        f = by_name[name]
        m, value = f.metadata, getattr(defaults, name)
        if m["ui"] == "lora":
            control = gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **kw(name))
        elif m["ui"] == "image":
            control = gr.Image(type="pil", **kw(name))
        elif m["choices"]:
            control = gr.Radio(choices=list(m["choices"]), value=value, **kw(name))
        elif f.type in ("bool", bool):
            control = gr.Checkbox(value=value, **kw(name))
        elif m["minimum"] is not None:
            control = gr.Slider(minimum=m["minimum"], maximum=m["maximum"], step=m["step"], value=value, **kw(name))
        else:
            control = gr.Textbox(value=value, lines=1, **kw(name))
        controls[name] = control
        return control

    names = [f.name for f in fields(FuseArgs)]
    paired = {name: row for row in PAIRED_ROWS for name in row}
    acc_kw = kw("enabled")
    acc_kw.pop("elem_classes")
    acc_kw.pop("tooltip", None)
    with accordion_cls(False, **acc_kw) as enabled:
        controls["enabled"] = enabled
        gr.HTML(value=tips_html(tab), visible=True, elem_classes=["dynfuse-tips"])
        for name in names[1:]:
            if by_name[name].metadata["section"] or name in controls:
                continue
            if name not in paired:
                make(name)
                continue
            with gr.Row():
                for other in paired[name]:
                    make(other)
                if paired[name] == PAIRED_ROWS[0]:
                    refresh_button = gr.Button(value="\U0001f504", elem_id=elem_id(tab, "refresh"),
                                               elem_classes=["tool", "dynfuse-refresh"])
        for section, members in sections():
            with gr.Accordion(label=SECTIONS.get(section, section), open=False,
                              elem_id=elem_id(tab, f"{section}_group")):
                if section == "windows":   # start and end of each LoRA side by side
                    for i in range(0, len(members), 2):
                        with gr.Row():
                            for name in members[i:i + 2]:
                                make(name)
                else:
                    for name in members:
                        make(name)

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

    dependent = method_dependent()

    def on_method(method):
        shown = shown_for(method)
        return [gr.update(visible=shown[name]) for name in dependent]

    refresh_button.click(fn=on_refresh, inputs=[], outputs=[controls["subject"], controls["style"]])
    card_action.change(fn=on_card_action, inputs=[card_action],
                       outputs=[controls["subject"], controls["style"], controls["enabled"]])
    if dependent:
        controls["method"].change(fn=on_method, inputs=[controls["method"]],
                                  outputs=[controls[name] for name in dependent])
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
