"""What a FuseSession's arguments mean, checked before any hook exists: methods, targets, step windows, merge's
balance and the pairing of an image's cond and uncond rows."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from . import blend, mha
from .layer_delta import FuseTarget

METHODS = ("dynamic", "klora", "merge", "blend")
TE_MODES = ("select", "merge", "off")
FULL_WINDOW = (0.0, 1.0)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """A ValueError naming the argument and its choices unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f"DynFuse: {name} must be one of {', '.join(choices)}, got {value!r}")


def check_targets(targets: Sequence[FuseTarget]) -> List[FuseTarget]:
    """The targets as a list, each with a delta, a known group, a fusable MultiheadAttention part where it has one,
    and no two on one module (part)."""
    targets = list(targets)
    for t in targets:
        if t.subject is None and t.style is None:
            raise ValueError(f"DynFuse: target {t.name!r} has neither a subject nor a style delta")
        if t.group not in ("unet", "te"):
            raise ValueError(f"DynFuse: target {t.name!r} has group {t.group!r}; expected 'unet' or 'te'")
        if t.part is not None:   # MultiheadAttention parts: one module, several targets (one per part)
            problem = mha.unsupported(t.module) if isinstance(t.module, torch.nn.MultiheadAttention) else \
                f"part {t.part!r} on a {type(t.module).__name__}, not a MultiheadAttention"
            problem = problem or ("" if t.part in mha.PARTS else f"unknown part {t.part!r}")
            if problem:
                raise ValueError(f"DynFuse: target {t.name!r} cannot be fused: {problem}")
    if len({(id(t.module), t.part) for t in targets}) != len(targets):
        raise ValueError("DynFuse: two targets share one module; give each layer one FuseTarget")
    return targets


def check_window(name: str, window) -> Tuple[float, float]:
    """(start, end) with 0 <= start <= end <= 1: the fraction of denoising in which a LoRA acts."""
    try:
        start, end = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"DynFuse: {name} must be (start, end) fractions of denoising, got {window!r}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"DynFuse: {name} needs 0 <= start <= end <= 1, got {window!r}")
    return start, end


def in_window(window: Tuple[float, float], progress: float) -> bool:
    """start <= p < end (an end of 1 keeps the last step), with a margin for the rounding of step/total."""
    start, end = window
    return start - 1e-9 <= progress < end - 1e-9 or end >= 1.0 and progress >= start - 1e-9


def balanced_targets(targets: Sequence[FuseTarget], balance: float) -> List[FuseTarget]:
    """`merge` at balance b: every subject delta times min(1, 2(1 - b)), every style delta times min(1, 2b)."""
    c, s = blend.merge_scales(balance)
    if (c, s) == (1.0, 1.0):
        return list(targets)
    return [dataclasses.replace(t, subject=t.subject.with_weight(c) if t.subject is not None else None,
                                style=t.style.with_weight(s) if t.style is not None else None) for t in targets]


def partner_order(labels: Sequence[str]) -> Optional[List[int]]:
    """tie_rows: per row the row it chooses with (the k-th cond row with the k-th uncond row, itself when
    unpaired); None when no row has a partner."""
    cond = [i for i, lab in enumerate(labels) if lab == "cond"]
    uncond = [i for i, lab in enumerate(labels) if lab == "uncond"]
    partner = list(range(len(labels)))
    for c, u in zip(cond, uncond):
        partner[c], partner[u] = u, c
    return partner if partner != list(range(len(labels))) else None
