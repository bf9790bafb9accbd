"""Per-UNet-call cases: no LoRA, the merged floor, and lib_dynfuse's methods (dynamic x criteria, klora, merge).

Each fused case opens a `lib_dynfuse.fuse(...)` session around its call, as a host does per generation, and
sets the step from the round (klora's schedule changes with it). Session setup (target resolution, K-LoRA's
top-K sums, cached per LoRA pair after the first time) is timed apart, once per method, by `setup_seconds`.
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


def fused_scope(unet, loras, method: str, criterion: str, holder: Dict, weight_space: bool = False):
    """A context manager factory: lib_dynfuse.fuse(...) opened for one timed call, the session in holder."""
    from lib_dynfuse import fuse

    @contextlib.contextmanager
    def scope():
        with fuse(unet, loras[0], loras[1], method=method, criterion=criterion,
                  weight_space=weight_space) as session:
            holder["session"] = session
            try:
                yield session
            finally:
                holder.pop("session", None)
    return scope


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
    holder: Dict = {}
    opened = {"count": 0}

    @contextlib.contextmanager
    def scope():
        with fused_scope(unet, loras, method, criterion, holder, weight_space)() as session:
            if weight_space:   # baked weights change only when the step does: set it here, untimed
                session.set_step(opened["count"] % STEPS, STEPS)
            opened["count"] += 1
            yield session

    def call(round_index: int) -> None:
        if not weight_space:
            holder["session"].set_step(round_index % STEPS, STEPS)
        unet_call(unet, inputs)
    return Case(name, call, scope, floor=floor)


def setup_seconds(unet, pair: LoraPair, methods: Sequence[str]) -> Dict[str, float]:
    """Seconds from two LoraFiles to an open session, per method: first time (K-LoRA computes its sums) and
    again (its cache hits); loading the files is timed once as `load`."""
    from lib_dynfuse import fuse
    out: Dict[str, float] = {}
    t0 = time.perf_counter()
    loras = pair.load()
    out["load"] = time.perf_counter() - t0
    for name in methods:   # "klora", "merge_baked", ...: a _baked name times baking the weights (once per generation)
        method, baked = name.replace("_baked", ""), name.endswith("_baked")
        for label in ("first", "again"):
            t0 = time.perf_counter()
            with fuse(unet, loras[0], loras[1], method=method, weight_space=baked):
                out[f"{name}_{label}"] = time.perf_counter() - t0
    return out
