"""Selection math: which of two LoRA branches a layer keeps. Pure tensor functions, no state.

Dynamic fusion (paper "dynamic training-free fusion", Sec. 4.1, Eq. 9-13): the layer's base output F and the
two fine-tuned outputs F_c = F + dF_c, F_s = F + dF_s are turned into distributions with a softmax over the
channels of every token (linear output [..., C]: the last dim; conv output [B, C, H, W]: dim 1, per pixel).
The divergence of each branch from F is averaged over the tokens, giving one value per batch row (dim 0),
and the row keeps the branch that changed its features more (ties to the subject, Eq. 13).
Why per token over channels: a linear/conv layer maps every token's channel vector on its own, so the
channel vector is the "feature" that the LoRA changes; averaging over tokens makes the value independent of
the resolution and the prompt length, so layers of different sizes are compared on the same footing.

K-LoRA (Eq. 1-10, supplement D): the importance of a layer's dW is the sum of its top-K |dW| elements,
K = r_c * r_s; the style sum is scaled by gamma (Eq. 9) and by S(p), p = denoising progress in [0, 1).
The sums do not depend on the input, so the whole schedule [steps, layers] is computed once.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Supplement D of K-LoRA: S* = (alpha' * p + beta') % alpha with alpha' = 1.5, beta' = 1.3.
STAR_SLOPE = 1.5
STAR_OFFSET = 1.3
KLORA_SCALES = ("linear", "star")


# ----------------------------------------------------------------------------- reference divergences (per branch)
def tokens_by_channels(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[B, ..., C, ...] -> [B, tokens, C]: every token's channel vector (dynamic fusion Eq. 11-12 inputs)."""
    moved = feature.movedim(channel_dim, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


def channel_log_probs(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """log softmax over channels per token, at least float32: [B, tokens, C] (dynamic fusion Eq. 11-12)."""
    tokens = tokens_by_channels(feature, channel_dim)
    return torch.log_softmax(tokens if tokens.dtype == torch.float64 else tokens.float(), dim=-1)


def kl_per_row(logp_hat: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """KL(p_hat || p) per token, mean over tokens: [B] (dynamic fusion Eq. 11-12, 'KL')."""
    kl = (logp_hat.exp() * (logp_hat - logp_base)).sum(-1)
    return kl.mean(-1).clamp_min(0.0)


def js_per_row(logp_hat: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per token, mean over tokens: [B] (dynamic fusion Table 4, 'JS')."""
    log_mid = torch.logaddexp(logp_hat, logp_base) - math.log(2.0)
    js = 0.5 * (logp_hat.exp() * (logp_hat - log_mid)).sum(-1) + 0.5 * (logp_base.exp() * (logp_base - log_mid)).sum(-1)
    return js.mean(-1).clamp_min(0.0)


def cosine_divergence_per_row(f_hat: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """1 - cos(F_hat, F) over each row's flattened features, in float64: [B] (dynamic fusion Table 4, 'cosine')."""
    a = f_hat.reshape(f_hat.shape[0], -1).double()
    b = f_base.reshape(f_base.shape[0], -1).double()
    return (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).clamp_min(0.0)


def dot_divergence_per_row(f_hat: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """-mean(F_hat * F) over each row, in float64: [B]; a larger value = less aligned = more change (dynamic fusion Table 4, 'dot')."""
    a = f_hat.reshape(f_hat.shape[0], -1).double()
    b = f_base.reshape(f_base.shape[0], -1).double()
    return -(a * b).mean(1)


CRITERIA = ("kl", "js", "cosine", "dot")


def output_divergences(criterion: str, base: torch.Tensor, f_c: torch.Tensor, f_s: torch.Tensor, channel_dim: int):
    """(d_c, d_s): the criterion for the fine-tuned outputs F_c, F_s against F, one value per row (dynamic fusion Eq. 9-12).

    The readable per-branch form (what the tests hold the hooks to); the hooks use `branch_scores`.
    """
    if criterion in ("kl", "js"):
        divergence = kl_per_row if criterion == "kl" else js_per_row
        logp = channel_log_probs(base, channel_dim)
        return (divergence(channel_log_probs(f_c, channel_dim), logp),
                divergence(channel_log_probs(f_s, channel_dim), logp))
    if criterion == "cosine":
        return cosine_divergence_per_row(f_c, base), cosine_divergence_per_row(f_s, base)
    if criterion == "dot":
        return dot_divergence_per_row(f_c, base), dot_divergence_per_row(f_s, base)
    raise ValueError(f"DynFuse: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def branch_divergences(criterion: str, base: torch.Tensor, delta_c: torch.Tensor, delta_s: torch.Tensor,
                       channel_dim: int):
    """(d_c, d_s): the criterion for F + dF_c and F + dF_s against F, one value per row (dynamic fusion Eq. 9-12)."""
    return output_divergences(criterion, base, base + delta_c, base + delta_s, channel_dim)


# ----------------------------------------------------------------------------- the hooks' scores (both branches)
def branch_outputs(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """[2, *base.shape] F + dF_c, F + dF_s in at least float32: the sum is not rounded to a half-precision output.

    In float16/bfloat16 a rounded F_hat moves every channel by up to half an ulp of F (0.008 for |F| ~ 3 in
    bfloat16), the same order as the LoRA's own dF: the divergences would rank the rounding, not the LoRAs.
    """
    if deltas.dtype in (torch.float32, torch.float64):
        return deltas + base
    return deltas.float() + base


def branch_scores(criterion: str, base: torch.Tensor, f_both: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[2, B, 1, ...] float64 per branch and row (one size-1 dim per feature dim of F, so that a row's choice
    broadcasts over its features), ordered as the divergences d_c, d_s of Eq. 13 (dynamic fusion Eq. 9-13).

    `f_both` = `branch_outputs(F, [dF_c, dF_s])`. KL: the sum over a row's tokens of KL(p_hat || p) - LSE(F),
    i.e. sum_c p_hat (log p_hat - F): the term LSE(F) is the same for both branches, so the scores differ by
    tokens x (KL_c - KL_s) without a softmax of F; five ops for both branches, summed in float64. The other
    criteria: their mean divergences (`output_divergences`' values, computed on the stacked branches).
    """
    cdim = channel_dim + 1 if channel_dim >= 0 else channel_dim
    if criterion == "kl":
        logp_hat = torch.log_softmax(f_both, cdim)
        return (logp_hat.exp() * (logp_hat - base)).sum(tuple(range(2, f_both.dim())), keepdim=True,
                                                        dtype=torch.float64)
    rows = base.shape[0]
    if criterion == "js":
        logp_hat = torch.log_softmax(f_both, cdim)
        logp = torch.log_softmax(base, channel_dim, dtype=logp_hat.dtype)
        log_mid = torch.logaddexp(logp_hat, logp) - math.log(2.0)
        js = logp_hat.exp() * (logp_hat - log_mid) + logp.exp() * (logp - log_mid)
        tokens = js.numel() // (2 * rows * base.shape[channel_dim])
        return (js.sum(tuple(range(2, js.dim())), keepdim=True, dtype=torch.float64) / (2 * tokens)).clamp_min(0.0)
    if criterion in ("cosine", "dot"):
        a = f_both.reshape(2, rows, -1).double()
        b = base.reshape(1, rows, -1).double()
        kept = (1,) * (base.dim() - 1)
        if criterion == "dot":
            return -(a * b).mean(-1).view(2, rows, *kept)
        return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).clamp_min(0.0).view(2, rows, *kept)
    raise ValueError(f"DynFuse: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def choose_subject(d_c: torch.Tensor, d_s: torch.Tensor) -> torch.Tensor:
    """Per row: keep the subject branch where d_c >= d_s, ties to the subject (dynamic fusion Eq. 13)."""
    return d_c >= d_s


def kept_branch(choose: torch.Tensor, f_both: torch.Tensor) -> torch.Tensor:
    """Row b of f_both[0] where choose[b], else of f_both[1]; choose is [B, 1, ...] (dynamic fusion Eq. 13)."""
    f_c, f_s = f_both.unbind(0)
    return torch.where(choose, f_c, f_s)


# ----------------------------------------------------------------------------- K-LoRA
def klora_k(rank_c: int, rank_s: int, numel: int) -> int:
    """K = r_c * r_s, clamped to the number of elements of dW (K-LoRA Eq. 5)."""
    return max(1, min(int(rank_c) * int(rank_s), int(numel)))


def topk_abs_sum(dw: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the K largest |dW| elements, float64 scalar (K-LoRA Eq. 1-4); K is clamped to dW's size."""
    flat = dw.detach().reshape(-1).abs().double()
    k = max(1, min(int(k), flat.numel()))
    return flat.topk(k, sorted=True).values.sum()


def klora_gamma(sum_abs_c: torch.Tensor, sum_abs_s: torch.Tensor) -> torch.Tensor:
    """gamma = sum_l sum |dW_c| / sum_l sum |dW_s| over the layers both LoRAs touch (K-LoRA Eq. 9).

    Zero-safe: when either LoRA is all zero there is nothing to balance and gamma = 1, so the non-zero LoRA
    wins wherever S > 0 (an all-zero style: S_c >= 0 = S_s' everywhere; an all-zero subject: 0 < S_s' where S_s > 0).
    """
    total_c = torch.as_tensor(sum_abs_c, dtype=torch.float64).sum()
    total_s = torch.as_tensor(sum_abs_s, dtype=torch.float64).sum()
    both = (total_c > 0) & (total_s > 0)
    return torch.where(both, total_c / torch.where(both, total_s, torch.ones_like(total_s)), torch.ones_like(total_c))


def klora_scale(p, alpha: float, beta: float, kind: str = "linear"):
    """S = alpha * p + beta (K-LoRA Eq. 7) or S* = (1.5 * p + 1.3) % alpha (K-LoRA supplement D, Eq. 12).

    `p` = denoising progress step/total (a float or a float64 tensor). The star scale ignores beta (its offset
    is the supplement's fixed 1.3) and needs alpha > 0.
    """
    if kind == "linear":
        return alpha * p + beta
    if kind == "star":
        if not alpha > 0:
            raise ValueError(f"DynFuse: the K-LoRA star scale needs alpha > 0 (it is taken modulo alpha), got {alpha}")
        v = STAR_SLOPE * p + STAR_OFFSET
        return torch.fmod(v, alpha) if torch.is_tensor(v) else math.fmod(v, alpha)  # v > 0: fmod is the exact mod
    raise ValueError(f"DynFuse: K-LoRA scale must be one of {', '.join(KLORA_SCALES)}, got {kind!r}")


def klora_choose_subject(s_c, s_s, gamma, scale):
    """Subject where S_c >= S_s * gamma * S, ties to the subject (K-LoRA Eq. 6, 8, 10)."""
    return s_c >= s_s * gamma * scale


def klora_switch_progress(s_c: torch.Tensor, s_s: torch.Tensor, gamma, alpha: float, beta: float) -> torch.Tensor:
    """p* per layer for the linear scale: subject for p <= p*, style after (K-LoRA Eq. 7 + 10 solved for p).

    S_c >= S_s*gamma*(alpha*p + beta)  <=>  p <= (S_c/(S_s*gamma) - beta) / alpha  for S_s*gamma > 0, alpha > 0.
    +inf: the layer never switches to the style; -inf: it is style from the first step. Needs alpha >= 0.
    """
    if alpha < 0:
        raise ValueError(f"DynFuse: the K-LoRA switch progress needs alpha >= 0, got {alpha}")
    s_c = torch.as_tensor(s_c, dtype=torch.float64)
    weighted_s = torch.as_tensor(s_s, dtype=torch.float64) * torch.as_tensor(gamma, dtype=torch.float64)
    inf = torch.full_like(s_c, math.inf)
    safe_s = torch.where(weighted_s > 0, weighted_s, torch.ones_like(weighted_s))
    ratio = s_c / safe_s
    if alpha > 0:
        p_star = (ratio - beta) / alpha
    else:  # constant scale beta: subject at every step or at none
        p_star = torch.where(ratio >= beta, inf, -inf)
    return torch.where(weighted_s > 0, p_star, inf)


def klora_progress(total_steps: int) -> torch.Tensor:
    """p = step / total for step = 0 .. total-1, float64 (K-LoRA Eq. 7's t_now / t_all, counted by the caller)."""
    total = max(1, int(total_steps))
    return torch.arange(total, dtype=torch.float64) / total


def klora_schedule(s_c: torch.Tensor, s_s: torch.Tensor, gamma, total_steps: int, alpha: float = 1.5,
                   beta: float = 0.5, kind: str = "linear", progress: Optional[Sequence[float]] = None) -> torch.Tensor:
    """bool [steps, layers]: True where the layer keeps the subject at that step (K-LoRA Eq. 6-10).

    Evaluated directly from Eq. 10 for every (step, layer) (cheap: it is done once per generation), so it is
    exact for both scales, including the non-monotonic star scale; `klora_switch_progress` is the closed
    form of the same table for the linear scale. `progress` overrides p = step/total (e.g. [0.0] for a text encoder).
    """
    p = klora_progress(total_steps) if progress is None else torch.as_tensor(progress, dtype=torch.float64)
    scale = klora_scale(p, alpha, beta, kind)[:, None]
    s_c = torch.as_tensor(s_c, dtype=torch.float64)[None, :]
    s_s = torch.as_tensor(s_s, dtype=torch.float64)[None, :]
    return klora_choose_subject(s_c, s_s, torch.as_tensor(gamma, dtype=torch.float64), scale)
