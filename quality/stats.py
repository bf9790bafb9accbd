"""Rates with Wilson 95% intervals and paired differences with a stratified bootstrap over seeds."""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 12345


def wilson(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(hits: torch.Tensor) -> Dict[str, float]:
    """{rate, lo, hi, n} of a bool tensor of outcomes."""
    n, k = int(hits.numel()), int(hits.sum())
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "lo": lo, "hi": hi, "n": n}


def paired_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Mean of a - b over all (pair, seed) cells, a 95% percentile bootstrap interval: seeds are resampled with
    replacement within each pair (the pairs are fixed strata), both methods keeping the same resampled seeds.

    a, b: one bool tensor [seeds] per pair, same seeds in the same order."""
    diffs = [x.float() - y.float() for x, y in zip(a, b)]
    total = sum(d.numel() for d in diffs)
    mean = sum(d.sum() for d in diffs).item() / total
    g = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    boot = torch.zeros(BOOTSTRAP_RESAMPLES, dtype=torch.float64)
    for d in diffs:
        idx = torch.randint(d.numel(), (BOOTSTRAP_RESAMPLES, d.numel()), generator=g)
        boot += d.double()[idx].sum(1)
    boot /= total
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": mean, "lo": lo, "hi": hi}
