"""One LoRA's change to one target layer, normalised once, whatever format it came from.

Every reader (our safetensors parser, the A1111 builtin's `NetworkModule`s, Forge's `load_lora` patch
dicts) produces `LayerDelta`s; every fusion method consumes them. Nothing here imports a host.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Tuple

import torch

MAX_WEIGHT = 100.0   # |user weight| above this only overflows fp16 activations into Inf/NaN images


@dataclass(frozen=True)
class LayerDelta:
    """dW for one layer: low rank (`up @ down`, optional CP `mid`) or dense, times `scale`.

    Shapes follow the layer's weight:
      linear: down [r, in],            up [out, r]
      conv:   down [r, in, kh, kw],    up [out, r, 1, 1]    (LoCon)
      conv CP: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
      dense:  same shape as the layer weight (LoHa, LoKr, DoRA ... built once per generation)
    `scale` = alpha / rank * user weight; dense deltas are usually stored already scaled (scale 1.0), and
    any other scale multiplies them too.
    `out_slice` = (offset, size): the delta covers only those output channels of a fused layer
    (FLUX qkv / linear1 in Forge); None = all outputs.
    """

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    mid: Optional[torch.Tensor] = None
    dense: Optional[torch.Tensor] = None
    scale: float = 1.0
    out_slice: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        if self.dense is None and (self.down is None or self.up is None):
            raise ValueError("LayerDelta needs either dense or both up and down")

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def is_conv(self) -> bool:
        w = self.dense if self.dense is not None else self.down
        return w.dim() == 4

    @property
    def rank(self) -> int:
        """LoRA rank r (for dense deltas: the smaller matrix side, an upper bound)."""
        if self.is_low_rank:
            return int(self.down.shape[0])
        w = self.dense.flatten(1)
        return int(min(w.shape))

    def with_weight(self, weight: float) -> "LayerDelta":
        """The same delta with its scale multiplied by a user weight."""
        if self.dense is not None:
            return replace(self, dense=self.dense * weight)
        return replace(self, scale=self.scale * weight)

    def to(self, device=None, dtype=None) -> "LayerDelta":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return replace(self, down=mv(self.down), up=mv(self.up), mid=mv(self.mid), dense=mv(self.dense))

    def dense_weight(self) -> torch.Tensor:
        """The full dW (scaled), in the layer's weight shape restricted to `out_slice`. For setup, never per call."""
        if self.dense is not None:
            # the per-call path (lowrank.prepare_delta) multiplies dense deltas by `scale` too
            return self.dense if self.scale == 1.0 else self.dense * self.scale
        up = _at_least_float32(self.up).flatten(1)
        if self.mid is not None:
            # CP/Tucker: dW[o, i, kh, kw] = sum_{a,b} up[o, a] * mid[a, b, kh, kw] * down[b, i]
            dw = torch.einsum("oa,abhw,bi->oihw", up, _at_least_float32(self.mid), _at_least_float32(self.down).flatten(1))
        elif self.down.dim() == 4:
            down = _at_least_float32(self.down)
            dw = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            dw = up @ _at_least_float32(self.down)
        return (dw * self.scale).to(self.up.dtype)


def check_weight(weight, name: str = "weight") -> float:
    """A user's LoRA weight as a float: a real number (not a string, None or bool), finite, |weight| <= MAX_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"DynFuse: {name} must be a number, got {type(weight).__name__} {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise ValueError(f"DynFuse: {name} must be a finite number between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                         f"got {weight!r}")
    return value


def delta_parts(delta: LayerDelta) -> List[Tuple[str, torch.Tensor]]:
    """(part name, tensor) for every tensor a delta holds, its scale as a 0-d tensor too."""
    parts = [(n, getattr(delta, n)) for n in ("down", "mid", "up", "dense") if getattr(delta, n) is not None]
    return parts + [("scale", torch.tensor(float(delta.scale), dtype=torch.float64))]


def first_nonfinite(named: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or an Inf, or None: one host sync per device, for setup only."""
    named = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    by_device: dict = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(named)
    for rows in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in rows]).tolist()
        for i, ok in zip(rows, flags):
            finite[i] = ok
    return next((named[i][0] for i, ok in enumerate(finite) if not ok), None)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the tensor already is: dW is formed at no less than the factors' precision."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class FuseTarget:
    """One layer that at least one of the two LoRAs changes.

    `module` is any module whose output is `W x (+ b)` (nn.Linear, nn.Conv2d, Forge's ops.Linear, which is
    not an nn.Linear); `name` is the layer name used in records and messages; `group` is "unet" or "te".
    `part` = "q", "k", "v" or "out": the delta changes that projection of `module`, an nn.MultiheadAttention
    (open_clip text encoders; see mha.py); None = the module's own weight.
    """

    name: str
    module: torch.nn.Module
    subject: Optional[LayerDelta] = None
    style: Optional[LayerDelta] = None
    group: str = "unet"
    part: Optional[str] = None

    @property
    def is_shared(self) -> bool:
        return self.subject is not None and self.style is not None
