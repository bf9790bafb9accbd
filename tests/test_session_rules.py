"""FuseSession rules beside the papers' own: K-LoRA's gamma over UNet layers, channels_last outputs, tied cond/uncond
rows, step windows and `blend`, on tiny hand-made layers (references as in test_session.py)."""
import math

import pytest
import torch

from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.session import FuseSession
from session_fixtures import _conv_delta, _g, _identity_linear, _linear, _linear_delta, _near, _ref_delta, _x


def test_klora_gamma_comes_from_the_unet_layers():
    te, unet_layer = _linear(0), _linear(1)
    dc_te, ds_te = _linear_delta(8, 6, 2, 10, 5.0), _linear_delta(8, 6, 2, 11, 0.1)
    dc, ds = _linear_delta(8, 6, 2, 12, 1.0), _linear_delta(8, 6, 2, 13, 2.0)
    both = FuseSession([FuseTarget("te", te, dc_te, ds_te, group="te"), FuseTarget("u", unet_layer, dc, ds)],
                       method="klora")
    unet_only = FuseSession([FuseTarget("u", unet_layer, dc, ds)], method="klora")
    te_only = FuseSession([FuseTarget("te", te, dc_te, ds_te, group="te")], method="klora")
    by_hand = (dc.up @ dc.down).abs().double().sum() / (2.0 * (ds.up @ ds.down).abs().double().sum())
    assert both.klora_sums.gamma.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert torch.equal(both.klora_sums.gamma, unet_only.klora_sums.gamma)
    te_by_hand = 5.0 * (dc_te.up @ dc_te.down).abs().double().sum() / (0.1 * (ds_te.up @ ds_te.down).abs().double().sum())
    assert te_only.klora_sums.gamma.item() == pytest.approx(te_by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("method", ["dynamic", "klora", "merge"])
def test_channels_last_outputs_keep_their_layout(method):
    """A host's conv output in channels_last must come back in channels_last: the next layers round by layout
    (seen in a real WebUI as 1/255 differences against its own LoRA)."""
    conv, single = torch.nn.Conv2d(3, 4, 1).eval(), torch.nn.Conv2d(3, 4, 1).eval()
    dc, ds = _conv_delta(4, 3, 1, 2, 5, scale=2.0), _conv_delta(4, 3, 1, 2, 6)
    x = _x(2, 3, 5, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y, y_single = conv(x), single(x)
        assert not y.is_contiguous()
        with FuseSession([FuseTarget("c", conv, dc, ds), FuseTarget("s", single, subject=dc)], method=method):
            got, got_single = conv(x), single(x)
        ref_single = y_single + _ref_delta(dc, x, single)
    assert got.stride() == y.stride() and got_single.stride() == ref_single.stride()
    assert torch.equal(got_single, ref_single)


def test_tied_rows_choose_together_by_their_summed_scores():
    """tie_rows: the k-th cond row and the k-th uncond row (one image under CFG) keep one branch, the one their
    summed scores favour; unpaired rows choose alone; without tie_rows every row chooses for itself."""
    lin = _identity_linear()
    dc = LayerDelta(down=torch.diag(torch.tensor([4.0, 0, 0, 0])), up=torch.eye(4))
    ds = LayerDelta(down=torch.diag(torch.tensor([0, 0, 0, 1.5])), up=torch.eye(4))
    strong_subject = torch.tensor([[[1.0, 0.1, 0.2, 0.0]]])     # the subject changes this row far more
    mild_style = torch.tensor([[[0.1, 0.1, 0.2, 1.0]]])         # the style changes this one, by less
    x = torch.cat([strong_subject, mild_style, mild_style, strong_subject, mild_style])
    labels = ["cond", "cond", "uncond", "uncond", "cond"]        # pairs (0, 2), (1, 3); row 4 alone
    with torch.no_grad():
        base = lin(x)
        d_c, d_s = _ref_delta(dc, x), _ref_delta(ds, x)
        with FuseSession([FuseTarget("l", lin, dc, ds)], method="dynamic") as free:
            free.set_row_labels(labels)
            alone = lin(x)
        with FuseSession([FuseTarget("l", lin, dc, ds)], tie_rows=True, method="dynamic") as tied:
            tied.set_row_labels(labels)
            together = lin(x)
    assert _near(alone, base + torch.where(torch.tensor([1, 0, 0, 1, 0]).bool()[:, None, None], d_c, d_s))
    assert _near(together, base + torch.where(torch.tensor([1, 1, 1, 1, 0]).bool()[:, None, None], d_c, d_s))
    assert tied.record.cond.tolist() == [[2 / 3]] and tied.record.uncond.tolist() == [[1.0]]


@pytest.mark.parametrize("weight_space", [False, True])
@pytest.mark.parametrize("method", ["dynamic", "klora", "merge"])
def test_step_windows_leave_a_lora_out_of_its_steps(method, weight_space):
    """subject in the first half, style in the second, and a layer only the style touches from 0.25 to 0.75:
    outside a window the LoRA is gone; a shared layer takes the other one alone, recorded as its choice."""
    shared, style_only, te = _linear(0), _linear(1), _linear(2)
    dc, ds, ds2 = _linear_delta(8, 6, 2, 10), _linear_delta(8, 6, 3, 11), _linear_delta(8, 6, 2, 12)
    dte_c, dte_s = _linear_delta(8, 6, 2, 13), _linear_delta(8, 6, 2, 14)
    targets = [FuseTarget("a", shared, dc, ds), FuseTarget("b", style_only, style=ds2),
               FuseTarget("te", te, dte_c, dte_s, group="te")]
    x = _x(2, 3, 6)
    with torch.no_grad():
        base_a, base_b, base_te = shared(x), style_only(x), te(x)
        with FuseSession(targets, method=method, te_mode="merge", weight_space=weight_space,
                         subject_window=(0.0, 0.5), style_window=(0.25, 0.75)) as session:
            outs = []
            for step in range(4):
                session.set_step(step, 4)
                outs.append((shared(x), style_only(x), te(x)))
    d_c, d_s, d_s2 = _ref_delta(dc, x), _ref_delta(ds, x), _ref_delta(ds2, x)
    assert _near(outs[0][0], base_a + d_c) and torch.equal(outs[0][1], base_b)          # p = 0: subject only
    assert _near(outs[2][0], base_a + d_s) and _near(outs[2][1], base_b + d_s2)        # p = 0.5: style only
    assert torch.equal(outs[3][0], base_a) and torch.equal(outs[3][1], base_b)          # p = 0.75: neither
    if method == "merge":
        assert _near(outs[1][0], base_a + d_c + d_s)                                     # p = 0.25: both
    for _, _, te_out in outs:   # the text encoder ignores the windows
        assert _near(te_out, base_te + _ref_delta(dte_c, x) + _ref_delta(dte_s, x))
    if method != "merge":
        shares = session.selection[:, 0].tolist()
        assert shares[0] == 1.0 and shares[2] == 0.0 and (len(shares) == 3 or math.isnan(shares[3]))


def test_bad_step_windows_are_clear_errors():
    t = [FuseTarget("l", _linear(0), _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 2, 2))]
    for window in ((0.5, 0.2), (-0.1, 1.0), (0.0, 1.5), "all", (0.1,)):
        with pytest.raises(ValueError, match="subject_window"):
            FuseSession(t, subject_window=window, method="dynamic")


def test_blend_is_merge_at_sharpness_zero_and_the_hard_choice_when_sharp():
    lin = _identity_linear()
    dc = LayerDelta(down=torch.diag(torch.tensor([4.0, 0, 0, 0])), up=torch.eye(4))
    ds = LayerDelta(down=torch.diag(torch.tensor([0, 0, 0, 2.0])), up=torch.eye(4))
    x = torch.tensor([[[1.0, 0.1, 0.2, 0.0]], [[0.0, 0.1, 0.2, 1.0]]])
    with torch.no_grad():
        base = lin(x)
        d_c, d_s = _ref_delta(dc, x), _ref_delta(ds, x)
        outs = {}
        for sharpness in (0.0, 200.0):
            with FuseSession([FuseTarget("l", lin, dc, ds)], method="blend", sharpness=sharpness) as session:
                outs[sharpness] = lin(x)
        with FuseSession([FuseTarget("l", lin, dc, ds)], method="dynamic") as hard:
            hard_out = lin(x)
    assert _near(outs[0.0], base + d_c + d_s)
    assert _near(outs[200.0], hard_out) and _near(hard_out, base + torch.stack([d_c[0], d_s[1]]))
    assert session.selection.tolist() == [[pytest.approx(0.5)]]


def test_blend_balance_moves_the_weights_monotonically():
    """From subject-heavy to style-heavy balance the subject's weight falls and the style's rises, smoothly."""
    g = _g(3)
    lin = _linear(0, 6, 8)
    dc, ds = _linear_delta(8, 6, 2, 10), _linear_delta(8, 6, 2, 11)
    x = torch.randn(1, 5, 6, generator=g)
    with torch.no_grad():
        base, d_c, d_s = lin(x), _ref_delta(dc, x), _ref_delta(ds, x)
        weights = []
        for balance in (0.1, 0.3, 0.5, 0.7, 0.9):
            with FuseSession([FuseTarget("l", lin, dc, ds)], method="blend", balance=balance) as session:
                out = lin(x)
            # recover (a_c, a_s) from out - base = a_c d_c + a_s d_s (least squares over the features)
            a = torch.linalg.lstsq(torch.stack([d_c.flatten(), d_s.flatten()], 1), (out - base).flatten()[:, None]).solution
            weights.append(a.flatten().tolist())
    subject_w, style_w = [w[0] for w in weights], [w[1] for w in weights]
    assert all(a >= b - 1e-6 for a, b in zip(subject_w, subject_w[1:])) and subject_w[0] > subject_w[-1]
    assert all(a <= b + 1e-6 for a, b in zip(style_w, style_w[1:])) and style_w[0] < style_w[-1]
    assert max(subject_w) <= 1 + 1e-5 and max(style_w) <= 1 + 1e-5
