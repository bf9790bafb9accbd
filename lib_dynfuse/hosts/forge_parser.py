"""Forge's own LoRA parser -> LayerDeltas (the Forge adapter's reading half, see forge.py).

A fused LoRA is read with Forge's parser (`load_lora` + `model_lora_keys_unet/clip`, a fresh key-map dict on
every call: the defaults are shared mutable dicts) and becomes LayerDeltas; targets are found by the key map's
model key, never by module type. Every refusal names the LoRA. Host modules are imported inside functions.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..flux import join_slices
from ..layer_delta import LayerDelta
from ..lora_file import check_safetensors
from .host_lora import FuseInputError, HostLora, LoraLayer

# Forge declares a LoRA a version mismatch above this many unmatched keys (sd_forge_lora/networks.py:25)
MAX_UNMATCHED = 12
UNET_PREFIX = "diffusion_model."


def check_lora_file(path: str) -> None:
    """Refuse a file that is not a whole safetensors file (pickles included) without loading it."""
    from safetensors import safe_open
    check_safetensors(path)
    with safe_open(path, framework="pt") as f:   # parses the header and checks it against the file size
        f.keys()


# ---------------------------------------------------------------------------- Forge's LoRA parser
@dataclass(frozen=True)
class ForgeLora:
    """The Forge functions this adapter uses (real ones from `forge_lora()`, stand-ins in tests)."""

    load_lora: Callable            # (lora_sd, key_map) -> (patch_dict, remaining_dict)
    keys_unet: Callable            # (KModel, key_map) -> key_map
    keys_clip: Callable            # (JointTextEncoder, key_map) -> key_map
    merge: Callable                # merge_lora_to_weight(patches, weight, key, computation_dtype)
    load_state_dict: Callable      # filename -> state dict


def forge_lora() -> ForgeLora:
    """Bind Forge's parser (backend/patcher/lora.py:19-48, :84) and its state-dict reader. Not the builtin's
    `load_lora_state_dict`: its lru_cache is keyed by the file name (sd_forge_lora/networks.py:56-58) and would
    serve a replaced file's old tensors; ForgeHost caches by file identity instead (common.FileCache)."""
    from backend.patcher import lora as forge_lora_module
    from backend.utils import load_torch_file

    def load_sd(filename):
        return load_torch_file(filename, safe_load=True)
    return ForgeLora(load_lora=forge_lora_module.load_lora, keys_unet=forge_lora_module.model_lora_keys_unet,
                     keys_clip=forge_lora_module.model_lora_keys_clip,
                     merge=forge_lora_module.merge_lora_to_weight, load_state_dict=load_sd)


def split_patch_key(key) -> Tuple[str, Optional[Tuple[int, int, int]], Optional[Callable]]:
    """A patch-dict key -> (model key, (dim, offset, size) or None, function or None).

    Keys are model keys, or tuples (model_key, (dim, offset, size)) for slices of FLUX's fused qkv/linear1
    and (model_key, None, fn) for re-ordered outputs (comfy utils.py:407-509; base.py:98-108 unpacks them).
    """
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1], (key[2] if len(key) > 2 else None)


def low_rank_delta(value, strength: float, offset=None) -> Optional[LayerDelta]:
    """("lora", (up, down, alpha, mid, dora_scale)) -> LayerDelta, scale = alpha/rank x strength; None if not plain.

    Comfy naming: v[0] is *up* [out, r(,1,1)], v[1] is *down* [r, in(,kh,kw)] (backend/patcher/lora.py:147-153).
    DoRA (dora_scale set) depends on the base weight: not low rank, built dense instead.
    """
    if not (isinstance(value, tuple) and len(value) == 2 and value[0] == "lora"):
        return None
    up, down, alpha, mid, dora_scale = value[1]
    if dora_scale is not None:
        return None
    rank = int(down.shape[0])
    scale = (float(alpha) / rank if alpha is not None else 1.0) * strength
    out_slice = None
    if offset is not None:
        if offset[0] != 0:
            return None
        out_slice = (int(offset[1]), int(offset[2]))
    return LayerDelta(down=down, up=up, mid=mid, scale=scale, out_slice=out_slice)


def _depends_on_weight(value) -> bool:
    """Whether a patch's dW depends on the base weight: DoRA (dora_scale, last item), GLoRA, set, unknown forms."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)):
        return True
    kind, v = value
    if kind in ("diff",):
        return False
    if kind in ("lora", "loha", "lokr"):
        return v[-1] is not None
    return True


def _weight_for_dense(module: torch.nn.Module, model_key: str, lora: str = "") -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "bnb_quantized", False) or getattr(weight, "gguf_cls", None) is not None:
        raise FuseInputError(f"DynFuse: LoRA {lora!r} changes {model_key}, which is stored quantized (NF4/FP4/GGUF); "
                             "only plain LoRA (lora_up/lora_down) works there, not LoHa/LoKr/DoRA/GLoRA/full diffs")
    return weight


def dense_delta(entries: Sequence[Tuple[Any, Any, Any]], module: torch.nn.Module, model_key: str,
                merge: Callable, strength: float, lora: str = "") -> LayerDelta:
    """dW of one layer for non-low-rank patches (LoHa, LoKr, GLoRA, DoRA, diff, set, re-ordered outputs).

    Built once per generation with Forge's own `merge_lora_to_weight` on a normal (non-inference) copy:
    on zeros when dW does not depend on W (exact), else merged(W) - W (DoRA/GLoRA/set depend on W).
    `entries` are (value, offset, function) of one model key.
    """
    weight = _weight_for_dense(module, model_key, lora)
    needs_base = any(_depends_on_weight(value) for value, _, _ in entries)
    patches = [[strength, value, 1.0, offset, function] for value, offset, function in entries]
    with torch.inference_mode(False), torch.no_grad():
        if needs_base:
            base = weight.detach().to(torch.float32).clone()
        else:
            base = torch.zeros(tuple(weight.shape), dtype=torch.float32, device=weight.device)
        merged = merge(patches, base.clone(), model_key, computation_dtype=torch.float32)
        dw = (merged.to(torch.float32) - base) if needs_base else merged.to(torch.float32).clone()
    return LayerDelta(dense=dw.to(weight.dtype if weight.dtype.is_floating_point else torch.float32))


def layer_deltas(patch_dict: Dict[Any, Any], root: torch.nn.Module, merge: Callable, strength: float,
                 lora: str = "") -> Tuple[Dict[str, LayerDelta], List[str]]:
    """Forge patch dict -> {module path under root: LayerDelta}, plus the patch keys that are skipped and why;
    `lora` (the LoRA's name) goes into the messages.

    All patches of one model key (FLUX: q, k, v, mlp slices of one fused layer) become one delta.
    """
    grouped: Dict[str, List[Tuple[Any, Any, Any]]] = {}
    skipped: List[str] = []
    for key, value in patch_dict.items():
        model_key, offset, function = split_patch_key(key)
        if not model_key.endswith(".weight"):
            skipped.append(f"{model_key} (only weights are fused, not biases or norms)")
            continue
        grouped.setdefault(model_key, []).append((value, offset, function))
    deltas: Dict[str, LayerDelta] = {}
    for model_key, entries in grouped.items():
        path = model_key[: -len(".weight")]
        try:
            module = root.get_submodule(path)
        except AttributeError:
            skipped.append(f"{model_key} (no such layer)")
            continue
        low = [None if function is not None else low_rank_delta(value, strength, offset)
               for value, offset, function in entries]
        if all(d is not None for d in low):
            out_channels = _out_channels(module, low)
            for d in low:
                _check_fits(d, module, out_channels, model_key, lora)
            deltas[path] = join_slices(low, out_channels)
        else:
            deltas[path] = dense_delta(entries, module, model_key, merge, strength, lora)
    return deltas, skipped


def _out_channels(module: torch.nn.Module, deltas: Sequence[LayerDelta]) -> int:
    """The layer's output channels: its weight's rows, else out_features/out_channels, else (a quantized layer
    without them, operations.py:355-438) the end of the furthest slice."""
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(weight, "shape") and len(weight.shape) >= 2 \
            and not getattr(weight, "bnb_quantized", False):
        return int(weight.shape[0])
    for attr in ("out_features", "out_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return max(int(d.up.shape[0]) if d.out_slice is None else sum(d.out_slice) for d in deltas)


def _check_fits(delta: LayerDelta, module: torch.nn.Module, out_channels: int, model_key: str, lora: str = "") -> None:
    size = delta.out_slice[1] if delta.out_slice is not None else out_channels
    if int(delta.up.shape[0]) != size:
        raise FuseInputError(f"DynFuse: LoRA {lora!r} does not fit the loaded model: its {model_key} has "
                             f"{delta.up.shape[0]} outputs, the layer {size}; is it for another base model?")
    in_features = getattr(module, "in_features", getattr(module, "in_channels", None))
    if in_features is not None and int(delta.down.shape[1]) != int(in_features):
        raise FuseInputError(f"DynFuse: LoRA {lora!r} does not fit the loaded model: its {model_key} takes "
                             f"{delta.down.shape[1]} inputs, the layer {in_features}; is it for another base model?")


def parse_lora(api: ForgeLora, name: str, lora_sd: Dict[str, torch.Tensor], unet_model: torch.nn.Module,
               clip_model: Optional[torch.nn.Module]) -> HostLora:
    """Read one LoRA state dict with Forge's parser, UNet first then text encoders (as networks.py:15-23).

    Deltas at strength 1 (the user weights are applied when pairing). Layer names: UNet layers by their path
    under `diffusion_model` (e.g. `input_blocks.1.1.proj_in`, `double_blocks.0.img_attn.qkv`), text-encoder
    layers by their path under `clip.cond_stage_model` (`clip_l.transformer.text_model...`).
    """
    unet_patches, rest = api.load_lora(lora_sd, api.keys_unet(unet_model, {}))
    te_patches: Dict[Any, Any] = {}
    if clip_model is not None:
        te_patches, rest = api.load_lora(rest, api.keys_clip(clip_model, {}))
    unet, skipped = layer_deltas(unet_patches, unet_model, api.merge, 1.0, name)
    te: Dict[str, LayerDelta] = {}
    if clip_model is not None:
        te, skipped_te = layer_deltas(te_patches, clip_model, api.merge, 1.0, name)
        skipped += skipped_te
    unmatched = sorted(k for k in rest if not k.endswith(".alpha"))
    if not unet and not te:
        raise FuseInputError(f"DynFuse: LoRA {name!r} matches no layer of the loaded model "
                             f"({len(lora_sd)} keys, e.g. {next(iter(sorted(lora_sd)), '')!r}): made for another base model?")
    if len(unmatched) > MAX_UNMATCHED:
        raise FuseInputError(f"DynFuse: LoRA {name!r} does not fit the loaded model: {len(unmatched)} of its keys "
                             f"match no layer (e.g. {', '.join(unmatched[:3])})")
    out = HostLora(name=name, skipped=skipped + [f"{k} (no layer)" for k in unmatched])
    for path, delta in unet.items():
        layer = path[len(UNET_PREFIX):] if path.startswith(UNET_PREFIX) else path
        out.layers[layer] = LoraLayer(module=unet_model.get_submodule(path), group="unet", delta=delta)
    for path, delta in te.items():
        out.layers[path] = LoraLayer(module=clip_model.get_submodule(path), group="te", delta=delta)
    out.order_as(itertools.chain(unet_model.modules(), clip_model.modules() if clip_model is not None else ()))
    return out
