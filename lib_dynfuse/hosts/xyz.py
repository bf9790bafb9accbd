"""DynFuse axes for the X/Y/Z plot script (scripts/xyz_grid.py in AUTOMATIC1111 v1.10 and Forge alike).

The axes are built from the FuseArgs field metadata (label, choices, type), so a method or a field added there
shows here without a change: `AXIS_FIELDS` names the fields that get an axis (one that FuseArgs lacks is
skipped), plus one axis for the LoRA pair, "subject|style". An axis writes its value into a dict on the cell's
`p` (`common.OVERRIDES_ATTR`; the plot copies `p` per cell, xyz_grid.py:711, Forge :735, so each cell gets a
new dict), and `common.begin` applies it over the UI settings and the tag; an axis value also turns fusion on.

How other extensions do it: the plot's module is found through `modules.scripts.scripts_data` (its entries carry
the module, scripts.py:381, :503) and `AxisOption(label, type, apply, format_value=, confirm=, choices=)`
(xyz_grid.py:214-223) instances are appended to its `axis_options` list (:238). The plot copies that list into
each Script instance's `current_axis_options` in its `ui()` (:420), and with `--nowebui` the API builds that UI
(api.py:259-260) before `on_before_ui` runs (webui.py:34-37): so the axes are registered when our script is
imported (the plot, in the WebUI's own scripts folder, is loaded before extensions, scripts.py:400-412) and again
before the UI (for a plot loaded after us), and a plot whose `ui()` already ran gets them appended to its
`current_axis_options` too (the API addresses axes by index into that list). Registering is idempotent (by
label); a WebUI without the plot script is left alone.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, List, Optional, Sequence

from ..args import FuseArgs
from . import common

log = logging.getLogger("dynfuse")

LABEL_PREFIX = "DynFuse "
PAIR_LABEL = LABEL_PREFIX + "LoRA pair (subject|style)"
PAIR_SEPARATOR = "|"
AXIS_FIELDS = ("method", "criterion", "balance", "subject_weight", "style_weight", "subject_start", "subject_end",
               "style_start", "style_end", "guidance", "guidance_scale")


@dataclasses.dataclass(frozen=True)
class AxisSpec:
    """One axis, host-independent: `values(p, x)` is the dict of field changes its value `x` stands for."""

    label: str
    type: type
    values: Callable[[Any], dict]
    choices: Optional[Callable[[], List[str]]] = None
    confirm: Optional[Callable[[Any, Sequence[Any]], None]] = None


def _field_axis(f: dataclasses.Field) -> Optional[AxisSpec]:
    m = f.metadata
    label = LABEL_PREFIX + (m["axis"] or m["label"])
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if m["choices"]:
        options = list(m["choices"])
        return AxisSpec(label, str, lambda x, n=f.name: {n: x}, choices=lambda: list(options))
    if kind == "bool":   # the plot's own boolean axes offer "True"/"False" (xyz_grid.py:163-167)
        return AxisSpec(label, str, lambda x, n=f.name: {n: x}, choices=lambda: ["True", "False"])
    if kind in ("float", "int"):
        return AxisSpec(label, float if kind == "float" else int, lambda x, n=f.name: {n: x})
    return None


def split_pair(value: str):
    """"subject|style" -> ("subject", "style"); anything else -> None."""
    parts = str(value).split(PAIR_SEPARATOR)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return parts[0].strip(), parts[1].strip()


def _confirm_pairs(p: Any, values: Sequence[Any]) -> None:
    """The plot calls this before its first image (xyz_grid.py:612-613): a malformed value stops it with this."""
    bad = [v for v in values if split_pair(v) is None]
    if bad:
        raise RuntimeError(f"DynFuse: a LoRA pair is two LoRA names joined by '{PAIR_SEPARATOR}' (subject{PAIR_SEPARATOR}"
                           f"style), got {', '.join(map(repr, bad))}")


def _pair_values(x: Any) -> dict:
    subject, style = split_pair(x) or (str(x), "")
    return {"subject": subject, "style": style}


def axis_specs() -> List[AxisSpec]:
    """Every DynFuse axis, in AXIS_FIELDS order, then the LoRA pair."""
    by_name = {f.name: f for f in dataclasses.fields(FuseArgs)}
    specs = [_field_axis(by_name[name]) for name in AXIS_FIELDS if name in by_name]
    specs = [s for s in specs if s is not None]
    specs.append(AxisSpec(PAIR_LABEL, str, _pair_values, confirm=_confirm_pairs))
    return specs


def apply_to(p: Any, changes: dict) -> None:
    """Add field changes to this cell's `p` (a new dict: `p` is a shallow copy shared with no other cell's)."""
    merged = dict(getattr(p, common.OVERRIDES_ATTR, None) or {})
    merged.update(changes, enabled=True)
    setattr(p, common.OVERRIDES_ATTR, merged)


def axis_option(module: Any, spec: AxisSpec) -> Any:
    """The plot's own AxisOption for a spec (shown in txt2img and img2img alike)."""
    def apply(p, x, xs):
        apply_to(p, spec.values(x))
    return module.AxisOption(spec.label, spec.type, apply, confirm=spec.confirm, choices=spec.choices)


def xyz_modules() -> List[Any]:
    """The loaded X/Y/Z plot modules (`xyz_grid.py` with AxisOption and axis_options), from scripts_data."""
    from modules import scripts
    found = []
    for data in list(getattr(scripts, "scripts_data", []) or []):
        module = getattr(data, "module", None)
        if os.path.basename(str(getattr(data, "path", ""))) != "xyz_grid.py":
            continue
        if hasattr(module, "AxisOption") and isinstance(getattr(module, "axis_options", None), list) \
                and all(module is not m for m in found):
            found.append(module)
    return found


def _built_plots(module: Any) -> List[Any]:
    """The plot's Script instances whose ui() already ran (they hold `current_axis_options`)."""
    from modules import scripts
    script_class = getattr(module, "Script", None)
    out = []
    for runner in (getattr(scripts, "scripts_txt2img", None), getattr(scripts, "scripts_img2img", None)):
        for script in list(getattr(runner, "scripts", None) or []):
            if script_class is not None and isinstance(script, script_class) \
                    and isinstance(getattr(script, "current_axis_options", None), list):
                out.append(script)
    return out


def register_axes() -> int:
    """Add the DynFuse axes to every loaded X/Y/Z plot (idempotent); returns how many options were added."""
    try:
        modules = xyz_modules()
    except ImportError:   # not inside a WebUI
        return 0
    added = 0
    for module in modules:
        known = {getattr(o, "label", None) for o in module.axis_options}
        new = [axis_option(module, spec) for spec in axis_specs() if spec.label not in known]
        module.axis_options.extend(new)
        added += len(new)
        ours = [o for o in module.axis_options if str(getattr(o, "label", "")).startswith(LABEL_PREFIX)]
        for script in _built_plots(module):
            have = {getattr(o, "label", None) for o in script.current_axis_options}
            script.current_axis_options.extend(o for o in ours if o.label not in have)
    return added


def register_axes_safely() -> None:
    """register_axes for the start-up: a failure is logged, never stops the WebUI."""
    try:
        register_axes()
    except Exception as e:
        log.warning("DynFuse: could not add the X/Y/Z plot axes: %s: %s", type(e).__name__, e)
