"""K-LoRA's per-layer sums, computed once per LoRA pair (they depend on the weights only, never on the input).

For every layer both LoRAs touch: S_c, S_s = sum of the top-K |dW| (K = r_c * r_s, K-LoRA Eq. 3-5) and the
full sums sum|dW_c|, sum|dW_s| that gamma (Eq. 9) adds up. dW is the *scaled* delta (alpha/rank x user
weight), i.e. the change the layer really gets. The dense dW is built here, at setup, one layer at a time.
A small cache keyed by the caller's (file hash, weight) pair skips the work for a repeated generation.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence

import torch

from .layer_delta import FuseTarget
from .selection import klora_gamma, klora_k, topk_abs_sum

_CACHE_SIZE = 8


@dataclass(frozen=True)
class KLoraSums:
    """float64 [layers] tensors, in the order of `names` (with each layer's group), plus gamma (K-LoRA Eq. 3-5, 9)."""

    names: tuple
    top_c: torch.Tensor
    top_s: torch.Tensor
    abs_c: torch.Tensor
    abs_s: torch.Tensor
    groups: tuple = ()

    @property
    def gamma(self) -> torch.Tensor:
        """Eq. 9 over the UNet layers both LoRAs touch (K-LoRA is defined on the UNet), so the UNet's gamma
        does not depend on whether text encoders were given; over all shared layers when none is a UNet layer."""
        unet = torch.tensor([g == "unet" for g in self.groups], dtype=torch.bool)
        if len(self.groups) == len(self.names) and bool(unet.any()):
            return klora_gamma(self.abs_c[unet], self.abs_s[unet])
        return klora_gamma(self.abs_c, self.abs_s)


def layer_sums(targets: Sequence[FuseTarget]) -> KLoraSums:
    """Top-K and full |dW| sums of every shared target (both LoRAs present), in the given order."""
    shared = [t for t in targets if t.is_shared]
    top_c: List[torch.Tensor] = []
    top_s: List[torch.Tensor] = []
    abs_c: List[torch.Tensor] = []
    abs_s: List[torch.Tensor] = []
    with torch.no_grad():
        for t in shared:
            dw_c, dw_s = t.subject.dense_weight(), t.style.dense_weight()
            k = klora_k(t.subject.rank, t.style.rank, min(dw_c.numel(), dw_s.numel()))
            top_c.append(topk_abs_sum(dw_c, k))
            top_s.append(topk_abs_sum(dw_s, k))
            abs_c.append(dw_c.abs().double().sum())
            abs_s.append(dw_s.abs().double().sum())

    def stack(values: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)

    return KLoraSums(tuple(t.name for t in shared), stack(top_c), stack(top_s), stack(abs_c), stack(abs_s),
                     tuple(t.group for t in shared))


class SumsCache:
    """LRU of `KLoraSums` by a caller-given key, e.g. (sha256_c, weight_c, sha256_s, weight_s, layer names)."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._items: "OrderedDict[Hashable, KLoraSums]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Optional[Hashable], targets: Sequence[FuseTarget]) -> KLoraSums:
        if key is None:
            return layer_sums(targets)
        key = (key, tuple(t.name for t in targets if t.is_shared))
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        sums = layer_sums(targets)
        self._items[key] = sums
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return sums


# One process-wide cache of weight statistics (not a counter: the values depend only on the LoRA files).
SUMS_CACHE = SumsCache()
