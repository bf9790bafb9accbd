"""Per-UNet-call cases: no LoRA, the merged floor, and lib_dynfuse's methods (dynamic x criteria, klora, merge).

Each fused case keeps one `lib_dynfuse.fuse(...)` session for the whole run, as a host keeps one per generation,
opens it around every call, as a host does every step, and sets the step from the round (klora's schedule
changes with it). What a generation pays once is timed apart by `setup_seconds`: target resolution, K-LoRA's
top-K sums (cached per LoRA pair after the first time), and casting the deltas to the UNet's dtype (the
session keeps the cast copies; here it is done at the case's untimed priming call on a small latent).
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Sequence

import torch

from .loras import LoraPair, MergedWeights
from .timing import Case

STEPS = 20   # the schedule length that set_step reports (klora switches inside it)


def unet_call(unet, inputs: Dict) -> torch.Tensor:
    """One noise prediction, batch = cond + uncond rows, under inference mode (as the hosts sample)."""
    with torch.inference_mode():
        return unet(**inputs).sample


def unet_cases(unet, inputs: Dict, pairs: Dict[int, LoraPair], merged: Dict[int, MergedWeights],
               criteria: Sequence[str], criteria_ranks: Sequence[int], methods: Sequence[str] = ("klora", "merge"),
               with_none: bool = True) -> List[Case]:
    """The per-call cases for every rank in `pairs` (dynamic kl at every rank; other criteria at `criteria_ranks`).

    klora and merge run twice: with forward-time deltas (`klora_r64`, as the hooks apply them) and baked into
    the weights (`klora_baked_r64`, FuseSession(weight_space=True)); baking happens in the untimed scope, as
    it happens once per generation (K-LoRA re-bakes a layer only at the step its pick switches).
    """
    cases: List[Case] = []
    if with_none:
        first = min(pairs)
        cases.append(Case("none", lambda r: unet_call(unet, inputs), floor=f"merged_r{first}"))
    for rank, pair in sorted(pairs.items()):
        floor = f"merged_r{rank}"
        cases.append(Case(floor, lambda r: unet_call(unet, inputs), merged[rank].applied))
        loras = pair.load()
        for criterion in criteria:
            if criterion != "kl" and rank not in criteria_ranks:
                continue
            cases.append(_fused_case(unet, inputs, loras, "dynamic", criterion, f"dynamic_{criterion}_r{rank}", floor))
        for method in methods:
            cases.append(_fused_case(unet, inputs, loras, method, "kl", f"{method}_r{rank}", floor))
        for method in methods:
            cases.append(_fused_case(unet, inputs, loras, method, "kl", f"{method}_baked_r{rank}", floor, True))
    return cases


def _fused_case(unet, inputs, loras, method, criterion, name, floor, weight_space=False) -> Case:
    from lib_dynfuse import fuse
    session = fuse(unet, loras[0], loras[1], method=method, criterion=criterion, weight_space=weight_space)
    opened = {"count": 0}

    @contextlib.contextmanager
    def scope():
        with session:
            if weight_space:   # baked weights change only when the step does: set it here, untimed
                session.set_step(opened["count"] % STEPS, STEPS)
            opened["count"] += 1
            yield session

    def call(round_index: int) -> None:
        if not weight_space:
            session.set_step(round_index % STEPS, STEPS)
        unet_call(unet, inputs)

    if not weight_space:   # the first call of a generation casts the deltas: done here, on an 8x8 latent
        with session:
            unet_call(unet, dict(inputs, sample=inputs["sample"][..., :8, :8]))
    return Case(name, call, scope, floor=floor)


def setup_seconds(unet, pair: LoraPair, methods: Sequence[str]) -> Dict[str, float]:
    """Seconds from two LoraFiles to an open session, per method: first time (K-LoRA computes its sums) and
    again (its cache hits); loading the files is timed once as `load`, and casting every delta to the UNet's
    device and dtype (what the first call of a generation does) as `cast`."""
    from lib_dynfuse import fuse
    from lib_dynfuse.branches import prepare_stacked, prepare_summed
    out: Dict[str, float] = {}
    t0 = time.perf_counter()
    loras = pair.load()
    out["load"] = time.perf_counter() - t0
    weight = next(unet.parameters())
    targets = fuse(unet, loras[0], loras[1]).targets
    t0 = time.perf_counter()
    for t in targets:   # as a dynamic session does: both LoRAs of a shared layer stacked, one LoRA's alone
        if t.is_shared:
            prepare_stacked(t.subject, t.style, t.module, weight.device, weight.dtype)
        else:
            prepare_summed([t.subject or t.style], t.module, weight.device, weight.dtype)
    out["cast"] = time.perf_counter() - t0
    for name in methods:   # "klora", "merge_baked", ...: a _baked name times baking the weights (once per generation)
        method, baked = name.replace("_baked", ""), name.endswith("_baked")
        for label in ("first", "again"):
            t0 = time.perf_counter()
            with fuse(unet, loras[0], loras[1], method=method, weight_space=baked):
                out[f"{name}_{label}"] = time.perf_counter() - t0
    return out
