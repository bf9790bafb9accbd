"""Side-by-side timing: every case once per round, rounds interleaved (A B C A B C ...), medians of per-round ratios.

On a shared machine the load drifts over minutes; a ratio taken inside one round (the case against the floor
measured seconds apart) cancels most of that drift, and the median over rounds drops the outliers. The order
of the cases rotates every round so that no case always runs right after the same neighbour.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch


@dataclass
class Case:
    """A named configuration: `scope()` sets it up around the timed `call(round)` (setup is not timed)."""

    name: str
    call: Callable[[int], None]
    scope: Callable[[], ContextManager] = contextlib.nullcontext
    floor: Optional[str] = None          # the case this one's ratio is taken against (None = no ratio)


@dataclass
class Timings:
    seconds: Dict[str, List[float]] = field(default_factory=dict)
    ratios: Dict[str, List[float]] = field(default_factory=dict)
    cpu_ratios: Dict[str, List[float]] = field(default_factory=dict)   # the same from process CPU seconds

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str) -> Optional[float]:
        r = self.ratios.get(name)
        return statistics.median(r) if r else None

    def cpu_ratio(self, name: str) -> Optional[float]:
        """Median per-round ratio of process CPU seconds: what a call costs in work, whatever else the
        machine runs (wall-clock ratios absorb other processes' load; CPU-time ratios mostly do not)."""
        r = self.cpu_ratios.get(name)
        return statistics.median(r) if r else None

    def fastest_ratio(self, name: str, floor: Optional[str]) -> Optional[float]:
        """The case's fastest round over the floor's fastest round: other load on a shared machine only ever adds
        time, so the fastest rounds are the ones it disturbed least (a check on the median per-round ratio)."""
        if floor is None or not self.seconds.get(name) or not self.seconds.get(floor):
            return None
        return min(self.seconds[name]) / min(self.seconds[floor])

    def spread(self, name: str) -> float:
        """(max - min) / median of a case's seconds: how noisy its rounds were."""
        s = self.seconds[name]
        return (max(s) - min(s)) / statistics.median(s) if len(s) > 1 else 0.0


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device="cpu") -> float:
    return timed_both(fn, device)[0]


def timed_both(fn: Callable[[], None], device="cpu"):
    """(wall seconds, process CPU seconds) of fn()."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(cases: List[Case], rounds: int, warmup: int = 0, device="cpu",
                log: Callable[[str], None] = print) -> Timings:
    """One untimed call of the first case (first-call costs of the process), `warmup` untimed rounds of
    every case, then `rounds` timed rounds in rotating order."""
    out = Timings({c.name: [] for c in cases}, {})
    with cases[0].scope():
        log(f"  prime {cases[0].name}: {timed(lambda: cases[0].call(0), device):.2f} s")
    for r in range(-warmup, rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)] if r >= 0 else cases
        this_round: Dict[str, float] = {}
        this_cpu: Dict[str, float] = {}
        for case in order:
            with case.scope():
                this_round[case.name], this_cpu[case.name] = timed_both(lambda: case.call(max(r, 0)), device)
            log(f"  {'warm-up' if r < 0 else f'round {r + 1}/{rounds}'} {case.name}: {this_round[case.name]:.2f} s "
                f"(CPU {this_cpu[case.name]:.2f} s)")
        if r < 0:
            continue
        for case in cases:
            out.seconds[case.name].append(this_round[case.name])
            if case.floor is not None:
                out.ratios.setdefault(case.name, []).append(this_round[case.name] / this_round[case.floor])
                if this_cpu[case.floor] > 0:
                    out.cpu_ratios.setdefault(case.name, []).append(this_cpu[case.name] / this_cpu[case.floor])
    return out
