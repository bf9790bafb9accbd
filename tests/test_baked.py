"""Weight-space application (baked.py, FuseSession(weight_space=True, method="dynamic")) against hand-made references.

References: W0 + dW with dW = up @ down * scale computed here in float32; the baked weight is compared bit for
bit with that sum (the same two IEEE operations), outputs with the module's plain forward on that weight.
After every session the weights are the original tensors with the original bits.
"""
import pytest
import torch
import torch.nn.functional as F

from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.session import FuseSession
from session_fixtures import _klora_targets, _linear, _linear_delta, _x


def _dense(delta: LayerDelta) -> torch.Tensor:
    up, down = delta.up.float(), delta.down.float()
    if down.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * delta.scale
    return up @ down * delta.scale


def _snapshot(modules):
    return [(p, p.detach().clone()) for m in modules for p in m.parameters()]


def _unchanged(snapshot):
    return all(torch.equal(p, saved) for p, saved in snapshot)


def test_merge_bakes_both_deltas_and_restores_the_same_bits():
    lin = _linear(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    g = torch.Generator().manual_seed(7)
    cd_c = LayerDelta(down=torch.randn(2, 3, 3, 3, generator=g), up=torch.randn(4, 2, 1, 1, generator=g), scale=0.5)
    cd_s = LayerDelta(down=torch.randn(2, 3, 3, 3, generator=g), up=torch.randn(4, 2, 1, 1, generator=g))
    dc, ds = _linear_delta(8, 6, 2, 10, 0.5), _linear_delta(8, 6, 3, 11, 2.0)
    targets = [FuseTarget("l", lin, dc, ds), FuseTarget("c", conv, cd_c, cd_s)]
    x, xc = _x(2, 5, 6), _x(2, 3, 6, 6, seed=2)
    snap = _snapshot([lin, conv])
    w_lin, w_conv = lin.weight.detach().clone(), conv.weight.detach().clone()
    with torch.no_grad():
        with FuseSession(targets, method="merge") as hooked:
            ref_lin, ref_conv = lin(x), conv(xc)
        with FuseSession(targets, method="merge", weight_space=True) as baked:
            assert len(lin._forward_hooks) == 0 and baked.is_open
            assert torch.equal(lin.weight, w_lin + _dense(dc) + _dense(ds))
            assert torch.equal(conv.weight, w_conv + _dense(cd_c) + _dense(cd_s))
            got_lin, got_conv = lin(x), conv(xc)
            assert torch.equal(got_lin, F.linear(x, w_lin + _dense(dc) + _dense(ds), lin.bias))
    assert not hooked.is_open and not baked.is_open
    torch.testing.assert_close(got_lin, ref_lin, rtol=1e-5, atol=1e-5)      # the same merge, other rounding
    torch.testing.assert_close(got_conv, ref_conv, rtol=1e-5, atol=1e-5)
    assert _unchanged(snap)


@pytest.mark.parametrize("kind", ["linear", "star"])
def test_klora_rebakes_the_layers_the_schedule_switches(kind):
    targets = _klora_targets()
    total = 10
    x = _x(2, 3, 6)
    snap = _snapshot([t.module for t in targets])
    originals = [t.module.weight.detach().clone() for t in targets]
    with torch.no_grad():
        with FuseSession(targets, method="klora", klora_scale=kind) as hooked:
            expected = []
            for step in range(total):
                hooked.set_step(step, total)
                expected.append([t.module(x) for t in targets])
        with FuseSession(targets, method="klora", klora_scale=kind, weight_space=True) as baked:
            for step in range(total):
                baked.set_step(step, total)
                for j, t in enumerate(targets):
                    keep_subject = bool(hooked.selection[step, j])
                    chosen = t.subject if keep_subject else t.style
                    assert torch.equal(t.module.weight, originals[j] + _dense(chosen)), (step, j)
                    torch.testing.assert_close(t.module(x), expected[step][j], rtol=1e-5, atol=1e-5)
    assert torch.equal(baked.selection, hooked.selection)     # the same schedule, recorded per step
    assert 0 < hooked.selection.sum() < hooked.selection.numel()
    assert _unchanged(snap)


def test_single_lora_layers_and_text_encoder_off_in_weight_space():
    te, lin = _linear(0), _linear(1)
    dc, ds = _linear_delta(8, 6, 2, 10, 3.0), _linear_delta(8, 6, 2, 11, 0.2)
    only_style = _linear(2)
    targets = [FuseTarget("te", te, dc, ds, group="te"), FuseTarget("u", lin, dc, ds),
               FuseTarget("s", only_style, style=ds)]
    w_te, w_s = te.weight.detach().clone(), only_style.weight.detach().clone()
    with FuseSession(targets, method="merge", te_mode="off", weight_space=True):
        assert torch.equal(te.weight, w_te)                           # "off": the text encoder is not touched
        assert torch.equal(only_style.weight, w_s + _dense(ds))       # a layer one LoRA touches takes that LoRA
    assert torch.equal(te.weight, w_te) and torch.equal(only_style.weight, w_s)


def test_multihead_attention_parts_and_out_slices_bake_their_rows():
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    fused = torch.nn.Linear(6, 12).eval()
    dq, dout = _linear_delta(8, 8, 2, 1, 0.5), _linear_delta(8, 8, 2, 2)
    d_slice = LayerDelta(down=torch.randn(2, 6), up=torch.randn(4, 2), out_slice=(4, 4))
    targets = [FuseTarget("q", attn, subject=dq, part="q"), FuseTarget("o", attn, style=dout, part="out"),
               FuseTarget("f", fused, subject=d_slice)]
    snap = _snapshot([attn, fused])
    w_in, w_out, w_f = (attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone(),
                        fused.weight.detach().clone())
    with FuseSession(targets, method="merge", weight_space=True):
        assert torch.equal(attn.in_proj_weight[:8], w_in[:8] + _dense(dq))
        assert torch.equal(attn.in_proj_weight[8:], w_in[8:])
        assert torch.equal(attn.out_proj.weight, w_out + _dense(dout))
        assert torch.equal(fused.weight[4:8], w_f[4:8] + _dense(d_slice))
        assert torch.equal(fused.weight[:4], w_f[:4]) and torch.equal(fused.weight[8:], w_f[8:])
    assert _unchanged(snap)


def test_weights_come_back_after_errors_interrupts_and_under_inference_mode():
    lin = _linear(0)
    dc, ds = _linear_delta(8, 6, 2, 10), _linear_delta(8, 6, 2, 11)
    snap = _snapshot([lin])
    weight_object = lin.weight
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with FuseSession([FuseTarget("l", lin, dc, ds)], method="merge", weight_space=True):
                assert not _unchanged(snap)
                raise exc
        assert _unchanged(snap)
    with torch.inference_mode():
        with FuseSession([FuseTarget("l", lin, dc, ds)], method="klora", weight_space=True) as session:
            session.set_step(3, 10)
            lin(_x(1, 6))
    assert _unchanged(snap) and lin.weight is weight_object and not lin.weight.is_inference()


@pytest.mark.parametrize("criterion", ["kl", "cosine"])
def test_dynamic_bakes_the_layers_one_lora_touches_and_hooks_the_shared_ones(criterion):
    shared, only_subject = _linear(0), _linear(1)
    dc, ds, d_only = _linear_delta(8, 6, 2, 10, 2.0), _linear_delta(8, 6, 2, 11), _linear_delta(8, 6, 3, 12)
    targets = [FuseTarget("shared", shared, dc, ds), FuseTarget("only", only_subject, subject=d_only)]
    x = _x(3, 4, 6)
    snap = _snapshot([shared, only_subject])
    w_only = only_subject.weight.detach().clone()
    with torch.no_grad():
        with FuseSession(targets, criterion=criterion, method="dynamic") as hooked:
            ref_shared, ref_only = shared(x), only_subject(x)
        with FuseSession(targets, criterion=criterion, weight_space=True, method="dynamic") as baked:
            assert len(shared._forward_hooks) == 1 and len(only_subject._forward_hooks) == 0
            assert torch.equal(only_subject.weight, w_only + _dense(d_only))
            got_shared, got_only = shared(x), only_subject(x)
    assert torch.equal(got_shared, ref_shared)       # the shared layer is the same hook, bit for bit
    torch.testing.assert_close(got_only, ref_only, rtol=1e-5, atol=1e-5)
    assert torch.equal(baked.selection, hooked.selection)
    assert _unchanged(snap) and not shared._forward_hooks


def test_weights_that_cannot_take_an_in_place_add_keep_their_hook():
    """fp8 storage (A1111's fp8 option) cannot be added to in place: that layer stays forward-time."""
    lin, fp8 = _linear(0), _linear(1)
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    fp8.weight.data = fp8.weight.data.to(torch.float8_e4m3fn)
    stored = fp8.weight.detach().clone()
    dc, ds = _linear_delta(8, 6, 2, 10), _linear_delta(8, 6, 2, 11)
    with FuseSession([FuseTarget("l", lin, dc, ds), FuseTarget("q", fp8, dc, ds)], method="merge",
                     weight_space=True) as session:
        assert len(lin._forward_hooks) == 0 and len(fp8._forward_hooks) == 1
        assert session.is_open
    assert torch.equal(fp8.weight.view(torch.uint8), stored.view(torch.uint8)) and not fp8._forward_hooks


def test_a_weight_rewritten_by_another_component_is_left_as_it_set_it():
    """A WebUI's own LoRA code may re-merge a layer from its own copy while ours is baked (an extension changing
    LoRA weights per step). Writing our saved copy back then would undo its state: the rewrite wins, a K-LoRA
    re-bake starts from it, and the session names the layer."""
    lin, other = _linear(0), _linear(1)
    dc, ds = _linear_delta(8, 6, 2, 10, 3.0), _linear_delta(8, 6, 2, 11, 0.2)
    targets = [FuseTarget("l", lin, dc, ds), FuseTarget("o", other, dc, ds)]
    their_state = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    w_other = other.weight.detach().clone()
    with FuseSession(targets, method="merge", weight_space=True) as session:
        with torch.no_grad():
            lin.weight.copy_(their_state)        # the other component's full write
    assert torch.equal(lin.weight, their_state) and torch.equal(other.weight, w_other)
    assert session.rewritten_layers == ["l"]

    lin2 = _linear(2)
    klora = [FuseTarget(t.name, m, t.subject, t.style) for t, m in zip(_klora_targets()[:1], [lin2])]
    with FuseSession(klora, method="klora", weight_space=True) as session:
        session.set_step(0, 10)
        with torch.no_grad():
            lin2.weight.copy_(their_state)
        session.set_step(9, 10)                  # a re-bake starts from the rewritten weight
        session.set_row_labels(["cond"])         # a call runs with step 9's choices: recorded
        keep_subject = bool(session.selection[9, 0])
        chosen = klora[0].subject if keep_subject else klora[0].style
        assert torch.equal(lin2.weight, their_state + _dense(chosen))
    assert torch.equal(lin2.weight, their_state) and session.rewritten_layers == ["l0"]


def test_constant_deltas_are_those_no_input_or_step_can_change():
    """A layer one LoRA touches: that delta, for every method; a shared layer: both for `merge` (or a text
    encoder in te mode 'merge'), none for `dynamic`/`klora` (the choice is per call); te mode 'off': none."""
    from lib_dynfuse.baked import constant_deltas
    m = torch.nn.Linear(3, 3)
    c, s = LayerDelta(down=torch.ones(1, 3), up=torch.ones(3, 1)), LayerDelta(down=torch.ones(1, 3), up=torch.ones(3, 1))
    shared, lone = FuseTarget("a", m, c, s), FuseTarget("b", m, None, s)
    te_shared, te_lone = FuseTarget("t", m, c, s, group="te"), FuseTarget("u", m, c, None, group="te")
    for method in ("dynamic", "klora", "merge"):
        assert constant_deltas(lone, method)[0] is s and len(constant_deltas(lone, method)) == 1
        assert constant_deltas(te_lone, method, "select")[0] is c and constant_deltas(te_lone, method, "off") is None
        assert constant_deltas(te_shared, method, "merge") == [c, s] and constant_deltas(te_shared, method, "off") is None
    assert constant_deltas(shared, "merge") == [c, s] and constant_deltas(te_shared, "merge", "select") == [c, s]
    for method in ("dynamic", "klora"):
        assert constant_deltas(shared, method) is None and constant_deltas(te_shared, method, "select") is None


def test_baked_choices_are_recorded_for_the_calls_that_ran_with_them():
    """weight_space K-LoRA: a step's choices are recorded with each labelled call's rows, once as cond when no call
    was labelled; the bake made on open is a step only when no set_step replaces it."""
    targets = _klora_targets()
    with FuseSession(targets, method="klora", weight_space=True) as session:
        session.set_step(2, 4)                              # the open-time bake at step 0 is not recorded
        session.set_row_labels(["cond", "uncond"])
        session.set_step(3, 4)                              # no call labelled: recorded once, as cond
    cond, uncond = session.record.cond, session.record.uncond
    assert cond.isfinite().all(dim=1).tolist() == [False, False, True, True]
    assert uncond.isfinite().all(dim=1).tolist() == [False, False, True, False]
    with FuseSession(targets, method="klora", weight_space=True) as only_open:
        pass                                                # no set_step at all: the open-time bake is step 0
    assert only_open.record.cond.isfinite().all(dim=1).tolist() == [True]
