"""Fixed cost of one fused layer call: a tiny layer, so that only op dispatch and Python are left.

On a GPU the kernels of a fused layer at SD sizes take microseconds, and the host side that launches them (tens
of small ops per layer and call, 192 fused layers per SD1.5 UNet call) is what bounds a step; this measures that
host-side cost per layer and call, side by side with the plain layer, on whatever CPU runs the benchmark.
"""
from __future__ import annotations

import statistics
from typing import Dict, List

import torch

from .timing import Case, interleaved

CALLS = 400   # layer calls per timed round


def _layers():
    """(name, module, input, deltas) for a linear token layer and a 1x1 conv (SD1.5's proj_in kind), rank 4."""
    g = torch.Generator().manual_seed(0)
    lin, conv = torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 8, 1)

    def pair(shape_down, shape_up):
        return [(torch.randn(*shape_down, generator=g), torch.randn(*shape_up, generator=g)) for _ in range(2)]
    return [("linear", lin, torch.randn(2, 4, 8, generator=g), pair((4, 8), (8, 4))),
            ("conv1x1", conv, torch.randn(2, 8, 2, 2, generator=g), pair((4, 8, 1, 1), (8, 4, 1, 1)))]


def layer_cases() -> List[Case]:
    from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
    from lib_dynfuse.session import FuseSession
    cases: List[Case] = []
    for kind, module, x, deltas in _layers():
        def run(round_index: int, module=module, x=x) -> None:
            with torch.inference_mode():
                for _ in range(CALLS):
                    module(x)
        plain = f"layer_{kind}_plain"
        cases.append(Case(plain, run))
        for method, criterion in (("dynamic", "kl"), ("klora", "kl"), ("merge", "kl")):
            subject, style = (LayerDelta(down=d, up=u) for d, u in deltas)
            session = FuseSession([FuseTarget(kind, module, subject, style)], method=method, criterion=criterion)
            session.set_row_labels(["uncond", "cond"])

            def scope(session=session):
                return session
            cases.append(Case(f"layer_{kind}_{method}", run, scope, floor=plain))
    return cases


def extra_microseconds(rounds: int, log) -> Dict[str, float]:
    """Per layer kind and method: median microseconds per call, plain and fused, and the fused layer's extra."""
    cases = layer_cases()
    timings = interleaved(cases, rounds, 1, "cpu", lambda msg: None)
    out: Dict[str, float] = {}
    for case in cases:
        us = statistics.median(timings.seconds[case.name]) / CALLS * 1e6
        out[f"{case.name}_us"] = round(us, 1)
        if case.floor is not None:
            plain = statistics.median(timings.seconds[case.floor]) / CALLS * 1e6
            out[f"{case.name}_extra_us"] = round(us - plain, 1)
    log("  fused layer fixed cost (us per call over the plain layer): " + ", ".join(
        f"{k[len('layer_'):-len('_extra_us')]} {v:.0f}" for k, v in out.items() if k.endswith("_extra_us")))
    return out
