"""Forge's patch sets and the fusion (the Forge adapter's weight half, see forge.py): the fused LoRAs kept out of
Forge's weight merge, the deltas that depend on neither input nor step given to it as DynFuse's own patch sets,
and the count of ours for the diagnostics.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Sequence, Set, Tuple

import torch

from ..baked import constant_deltas
from ..layer_delta import LayerDelta
from .forge_parser import UNET_PREFIX

if TYPE_CHECKING:
    from .run import FuseRun


# ---------------------------------------------------------------------------- keep Forge from merging them
def drop_lora_patches(patcher: Any, filenames: Iterable[str]) -> List[str]:
    """Remove these files' entries from a (cloned) patcher's `lora_patches` (keyed (filename, ...), base.py:92).

    The fused LoRAs must never be merged into the weights too (a `<lora:...>` tag naming one of them).
    Returns the removed filenames.
    """
    wanted = {os.path.normcase(os.path.abspath(f)) for f in filenames if f}
    removed = []
    for key in list(getattr(patcher, "lora_patches", {}) or {}):
        filename = key[0] if isinstance(key, tuple) else key
        if isinstance(filename, str) and os.path.normcase(os.path.abspath(filename)) in wanted:
            del patcher.lora_patches[key]
            removed.append(filename)
    return removed


def has_patches_of(patcher: Any, filenames: Iterable[str]) -> bool:
    wanted = {os.path.normcase(os.path.abspath(f)) for f in filenames if f}
    return any(isinstance(k, tuple) and isinstance(k[0], str) and os.path.normcase(os.path.abspath(k[0])) in wanted
               for k in getattr(patcher, "lora_patches", {}) or {})


# ---------------------------------------------------------------------------- constant deltas: Forge's own merge
def forge_patch_value(delta: LayerDelta):
    """A LayerDelta as the patch value Forge merges (backend/patcher/lora.py:85-160): low rank as ("lora", (up,
    down, alpha, mid, None)) with alpha = scale x rank (Forge scales by alpha / rank), dense as ("diff", (dW,))."""
    if delta.is_low_rank:
        return "lora", (delta.up, delta.down, delta.scale * delta.rank, delta.mid, None)
    return "diff", (delta.dense if delta.scale == 1.0 else delta.dense * delta.scale,)


def forge_patch_key(prefix: str, name: str, delta: LayerDelta):
    """The patch-dict key of a layer: its model key, with (dim, offset, size) for a slice (split_patch_key)."""
    model_key = prefix + name + ".weight"
    if delta.out_slice is None:
        return model_key
    return model_key, (0, int(delta.out_slice[0]), int(delta.out_slice[1]))


def lora_online_mode(unet: Any) -> bool:
    """Whether Forge merges LoRA patches per forward, decided as for <lora> (sd_forge_lora/networks.py:102-105)."""
    try:
        from backend.args import dynamic_args
        online = bool(dynamic_args.get("online_lora", False))
    except ImportError:
        online = False
    if getattr(unet.model, "storage_dtype", None) in (torch.float32, torch.float16, torch.bfloat16):
        online = False
    return online


def add_constant_patches(objects: Any, group: str, targets: Sequence[Any], args: Any,
                         identities: Tuple[str, str]) -> Set[str]:
    """Give Forge's own weight merge every delta of `group` that does not depend on the input or the step.

    `constant_deltas`: all of them for `merge`, and for every method the layers only one LoRA touches, except the
    UNet deltas of a LoRA with a step window (`FuseArgs.windowed`: they change with the step, so the hooks keep them). They
    become two patch sets (subject, style) on a clone of `objects.unet` (group "unet", model keys under the
    KModel) or `objects.clip` ("te", keys under its cond_stage_model), assigned back, so Forge merges them into
    the weights when it loads that model, as it does for <lora>: each call then costs what the plain model
    costs, and the weights come from <lora>'s own arithmetic. Forge keeps its own copy of the weights and puts
    it back when the patches change, so the next job without them gets the weights back bit for bit.
    `identities` (`patch_identities`) name the two sets: Forge skips its re-merge while the names of the patch
    sets are unchanged (LoraLoader.refresh), so they must change whenever the deltas do. Returns the names of
    the targets patched.
    """
    prefix = UNET_PREFIX if group == "unet" else ""
    sets: Tuple[Dict[Any, Any], Dict[Any, Any]] = ({}, {})
    names: Dict[Any, str] = {}
    for t in targets:
        deltas = constant_deltas(t, args.method, args.text_encoder, args.windowed()) if t.group == group else None
        for delta in deltas or []:
            key = forge_patch_key(prefix, t.name, delta)
            sets[0 if delta is t.subject else 1][key] = forge_patch_value(delta)
            names[key] = t.name
    attr = "unet" if group == "unet" else "clip"
    holder = getattr(objects, attr, None)
    if not names or holder is None:
        return set()
    clone = holder.clone()
    patcher = clone if group == "unet" else clone.patcher   # a CLIP holds its patcher (backend/patcher/clip.py:20)
    online = lora_online_mode(objects.unet)
    taken = set()
    for identity, patches in zip(identities, sets):
        if patches:
            taken |= set(patcher.add_patches(filename=identity, patches=patches, strength_patch=1.0,
                                             strength_model=1.0, online_mode=online))
    setattr(objects, attr, clone)
    refused = {name for key, name in names.items() if key not in taken}   # a layer is Forge's only if all its
    return set(names.values()) - refused                                 # patches were taken


def patch_identities(run: "FuseRun") -> Tuple[str, str]:
    """Names of the subject and style patch sets: what the deltas are made of, the files by hash and identity
    on disk (a replaced file makes new names, see add_constant_patches)."""
    a = run.args
    which = "all layers" if a.method == "merge" else "one-LoRA layers"
    which += f", te {a.text_encoder}"
    if a.windowed():   # a windowed LoRA's UNet deltas leave the sets (add_constant_patches)
        which += ", windows " + " ".join(f"{role} {a.window(role)[0]}-{a.window(role)[1]}" for role in a.windowed())
    return tuple(f"DynFuse {role} {name} {run.identities.get(role, '')} x{weight} ({which})"
                 for role, name, weight in zip(("subject", "style"), (a.subject, a.style), a.lora_weights()))


def our_patch_sets(objects: Any) -> int:
    """DynFuse's patch sets (named by `patch_identities`) on a ForgeObjects' UNet and CLIP patchers."""
    clip = getattr(objects, "clip", None)
    count = 0
    for patcher in (getattr(objects, "unet", None), getattr(clip, "patcher", None)):
        for key in getattr(patcher, "lora_patches", None) or {}:
            name = key[0] if isinstance(key, tuple) else key
            count += isinstance(name, str) and name.startswith("DynFuse ")
    return count


def our_wrappers(objects: Any) -> int:
    """DynFuse's model-function wrappers (fusion, guidance redirect) chained on a ForgeObjects' UNet patcher."""
    options = getattr(getattr(objects, "unet", None), "model_options", None) or {}
    wrapper, count = options.get("model_function_wrapper"), 0
    while wrapper is not None and hasattr(wrapper, "dynfuse_previous"):
        count += 1
        wrapper = wrapper.dynfuse_previous
    return count
