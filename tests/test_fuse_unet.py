"""Whole-UNet checks of `fuse` on diffusers UNets with the SD1.5 and SDXL layouts and real-format LoRA files.

References are UNets with the LoRAs merged into their weights by hand (from the tensors the writers wrote),
so the low-rank hook path is compared with the plain merge. Those comparisons run in float64 (a float64 copy
of the UNet; the hooks cast the deltas to the input's dtype), where the different summation order leaves
~1e-13: allclose rtol 1e-9. In float32 the deep random-weight SDXL UNet amplifies rounding to ~1e-4.
Hook-vs-hook comparisons are bit-exact.
"""
import copy

import pytest
import torch

from lib_dynfuse import fuse, load_lora
from lib_dynfuse.heatmap import heatmap_layout
from lib_dynfuse.selection import klora_schedule
from tests.fixtures.lora_files import write_kohya_lora
from tests.fixtures.models import unet_forward, unet_inputs

TOL = dict(rtol=1e-9, atol=1e-9)


def _double(model):
    return copy.deepcopy(model).double()


def _double_inputs(inputs):
    return {k: (_double_inputs(v) if isinstance(v, dict) else v.double() if v.is_floating_point() else v)
            for k, v in inputs.items()}


def _dw(layer):
    """dW of one written layer, by hand: up @ down (LoCon reshaped, CP through its core) * alpha/rank."""
    up, down = layer.up.double(), layer.down.double()
    if layer.mid is not None:
        dw = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), layer.mid.double(), down.flatten(1))
    elif down.dim() == 4:
        dw = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    else:
        dw = up @ down
    return dw * layer.scale


def _merged(model, *written_sets, group="unet"):
    merged = _double(model)
    with torch.no_grad():
        for written in written_sets:
            for layer in written:
                if layer.group == group:
                    module = merged.get_submodule(layer.module)
                    module.weight += _dw(layer).to(module.weight.dtype)
    return merged


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers are op-overhead bound: one thread is as fast alone and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, tmp_path_factory):
    """A UNet (float32 and a float64 copy), inputs, base outputs and three LoRA files: subject, style, all-zero.

    SD1.5: kohya LoCon with the resnet convs (CP form for 3x3) and diffusers-style names; SDXL: attention
    layers with sd-scripts' compvis names (what SDXL LoRAs usually are).
    """
    from tests.fixtures import models
    kind = request.param
    unet = models.tiny_sd15_unet(0) if kind == "sd15" else models.tiny_sdxl_unet(0)
    kw = dict(style="diffusers", include_conv=True) if kind == "sd15" else dict(style="compvis")
    d = tmp_path_factory.mktemp(kind)
    subject_w = write_kohya_lora(unet, d / "subject.safetensors", rank=4, alpha=2.0, seed=1, cp=(kind == "sd15"), **kw)
    style_w = write_kohya_lora(unet, d / "style.safetensors", rank=2, seed=2, **kw)
    write_kohya_lora(unet, d / "zero.safetensors", rank=2, seed=3, zero=True, **kw)
    files = {n: load_lora(str(d / f"{n}.safetensors")) for n in ("subject", "style", "zero")}
    inputs = unet_inputs(unet, batch=2, seed=0)
    unet64, inputs64 = _double(unet), _double_inputs(inputs)
    return dict(kind=kind, unet=unet, inputs=inputs, base=unet_forward(unet, inputs), unet64=unet64,
                inputs64=inputs64, base64=unet_forward(unet64, inputs64), files=files,
                written={"subject": subject_w, "style": style_w})


def test_zero_style_gives_the_subject_alone(case):
    unet, inputs, files = case["unet64"], case["inputs64"], case["files"]
    with fuse(unet, files["subject"], files["zero"], method="dynamic", criterion="kl") as session:
        fused = unet_forward(unet, inputs)
    with fuse(unet, files["subject"], None, method="dynamic"):
        subject_only = unet_forward(unet, inputs)
    # both branches are computed side by side, the subject alone by one addmm: the same maths, other rounding
    torch.testing.assert_close(fused, subject_only, **TOL)
    assert not torch.isnan(fused).any()
    assert torch.all(session.selection == 1.0)   # every layer, every row kept the subject
    merged = _merged(case["unet"], case["written"]["subject"])
    torch.testing.assert_close(subject_only, unet_forward(merged, inputs), **TOL)


def test_merge_equals_both_loras_merged_into_the_weights(case):
    unet, inputs, files = case["unet64"], case["inputs64"], case["files"]
    with fuse(unet, files["subject"], files["style"], method="merge") as session:
        fused = unet_forward(unet, inputs)
    merged = _merged(case["unet"], case["written"]["subject"], case["written"]["style"])
    torch.testing.assert_close(fused, unet_forward(merged, inputs), **TOL)
    assert (fused - case["base64"]).abs().max() > 1e-2                 # the LoRAs do change the output
    assert len(session.resolved.targets) == len(case["written"]["subject"])


@pytest.mark.parametrize("method", ["dynamic", "klora"])
def test_selection_record_and_clean_exit(case, method):
    unet, inputs, files = case["unet"], case["inputs"], case["files"]
    steps = 2
    with fuse(unet, files["subject"], files["style"], method=method) as session:
        session.set_row_labels(["uncond", "cond"])
        for i in range(steps):
            session.set_step(i, steps)
            fused = unet_forward(unet, inputs)
    assert not torch.equal(fused, case["base"])
    assert torch.equal(unet_forward(unet, inputs), case["base"])      # bit-identical after the block
    assert all(not m._forward_hooks for m in unet.modules())
    layers = len(session.resolved.targets)
    for table in (session.selection, session.record.cond, session.record.uncond):
        assert table.shape == (steps, layers)
        assert not torch.isnan(table).any() and ((table >= 0) & (table <= 1)).all()
    assert session.layer_names == [t.name for t in session.resolved.targets]
    if method == "dynamic":
        assert 0.0 < session.selection.mean().item() < 1.0            # both branches are used somewhere
    else:
        s = session.klora_sums
        expected = klora_schedule(s.top_c, s.top_s, s.gamma, steps, 1.5, 0.5, "linear")
        assert torch.equal(session.record.cond, expected.double())
        assert torch.equal(session.record.uncond, expected.double())
    image = session.heatmap()
    assert image.size == heatmap_layout(steps, layers).size


def test_text_encoder_targets(tmp_path, sd15_unet, sd15_text_encoder):
    unet, te = sd15_unet, _double(sd15_text_encoder)
    subject_w = write_kohya_lora(unet, tmp_path / "s.safetensors", rank=2, seed=1, te_layers={"lora_te": te})
    style_w = write_kohya_lora(unet, tmp_path / "t.safetensors", rank=2, seed=2, te_layers={"lora_te": te})
    subject, style = load_lora(str(tmp_path / "s.safetensors")), load_lora(str(tmp_path / "t.safetensors"))
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    with torch.no_grad():
        base = te(ids).last_hidden_state
        with fuse(unet, subject, style, text_encoders=te, te_mode="off", method="dynamic"):
            assert torch.equal(te(ids).last_hidden_state, base)
        with fuse(unet, subject, style, text_encoders=te, te_mode="merge", method="dynamic") as session:
            fused = te(ids).last_hidden_state
        merged = _merged(te, subject_w, style_w, group="te1")
        torch.testing.assert_close(fused, merged(ids).last_hidden_state, **TOL)
        assert sum(t.group == "te" for t in session.resolved.targets) == len([w for w in subject_w if w.group == "te1"])
        with fuse(unet, subject, style, text_encoders=te, te_mode="select", method="dynamic"):
            selected = te(ids).last_hidden_state
        assert not torch.equal(selected, fused) and not torch.equal(selected, base)
        assert torch.equal(te(ids).last_hidden_state, base)


@pytest.mark.parametrize("method", ["merge", "klora"])
def test_weight_space_matches_forward_time_and_leaves_the_unet_as_it_was(case, method):
    """Baked (weight_space=True): merge equals both LoRAs merged by hand (LoCon and CP convs included), K-LoRA
    equals its forward-time form step by step; afterwards every parameter has its old bits and no hook is left."""
    unet, inputs, files = case["unet64"], case["inputs64"], case["files"]
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    steps = 3
    outputs = {}
    for baked in (False, True):
        with fuse(unet, files["subject"], files["style"], method=method, weight_space=baked) as session:
            outputs[baked] = []
            for i in range(steps):
                session.set_step(i, steps)
                outputs[baked].append(unet_forward(unet, inputs))
        if method == "klora":
            outputs[f"selection_{baked}"] = session.selection
    for hooked, baked in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(baked, hooked, **TOL)
    if method == "merge":
        merged = _merged(case["unet"], case["written"]["subject"], case["written"]["style"])
        torch.testing.assert_close(outputs[True][0], unet_forward(merged, inputs), **TOL)
    else:
        assert torch.equal(outputs["selection_True"], outputs["selection_False"])
    assert all(torch.equal(p, before[name]) for name, p in unet.named_parameters())
    assert all(not m._forward_hooks for m in unet.modules())
    assert torch.equal(unet_forward(unet, inputs), case["base64"])
