"""Half-precision layers choose the branch a float64 computation of the same layer chooses (dynamic fusion Eq. 9-13).

Real users run float16 (SD1.5, SDXL) or bfloat16 (FLUX). The case: one 320-channel linear layer with |F| ~ 3 and
two rank-8 LoRAs with |dF| ~ 0.05, the style 0.7-1.3 times the subject's strength, one batch row per call. The
float64 reference runs the same weights and input in float64; a case counts where its two divergences are at
least 3% apart (a clear case; see `_reference_choice`). Rounding F + dF to half precision moves every channel by up to half an ulp of F
(0.008 in bfloat16), the order of dF itself, so the hooks score branches summed in float32.
"""
import pytest
import torch

from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.selection import CRITERIA, branch_divergences
from lib_dynfuse.session import FuseSession

CHANNELS, RANK, TOKENS, PAIRS, ROWS = 320, 8, 16, 8, 16   # 8 LoRA pairs x 16 rows (inputs): 128 cases


def _layer(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(CHANNELS, CHANNELS, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(3.0 * torch.randn(CHANNELS, CHANNELS, generator=g, dtype=torch.float64) / CHANNELS ** 0.5)
    return layer


def _pair(seed: int):
    """(x [ROWS, TOKENS, C], subject delta, style delta) in float64; every row is a case of its own."""
    g = torch.Generator().manual_seed(1000 + seed)   # not the layer's seed: x must not repeat its weights
    x = torch.randn(ROWS, TOKENS, CHANNELS, generator=g, dtype=torch.float64)
    ratio = 0.7 + 0.6 * seed / (PAIRS - 1)

    def delta(strength):
        down = torch.randn(RANK, CHANNELS, generator=g, dtype=torch.float64) / CHANNELS ** 0.5
        up = strength * 0.05 * torch.randn(CHANNELS, RANK, generator=g, dtype=torch.float64) / RANK ** 0.5
        return LayerDelta(down=down, up=up, scale=1.0)
    return x, delta(1.0), delta(ratio)


def _reference_choices(criterion, layer, x, subject, style):
    """(subject kept [ROWS], clear [ROWS]): the float64 choices of Eq. 13 and whether a row's two changes are
    at least 3% apart. A change is the criterion's value less its value for an unchanged F (0 for the
    divergences; -mean(F*F) for dot, which would otherwise make every case look close)."""
    with torch.no_grad():
        y = layer(x)
        d_c = x @ subject.down.T @ subject.up.T * subject.scale
        d_s = x @ style.down.T @ style.up.T * style.scale
        div_c, div_s = branch_divergences(criterion, y, d_c, d_s, -1)
        unchanged, _ = branch_divergences(criterion, y, torch.zeros_like(y), torch.zeros_like(y), -1)
    a, b = div_c - unchanged, div_s - unchanged
    return a >= b, (a - b).abs() >= 0.03 * torch.maximum(a.abs(), b.abs())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_half_precision_choices_agree_with_float64(criterion, dtype):
    layer, half = _layer(), _layer(dtype)
    agree = clear = 0
    for seed in range(PAIRS):
        x, subject, style = _pair(seed)
        expected, is_clear = _reference_choices(criterion, layer, x, subject, style)
        with torch.no_grad(), FuseSession([FuseTarget("l", half, subject, style)], criterion=criterion, method="dynamic") as session:
            session.set_row_labels(["cond"] * ROWS)
            for row in range(ROWS):        # one row per call, as the paper's sampler sees a layer
                session.set_step(row, ROWS)
                half(x[row:row + 1].to(dtype))
        got = session.selection[:, 0] == 1.0
        clear += int(is_clear.sum())
        agree += int((got == expected)[is_clear].sum())
    assert clear >= PAIRS * ROWS // 2
    assert agree >= 0.98 * clear, f"{criterion} {dtype}: {agree}/{clear} clear cases agree with float64"
