"""dF = dW x for one LayerDelta and the layer's input x, in low rank: x -> down -> up, never the dense dW per call.

Linear or conv is decided from the delta's weight (4-d = conv), never from the module's class: Forge's
`ops.Linear` is not an `nn.Linear`. Conv parameters (stride, padding, dilation, groups, padding_mode) are
read from the module's attributes, which `nn.Conv2d` and every subclass of it (Forge's `ops.Conv2d`) have.
`prepare_delta` casts a delta once (per session, device and dtype); `delta_output` is the per-call math.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layer_delta import LayerDelta


def conv_params(module: torch.nn.Module) -> dict:
    """stride/padding/dilation/groups of a conv module (defaults of F.conv2d where an attribute is missing)."""
    return dict(stride=getattr(module, "stride", 1), padding=getattr(module, "padding", 0),
                dilation=getattr(module, "dilation", 1), groups=getattr(module, "groups", 1))


def _conv_input(x: torch.Tensor, module: torch.nn.Module, params: dict) -> Tuple[torch.Tensor, dict]:
    """Apply a non-zero padding_mode (reflect/replicate/circular) the way nn.Conv2d does, before a padding-0 conv."""
    mode = getattr(module, "padding_mode", "zeros")
    if mode == "zeros":
        return x, params
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), dict(params, padding=0)


def prepare_delta(delta: LayerDelta, module: torch.nn.Module, device, dtype) -> LayerDelta:
    """The delta on x's device and dtype, detached, ready for `delta_output` (built once, not per call).

    A low-rank conv on a grouped conv (groups > 1) has no low-rank form that keeps the groups, so it becomes
    dense here. Dense deltas get their `scale` folded in. Tensors made under inference mode are copied into
    normal tensors so that the same cast weights serve later calls under autograd (guidance gradients).
    """
    if delta.is_low_rank and delta.is_conv and conv_params(module)["groups"] != 1:
        delta = LayerDelta(dense=delta.dense_weight(), out_slice=delta.out_slice)
    if not delta.is_low_rank and delta.scale != 1.0:
        delta = LayerDelta(dense=delta.dense * delta.scale, out_slice=delta.out_slice)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        with torch.inference_mode(False), torch.no_grad():
            out = t.detach().to(device=device, dtype=dtype)
            if out.is_inference():
                out = out.clone()
        return out

    return LayerDelta(down=cast(delta.down), up=cast(delta.up), mid=cast(delta.mid), dense=cast(delta.dense),
                      scale=delta.scale, out_slice=delta.out_slice)


def delta_output(delta: LayerDelta, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """dW x for this layer's input x (dynamic fusion Eq. 9-10's dW_c F / dW_s F), only `out_slice` channels wide."""
    if delta.is_conv:
        params = conv_params(module)
        x, params = _conv_input(x, module, params)
        if not delta.is_low_rank:
            return F.conv2d(x, delta.dense, None, **params)
        if delta.mid is not None:
            # CP/Tucker: 1x1 down to rank, the kxk core with the layer's geometry, 1x1 up
            h = F.conv2d(x, delta.down)
            h = F.conv2d(h, delta.mid, None, params["stride"], params["padding"], params["dilation"])
        else:
            h = F.conv2d(x, delta.down, None, params["stride"], params["padding"], params["dilation"])
        return _scaled(F.conv2d(h, delta.up), delta.scale)
    if not delta.is_low_rank:
        return F.linear(x, delta.dense)
    return _scaled(F.linear(F.linear(x, delta.down), delta.up), delta.scale)


def _scaled(h: torch.Tensor, scale: float) -> torch.Tensor:
    """h * scale, skipping the full-size multiply when scale is 1 (alpha = rank): the same bits, one pass less."""
    return h if scale == 1.0 else h * scale


def channel_dim(delta: LayerDelta) -> int:
    """Where the output channels are: dim 1 for a conv ([B, C, H, W]), the last dim for a linear ([..., C])."""
    return 1 if delta.is_conv else -1


def widen_to_output(d: torch.Tensor, delta: LayerDelta, out_channels: int) -> torch.Tensor:
    """Zero-pad a delta that covers only `out_slice` = (offset, size) to the layer's full output channels."""
    if delta.out_slice is None:
        return d
    offset, size = delta.out_slice
    after = out_channels - offset - size
    if offset < 0 or after < 0 or d.shape[channel_dim(delta)] != size:
        raise ValueError(f"DynFuse: out_slice {delta.out_slice} does not fit an output of {out_channels} channels "
                         f"(delta has {d.shape[channel_dim(delta)]})")
    if delta.is_conv:
        return F.pad(d, (0, 0, 0, 0, offset, after))
    return F.pad(d, (offset, after))


def full_delta_output(delta: LayerDelta, x: torch.Tensor, module: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """dW x shaped and typed like the layer's output `like` (out_slice widened with zeros)."""
    d = delta_output(delta, x, module)
    d = widen_to_output(d, delta, like.shape[channel_dim(delta)])
    return d if d.dtype == like.dtype else d.to(like.dtype)
