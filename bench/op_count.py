"""Ops each fused layer dispatches per call, views included: what a GPU pays on the host side for each of the
~200 fused layers of an SD1.5 UNet call (~5-10 us per op, whatever its size).

Counted with a TorchDispatchMode on the meta device, which takes the same code path as a GPU (nothing is read
back to the host there), as the difference between a hooked and a plain call of one layer.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (case name, method, criterion): the methods as they run forward-time (A1111 functional mode, Forge klora)
CASES: Tuple[Tuple[str, str, str], ...] = (
    ("dynamic_kl", "dynamic", "kl"), ("dynamic_js", "dynamic", "js"), ("dynamic_cosine", "dynamic", "cosine"),
    ("dynamic_dot", "dynamic", "dot"), ("klora", "klora", "kl"), ("merge", "merge", "kl"),
)
LAYERS = ("linear", "conv1x1", "conv3x3")


class OpLog(TorchDispatchMode):
    """Every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer(kind: str, dtype: torch.dtype):
    """(module, input, subject delta, style delta) on the meta device; ranks 4 and 3 (padded when stacked)."""
    from lib_dynfuse.layer_delta import LayerDelta
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        module, x = torch.nn.Linear(8, 12), torch.empty(2, 5, 8)
        shapes = [((r, 8), (12, r)) for r in (4, 3)]
    else:
        k = 3 if kind == "conv3x3" else 1
        module, x = torch.nn.Conv2d(8, 12, k, padding=k // 2), torch.empty(2, 8, 5, 5)
        shapes = [((r, 8, k, k), (12, r, 1, 1)) for r in (4, 3)]
    deltas = [LayerDelta(down=torch.randn(d, generator=g), up=torch.randn(u, generator=g), scale=0.5) for d, u in shapes]
    return module.to("meta", dtype), x.to("meta", dtype), deltas[0], deltas[1]


def ops_per_call(kind: str, method: str, criterion: str, dtype: torch.dtype = torch.float32) -> List[str]:
    """The ops a fused `kind` layer adds to one call over the plain layer (after a first call that casts)."""
    from lib_dynfuse.layer_delta import FuseTarget
    from lib_dynfuse.session import FuseSession
    module, x, subject, style = _layer(kind, dtype)
    with torch.no_grad():
        with OpLog() as plain:
            module(x)
        with FuseSession([FuseTarget("layer", module, subject, style)], method=method, criterion=criterion) as session:
            session.set_row_labels(["uncond", "cond"])
            module(x)
            with OpLog() as fused:
                module(x)
    extra = list(fused.ops)
    for op in plain.ops:
        extra.remove(op)
    return extra


def op_counts(dtypes=(torch.float32, torch.float16)) -> Dict[str, int]:
    """{"ops_<case>_<layer>_<dtype>": count} for every case, layer kind and dtype."""
    out = {}
    for dtype in dtypes:
        for name, method, criterion in CASES:
            for kind in LAYERS:
                out[f"ops_{name}_{kind}_{str(dtype).split('.')[-1]}"] = len(ops_per_call(kind, method, criterion, dtype))
    return out


def ops_table(counts: Dict[str, int]) -> str:
    """Markdown: ops per fused layer call, a row per case, a column per layer kind and dtype."""
    dtypes = sorted({k.rsplit("_", 1)[1] for k in counts}, key=lambda d: d != "float32")
    columns = [(kind, dt) for dt in dtypes for kind in LAYERS]
    lines = ["| ops per fused layer call (views included) | " + " | ".join(f"{k} {d}" for k, d in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, _, _ in CASES:
        lines.append(f"| `{name}` | " + " | ".join(str(counts.get(f"ops_{name}_{k}_{d}", "")) for k, d in columns) + " |")
    return "\n".join(lines) + "\n"
