"""Resolve a subject and a style `LoraFile` onto a model's modules -> `FuseTarget`s, with a match report.

Rules: a LoRA with UNet keys of which none matches is a `LoraMatchError` naming its first unmatched keys
(e.g. an SDXL LoRA on an SD1.5 UNet); partial matches go to `warnings`; text-encoder keys with no text
encoder given are `skipped`, not errors. Every warning is also logged (logger `lib_dynfuse`) and issued as a
`LoraMatchWarning`, so that a library user sees it without reading `warnings`. A delta whose shape does not
fit its module's weight is a `LoraShapeError`, never applied. Linear <-> 1x1 conv deltas (SD1.5 conv proj_in vs SDXL linear proj_in,
LoRAs trained on either) are reshaped to the module's kind.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings as pywarnings
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .layer_delta import FuseTarget, LayerDelta
from .lora_file import LayerKey, LoraFile, load_lora
from .name_maps import TE_GROUPS, ModuleNameMap, as_name_map

SHOWN_KEYS = 5
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("lib_dynfuse")


class LoraMatchWarning(UserWarning):
    """A LoRA only partly fits the model (layers ignored or skipped), or subject and style are one file."""


class LoraMatchError(ValueError):
    """A LoRA does not fit the model (no UNet key matches): the message names the LoRA and its first keys."""


class LoraShapeError(LoraMatchError):
    """A LoRA layer's delta does not fit its module's weight shape."""


@dataclass
class LoraMatchReport:
    """How one LoRA resolved: matched layer count, unmatched / skipped / unsupported keys."""

    name: str
    matched: int = 0
    unmatched: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)          # text-encoder keys, no text encoder given
    unsupported: Dict[str, str] = field(default_factory=dict)  # key -> reason (DoRA, LoHa ...)
    duplicates: List[str] = field(default_factory=list)       # second spelling of an already matched module


@dataclass
class ResolveResult:
    """Targets in model order, one report per LoRA role ("subject", "style"), and user-facing warnings."""

    targets: List[FuseTarget]
    reports: Dict[str, LoraMatchReport]
    warnings: List[str]


TextEncoders = Union[None, torch.nn.Module, Sequence[Optional[torch.nn.Module]], Dict[str, torch.nn.Module]]


def text_encoder_roots(text_encoders: TextEncoders) -> Dict[str, torch.nn.Module]:
    """{"te1": ..., "te2": ...} from one module, a (te1, te2) sequence or a dict keyed te1/te2."""
    if text_encoders is None:
        return {}
    if isinstance(text_encoders, torch.nn.Module):
        return {"te1": text_encoders}
    if isinstance(text_encoders, dict):
        unknown = set(text_encoders) - set(TE_GROUPS)
        if unknown:
            raise ValueError(f"text_encoders keys must be {TE_GROUPS}, got {sorted(unknown)}")
        return {g: m for g, m in text_encoders.items() if m is not None}
    return {g: m for g, m in zip(TE_GROUPS, text_encoders) if m is not None}


def as_lora_file(value, role: str) -> Optional[LoraFile]:
    """A LoraFile (or None) as given, or one read from a path with `load_lora` at weight 1."""
    if value is None or hasattr(value, "layers"):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_lora(value)
    raise TypeError(f"DynFuse: {role} must be a LoraFile from lib_dynfuse.load_lora(path, weight) or a path to a "
                    f".safetensors file, got {type(value).__name__}")


def publish_warnings(messages: Sequence[str]) -> None:
    """Log each message (logger `lib_dynfuse`) and issue it as a LoraMatchWarning at the caller's first frame
    outside lib_dynfuse."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    for message in messages:
        log.warning("%s", message)
        pywarnings.warn(message, LoraMatchWarning, stacklevel=level)


def fit_to_weight(delta: LayerDelta, weight: torch.Tensor) -> LayerDelta:
    """Reshape a 1x1-conv delta for a Linear and a linear delta for a 1x1 conv; anything else unchanged."""
    if delta.dense is not None or delta.mid is not None:
        return delta
    if weight.dim() == 2 and delta.down.dim() == 4 and delta.down.shape[2:] == (1, 1):
        return replace(delta, down=delta.down.flatten(1), up=delta.up.flatten(1))
    if weight.dim() == 4 and weight.shape[2:] == (1, 1) and delta.down.dim() == 2:
        return replace(delta, down=delta.down[:, :, None, None], up=delta.up[:, :, None, None])
    return delta


def delta_shape(delta: LayerDelta) -> Tuple[int, ...]:
    """The weight shape a delta produces: (out, in) or (out, in, kh, kw)."""
    if delta.dense is not None:
        return tuple(delta.dense.shape)
    out_dim, in_dim = delta.up.shape[0], delta.down.shape[1]
    if delta.mid is not None:
        return (out_dim, in_dim, *delta.mid.shape[2:])
    return (out_dim, in_dim, *delta.down.shape[2:])


def shape_problem(delta: LayerDelta, weight: torch.Tensor) -> Optional[str]:
    """None when the delta fits the weight (its out_slice included), else a description of the mismatch."""
    want = tuple(weight.shape)
    got = delta_shape(delta)
    if delta.out_slice is not None:
        offset, size = delta.out_slice
        if offset < 0 or offset + size > want[0]:
            return f"out_slice {delta.out_slice} outside the {want[0]} outputs"
        want = (size, *want[1:])
    if got != want:
        return f"delta {got} vs weight {want}"
    return None


def _lookup(name_map, model, name: str) -> Optional[torch.nn.Module]:
    finder = getattr(name_map, "module", None)
    try:
        return finder(name) if finder is not None else model.get_submodule(name)
    except (AttributeError, KeyError):
        return None


def _resolve_one(lora: LoraFile, name_map, model, te_groups):
    """One LoRA -> ({module name: (module, group, delta)}, report, shape problems)."""
    report = LoraMatchReport(name=lora.name, unsupported={str(k): v for k, v in lora.unsupported.items()})
    found: Dict[str, Tuple[torch.nn.Module, str, LayerDelta]] = {}
    problems: List[str] = []
    for key, delta in lora.layers.items():
        key = LayerKey(*key)
        is_te = key.group != "unet"
        name = name_map.resolve(key)
        module = _lookup(name_map, model, name) if name is not None else None
        if module is None:
            if is_te and key.group not in te_groups:
                report.skipped.append(str(key))
            else:
                report.unmatched.append(str(key))
            continue
        if name in found:
            report.duplicates.append(str(key))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            problems.append(f"{key} -> {name}: module has no weight tensor")
            continue
        delta = fit_to_weight(delta, weight)
        problem = shape_problem(delta, weight)
        if problem:
            problems.append(f"{key} -> {name}: {problem}")
            continue
        found[name] = (module, "te" if is_te else "unet", delta)
        report.matched += 1
    return found, report, problems


def _check(role: str, lora: LoraFile, report: LoraMatchReport, problems: List[str], warnings: List[str]) -> None:
    """Raise for a LoRA that does not fit; add warnings for partial matches."""
    label = f"{role} LoRA '{lora.name}'"
    if problems:
        raise LoraShapeError(f"{label}: {len(problems)} layer(s) do not fit the model's weights "
                             f"(it looks like base model '{lora.base_model}'): " + "; ".join(problems[:SHOWN_KEYS]))
    unet_unmatched = [k for k in report.unmatched if k.startswith("unet:")]
    unet_total = sum(1 for k in lora.layers if k[0] == "unet")
    if unet_total and unet_total == len(unet_unmatched):
        raise LoraMatchError(f"{label} matches no layer of this UNet (it looks like base model "
                             f"'{lora.base_model}'); first unmatched keys: {', '.join(unet_unmatched[:SHOWN_KEYS])}")
    if report.matched == 0:
        why = (f"only text-encoder keys, and no text encoder was given (first: {', '.join(report.skipped[:SHOWN_KEYS])})"
               if report.skipped else
               f"no supported layer ({'; '.join(list(report.unsupported.values())[:1]) or 'no LoRA layers'})")
        raise LoraMatchError(f"{label} has nothing to apply to this model: {why}")
    if report.unmatched:
        warnings.append(f"{label}: {len(report.unmatched)} of {len(lora.layers)} layers match no module, "
                        f"ignored (first: {', '.join(report.unmatched[:SHOWN_KEYS])})")
    if report.unsupported:
        first = next(iter(report.unsupported.items()))
        warnings.append(f"{label}: {len(report.unsupported)} layers in formats without a low-rank form are "
                        f"ignored here ({first[0]}: {first[1]})")
    if report.skipped:
        warnings.append(f"{label}: {len(report.skipped)} text-encoder layers skipped (no text encoder given)")
    if report.duplicates:
        warnings.append(f"{label}: {len(report.duplicates)} keys name an already matched module, ignored "
                        f"(first: {', '.join(report.duplicates[:SHOWN_KEYS])})")


LoraInput = Union[None, LoraFile, str, "os.PathLike[str]"]


def resolve_targets(model: torch.nn.Module, subject: LoraInput, style: LoraInput,
                    name_map=None, text_encoders: TextEncoders = None) -> ResolveResult:
    """Union of both LoRAs' layers on `model` (and text encoders) as FuseTargets; errors for LoRAs that don't fit.

    subject, style: LoraFiles from `load_lora`, or paths (read at weight 1). name_map: None = `ModuleNameMap`
    over model and text encoders (diffusers, kohya and compvis names), or a host's map (object with
    `resolve(key)` and optionally `module(name)`, or a plain callable). Warnings are also published
    (`publish_warnings`).
    """
    subject, style = as_lora_file(subject, "subject"), as_lora_file(style, "style")
    te_roots = text_encoder_roots(text_encoders)
    name_map = as_name_map(name_map) if name_map is not None else ModuleNameMap({"unet": model, **te_roots})
    warnings: List[str] = []
    reports: Dict[str, LoraMatchReport] = {}
    resolved: Dict[str, Dict[str, Tuple[torch.nn.Module, str, LayerDelta]]] = {}
    for role, lora in (("subject", subject), ("style", style)):
        if lora is None:
            continue
        found, report, problems = _resolve_one(lora, name_map, model, set(te_roots))
        _check(role, lora, report, problems, warnings)
        reports[role], resolved[role] = report, found
    if subject is not None and style is not None and getattr(subject, "sha256", "") \
            and subject.sha256 == getattr(style, "sha256", None):
        warnings.append(f"subject LoRA '{subject.name}' and style LoRA '{style.name}' are the same file (sha256 "
                        f"{subject.sha256[:12]}): fusing a LoRA with itself only changes its weight")
    order = getattr(name_map, "order", None) or {}
    names: List[str] = []
    for found in resolved.values():
        names.extend(n for n in found if n not in names)
    first_seen = {n: i for i, n in enumerate(names)}
    names.sort(key=lambda n: order.get(n, len(order) + first_seen[n]))
    targets = []
    for name in names:
        sub, sty = resolved.get("subject", {}).get(name), resolved.get("style", {}).get(name)
        module, group = (sub or sty)[0], (sub or sty)[1]
        targets.append(FuseTarget(name=name, module=module, subject=sub[2] if sub else None,
                                  style=sty[2] if sty else None, group=group))
    publish_warnings(warnings)
    return ResolveResult(targets=targets, reports=reports, warnings=warnings)
