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
LOG2_E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------- features -> distributions
def tokens_by_channels(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[B, ..., C, ...] -> [B, tokens, C]: every token's channel vector (dynamic fusion Eq. 11-12 inputs)."""
    moved = feature.movedim(channel_dim, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


def channel_log_probs(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """log softmax over channels per token, in float32: [B, tokens, C] (dynamic fusion Eq. 11-12)."""
    return torch.log_softmax(tokens_by_channels(feature, channel_dim).float(), dim=-1)


# ----------------------------------------------------------------------------- criteria (one value per row)
def softmax_parts(feature: torch.Tensor, channel_dim: int):
    """(exp(F - max), its sum, LSE) over channels per token, float32, channels kept as size 1 (dynamic fusion Eq. 11-12)."""
    # one memory layout for every input: equal features must reduce in the same order to the same bits (a
    # zero delta then diverges by exactly 0, even when the layer's output is channels_last)
    f = feature.float().contiguous()
    top = f.amax(channel_dim, keepdim=True)
    # exp(F - max) as 2^((F - max) log2 e), the shift and scale in one pass: a CPU's vectorised exp2 takes about
    # half the time of its exp (relative error ~1e-6 instead of ~1e-7; the exponent is <= 0 up to rounding: no overflow)
    unnormalised = torch.add(top.mul(-LOG2_E), f, alpha=LOG2_E).exp2_()
    total = unnormalised.sum(channel_dim, keepdim=True)
    return unnormalised, total, top + total.log()


def channel_logsumexp(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """log sum_c exp(F_c) per token, float32, channels kept as size 1: the softmax normaliser of Eq. 11-12."""
    return softmax_parts(feature, channel_dim)[2]


def _kl_terms(f_hat: torch.Tensor, delta: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """E_p_hat[dF] - LSE(F_hat) per token, float32, channels kept as size 1: KL(F_hat || F) per token less LSE(F)."""
    unnormalised, total, lse_hat = softmax_parts(f_hat, channel_dim)
    return unnormalised.mul_(delta.float().contiguous()).sum(channel_dim, keepdim=True).div_(total).sub_(lse_hat)


def kl_from_delta_per_row(f_hat: torch.Tensor, delta: torch.Tensor, lse_base: torch.Tensor,
                          channel_dim: int) -> torch.Tensor:
    """KL(F_hat || F) per token as sum_c p_hat dF - (LSE(F_hat) - LSE(F)), mean over tokens: [B] (dynamic fusion Eq. 11-12).

    The same value as sum_c p_hat (log p_hat - log p) (log p_hat - log p = dF - the LSE difference, and p_hat
    sums to one), with one exp per branch instead of two, on the layer's own layout (no copy to tokens x
    channels). `lse_base` = channel_logsumexp(F), shared by both branches. A zero dF gives exactly 0:
    F_hat is then F bit for bit, so both LSEs come from the same bits.
    """
    kl = _kl_terms(f_hat, delta, channel_dim).add_(lse_base)
    # KL >= 0; rounding can give -1e-9 for a tiny delta, which must not lose a tie against a zero delta.
    return kl.reshape(kl.shape[0], -1).mean(1).clamp_min(0.0)


def kl_score_per_row(f_hat: torch.Tensor, delta: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """mean over tokens of E_p_hat[dF] - LSE(F_hat), float64 [B]: KL(F_hat || F) less the mean LSE(F) (dynamic fusion Eq. 11-13).

    Eq. 13 only compares the two branches' KL, and LSE(F) is the same in both, so score_c - score_s =
    KL_c - KL_s without computing LSE(F) (a third softmax pass over the layer's output). The tokens' terms
    (each near -LSE, |.| ~ 5-10) are averaged in float64, so the difference keeps the float32 precision of
    the per-token terms instead of losing it to the rounding of two large means. Equal deltas give equal bits.
    """
    return _row_means64(_kl_terms(f_hat, delta, channel_dim))


def _row_means64(terms: torch.Tensor) -> torch.Tensor:
    """Per-token terms [B, ...] -> their mean per row, in float64: [B]."""
    return terms.reshape(terms.shape[0], -1).mean(1, dtype=torch.float64)


# CPU: a layer output this large is scored block by block of tokens, each block ~KL_BLOCK_BYTES per tensor, so
# that its ~10 passes (add, max, exp, sums, product) run in cache instead of streaming the whole output from
# memory each time (measured: 15-40% less time for SD1.5 outputs of 10-80 MiB; nothing to gain below that).
KL_BLOCK_BYTES = 1 << 20
KL_BLOCKED_FROM_BYTES = 8 << 20


def kl_scores_with_outputs(base: torch.Tensor, delta_c: torch.Tensor, delta_s: torch.Tensor, out: torch.Tensor,
                           channel_dim: int, block_bytes: Optional[int] = None):
    """Writes F_c = F + dF_c into out[0] and F_s = F + dF_s into out[1]; returns their `kl_score_per_row` (dynamic fusion Eq. 9-13).

    `out` is [2, *base.shape], contiguous. Both branches are scored by the same ops on `out` at once: half the
    op dispatches of scoring them one by one (on a GPU, 192 fused layers of small ops are bound by dispatch),
    and the bits of `kl_score_per_row` on each branch (every op is per token; the token means per row).
    Contiguous outputs with channels last are done token block by token block on the CPU instead
    (`block_bytes` of float32 per tensor; None = KL_BLOCK_BYTES for outputs from KL_BLOCKED_FROM_BYTES, else
    one block): the token means are taken over all blocks at the end, so the bits are the same again.
    """
    channels = base.shape[channel_dim]
    last = channel_dim in (-1, base.dim() - 1)
    rows = base.numel() // max(1, channels)
    if block_bytes is None:
        big = base.device.type == "cpu" and base.numel() * 4 >= KL_BLOCKED_FROM_BYTES
        block_bytes = KL_BLOCK_BYTES if big else None
    blockable = last and all(t.is_contiguous() for t in (base, delta_c, delta_s, out))
    step = max(1, block_bytes // (4 * channels)) if block_bytes and blockable else rows
    if step >= rows:
        torch.add(base, delta_c, out=out[0])
        torch.add(base, delta_s, out=out[1])
        # `_kl_terms` on both branches at once, written out: a per-branch loop in it costs ~20 us of dispatch per call
        both_dim = channel_dim if channel_dim < 0 else channel_dim + 1
        unnormalised, total, lse_hat = softmax_parts(out, both_dim)
        unnormalised[0].mul_(delta_c.float())   # as _kl_terms: a float64 layer's dF is rounded to float32 first
        unnormalised[1].mul_(delta_s.float())
        terms = unnormalised.sum(both_dim, keepdim=True).div_(total).sub_(lse_hat)
        means = terms.reshape(2, base.shape[0], -1).mean(2, dtype=torch.float64)
        return means[0], means[1]
    f = base.view(rows, channels)
    branches = ((delta_c.view(rows, channels), out[0].view(rows, channels)),
                (delta_s.view(rows, channels), out[1].view(rows, channels)))
    terms = torch.empty((2, rows, 1), dtype=torch.float32, device=base.device)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        for branch, (d, branch_out) in enumerate(branches):
            f_hat = torch.add(f[block], d[block], out=branch_out[block])
            terms[branch, block] = _kl_terms(f_hat, d[block], -1)
    rows_of_batch = terms.view(2, base.shape[0], -1)
    return _row_means64(rows_of_batch[0]), _row_means64(rows_of_batch[1])


def js_per_row(logp_hat: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per token, mean over tokens: [B] (dynamic fusion Table 4, 'JS')."""
    log_mid = torch.logaddexp(logp_hat, logp_base) - math.log(2.0)
    js = 0.5 * (logp_hat.exp() * (logp_hat - log_mid)).sum(-1) + 0.5 * (logp_base.exp() * (logp_base - log_mid)).sum(-1)
    return js.mean(-1).clamp_min(0.0)


def cosine_divergence_per_row(f_hat: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """1 - cos(F_hat, F) over each row's flattened features: [B] (dynamic fusion Table 4, 'cosine')."""
    a = f_hat.reshape(f_hat.shape[0], -1).float()
    b = f_base.reshape(f_base.shape[0], -1).float()
    return (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).clamp_min(0.0)


def dot_divergence_per_row(f_hat: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """-mean(F_hat * F) over each row: [B]; a larger value = less aligned = more change (dynamic fusion Table 4, 'dot')."""
    a = f_hat.reshape(f_hat.shape[0], -1).float()
    b = f_base.reshape(f_base.shape[0], -1).float()
    return -(a * b).mean(1)


def choose_subject(d_c: torch.Tensor, d_s: torch.Tensor) -> torch.Tensor:
    """Per row: keep the subject branch where d_c >= d_s, ties to the subject (dynamic fusion Eq. 13)."""
    return d_c >= d_s


def kept_rows(choose: torch.Tensor, f_c: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
    """Row b of F_c where choose[b], else of F_s: the bits and layout of where(choose, F_c, F_s) (dynamic fusion Eq. 13).

    On the CPU the choice is read without a device sync, so a batch whose rows all keep one branch gets that
    branch's tensor itself, and a mixed batch has only its style rows copied into F_c (which it overwrites):
    no pass over the whole output. Elsewhere it is one `where` (reading the choice would stall the device).
    """
    if choose.device.type != "cpu":
        return torch.where(choose.reshape(-1, *([1] * (f_c.dim() - 1))), f_c, f_s)
    style_rows = [row for row, subject in enumerate(choose.reshape(-1).tolist()) if not subject]
    if not style_rows:
        return f_c
    if len(style_rows) == choose.numel():
        return f_s
    for row in style_rows:
        f_c[row].copy_(f_s[row])
    return f_c


CRITERIA = ("kl", "js", "cosine", "dot")


def selection_scores(criterion: str, base: torch.Tensor, f_c: torch.Tensor, f_s: torch.Tensor, channel_dim: int,
                     delta_c: Optional[torch.Tensor] = None, delta_s: Optional[torch.Tensor] = None):
    """(s_c, s_s) per row that Eq. 13 compares: s_c >= s_s exactly where d_c >= d_s (dynamic fusion Eq. 9-13).

    KL: `kl_score_per_row`, the divergences less the LSE(F) term both share (one softmax pass fewer per
    layer); the other criteria: the divergences themselves (`output_divergences`).
    """
    if criterion != "kl":
        return output_divergences(criterion, base, f_c, f_s, channel_dim, delta_c, delta_s)
    delta_c, delta_s = _branch_deltas(base, f_c, f_s, delta_c, delta_s)
    return kl_score_per_row(f_c, delta_c, channel_dim), kl_score_per_row(f_s, delta_s, channel_dim)


def _branch_deltas(base, f_c, f_s, delta_c, delta_s):
    """(F_c - F, F_s - F), or the caller's deltas where it has them."""
    return (f_c - base if delta_c is None else delta_c), (f_s - base if delta_s is None else delta_s)


def branch_divergences(criterion: str, base: torch.Tensor, delta_c: torch.Tensor, delta_s: torch.Tensor,
                       channel_dim: int):
    """(d_c, d_s): the criterion for F + dF_c and F + dF_s against F, one value per row (dynamic fusion Eq. 9-12)."""
    return output_divergences(criterion, base, base + delta_c, base + delta_s, channel_dim, delta_c, delta_s)


def output_divergences(criterion: str, base: torch.Tensor, f_c: torch.Tensor, f_s: torch.Tensor, channel_dim: int,
                       delta_c: Optional[torch.Tensor] = None, delta_s: Optional[torch.Tensor] = None):
    """(d_c, d_s) from the two fine-tuned outputs F_c, F_s (and, for KL, their deltas F_c - F, F_s - F when the
    caller has them; otherwise they are formed here) (dynamic fusion Eq. 9-12)."""
    if criterion == "kl":
        lse = channel_logsumexp(base, channel_dim)
        delta_c, delta_s = _branch_deltas(base, f_c, f_s, delta_c, delta_s)
        return (kl_from_delta_per_row(f_c, delta_c, lse, channel_dim),
                kl_from_delta_per_row(f_s, delta_s, lse, channel_dim))
    if criterion == "js":
        logp = channel_log_probs(base, channel_dim)
        return (js_per_row(channel_log_probs(f_c, channel_dim), logp),
                js_per_row(channel_log_probs(f_s, channel_dim), logp))
    if criterion == "cosine":
        return cosine_divergence_per_row(f_c, base), cosine_divergence_per_row(f_s, base)
    if criterion == "dot":
        return dot_divergence_per_row(f_c, base), dot_divergence_per_row(f_s, base)
    raise ValueError(f"DynFuse: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


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
