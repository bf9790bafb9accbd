"""LayerDelta: the dense dW it stands for, whatever its form, agrees with the per-call path's convention."""
import pytest
import torch

from lib_dynfuse.layer_delta import LayerDelta
from lib_dynfuse.lowrank import delta_output, prepare_delta


def test_low_rank_dense_weight_is_up_down_times_scale():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    d = LayerDelta(down=down, up=up, scale=0.5)
    assert torch.equal(d.dense_weight(), (up @ down) * 0.5)
    assert d.rank == 3 and not d.is_conv and d.is_low_rank


def test_dense_delta_scale_is_applied_like_the_per_call_path():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    d = LayerDelta(dense=w, scale=0.25)
    assert torch.equal(d.dense_weight(), w * 0.25)
    layer = torch.nn.Linear(5, 4).double()
    per_call = delta_output(prepare_delta(d, layer, x.device, x.dtype), x, layer)
    assert torch.allclose(per_call, x @ d.dense_weight().T, rtol=1e-12, atol=0)


def test_with_weight_scales_low_rank_and_dense_alike():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
    low = LayerDelta(down=down, up=up, scale=2.0)
    dense = LayerDelta(dense=low.dense_weight())
    assert torch.allclose(low.with_weight(0.3).dense_weight(), dense.with_weight(0.3).dense_weight())


def test_needs_dense_or_both_factors():
    with pytest.raises(ValueError):
        LayerDelta(down=torch.zeros(1, 2))
