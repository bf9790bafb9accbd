"""A fused layer's LoRA deltas in as few ops per call as possible, laid out once per session.

On a GPU each op a hook dispatches costs ~5-10 us of host time whatever its size, and an SD1.5 UNet call has
~200 fused layers, so the per-call path is written for op count: the deltas are prepared once (cast, scale
folded into the up weights, transposed for `mm`) and a call runs a fixed handful of ops:
- `Summed`: y + sum of deltas (one LoRA, or `merge`'s two, down weights side by side): a linear layer is
  view, mm, view, addmm, view; a conv two convs and an add.
- `Stacked`: both LoRAs' deltas as one [2, *y.shape] tensor (ranks zero-padded to the larger): a linear layer
  is view, expand, bmm, bmm, view; a conv one conv over both downs and one grouped conv over both ups.
Anything else (dense deltas from LoHa/LoKr/DoRA, CP cores, fused-output slices, grouped or padded convs) takes
the per-delta path of lowrank.py. The two paths round differently (the scale folded into the up weights, the
sum inside addmm), so they agree within rounding, not bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .layer_delta import LayerDelta
from .lowrank import conv_params, full_delta_output, prepare_delta


@dataclass(frozen=True)
class Summed:
    """y + sum of low-rank deltas: linear down [in, R], up [R, out]; conv down [R, in, kh, kw], up [out, R, 1, 1]."""
    down: torch.Tensor
    up: torch.Tensor
    conv: bool


@dataclass(frozen=True)
class Stacked:
    """Two low-rank deltas side by side: linear down [2, in, r], up [2, r, out]; conv down [2r, in, kh, kw],
    up [2 out, r, 1, 1] (a grouped conv, groups=2)."""
    down: torch.Tensor
    up: torch.Tensor
    conv: bool


@dataclass(frozen=True)
class PerDelta:
    """Deltas computed one by one (lowrank.py), for the forms the fast layouts do not cover."""
    deltas: Tuple[LayerDelta, ...]


Prepared = Union[Summed, Stacked, PerDelta]


def _fast_form(delta: LayerDelta, module: torch.nn.Module) -> bool:
    """Low rank, no CP core, no output slice; convs plain (groups 1, zero padding)."""
    if not delta.is_low_rank or delta.mid is not None or delta.out_slice is not None:
        return False
    if not delta.is_conv:
        return True
    return conv_params(module)["groups"] == 1 and getattr(module, "padding_mode", "zeros") == "zeros"


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """A normal (non-inference) contiguous copy on device/dtype, usable under autograd later."""
    with torch.inference_mode(False), torch.no_grad():
        out = t.detach().to(device=device, dtype=dtype).contiguous()
        return out.clone() if out.is_inference() else out


def _scaled_up(delta: LayerDelta) -> torch.Tensor:
    """up * scale in at least float32, [out, r] (convs flattened)."""
    up = delta.up.flatten(1)
    return up.double() * delta.scale if up.dtype == torch.float64 else up.float() * delta.scale


def prepare_summed(deltas: Sequence[LayerDelta], module: torch.nn.Module, device, dtype) -> Prepared:
    """The sum of `deltas` (one or more, low rank) laid out for `plus_deltas` on x's device and dtype."""
    if not all(_fast_form(d, module) for d in deltas) or len({d.is_conv for d in deltas}) != 1:
        return PerDelta(tuple(prepare_delta(d, module, device, dtype) for d in deltas))
    conv = deltas[0].is_conv
    ups = torch.cat([_scaled_up(d) for d in deltas], dim=1)                      # [out, R]
    if conv:
        down = torch.cat([d.down for d in deltas], dim=0)                          # [R, in, kh, kw]
        return Summed(_cast(down, device, dtype), _cast(ups[:, :, None, None], device, dtype), True)
    down = torch.cat([d.down for d in deltas], dim=0)                              # [R, in]
    return Summed(_cast(down.t(), device, dtype), _cast(ups.t(), device, dtype), False)


def prepare_stacked(subject: LayerDelta, style: LayerDelta, module: torch.nn.Module, device, dtype) -> Prepared:
    """Both deltas laid out for `branch_deltas` (one [2, ...] result) on x's device and dtype."""
    if not (_fast_form(subject, module) and _fast_form(style, module)) or subject.is_conv != style.is_conv:
        return PerDelta((prepare_delta(subject, module, device, dtype), prepare_delta(style, module, device, dtype)))
    rank = max(subject.rank, style.rank)
    downs, ups = [], []
    for d in (subject, style):
        pad = rank - d.rank
        down, up = d.down.flatten(1), _scaled_up(d)
        downs.append(torch.cat([down, down.new_zeros(pad, down.shape[1])]) if pad else down)
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1) if pad else up)
    if subject.is_conv:
        kernel = subject.down.shape[1:]
        down = torch.cat(downs).reshape(2 * rank, *kernel)                        # [2r, in, kh, kw]
        up = torch.cat(ups).reshape(-1, rank, 1, 1)                                # [2 out, r, 1, 1]
        return Stacked(_cast(down, device, dtype), _cast(up, device, dtype), True)
    down = torch.stack([d.t() for d in downs])                                     # [2, in, r]
    up = torch.stack([u.t() for u in ups])                                         # [2, r, out]
    return Stacked(_cast(down, device, dtype), _cast(up, device, dtype), False)


def plus_deltas(prepared: Prepared, x: torch.Tensor, module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """y + the sum of the prepared deltas applied to x (the layer's input), shaped and typed like y."""
    if isinstance(prepared, PerDelta):
        out = y
        for d in prepared.deltas:
            out = out + full_delta_output(d, x, module, y)
        return out
    if prepared.conv:
        h = F.conv2d(x, prepared.down, None, **_geometry(module))
        return y + F.conv2d(h, prepared.up)
    tokens = x.numel() // x.shape[-1]
    h = torch.mm(x.reshape(tokens, -1), prepared.down)
    return torch.addmm(y.reshape(tokens, -1), h, prepared.up).view(y.shape)


def branch_deltas(prepared: Prepared, x: torch.Tensor, module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """[2, *y.shape]: dF_c = dW_c x and dF_s = dW_s x for the layer input x, in y's dtype."""
    if isinstance(prepared, PerDelta):
        return torch.stack([full_delta_output(d, x, module, y) for d in prepared.deltas])
    if prepared.conv:
        h = F.conv2d(x, prepared.down, None, **_geometry(module))
        d = F.conv2d(h, prepared.up, groups=2)                                     # [B, 2 out, H, W]
        return d.view(d.shape[0], 2, -1, *d.shape[2:]).movedim(1, 0)
    tokens = x.numel() // x.shape[-1]
    h = torch.bmm(x.reshape(tokens, -1).expand(2, tokens, -1), prepared.down)    # [2, tokens, r]
    return torch.bmm(h, prepared.up).view(2, *y.shape)


def _geometry(module: torch.nn.Module) -> dict:
    """The layer's stride/padding/dilation for the down conv (the up conv is 1x1)."""
    params = conv_params(module)
    params.pop("groups")
    return params


def layout_of(y: torch.Tensor) -> Optional[torch.memory_format]:
    """channels_last for a 4-d output in that layout, else None (the result is made contiguous as usual)."""
    if y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None
