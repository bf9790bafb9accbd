"""Weight-space application for the input-independent methods (`merge`, `klora`): W += dW, restored bit-exactly.

A forward-time delta costs r * (in + out) multiply-adds per token per LoRA: for two rank-64 LoRAs on an
SD1.5-shaped UNet at a 32x32 latent that is 13.5% more matmul FLOPs than the base call (bench/flops.py), more
than K-LoRA's and the merge's whole speed budget. Neither method depends on the input, so outside autograd
the same output can be baked into the weights once: W' = W + dW_c + dW_s (merge) or W + the delta the step's
K-LoRA schedule keeps, and each call then costs what the merged floor costs. The originals are copied to
`backup_device` (the CPU by default, as the WebUI's own LoRA code keeps its backups, so no accelerator memory
is spent) and copied back by `restore()`; copy_ of the saved bits makes the model exactly as before.

Two such sessions on one layer at a time are refused (`BakedWeights` raises before writing anything): the
inner one would save the outer's baked weight as its original, and each would take the other's writes for
a rewrite by another component, so the outer's deltas would stay in the model.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import mha
from .layer_delta import FuseTarget, LayerDelta


def target_weight(target: FuseTarget) -> torch.Tensor:
    """The weight tensor a target's deltas change (the module's weight, or its MultiheadAttention part's rows)."""
    if target.part is not None:
        return mha.part_weight(target.module, target.part)
    weight = getattr(target.module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"DynFuse: layer {target.name!r} has no weight tensor to bake a delta into")
    return weight


# module -> the BakedWeights whose deltas it holds now (weak both ways: never keeps a model or a session alive)
_HELD_BY: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def baked_by(module: torch.nn.Module) -> Optional["BakedWeights"]:
    """The open BakedWeights whose deltas this module's weight holds now, or None."""
    ref = _HELD_BY.get(module)
    return ref() if ref is not None else None


BAKEABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def can_bake(target: FuseTarget) -> bool:
    """Whether a delta can be added into this target's weight in place: a plain float tensor (not fp8 storage,
    a quantized or packed weight, or a layer without one; those keep their forward hook)."""
    try:
        weight = target_weight(target)
    except (ValueError, AttributeError):
        return False
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype in BAKEABLE_DTYPES


def dense_delta(delta: LayerDelta, weight: torch.Tensor) -> Tuple[torch.Tensor, slice]:
    """(dW in the weight's dtype and device, the output rows it covers): the full delta, computed in float32
    (float64 for a float64 weight)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dw = delta.to(device=weight.device, dtype=compute).dense_weight()
    rows = slice(None) if delta.out_slice is None else slice(delta.out_slice[0], delta.out_slice[0] + delta.out_slice[1])
    if dw.numel() != weight[rows].numel():
        raise ValueError(f"DynFuse: a delta of shape {tuple(dw.shape)} does not fit a weight of shape "
                         f"{tuple(weight[rows].shape)}")
    return dw.reshape(weight[rows].shape).to(weight.dtype), rows


class BakedWeights:
    """The weights of some targets with deltas added in place; `bake(i, deltas)` changes one, `restore()` undoes all.

    Another component may rewrite a weight while it is baked (a WebUI's own LoRA code re-merging its LoRAs from
    its own copy, e.g. when an extension changes LoRA weights per step). Such a rewrite shows as a new version
    of the tensor (every in-place write bumps it; moving the module to another device does not). Then the
    saved copy is out of date: a re-bake starts from the weight as rewritten, and `restore()` leaves it as the
    other component set it, instead of writing back a state that component no longer expects.
    """

    def __init__(self, targets: Sequence[FuseTarget], backup_device="cpu"):
        for t in targets:
            if baked_by(t.module) is not None:
                raise RuntimeError(f"DynFuse: layer {t.name!r} already holds the baked deltas of another open "
                                   "weight_space session; close that session first (weight_space sessions on one "
                                   "layer cannot be nested), or open this one with weight_space=False")
        self.targets = list(targets)
        self.backup_device = backup_device
        self._backups: Dict[int, torch.Tensor] = {}
        self._baked: Dict[int, Tuple[int, ...]] = {}     # target index -> ids of the deltas in its weight now
        self._versions: Dict[int, int] = {}              # target index -> the weight's version after our writes
        self.rewritten: List[str] = []                   # layers another component rewrote while baked

    def _record_versions(self) -> None:
        # q/k/v parts share one tensor (and its version): every entry is re-read after each of our writes
        self._versions = {i: target_weight(self.targets[i])._version for i in self._backups}

    def _is_rewritten(self, index: int) -> bool:
        return target_weight(self.targets[index])._version != self._versions.get(index)

    def bake(self, index: int, deltas: Sequence[LayerDelta]) -> None:
        """Make target `index`'s weight W0 + sum(deltas) (W0 = the weight before the first bake); no-op if it is."""
        key = tuple(id(d) for d in deltas)
        rewritten = index in self._backups and self._is_rewritten(index)
        if self._baked.get(index) == key and not rewritten:
            return
        weight = target_weight(self.targets[index])
        with torch.inference_mode(False), torch.no_grad():
            if rewritten:   # someone else's full write: that is the weight to start from now
                self.rewritten.append(self.targets[index].name)
                self._backups[index] = weight.detach().to(self.backup_device, copy=True)
            elif index in self._backups:
                weight.copy_(self._backups[index])
            else:
                self._backups[index] = weight.detach().to(self.backup_device, copy=True)
                _HELD_BY[self.targets[index].module] = weakref.ref(self)
            self._baked[index] = ()
            for d in deltas:
                dw, rows = dense_delta(d, weight)
                weight[rows].add_(dw)
        self._baked[index] = key
        self._record_versions()

    def restore(self) -> None:
        """Copy every saved weight back, except those another component rewrote meanwhile (all of them even if
        one fails; the first failure is raised after)."""
        rewritten = {i for i in self._backups if self._is_rewritten(i)}
        self.rewritten += [self.targets[i].name for i in sorted(rewritten)]
        backups, self._backups, self._baked, self._versions = self._backups, {}, {}, {}
        for index in backups:
            if baked_by(self.targets[index].module) is self:
                del _HELD_BY[self.targets[index].module]
        first_error: Optional[BaseException] = None
        for index, saved in backups.items():
            if index in rewritten:
                continue
            try:
                with torch.inference_mode(False), torch.no_grad():
                    target_weight(self.targets[index]).copy_(saved)
            except Exception as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error


def target_mode(target: FuseTarget, method: str, te_mode: str) -> str:
    """'merge', 'select' or 'off' for this target: a text encoder follows te_mode unless that is 'select'."""
    if target.group == "te" and te_mode != "select":
        return te_mode
    return "merge" if method == "merge" else "select"


def baked_deltas(target: FuseTarget, mode: str, keep_subject: Optional[bool]) -> List[LayerDelta]:
    """The deltas a target's weight holds: its one LoRA; both for 'merge'; K-LoRA's pick for 'select'; none for 'off'."""
    if mode == "off":
        return []
    if not target.is_shared:
        return [target.subject if target.subject is not None else target.style]
    if mode == "merge":
        return [target.subject, target.style]
    return [target.subject if keep_subject else target.style]


def constant_deltas(target: FuseTarget, method: str, te_mode: str = "select",
                    windowed: Sequence[str] = ()) -> Optional[List[LayerDelta]]:
    """The deltas a target adds on every call, whatever the input and the step: its one LoRA, or both where
    they are merged (`merge`, or a text encoder in te mode 'merge'); None where the kept branch is chosen per
    call (`dynamic`: by the input, `klora`: by the step), the layer is left out (te mode 'off'), or a UNet
    layer's LoRA acts only in a step window (`windowed`: "subject", "style")."""
    mode = target_mode(target, method, te_mode)
    if mode == "off" or (target.is_shared and mode != "merge"):
        return None
    if target.group != "te" and any(getattr(target, branch) is not None for branch in windowed):
        return None
    return baked_deltas(target, mode, None)
