"""FLUX (BFL naming) helpers: fused-output slices and block names. No host imports.

FLUX fuses q, k, v (and in single blocks the MLP input) into one Linear: `double_blocks.N.img_attn.qkv`
[3*hidden, hidden], `txt_attn.qkv`, and `single_blocks.N.linear1` [3*hidden + mlp, hidden]. A diffusers-named
FLUX LoRA trains `to_q`, `to_k`, `to_v`, `proj_mlp` separately; each lands in its own output-channel slice of
the fused layer. One hook per fused layer needs one delta per LoRA, so the slices of one LoRA are joined here
into one low-rank delta whose `up` is block-structured (exact: sum of the parts, nothing else).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from .layer_delta import LayerDelta

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def output_range(delta: LayerDelta, out_channels: int):
    """(first, end) output channels a delta covers: its `out_slice`, or all `out_channels`."""
    if delta.out_slice is None:
        return 0, out_channels
    offset, size = delta.out_slice
    return offset, offset + size


def join_slices(parts: Sequence[LayerDelta], out_channels: int) -> LayerDelta:
    """One LayerDelta equal to the sum of `parts`, each adding to its own `out_slice` of a fused layer.

    Low rank (no CP mid): down = all parts' downs stacked [sum r, in]; up [covered, sum r] holds each part's
    up (times its scale) in its rows and rank columns, zeros elsewhere; out_slice = the covered range.
    Otherwise dense over the covered range. Overlapping slices add up, as weight merging would.
    """
    if not parts:
        raise ValueError("join_slices needs at least one delta")
    if len(parts) == 1:
        return parts[0]
    ranges = [output_range(d, out_channels) for d in parts]
    first = min(r[0] for r in ranges)
    end = max(r[1] for r in ranges)
    if end > out_channels or first < 0:
        raise ValueError(f"DynFuse: LoRA slices {ranges} do not fit a layer with {out_channels} outputs")
    out_slice: Optional[tuple] = None if (first, end) == (0, out_channels) else (first, end - first)
    if all(d.is_low_rank and d.mid is None for d in parts):
        dtype = parts[0].up.dtype
        downs = [d.down.to(dtype) for d in parts]
        rank = sum(int(d.shape[0]) for d in downs)
        up = torch.zeros((end - first, rank) + tuple(parts[0].up.shape[2:]), dtype=dtype, device=parts[0].up.device)
        col = 0
        for d, (lo, hi) in zip(parts, ranges):
            r = int(d.down.shape[0])
            up[lo - first:hi - first, col:col + r] = d.up.to(dtype) * d.scale
            col += r
        return LayerDelta(down=torch.cat(downs, 0), up=up, scale=1.0, out_slice=out_slice)
    dtype = (parts[0].dense if parts[0].dense is not None else parts[0].up).dtype
    dense = None
    for d, (lo, hi) in zip(parts, ranges):
        w = d.dense_weight().float()
        if dense is None:
            dense = torch.zeros((end - first,) + tuple(w.shape[1:]), dtype=torch.float32, device=w.device)
        dense[lo - first:hi - first] += w
    return LayerDelta(dense=dense.to(dtype), out_slice=out_slice)


def block_of(name: str) -> Optional[str]:
    """'double_blocks.3' / 'single_blocks.12' for a FLUX layer name, None for other layers."""
    m = _BLOCK.match(name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def is_flux_layer_name(name: str) -> bool:
    """True for BFL-named FLUX transformer layers (double or single blocks)."""
    return block_of(name) is not None
