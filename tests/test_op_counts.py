"""Ops a fused layer dispatches per call (bench/op_count.py, meta device = the GPU code path): the host-side
cost that bounds a GPU step over ~200 fused layers. Targets per fused linear layer: `dynamic` kl <= 16,
forward-time `merge` <= 8, `klora` <= 6 (float32; a half-precision model adds the two casts of the float32
branch sum that keeps its choices right, see test_half_precision.py)."""
import pytest
import torch

from bench.op_count import LAYERS, ops_per_call

TARGETS = {("dynamic", "kl"): 16, ("merge", "kl"): 8, ("klora", "kl"): 6}


@pytest.mark.parametrize("method,criterion", sorted(TARGETS))
@pytest.mark.parametrize("kind", LAYERS)
def test_fused_layers_dispatch_few_ops(method, criterion, kind):
    target = TARGETS[(method, criterion)]
    assert len(ops_per_call(kind, method, criterion, torch.float32)) <= target
    half = ops_per_call(kind, method, criterion, torch.float16)
    assert len(half) <= target + (2 if method == "dynamic" else 0), half


def test_dynamic_kl_linear_is_the_documented_sequence():
    """The op list itself, so that a change to the hot path is seen here and in the README's table."""
    ops = [op.split(".")[1] for op in ops_per_call("linear", "dynamic", "kl", torch.float32)]
    assert ops == ["view", "expand", "bmm", "bmm", "view", "add", "_log_softmax", "exp", "sub", "mul", "sum",
                   "unbind", "ge", "unbind", "where"]
