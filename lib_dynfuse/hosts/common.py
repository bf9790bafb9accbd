"""Host-independent glue between a WebUI and the fusion engine: host -> FuseArgs -> FuseSession -> hooks.

Every host (AUTOMATIC1111 in `a1111.py`, Forge in `forge.py`) implements the small `HostAdapter` protocol
below; everything else lives once, host-independent: `FuseRun` (run.py: arguments from UI/API/tag, sessions,
infotext, the heat-map), reading and checking the two LoRAs and pairing their layers into `FuseTarget`s
(host_lora.py), messages (messages.py), progress through the schedule (progress.py), the counts of the info
route (diagnostics.py). This module holds the protocol, what both adapters share, and the Script's lifecycle.

One generation (one `p`) owns one `FuseRun`:

    run = FuseRun(host, ui_values)            # Script.process: positional UI values or one dict (API)
    run.use_tag(tags)                         # ExtraNetwork.activate: `<dynlora:subject:style:k=v>` items
    host.install(p, run)                      # host: arrange the scopes below around its own TE / UNet calls
        with run.scope(p, "te"): ...          #   around the conditioning computation (per prompt)
        with run.scope(p, "unet"): ...        #   around sampling (all passes); hooks removed in `finally`
        run.set_step(step, total)             #   from the denoiser's own counters, never a call counter
        run.set_rows(labels)                  #   "cond" / "uncond" per batch row of the next UNet call
    run.infotext()                            # value of the `DynFuse` infotext entry
    run.heatmap()                             # PIL image or None

`HostAdapter` (what a host provides; every method is cheap and has no side effect unless it says so):
    name: str                                  "a1111" / "forge"
    lora_names() -> list[str]                  names the host's LoRA list offers (for dropdowns and checks)
    refresh_loras() -> list[str]               rescan the LoRA folders, then `lora_names()`
    model_base() -> str                        the loaded checkpoint's family: "sd1", "sd2", "sdxl", ... or "unknown"
    lora_base(name) -> str                     the family a LoRA's metadata names (from the LoRA list, no file read)
    read_lora(name) -> HostLora                read one LoRA with the host's own loader into `LayerDelta`s keyed
                                               by layer, never activating it in the host; raises `FuseInputError`
    prompt_lora_names(p) -> list[str]          names of the host's own `<lora:...>` tags active for this batch
    suppress_builtin(p, names) -> list[str]    stop the host's LoRA support from applying these names (they are
                                               fused instead); returns the names it actually removed
    install(p, run) -> None                    per-generation install points (see above); nothing global
    report(p, message) -> None                 show a message in the UI, the console and the infotext / API info
    add_image(p, processed, image, infotext)   append an image to the gallery (not saved as a generation)
Optional, used by scripts/dynfuse.py when present:
    gradio_tooltips: bool                      the host's gradio takes `tooltip=` on components
    before_every_sampling(p, **kwargs)         Script.process_before_every_sampling (x=, noise=, c=, uc=)
    on_cfg_denoiser(params)                    registered with script_callbacks.on_cfg_denoiser
    uninstall(p)                               undo `install` on this p (called from Script.postprocess)
    save_beside(p, processed, image, suffix, infotext)   save an extra image beside the generation's saved one

Nothing here imports a WebUI module or gradio.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from ..args import ArgsError, FuseArgs
# the parts of the glue, re-exported: hosts and tests name them through this module
from .host_lora import (LORA_BASES, BuiltinLoraList, FileCache, FuseInputError, HostLora, LoraLayer,  # noqa: F401
                        check_base, check_finite, check_shapes, file_identity, is_packed_weight, pair_targets)
from .messages import INFOTEXT_KEY, MESSAGE_KEY, append_to_gallery, one_line, report_on_p  # noqa: F401
from .progress import RowCursor, img2img_schedule, pass_progress, schedule_progress  # noqa: F401
from .run import MERGE_NOTE, FuseRun, parse_ui_values, tag_args  # noqa: F401

log = logging.getLogger("dynfuse")

RUN_ATTR = "dynfuse_run"        # the FuseRun of a generation, kept on its `p`
OVERRIDES_ATTR = "dynfuse_xyz"  # field -> value set on a `p` by the X/Y/Z plot's DynFuse axes (hosts/xyz.py)
TAG_NAME = "dynlora"            # <dynlora:subject:style[:key=value...]>
HEATMAP_SUFFIX = "-dynfuse-heatmap"   # the heat-map's file name: the generation's first saved image's + this


class WebUIHost(BuiltinLoraList):
    """What both WebUI adapters do alike: messages, gallery, infotext and dropping their per-instance wrappers.
    A subclass names the `p` methods it wraps in `wrapped_methods`."""

    wrapped_methods: Tuple[str, ...] = ()

    def report(self, p: Any, message: str) -> None:
        report_on_p(p, message)

    def add_image(self, p: Any, processed: Any, image: Any, infotext: str) -> None:
        append_to_gallery(processed, image, infotext)

    def save_beside(self, p: Any, processed: Any, image: Any, suffix: str, infotext: str) -> Optional[str]:
        from .saving import save_beside
        return save_beside(p, processed, image, suffix, infotext)

    def uninstall(self, p: Any) -> None:
        for attr in self.wrapped_methods:
            p.__dict__.pop(attr, None)
        p.__dict__.pop("_dynfuse_wrapped", None)

    def _publish(self, p: Any, run: "FuseRun") -> None:
        text = run.infotext()
        if text:
            p.extra_generation_params[INFOTEXT_KEY] = text


class HostAdapter(Protocol):
    """What a WebUI provides to `FuseRun` (see the module docstring for the contract of each method)."""

    name: str

    def lora_names(self) -> List[str]: ...

    def refresh_loras(self) -> List[str]: ...

    def model_base(self) -> str: ...

    def lora_base(self, name: str) -> str: ...

    def read_lora(self, name: str) -> HostLora: ...

    def prompt_lora_names(self, p: Any) -> List[str]: ...

    def suppress_builtin(self, p: Any, names: Sequence[str]) -> List[str]: ...

    def install(self, p: Any, run: "FuseRun") -> None: ...

    def report(self, p: Any, message: str) -> None: ...

    def add_image(self, p: Any, processed: Any, image: Any, infotext: str) -> None: ...



def infotext_field_value(params: Dict[str, Any], name: str) -> Any:
    """For paste: the value of FuseArgs field `name` from parsed infotext params; None leaves a control alone."""
    text = params.get(INFOTEXT_KEY)
    if not text:
        return False if name == "enabled" else None
    try:
        args = FuseArgs.from_infotext(text)
    except ArgsError:
        return None
    return getattr(args, name)


# ----------------------------------------------------------------------------- lifecycle, called by the Script
def prompts_have_tag(p: Any) -> bool:
    """Does any prompt of this job mention `<dynlora:`? (cheap; the host parses the tag itself later)"""
    texts = []
    for attr in ("all_prompts", "all_hr_prompts", "prompt", "hr_prompt"):
        v = getattr(p, attr, None)
        texts.extend(v if isinstance(v, (list, tuple)) else [v])
    marker = f"<{TAG_NAME}:"
    return any(isinstance(t, str) and marker in t for t in texts)


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")   # the host's re_extra_net (extra_networks.py:175)


def prompt_tags(prompt: Any) -> List[Tuple[List[str], Dict[str, str]]]:
    """The `<dynlora:...>` items of one prompt as the host will hand them to ExtraNetwork.activate: args split
    at ':', an item with exactly one '=' named, any other positional (extra_networks.py:31-45, :178-191)."""
    tags = []
    for name, text in _EXTRA_NETWORK.findall(prompt if isinstance(prompt, str) else ""):
        if name != TAG_NAME:
            continue
        positional, named = [], {}
        for item in text.split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        tags.append((positional, named))
    return tags


def first_batch_tags(p: Any) -> List[Tuple[List[str], Dict[str, str]]]:
    """The tags the host will activate for the first batch: the first prompt's (parse_prompts keeps the
    first prompt's networks, extra_networks.py:194-206); none when the job disables extra networks."""
    if getattr(p, "disable_extra_networks", False):
        return []
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")]
    first = prompts[0] if isinstance(prompts, (list, tuple)) else prompts
    return prompt_tags(first)


def begin(host: HostAdapter, p: Any, values: Sequence[Any]) -> FuseRun:
    """Script.process: the run of this generation from the UI/API values and the first batch's tag (parsed
    here, before the host activates it per batch, so that what is decided once per generation - install,
    guidance and its references - sees the tag's fields too); install only when it may fuse."""
    run = FuseRun(host, ui_values=values)
    setattr(p, RUN_ATTR, run)
    overrides = getattr(p, OVERRIDES_ATTR, None)
    if overrides:
        # an X/Y/Z plot cell is a shallow copy of the plot's p (xyz_grid.py:711): its own dicts keep a cell's
        # messages and infotext out of the next cell's
        for attr in ("extra_generation_params", "comments"):
            if isinstance(getattr(p, attr, None), dict):
                setattr(p, attr, dict(getattr(p, attr)))
        run.use_overrides(overrides, p)
    run.report_all(p)
    tags = first_batch_tags(p)
    if tags:
        run.use_tag(tags, p)
    if run.enabled or prompts_have_tag(p):
        host.install(p, run)
        run.installed = True
    return run


def activate_tag(host: HostAdapter, p: Any, tags: Sequence[Tuple[Sequence[str], Dict[str, str]]]) -> None:
    """ExtraNetwork.activate: this batch's tags; a job without our Script (p.scripts None) gets a run here."""
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        if not tags:
            return
        run = FuseRun(host)
        setattr(p, RUN_ATTR, run)
    run.use_tag(tags, p)
    if run.enabled and not getattr(run, "installed", False):
        host.install(p, run)
        run.installed = True


def finish(host: HostAdapter, p: Any, processed: Any) -> None:
    """Script.postprocess: heat-map into the gallery when asked, and beside the saved image when the host saved
    one; the per-instance wrappers go."""
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        return
    image = run.heatmap()
    if image is not None and processed is not None:
        text = f"DynFuse selection heat-map ({run.args.subject} vs {run.args.style})"
        save = getattr(host, "save_beside", None)
        if save is not None:
            save(p, processed, image, HEATMAP_SUFFIX, text)   # before add_image: the heat-map is no generation image
        host.add_image(p, processed, image, text)
    uninstall = getattr(host, "uninstall", None)
    if uninstall is not None:
        uninstall(p)


def info(host: HostAdapter, version: str) -> Dict[str, Any]:
    """The `GET /dynfuse/v1/info` body: version, choices, defaults and every field's UI metadata (JSON-safe)."""
    from dataclasses import fields as dc_fields
    from .. import args as args_mod
    defaults = FuseArgs()
    described = []
    for f in dc_fields(FuseArgs):
        m = f.metadata
        if m["ui"] == "image":
            default = None
        else:
            default = getattr(defaults, f.name)
        described.append({"name": f.name, "label": m["label"], "tip": m["tip"], "default": default,
                          "choices": list(m["choices"]) or None, "minimum": m["minimum"], "maximum": m["maximum"],
                          "infotext": m["infotext"], "tag_aliases": list(m["aliases"])})
    return {
        "version": version,
        "host": getattr(host, "name", "unknown"),
        "methods": list(args_mod.METHODS),
        "criteria": list(args_mod.CRITERIA),
        "text_encoder_modes": list(args_mod.TEXT_ENCODER_MODES),
        "defaults": {d["name"]: d["default"] for d in described},
        "fields": described,
        "tag": f"<{TAG_NAME}:subject:style[:key=value...]>",
        "api_args": "alwayson_scripts: {\"dynfuse\": {\"args\": [positional values in field order] or [{name: value}]}}",
        "loras": host.lora_names(),
    }
