"""LoRA deltas on a torch.nn.MultiheadAttention: its q/k/v/out projections recomputed in one forward hook.

open_clip's text transformer (SD2's encoder, SDXL's second) attends with nn.MultiheadAttention, whose forward
reads `in_proj_weight` and `out_proj.weight` as tensors: no sub-module is called, so per-Linear hooks never
fire. A hook on the MHA itself redoes its math with each projection's output passed through `fuse_part`
(part name, the projection's input, its base output -> the fused output), which applies the same branch
choice as for any other layer. Everything here works batch-first, [N, L, E]: the rows that the selection
compares are the batch, whatever the module's layout.
Dropout is not applied (text encoders run in eval). `add_bias_kv` / `add_zero_attn` are refused up front.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PARTS = ("q", "k", "v", "out")
# nn.MultiheadAttention.forward's parameters after self, in order (torch 2.0 - 2.x)
FORWARD_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                  "average_attn_weights", "is_causal")
FORWARD_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                    "average_attn_weights": True, "is_causal": False}

FusePart = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def unsupported(mha: torch.nn.MultiheadAttention) -> str:
    """Why this MHA cannot be recomputed here ('' = it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv"
    if mha.add_zero_attn:
        return "add_zero_attn"
    return ""


def part_weight(mha: torch.nn.MultiheadAttention, part: str) -> torch.Tensor:
    """The weight a LoRA on `part` changes: rows [0:E], [E:2E], [2E:3E] of in_proj_weight for q, k, v."""
    if part == "out":
        return mha.out_proj.weight
    index = PARTS.index(part)
    if index > 2:
        raise ValueError(f"DynFuse: MultiheadAttention part must be one of {', '.join(PARTS)}, got {part!r}")
    if not mha._qkv_same_embed_dim:
        return getattr(mha, f"{part}_proj_weight")
    e = mha.embed_dim
    return mha.in_proj_weight[index * e:(index + 1) * e]


def part_bias(mha: torch.nn.MultiheadAttention, part: str) -> Optional[torch.Tensor]:
    if part == "out":
        return mha.out_proj.bias
    if mha.in_proj_bias is None:
        return None
    e = mha.embed_dim
    index = PARTS.index(part)
    return mha.in_proj_bias[index * e:(index + 1) * e]


def forward_arguments(args: tuple, kwargs: dict) -> dict:
    """The MHA call's arguments by name (hosts may patch forward with *args, **kwargs)."""
    if len(args) > len(FORWARD_PARAMS):
        raise TypeError(f"MultiheadAttention got {len(args)} positional arguments")
    bound = dict(FORWARD_DEFAULTS)
    bound.update(zip(FORWARD_PARAMS, args))
    bound.update(kwargs)
    bound.setdefault("key", bound["query"])
    bound.setdefault("value", bound["key"])
    return bound


def additive_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], batch: int,
                  heads: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """attn_mask [L, S] or [N*heads, L, S] and key_padding_mask [N, S] -> one float mask [N, heads|1, L|1, S].

    MHA's bool masks mark positions to ignore (True = -inf); float masks are added to the scores."""
    def as_float(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = as_float(attn_mask)
        mask = mask.reshape(batch, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask[None, None]
    if key_padding_mask is not None:
        padding = as_float(key_padding_mask).reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], need_weights: bool):
    """softmax(q k^T / sqrt(d) + mask) v per head: [N, H, L, d] -> ([N, H, L, d], weights [N, H, L, S] or None)."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(-1)
    return weights @ v, weights


def fused_forward(mha: torch.nn.MultiheadAttention, args: tuple, kwargs: dict, fuse_part: FusePart):
    """nn.MultiheadAttention's output for this call, every projection's output through `fuse_part`."""
    a = forward_arguments(args, kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if a["key_padding_mask"] is not None:
            a["key_padding_mask"] = a["key_padding_mask"].unsqueeze(0)
    elif mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # now [L, N, E] -> batch-first [N, L, E]
    query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, heads = query.shape[0], mha.num_heads

    def project(part: str, x: torch.Tensor) -> torch.Tensor:
        return fuse_part(part, x, F.linear(x, part_weight(mha, part), part_bias(mha, part)))

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = project("q", query), project("k", key), project("v", value)
    mask = additive_mask(a["attn_mask"], a["key_padding_mask"], batch, heads, q.dtype)
    heads_out, weights = attend(split_heads(q), split_heads(k), split_heads(v), mask, bool(a["need_weights"]))
    out = project("out", heads_out.transpose(1, 2).reshape(batch, query.shape[1], -1))

    if weights is not None and a["average_attn_weights"]:
        weights = weights.mean(1)
    if unbatched:
        return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
    return (out if mha.batch_first else out.transpose(0, 1)), weights
