"""Tiny hand-made layers, deltas and inputs shared by the FuseSession tests (seeded, CPU float32)."""
import torch

from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.lowrank import delta_output


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _linear_delta(out_f, in_f, rank, seed, scale=1.0, zero=False):
    g = _g(seed)
    down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    up = torch.randn(out_f, rank, generator=g)
    return LayerDelta(down=down, up=torch.zeros_like(up) if zero else up, scale=scale)


def _conv_delta(out_c, in_c, k, rank, seed, scale=1.0):
    g = _g(seed)
    return LayerDelta(down=torch.randn(rank, in_c, k, k, generator=g) / (in_c * k * k) ** 0.5,
                      up=torch.randn(out_c, rank, 1, 1, generator=g), scale=scale)


def _ref_delta(delta, x, module=None):
    """dW x of the low-rank path itself (lowrank.delta_output, checked against merged weights in test_lowrank.py):
    these tests are about which branch a row keeps and the layout, and compare bits, so the same op order."""
    return delta_output(delta, x, module)


def _near(got, expected):
    """Equal within float32 rounding (the hooks and the references order their sums differently)."""
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def _linear(seed=0, in_f=6, out_f=8):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).eval()


def _identity_linear(n=4):
    """An n x n Linear with identity weight and zero bias: a layer whose output is its input."""
    lin = _linear(0, n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
        lin.bias.zero_()
    return lin


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=_g(seed))


def _klora_targets():
    lins = [_linear(i) for i in range(4)]
    targets = []
    for i, lin in enumerate(lins):
        # alternate which LoRA is stronger so that layers switch at different steps
        sc, ss = (3.0, 1.0) if i % 2 else (1.0, 1.5)
        targets.append(FuseTarget(f"l{i}", lin, _linear_delta(8, 6, 2, 20 + i, sc), _linear_delta(8, 6, 3, 40 + i, ss)))
    return targets
