"""FuseSession on tiny hand-made layers: per-method outputs against hand-written references, hook lifecycle,
grad modes, and the selection record.

References: the base output is the module's own output, the deltas come from the per-delta low-rank path
(lowrank.delta_output: (x @ down.T) @ up.T * scale, checked against merged weights in test_lowrank.py). The
hooks lay both LoRAs out side by side with the scale folded into the up weights (branches.py), so their outputs
round differently: compared within float32 rounding (`_near`), and bit for bit only where no delta is added.
"""
import math

import pytest
import torch

from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.record import SelectionRecord
from lib_dynfuse.selection import klora_k, klora_schedule, topk_abs_sum
from lib_dynfuse.session import FuseSession
from session_fixtures import (_conv_delta, _g, _identity_linear, _klora_targets, _linear, _linear_delta, _near,
                              _ref_delta, _x)


# ----------------------------------------------------------------------------- outputs per method
def test_single_lora_layers_take_that_delta():
    lin_c, lin_s = _linear(0), _linear(1)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).eval()
    dc, ds, dconv = _linear_delta(8, 6, 2, 10, 0.5), _linear_delta(8, 6, 3, 11, 2.0), _conv_delta(4, 3, 3, 2, 12)
    targets = [FuseTarget("c", lin_c, subject=dc), FuseTarget("s", lin_s, style=ds), FuseTarget("k", conv, style=dconv)]
    x, xc = _x(2, 5, 6), _x(2, 3, 7, 7, seed=2)
    with torch.no_grad():
        expected = [lin_c(x) + _ref_delta(dc, x), lin_s(x) + _ref_delta(ds, x), conv(xc) + _ref_delta(dconv, xc, conv)]
        for method in ("dynamic", "klora", "merge"):
            with FuseSession(targets, method=method):
                got = [lin_c(x), lin_s(x), conv(xc)]
            for g, e in zip(got, expected):
                assert _near(g, e), method


def test_merge_adds_both_deltas():
    lin = _linear(0)
    dc, ds = _linear_delta(8, 6, 2, 10, 0.5), _linear_delta(8, 6, 3, 11, 2.0)
    x = _x(3, 4, 6)
    with torch.no_grad():
        base = lin(x)
        with FuseSession([FuseTarget("l", lin, dc, ds)], method="merge") as session:
            got = lin(x)
    assert _near(got, base + _ref_delta(dc, x) + _ref_delta(ds, x))
    assert session.selection.shape == (0, 1)  # merge records no choice


@pytest.mark.parametrize("criterion", ["kl", "js", "cosine", "dot"])
def test_dynamic_picks_per_row(criterion):
    """Row 0: the subject flips the features, the style barely moves them; row 1 the other way round."""
    lin = _identity_linear()
    big = LayerDelta(down=-3.0 * torch.eye(4), up=torch.eye(4))     # F -> -2F
    small = LayerDelta(down=0.01 * torch.eye(4), up=torch.eye(4).flip(0))
    x = torch.stack([_x(5, 4, seed=3), _x(5, 4, seed=4)])
    with torch.no_grad():
        base = lin(x)
        with FuseSession([FuseTarget("l", lin, big, small)], method="dynamic", criterion=criterion) as session:
            session.set_row_labels(["cond", "uncond"])
            row0 = lin(x[:1].repeat(2, 1, 1))                     # both rows like row 0 -> subject, subject
            got = lin(x)
    ref_big, ref_small = _ref_delta(big, x), _ref_delta(small, x)
    assert _near(got[0], base[0] + ref_big[0])
    # row 1: the style is the small delta, the subject the big one -> subject again; swap to test the style side
    assert _near(got[1], base[1] + ref_big[1])
    assert _near(row0, (base[:1] + ref_big[:1]).repeat(2, 1, 1))
    with torch.no_grad():
        with FuseSession([FuseTarget("l", lin, small, big)], method="dynamic", criterion=criterion) as session:
            session.set_row_labels(["cond", "uncond"])
            got = lin(x)
    assert _near(got, base + ref_big)     # now big is the style: both rows keep the style
    assert session.record.cond.tolist() == [[0.0]] and session.record.uncond.tolist() == [[0.0]]


def test_dynamic_mixed_rows_in_one_batch():
    lin = _identity_linear()
    # rows scaled so that one delta matters in row 0 only: dF_c = 5*x0-direction, dF_s = same map; inputs differ
    dc = LayerDelta(down=torch.diag(torch.tensor([4.0, 0, 0, 0])), up=torch.eye(4))
    ds = LayerDelta(down=torch.diag(torch.tensor([0, 0, 0, 4.0])), up=torch.eye(4))
    x = torch.tensor([[[1.0, 0.1, 0.2, 0.0]], [[0.0, 0.1, 0.2, 1.0]]])   # row 0 lives on channel 0, row 1 on 3
    with torch.no_grad():
        base = lin(x)
        with FuseSession([FuseTarget("l", lin, dc, ds)], method="dynamic") as session:
            session.set_row_labels(["cond", "uncond"])
            got = lin(x)
    assert _near(got[0], base[0] + _ref_delta(dc, x)[0])
    assert _near(got[1], base[1] + _ref_delta(ds, x)[1])
    assert session.record.cond.tolist() == [[1.0]] and session.record.uncond.tolist() == [[0.0]]
    assert session.selection.tolist() == [[0.5]]


def test_dynamic_conv_layer_per_row():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    dc, ds = _conv_delta(4, 3, 3, 2, 1, scale=3.0), _conv_delta(4, 3, 3, 2, 2, scale=0.01)
    x = _x(2, 3, 5, 5)
    with torch.no_grad():
        base = conv(x)
        with FuseSession([FuseTarget("c", conv, dc, ds)], method="dynamic"):
            got = conv(x)
    assert _near(got, base + _ref_delta(dc, x, conv))


@pytest.mark.parametrize("criterion", ["kl", "js", "cosine", "dot"])
def test_sampling_path_copies_each_row_from_its_branch(criterion):
    """No autograd (sampling): rows picked from F_c / F_s equal y + where(keep, dF_c, dF_s) bit for bit, for a
    conv and a linear layer with rows going both ways in one batch."""
    from lib_dynfuse.selection import branch_divergences, choose_subject
    g = _g(9)
    # the subject reads input channel 0, the style channel 2; even rows live on channel 0, odd rows on channel 2
    pick_c, pick_s = torch.zeros(2, 3), torch.zeros(2, 3)
    pick_c[:, 0], pick_s[:, 2] = 2.0, 2.0
    up_c, up_s = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    rows = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.1, 1.0]]).repeat(3, 1)          # [6, 3]
    conv, lin = torch.nn.Conv2d(3, 4, 1).eval(), torch.nn.Linear(3, 4).eval()
    cases = [(conv, LayerDelta(down=pick_c[..., None, None], up=up_c[..., None, None], scale=1.5),
              LayerDelta(down=pick_s[..., None, None], up=up_s[..., None, None]),
              rows[:, :, None, None] * _x(6, 3, 4, 4).abs(), 1),
             (lin, LayerDelta(down=pick_c, up=up_c, scale=1.5), LayerDelta(down=pick_s, up=up_s),
              rows[:, None, :] * _x(6, 5, 3).abs(), -1)]
    for module, dc, ds, x, cdim in cases:
        with torch.no_grad():
            y = module(x)
            ref_c, ref_s = _ref_delta(dc, x, module), _ref_delta(ds, x, module)
            keep = choose_subject(*branch_divergences(criterion, y, ref_c, ref_s, cdim))
            with FuseSession([FuseTarget("m", module, dc, ds)], criterion=criterion, method="dynamic"):
                got = module(x)
        if criterion in ("kl", "js"):   # the distribution criteria see which channel each row lives on
            assert keep.tolist() == [True, False] * 3, criterion
        assert _near(got, y + torch.where(keep.reshape(-1, *([1] * (y.dim() - 1))), ref_c, ref_s))


@pytest.mark.parametrize("criterion", ["kl", "js", "cosine"])
def test_ties_and_zero_loras(criterion):
    lin = _linear(0)
    d = _linear_delta(8, 6, 2, 10)
    zero = _linear_delta(8, 6, 2, 11, zero=True)
    x = _x(2, 3, 6)
    with torch.no_grad():
        base = lin(x)
        # identical deltas: a tie in every row -> subject
        with FuseSession([FuseTarget("l", lin, d, d)], criterion=criterion, method="dynamic") as tie:
            assert _near(lin(x), base + _ref_delta(d, x))
        # zero style: subject everywhere; zero subject: style everywhere; both zero: the base output
        with FuseSession([FuseTarget("l", lin, d, zero)], criterion=criterion, method="dynamic") as zs:
            assert _near(lin(x), base + _ref_delta(d, x))
        with FuseSession([FuseTarget("l", lin, zero, d)], criterion=criterion, method="dynamic") as zc:
            assert _near(lin(x), base + _ref_delta(d, x))
        with FuseSession([FuseTarget("l", lin, zero, zero)], criterion=criterion, method="dynamic") as both:
            out = lin(x)
    assert torch.equal(out, base) and not torch.isnan(out).any()
    assert tie.selection.tolist() == [[1.0]] and zs.selection.tolist() == [[1.0]]
    assert zc.selection.tolist() == [[0.0]] and both.selection.tolist() == [[1.0]]


@pytest.mark.parametrize("kind", ["linear", "star"])
def test_klora_follows_the_schedule_from_topk_sums(kind):
    targets = _klora_targets()
    # the sums by hand: top-K of |up @ down * scale|, K = r_c * r_s; gamma over all layers (Eq. 3-5, 9)
    top_c, top_s, abs_c, abs_s = [], [], [], []
    for t in targets:
        dw_c = t.subject.up @ t.subject.down * t.subject.scale
        dw_s = t.style.up @ t.style.down * t.style.scale
        k = klora_k(2, 3, dw_c.numel())
        top_c.append(float(topk_abs_sum(dw_c, k)))
        top_s.append(float(topk_abs_sum(dw_s, k)))
        abs_c.append(dw_c.abs().double().sum().item())
        abs_s.append(dw_s.abs().double().sum().item())
    gamma = sum(abs_c) / sum(abs_s)
    total = 10
    expected = klora_schedule(torch.tensor(top_c, dtype=torch.float64), torch.tensor(top_s, dtype=torch.float64),
                              torch.tensor(gamma, dtype=torch.float64), total, 1.5, 0.5, kind)
    assert 0 < expected.sum() < expected.numel()   # the test LoRAs do switch
    x = _x(2, 3, 6)
    with torch.no_grad():
        bases = [t.module(x) for t in targets]
        with FuseSession(targets, method="klora", klora_scale=kind) as session:
            assert session.klora_sums.gamma.item() == pytest.approx(gamma, rel=1e-12)
            for step in range(total):
                session.set_step(step, total)
                for j, t in enumerate(targets):
                    out = t.module(x)
                    chosen = t.subject if expected[step, j] else t.style
                    assert _near(out, bases[j] + _ref_delta(chosen, x)), (step, j)
    assert torch.equal(session.selection, expected.double())
    if kind == "linear":
        p_star = session.klora_switch_progress()
        p = torch.arange(total, dtype=torch.float64) / total
        assert torch.equal(expected, p[:, None] <= p_star[None, :])


def test_klora_sums_are_cached_by_key():
    from lib_dynfuse.klora_cache import SUMS_CACHE
    targets = _klora_targets()
    a = FuseSession(targets, method="klora", klora_key=("sha-c", 1.0, "sha-s", 1.0))
    b = FuseSession(targets, method="klora", klora_key=("sha-c", 1.0, "sha-s", 1.0))
    c = FuseSession(targets, method="klora")
    assert a.klora_sums is b.klora_sums and a.klora_sums is not c.klora_sums
    assert torch.equal(a.klora_sums.top_c, c.klora_sums.top_c)
    assert SUMS_CACHE.size >= 1


def test_text_encoder_modes():
    te, unet_layer = _linear(0), _linear(1)
    dc, ds = _linear_delta(8, 6, 2, 10, 3.0), _linear_delta(8, 6, 2, 11, 0.2)
    x = _x(2, 3, 6)
    with torch.no_grad():
        base = te(x)
        targets = [FuseTarget("te", te, dc, ds, group="te"), FuseTarget("u", unet_layer, dc, ds)]
        with FuseSession(targets, te_mode="off", method="dynamic"):
            assert _near(te(x), base)
            assert len(te._forward_hooks) == 0
        with FuseSession(targets, te_mode="merge", method="dynamic"):
            assert _near(te(x), base + _ref_delta(dc, x) + _ref_delta(ds, x))
        with FuseSession(targets, te_mode="select", method="dynamic") as s:
            assert _near(te(x), base + _ref_delta(dc, x))   # the subject delta is far larger
        with FuseSession(targets, method="klora", te_mode="select") as k:
            k.set_step(9, 10)   # the text encoder always uses progress 0
            table = klora_schedule(k.klora_sums.top_c, k.klora_sums.top_s, k.klora_sums.gamma, 1)
            chosen = dc if table[0, 0] else ds
            assert _near(te(x), base + _ref_delta(chosen, x))
    assert s.layer_names == ["u"]   # only UNet layers are recorded


# ----------------------------------------------------------------------------- lifecycle
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 5)).eval()


def _model_targets(model):
    return [FuseTarget("0", model[0], _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 2, 2)),
            FuseTarget("2", model[2], _linear_delta(5, 8, 2, 3), _linear_delta(5, 8, 2, 4))]


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_after_normal_exit_exception_and_interrupt():
    model = _model()
    x = _x(2, 6)
    with torch.no_grad():
        before = model(x)
        for error in (None, ValueError("boom"), KeyboardInterrupt()):
            try:
                with FuseSession(_model_targets(model), method="dynamic") as session:
                    fused = model(x)
                    assert not torch.equal(fused, before) and session.is_open
                    if error is not None:
                        raise error
            except (ValueError, KeyboardInterrupt) as e:
                assert e is error
            assert _no_hooks(model) and not session.is_open
            assert torch.equal(model(x), before)
        session.close()   # idempotent
        session.close()


def test_interrupt_inside_a_hook_still_removes_everything():
    model = _model()
    x = _x(2, 6)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    with torch.no_grad():
        before = model(x)
        stop = model[2].register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            with FuseSession(_model_targets(model), method="dynamic"):
                model(x)
        stop.remove()
        assert _no_hooks(model) and torch.equal(model(x), before)


def test_layer_error_names_the_layer_and_cleans_up():
    model = _model()
    bad = [FuseTarget("down_blocks.bad", model[0], subject=_linear_delta(8, 7, 2, 1))]   # in 7 != 6
    x = _x(2, 6)
    with pytest.raises(RuntimeError, match="down_blocks.bad"):
        with torch.no_grad(), FuseSession(bad, method="dynamic"):
            model(x)
    assert _no_hooks(model)


def test_inference_mode_then_autograd_through_the_hooks():
    model = _model()
    targets = _model_targets(model)
    x = _x(3, 6)
    with torch.no_grad():
        expected = model(x)
    with FuseSession(targets, method="dynamic") as session:
        with torch.no_grad():
            fused = model(x)
        with torch.inference_mode():
            fused_inf = model(x)          # the deltas were cast under no_grad; run inference mode on them
        assert torch.equal(fused, fused_inf)
        session.clear_cache()
        with torch.inference_mode():
            assert torch.equal(model(x), fused)   # cast under inference mode this time
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            out = model(xg)
            out.square().sum().backward()
    assert not torch.equal(fused, expected)
    # the reference gradient: the same fused network written out by hand, with the branches the hook chose
    xr = x.clone().requires_grad_(True)
    h = model[0](xr)
    h = h + torch.where(torch.tensor(_row_choice(targets[0], x, model[0]))[:, None],
                        _ref_delta(targets[0].subject, xr), _ref_delta(targets[0].style, xr))
    h = model[1](h)
    y = model[2](h)
    y = y + torch.where(torch.tensor(_row_choice(targets[1], h.detach(), model[2]))[:, None],
                        _ref_delta(targets[1].subject, h), _ref_delta(targets[1].style, h))
    y.square().sum().backward()
    assert _near(out.detach(), y.detach())
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)


def _row_choice(target, x, module):
    from lib_dynfuse.selection import branch_divergences, choose_subject
    with torch.no_grad():
        y = module(x)
        d_c, d_s = branch_divergences("kl", y, _ref_delta(target.subject, x), _ref_delta(target.style, x), -1)
    return choose_subject(d_c, d_s).tolist()


def test_bad_arguments_are_clear_errors():
    lin = _linear(0)
    d = _linear_delta(8, 6, 2, 1)
    t = [FuseTarget("l", lin, d, d)]
    for kwargs, message in ((dict(method="zip"), "method must be one of"), (dict(criterion="l1"), "criterion"),
                            (dict(te_mode="x"), "te_mode"), (dict(klora_scale="s"), "klora_scale"),
                            (dict(method="klora", klora_scale="star", klora_alpha=0.0), "alpha > 0")):
        with pytest.raises(ValueError, match=message):
            FuseSession(t, **kwargs)
    with pytest.raises(ValueError, match="neither"):
        FuseSession([FuseTarget("l", lin)], method="dynamic")
    with pytest.raises(ValueError, match="share one module"):
        FuseSession([FuseTarget("a", lin, d), FuseTarget("b", lin, None, d)], method="dynamic")
    session = FuseSession(t, method="dynamic")
    with pytest.raises(ValueError, match="cond"):
        session.set_row_labels(["cond", "negative"])
    with pytest.raises(ValueError, match="total"):
        session.set_step(0, 0)
    with session:
        with pytest.raises(RuntimeError, match="already open"):
            session.open()
    assert _no_hooks(lin)


# ----------------------------------------------------------------------------- record
def test_record_averages_calls_and_keeps_labels_apart():
    lin = _identity_linear()
    dc = LayerDelta(down=torch.diag(torch.tensor([4.0, 0, 0, 0])), up=torch.eye(4))
    ds = LayerDelta(down=torch.diag(torch.tensor([0, 0, 0, 4.0])), up=torch.eye(4))
    subj = torch.tensor([[[1.0, 0.1, 0.2, 0.0]]])
    styl = torch.tensor([[[0.0, 0.1, 0.2, 1.0]]])
    other = _linear(1, 4, 4)
    targets = [FuseTarget("a", lin, dc, ds), FuseTarget("b", other, dc, ds)]
    with torch.no_grad(), FuseSession(targets, method="dynamic") as session:
        session.set_step(0, 3)
        session.set_row_labels(["uncond", "cond"])
        lin(torch.cat([subj, styl]))            # uncond -> subject, cond -> style
        session.set_step(2, 3)
        session.set_row_labels(None)            # all cond
        lin(torch.cat([subj, subj]))            # call 1: 2 of 2 subject
        lin(torch.cat([styl, subj]))            # call 2: 1 of 2 subject -> 3 of 4
    nan = math.nan
    cond, uncond = session.record.cond, session.record.uncond
    assert cond.shape == uncond.shape == session.selection.shape == (3, 2)
    assert _same(cond, [[0.0, nan], [nan, nan], [0.75, nan]])
    assert _same(uncond, [[1.0, nan], [nan, nan], [nan, nan]])
    assert _same(session.selection, [[0.5, nan], [nan, nan], [0.75, nan]])
    assert session.layer_names == ["a", "b"]


def _same(t, expected):
    return t.shape == torch.Size([len(expected), len(expected[0])]) and all(
        (math.isnan(a) and math.isnan(b)) or a == b for ra, rb in zip(t.tolist(), expected) for a, b in zip(ra, rb))


def test_record_under_inference_mode_and_host_decisions():
    record = SelectionRecord(["x", "y"])
    with torch.inference_mode():
        record.add_rows(1, 0, torch.tensor([True, False, True]), ["cond", "uncond", "uncond"])
    record.add_rows(1, 0, torch.tensor([False, False, False]), ["cond", "uncond", "uncond"])
    record.add_all(0, 1, True, ["cond", "uncond"])
    record.add_all(0, 1, False, ["cond", "uncond"])
    assert _same(record.cond, [[math.nan, 0.5], [0.5, math.nan]])
    assert _same(record.uncond, [[math.nan, 0.5], [0.25, math.nan]])


def test_record_counts_are_exact_across_queue_flushes(monkeypatch):
    """Choices are queued and added up in bulk: the shares are the same whether a flush falls between calls
    (every 3 choices here, partly under inference mode) or happens only when the record is read."""
    from lib_dynfuse import record as record_module
    g = _g(5)
    calls = [(step, layer, torch.rand(4, generator=g) < 0.5) for step in (0, 2) for layer in (0, 1, 2) for _ in range(3)]
    labels = ["uncond", "uncond", "cond", "cond"]
    cond_count, uncond_count = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for step, layer, choose in calls:   # 3 calls x 2 rows of each label per (step, layer)
        uncond_count[step, layer] += int(choose[:2].sum())
        cond_count[step, layer] += int(choose[2:].sum())
    expected_cond, expected_uncond = cond_count / 6, uncond_count / 6
    for flush_every in (3, 10_000):
        monkeypatch.setattr(record_module, "FLUSH_EVERY", flush_every)
        record = SelectionRecord(["a", "b", "c"])
        for i, (step, layer, choose) in enumerate(calls):
            with torch.inference_mode(i % 2 == 0):
                record.add_rows(step, layer, choose, labels)
        assert torch.equal(record.cond[[0, 2]], expected_cond[[0, 2]])
        assert torch.equal(record.uncond[[0, 2]], expected_uncond[[0, 2]])
        assert record.cond[1].isnan().all()


@pytest.mark.parametrize("method,criterion", [("dynamic", "kl"), ("dynamic", "js"), ("dynamic", "cosine"),
                                              ("dynamic", "dot"), ("klora", "kl"), ("merge", "kl")])
def test_hooks_never_read_tensor_values(method, criterion, monkeypatch):
    """On the meta device a tensor has no values: any .item(), bool(tensor) or copy to the host would raise,
    so passing here shows the hook path makes no host-device sync (recording included: every choice is added
    into the counts as it is queued)."""
    from lib_dynfuse import record
    monkeypatch.setattr(record, "FLUSH_EVERY", 1)
    lin = torch.nn.Linear(6, 8, device="meta")
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, device="meta")
    targets = [FuseTarget("l", lin, _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 3, 2)),
               FuseTarget("c", conv, _conv_delta(4, 3, 3, 2, 3), _conv_delta(4, 3, 3, 2, 4))]
    with torch.no_grad(), FuseSession(targets, method=method, criterion=criterion) as session:
        session.set_row_labels(["uncond", "cond"])
        session.set_step(1, 4)
        y = lin(torch.empty(2, 5, 6, device="meta"))
        z = conv(torch.empty(2, 3, 4, 4, device="meta"))
    assert y.shape == (2, 5, 8) and z.shape == (2, 4, 4, 4) and y.is_meta


def test_deltas_are_cast_once_across_reopened_scopes(monkeypatch):
    """Hosts reopen one session per UNet call; the cast deltas must survive close() (one cast per generation)."""
    from lib_dynfuse import branches
    calls = []
    for name in ("prepare_stacked", "prepare_summed"):
        real = getattr(branches, name)
        monkeypatch.setattr(branches, name, lambda *a, real=real: calls.append(1) or real(*a))
    model = _model()
    session = FuseSession(_model_targets(model), method="dynamic")
    x = _x(2, 6)
    outs = []
    with torch.no_grad():
        for _ in range(3):
            with session:
                outs.append(model(x))
    assert len(calls) == 2 and torch.equal(outs[0], outs[2])   # 2 layers, both LoRAs cast together, on the first call only
    with torch.no_grad(), session:
        model(x.double().float())
    assert len(calls) == 2
    with torch.no_grad(), session:
        model.double()(x.double())                             # a new dtype: cast again, once
    assert len(calls) == 4
