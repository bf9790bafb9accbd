"""Matmul and convolution FLOPs of each per-call case (torch.utils.flop_counter): the noise-free part of a ratio.

A forward-time LoRA delta adds r * (in + out) multiply-adds per token; the count shows how far below a time
ratio the arithmetic alone already is (elementwise work, such as the KL criterion, is not counted).
"""
from __future__ import annotations

from typing import Dict, List

from torch.utils.flop_counter import FlopCounterMode

from .timing import Case


def case_flops(cases: List[Case]) -> Dict[str, int]:
    """FLOPs of one call of every case, inside its own scope (sessions open, weights merged or baked)."""
    out: Dict[str, int] = {}
    for case in cases:
        with case.scope():
            with FlopCounterMode(display=False) as counter:
                case.call(0)
        out[case.name] = counter.get_total_flops()
    return out
