"""Soft fusion: each LoRA's delta weighted by how much its branch changes the layer, beside the papers' hard switch.

Dynamic fusion (Eq. 9-13) keeps one branch per layer and row, the one whose features diverge more from the base.
Here both deltas are kept with weights from the two divergences d_c, d_s (KL per token, or its mean per row):

    l = sharpness * (log d_c - log d_s + log lambda),   a_c = min(1, e^l),   a_s = min(1, e^-l)
    F_hat = F + a_c dF_c + a_s dF_s

`sharpness` 0 is the direct merge (both weights 1); as it grows the weaker delta fades and the rule tends to the
hard switch of Eq. 13 (with the tie moved by lambda). `balance` b in [0, 1] sets lambda = (1 - b) / b: 0.5 is
neutral, lower favours the subject, higher the style, continuously (no cliff where one LoRA takes every layer).

For `merge` the same control trades the two strengths (`merge_scales`): below 0.5 the style's delta shrinks,
above it the subject's, linearly to 0 at the ends; 0.5 is the plain merge.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

EPS = 1e-12


def token_kl(f_both: torch.Tensor, base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """KL(p_hat || p) per token for both branches, channels kept as size 1: [2, B, ...] (dynamic fusion Eq. 11-12)."""
    cdim = channel_dim + 1 if channel_dim >= 0 else channel_dim
    logp_hat = torch.log_softmax(f_both, cdim)
    logp = torch.log_softmax(base, channel_dim, dtype=logp_hat.dtype)
    return (logp_hat.exp() * (logp_hat - logp)).sum(cdim, keepdim=True)


def row_mean(per_token: torch.Tensor) -> torch.Tensor:
    """[2, B, ...] -> the mean over each row's tokens, [2, B, 1, ...]."""
    return per_token.mean(tuple(range(2, per_token.dim())), keepdim=True)


def balance_log_ratio(balance: float) -> float:
    """log lambda = log((1 - b) / b): 0 at the neutral b = 0.5, > 0 favours the subject."""
    if not 0.0 < balance < 1.0:
        raise ValueError(f"DynFuse: balance must be strictly between 0 and 1, got {balance!r}")
    return math.log((1.0 - balance) / balance)


def merge_scales(balance: float) -> Tuple[float, float]:
    """(subject, style) strength factors of `merge` at balance b: (min(1, 2(1 - b)), min(1, 2b)); 0.5 is (1, 1)."""
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"DynFuse: balance must be between 0 and 1, got {balance!r}")
    return min(1.0, 2.0 * (1.0 - balance)), min(1.0, 2.0 * balance)


def blend_weights(divergence: torch.Tensor, sharpness: float, log_ratio: float) -> torch.Tensor:
    """[2, ...] weights (a_c, a_s) in (0, 1] from the divergences [2, ...] (see the module doc)."""
    logs = divergence.clamp_min(EPS).log()
    l = (logs[0] - logs[1] + log_ratio) * sharpness
    return torch.stack([l.clamp_max(0.0), (-l).clamp_max(0.0)]).exp()


def blended(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """F + a_c dF_c + a_s dF_s, in y's dtype (weights broadcast over the features)."""
    out = base + (weights * deltas).sum(0)
    return out if out.dtype == base.dtype else out.to(base.dtype)
