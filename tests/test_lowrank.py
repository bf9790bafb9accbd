"""lowrank.py: x -> down -> up equals the layer with dW merged into its weight, for every layer kind.

References build dW by hand (Python loops for CP) and run the *module itself* with W + dW. The low-rank path
sums in a different order than the dense one, so the comparison is allclose (float64: rtol 1e-12).
"""
import pytest
import torch
import torch.nn.functional as F

from lib_dynfuse.layer_delta import LayerDelta
from lib_dynfuse.lowrank import delta_output, full_delta_output, prepare_delta, widen_to_output

D = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=D)


def _merged_output(module, x, dw):
    """The module's own forward with W + dW (on a copy of the weight; the module is restored)."""
    original = module.weight.data.clone()
    try:
        with torch.no_grad():
            module.weight.data = original + dw
            merged = module(x)
            module.weight.data = original
            base = module(x)
    finally:
        module.weight.data = original
    return merged - base


def _linear_dw(down, up, scale):
    out, r = up.shape
    return torch.tensor([[sum(up[o, a].item() * down[a, i].item() for a in range(r)) * scale
                          for i in range(down.shape[1])] for o in range(out)], dtype=D)


def _cp_dw(down, mid, up, scale):
    out, r = up.shape[:2]
    cin, kh, kw = down.shape[1], mid.shape[2], mid.shape[3]
    dw = torch.zeros(out, cin, kh, kw, dtype=D)
    for o in range(out):
        for i in range(cin):
            for h in range(kh):
                for w in range(kw):
                    dw[o, i, h, w] = sum(up[o, a, 0, 0] * mid[a, b, h, w] * down[b, i, 0, 0]
                                         for a in range(r) for b in range(r)) * scale
    return dw


def test_linear_low_rank_equals_merged_weight():
    module = torch.nn.Linear(6, 5).to(D)
    delta = LayerDelta(down=_rand(3, 6, seed=1), up=_rand(5, 3, seed=2), scale=0.75)
    x = _rand(2, 4, 6, seed=3)
    expected = _merged_output(module, x, _linear_dw(delta.down, delta.up, 0.75))
    torch.testing.assert_close(delta_output(delta, x, module), expected, rtol=1e-12, atol=1e-12)


class ForgeStyleLinear(torch.nn.Module):
    """Stand-in for Forge's `backend.operations.ForgeOperations.Linear`: a plain Module (not an nn.Linear)
    holding weight/bias and calling F.linear (webui-forge.md: operations.py Linear; real-host-facts.md:
    `isinstance(m, torch.nn.Linear)` is False on Forge's targets)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(_rand(out_features, in_features, seed=11))
        self.bias = torch.nn.Parameter(_rand(out_features, seed=12))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_linear_decided_by_delta_not_module_class():
    module = ForgeStyleLinear(6, 4)
    assert not isinstance(module, torch.nn.Linear)
    delta = LayerDelta(down=_rand(2, 6, seed=4), up=_rand(4, 2, seed=5), scale=1.5)
    x = _rand(3, 6, seed=6)
    expected = _merged_output(module, x, _linear_dw(delta.down, delta.up, 1.5))
    torch.testing.assert_close(delta_output(delta, x, module), expected, rtol=1e-12, atol=1e-12)


CONVS = {
    "3x3 stride 2 pad 1": dict(kernel_size=3, stride=2, padding=1),
    "3x3 dilation 2 pad 2": dict(kernel_size=3, padding=2, dilation=2),
    "1x1": dict(kernel_size=1),
    "1x1 stride 2": dict(kernel_size=1, stride=2),
    "1x1 pad 1": dict(kernel_size=1, padding=1),
    "1x1 same": dict(kernel_size=1, padding="same"),
    "3x3 reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "3x1 same": dict(kernel_size=(3, 1), padding="same"),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_locon_equals_merged_weight(name):
    module = torch.nn.Conv2d(4, 5, **CONVS[name]).to(D)
    kh, kw = module.kernel_size
    delta = LayerDelta(down=_rand(2, 4, kh, kw, seed=7), up=_rand(5, 2, 1, 1, seed=8), scale=0.5)
    dw = (delta.up.flatten(1) @ delta.down.flatten(1)).reshape(5, 4, kh, kw) * 0.5
    x = _rand(2, 4, 7, 6, seed=9)
    torch.testing.assert_close(delta_output(delta, x, module), _merged_output(module, x, dw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "unbatched"])
def test_pointwise_conv_delta_in_every_layout(layout):
    # a 1x1 LoCon (SD1.5's proj_in/proj_out): the same values as the merged weight, in the layout the conv itself
    # returns, for every input layout (the next layers round by layout)
    module = torch.nn.Conv2d(4, 5, 1).to(D)
    delta = LayerDelta(down=_rand(2, 4, 1, 1, seed=1), up=_rand(5, 2, 1, 1, seed=2), scale=0.5)
    dw = (delta.up.flatten(1) @ delta.down.flatten(1)).reshape(5, 4, 1, 1) * 0.5
    x = _rand(3, 4, 6, 7, seed=3)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "sliced": x[:, :, :, ::2], "unbatched": x[0]}[layout]
    got = delta_output(delta, x, module)
    torch.testing.assert_close(got, _merged_output(module, x, dw), rtol=1e-12, atol=1e-12)
    assert got.stride() == module(x).stride()


@pytest.mark.parametrize("name", ["3x3 stride 2 pad 1", "3x3 dilation 2 pad 2"])
def test_conv_cp_equals_merged_weight(name):
    module = torch.nn.Conv2d(3, 4, **CONVS[name]).to(D)
    delta = LayerDelta(down=_rand(2, 3, 1, 1, seed=1), mid=_rand(2, 2, 3, 3, seed=2), up=_rand(4, 2, 1, 1, seed=3),
                       scale=0.25)
    dw = _cp_dw(delta.down, delta.mid, delta.up, 0.25)
    x = _rand(2, 3, 6, 5, seed=4)
    torch.testing.assert_close(delta_output(delta, x, module), _merged_output(module, x, dw), rtol=1e-12, atol=1e-12)


def test_dense_linear_and_conv():
    linear = torch.nn.Linear(6, 5).to(D)
    dense = _rand(5, 6, seed=1)
    x = _rand(2, 6, seed=2)
    torch.testing.assert_close(delta_output(LayerDelta(dense=dense), x, linear), _merged_output(linear, x, dense),
                               rtol=1e-12, atol=1e-12)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).to(D)
    dense = _rand(4, 3, 3, 3, seed=3)
    x = _rand(1, 3, 5, 5, seed=4)
    torch.testing.assert_close(delta_output(LayerDelta(dense=dense), x, conv), _merged_output(conv, x, dense),
                               rtol=1e-12, atol=1e-12)


def test_grouped_conv_low_rank_goes_dense_once():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2).to(D)
    delta = LayerDelta(down=_rand(2, 2, 3, 3, seed=5), up=_rand(6, 2, 1, 1, seed=6), scale=2.0)
    prepared = prepare_delta(delta, conv, "cpu", D)
    assert not prepared.is_low_rank and prepared.dense.shape == conv.weight.shape
    dw = (delta.up.flatten(1) @ delta.down.flatten(1)).reshape(6, 2, 3, 3) * 2.0
    x = _rand(2, 4, 5, 5, seed=7)
    # LayerDelta.dense_weight() multiplies in float32: float32 tolerance here
    torch.testing.assert_close(delta_output(prepared, x, conv), _merged_output(conv, x, dw), rtol=1e-5, atol=1e-5)


def test_out_slice_touches_only_its_channels():
    # a fused qkv Linear (Forge/FLUX style): the delta covers the k third only
    module = torch.nn.Linear(4, 9).to(D)
    delta = LayerDelta(down=_rand(2, 4, seed=1), up=_rand(3, 2, seed=2), scale=1.0, out_slice=(3, 3))
    x = _rand(2, 5, 4, seed=3)
    y = module(x).detach()
    full = full_delta_output(delta, x, module, y)
    assert full.shape == y.shape
    assert torch.equal(full[..., :3], torch.zeros(2, 5, 3, dtype=D))
    assert torch.equal(full[..., 6:], torch.zeros(2, 5, 3, dtype=D))
    assert torch.equal(full[..., 3:6], delta_output(delta, x, module))
    dw = torch.zeros(9, 4, dtype=D)
    dw[3:6] = _linear_dw(delta.down, delta.up, 1.0)
    torch.testing.assert_close(full, _merged_output(module, x, dw), rtol=1e-12, atol=1e-12)
    # conv: channels are dim 1
    conv = torch.nn.Conv2d(2, 6, 1).to(D)
    cdelta = LayerDelta(down=_rand(1, 2, 1, 1, seed=4), up=_rand(2, 1, 1, 1, seed=5), out_slice=(4, 2))
    cx = _rand(1, 2, 3, 3, seed=6)
    cfull = full_delta_output(cdelta, cx, conv, conv(cx))
    assert torch.equal(cfull[:, :4], torch.zeros(1, 4, 3, 3, dtype=D))
    assert torch.equal(cfull[:, 4:], delta_output(cdelta, cx, conv))
    with pytest.raises(ValueError, match="out_slice"):
        widen_to_output(torch.zeros(2, 3, dtype=D), LayerDelta(dense=torch.zeros(3, 4), out_slice=(8, 3)), 9)


def test_prepare_casts_once_and_leaves_no_inference_tensors():
    with torch.inference_mode():
        down, up = torch.randn(2, 4, generator=_g(1)), torch.randn(3, 2, generator=_g(2))
        delta = LayerDelta(down=down, up=up, scale=0.5)
        prepared = prepare_delta(delta, torch.nn.Linear(4, 3), "cpu", torch.float64)
    assert down.is_inference()
    assert prepared.down.dtype == prepared.up.dtype == torch.float64
    assert not prepared.down.is_inference() and not prepared.up.is_inference()
    assert prepared.scale == 0.5 and torch.equal(prepared.down, down.double())
    # same dtype: still not an inference tensor, so later autograd calls can save it for backward
    with torch.inference_mode():
        same = prepare_delta(LayerDelta(down=torch.ones(1, 2), up=torch.ones(2, 1)), None, "cpu", torch.float32)
    x = torch.ones(1, 2, requires_grad=True)
    delta_output(same, x, None).sum().backward()
    assert torch.equal(x.grad, torch.full((1, 2), 2.0))


def test_dense_scale_is_folded_in():
    dense = _rand(3, 4, seed=1)
    prepared = prepare_delta(LayerDelta(dense=dense, scale=0.5), torch.nn.Linear(4, 3), "cpu", D)
    assert torch.equal(prepared.dense, dense * 0.5)
