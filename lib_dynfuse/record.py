"""Which branch every layer kept at every step, for cond and uncond rows apart (dynamic fusion Fig. 5, K-LoRA Fig. 6).

Per step and layer the record keeps how many rows chose the subject (`chosen`) and how many rows were seen
(`rows`), separately for "cond" and "uncond" rows. Several forward calls in one step (second-order samplers,
unbatched CFG) add up, so the share is their average. The subject counts of the dynamic method stay on the
device during sampling (adding a bool tensor needs no host sync); they are moved to the CPU once, when read.
A layer's choice is only queued when it is made and added up in bulk later (when read, or every FLUSH_EVERY
choices): adding it on the spot cost about 70 us of op dispatch per fused layer and call, for a 0/1 count.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

LABELS = ("cond", "uncond")
FLUSH_EVERY = 1024   # queued choices (a [B] bool tensor each) before they are added into the counts


class SelectionRecord:
    """Subject choices per (step, layer, label); `cond`, `uncond`, `both` -> float [steps, layers], NaN = not run."""

    def __init__(self, layer_names: Sequence[str]):
        self.layer_names: List[str] = list(layer_names)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self._device_chosen: Dict[int, torch.Tensor] = {}   # step -> [layers, 2] on the device, float32
        self._host_chosen: Dict[int, List[List[int]]] = {}  # step -> [layers][2] host-decided choices (klora)
        self._rows: Dict[int, List[List[int]]] = {}         # step -> [layers][2] rows seen (known on the host)
        self._masks: Dict[tuple, torch.Tensor] = {}         # (labels, device) -> [2, B] float label masks
        self._queued: Dict[tuple, List[torch.Tensor]] = {}  # (step, layer, labels, device) -> [choose [B], ...]
        self._queued_count = 0
        self.total_steps: int = 0

    # ------------------------------------------------------------------ writing
    def _buffer(self, store: Dict[int, torch.Tensor], step: int, device) -> torch.Tensor:
        buf = store.get(step)
        if buf is None:
            # a normal (not inference) tensor, so that it can be updated under and outside inference mode alike
            with torch.inference_mode(False):
                buf = torch.zeros(len(self.layer_names), 2, dtype=torch.float32, device=device)
            store[step] = buf
        return buf

    def _host_counts(self, store: Dict[int, List[List[int]]], step: int) -> List[List[int]]:
        counts = store.get(step)
        if counts is None:
            counts = store[step] = [[0, 0] for _ in self.layer_names]
        return counts

    def _count_rows(self, step: int, layer: int, labels: Sequence[str]) -> None:
        uncond = labels.count("uncond")
        counts = self._host_counts(self._rows, step)[layer]
        counts[0] += len(labels) - uncond
        counts[1] += uncond
        self.total_steps = max(self.total_steps, step + 1)

    def add_rows(self, step: int, layer: int, choose: torch.Tensor, labels: Sequence[str]) -> None:
        """Record a per-row bool tensor [B] or [B, 1, ...] (on any device) without a host sync (queued; see the module doc)."""
        self._queued.setdefault((step, layer, tuple(labels), choose.device), []).append(choose)
        self._queued_count += 1
        self._count_rows(step, layer, labels)
        if self._queued_count >= FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Add the queued choices into the per-step counts, a few ops per (step, layer, labels), no host sync."""
        queued, self._queued, self._queued_count = self._queued, {}, 0
        for (step, layer, labels, device), chooses in queued.items():
            mask = self._masks.get((labels, device))
            if mask is None:
                with torch.inference_mode(False):
                    mask = torch.tensor([[lab != "uncond" for lab in labels], [lab == "uncond" for lab in labels]],
                                        dtype=torch.float32, device=device)
                self._masks[(labels, device)] = mask
            with torch.no_grad():   # 0/1 sums: exact in float32
                rows = torch.stack(chooses).float().sum(0) if len(chooses) > 1 else chooses[0].float()
                self._buffer(self._device_chosen, step, device)[layer].add_(mask @ rows.reshape(-1))

    def add_all(self, step: int, layer: int, subject: bool, labels: Sequence[str]) -> None:
        """Record one host-side decision that holds for every row (K-LoRA's schedule)."""
        if subject:
            uncond = sum(1 for lab in labels if lab == "uncond")
            counts = self._host_counts(self._host_chosen, step)[layer]
            counts[0] += len(labels) - uncond
            counts[1] += uncond
        self._count_rows(step, layer, labels)

    def layer_index(self, name: str) -> int:
        return self._index[name]

    # ------------------------------------------------------------------ reading
    def _table(self, store: Dict[int, object], steps: int) -> torch.Tensor:
        out = torch.zeros(steps, len(self.layer_names), 2, dtype=torch.float64)
        for step, buf in store.items():
            if step < steps:
                out[step] += torch.as_tensor(buf).detach().to("cpu", torch.float64).reshape(-1, 2)
        return out

    def counts(self, steps: Optional[int] = None):
        """(chosen, rows): float64 [steps, layers, 2] (last dim: cond, uncond)."""
        steps = self.total_steps if steps is None else steps
        self._flush()
        chosen = self._table(self._device_chosen, steps) + self._table(self._host_chosen, steps)
        return chosen, self._table(self._rows, steps)

    def _share(self, chosen: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.where(rows > 0, chosen / rows.clamp_min(1), torch.full_like(rows, float("nan")))

    @property
    def cond(self) -> torch.Tensor:
        """Share of cond rows that kept the subject: [steps, layers], NaN where the layer saw no cond row."""
        chosen, rows = self.counts()
        return self._share(chosen[..., 0], rows[..., 0])

    @property
    def uncond(self) -> torch.Tensor:
        """Share of uncond rows that kept the subject: [steps, layers], NaN where the layer saw no uncond row."""
        chosen, rows = self.counts()
        return self._share(chosen[..., 1], rows[..., 1])

    @property
    def both(self) -> torch.Tensor:
        """Share of all rows that kept the subject: [steps, layers], NaN where the layer did not run."""
        chosen, rows = self.counts()
        return self._share(chosen.sum(-1), rows.sum(-1))
