"""The balance control of `merge`: subject <-> style strengths, 0.5 the plain merge, exact at every setting."""
import pytest
import torch

from lib_dynfuse.blend import merge_scales
from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.session import FuseSession


def _delta(out_f, in_f, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return LayerDelta(up=torch.randn(out_f, 2, generator=g, dtype=torch.float64),
                      down=torch.randn(2, in_f, generator=g, dtype=torch.float64), scale=scale)


def _layer():
    lin = torch.nn.Linear(6, 8).double()
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(5))
    return lin


@pytest.mark.parametrize("balance, subject, style", [(0.0, 1.0, 0.0), (0.2, 1.0, 0.4), (0.5, 1.0, 1.0),
                                                     (0.8, 0.4, 1.0), (1.0, 0.0, 1.0)])
def test_merge_scales_trade_the_strengths_linearly(balance, subject, style):
    assert merge_scales(balance) == (pytest.approx(subject), pytest.approx(style))


@pytest.mark.parametrize("weight_space", [False, True])
def test_merge_at_a_balance_is_the_merge_of_the_scaled_deltas(weight_space):
    """Forward-time and baked into the weights alike: base + c dW_c + s dW_s with (c, s) = merge_scales(b)."""
    lin, dc, ds = _layer(), _delta(8, 6, 1, 0.5), _delta(8, 6, 2, 2.0)
    only_subject = torch.nn.Linear(6, 6).double()
    dc_only = _delta(6, 6, 3, 1.0)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        base, base_only = lin(x), only_subject(x)
        for b in (0.1, 0.3, 0.5, 0.7, 0.9):
            c, s = merge_scales(b)
            targets = [FuseTarget("l", lin, dc, ds), FuseTarget("o", only_subject, dc_only, None)]
            with FuseSession(targets, method="merge", balance=b, weight_space=weight_space):
                out, out_only = lin(x), only_subject(x)
            want = base + x @ (c * dc.dense_weight() + s * ds.dense_weight()).T
            assert torch.allclose(out, want, atol=1e-10), b
            assert torch.allclose(out_only, base_only + x @ (c * dc_only.dense_weight()).T, atol=1e-10), b
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in before.items())   # the model as before
    assert targets[0].subject is dc and dc.scale == 0.5                         # the caller's deltas untouched


def test_balance_is_refused_where_it_means_nothing():
    t = [FuseTarget("l", _layer(), _delta(8, 6, 1, 1.0), _delta(8, 6, 2, 1.0))]
    for method in ("dynamic", "klora"):
        with pytest.raises(ValueError, match="balance applies to the merge and blend methods"):
            FuseSession(t, method=method, balance=0.3)
    FuseSession(t, method="dynamic", balance=0.5)          # the default is every method's own rule
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="balance must be between 0 and 1"):
            FuseSession(t, method="merge", balance=bad)
