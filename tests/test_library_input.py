"""Bad input to the library (load_lora, fuse, FuseSession): a clear error naming what is wrong, or a warning a
library user sees; never a NaN image, a silent no-op or a changed model."""
import logging
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_dynfuse import LoraFormatError, fuse, load_lora
from lib_dynfuse.layer_delta import FuseTarget, check_weight, first_nonfinite
from lib_dynfuse.session import FuseSession
from lib_dynfuse.targets import LoraMatchWarning
from tests.fixtures.lora_files import write_kohya_lora
from tests.fixtures.models import unet_forward, unet_inputs

from session_fixtures import _linear, _linear_delta, _x

TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
TO_V = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"


def attn_only(name):
    return ".attn" in name


def _edited(path, edit):
    """Rewrite a LoRA file with `edit(tensors)` applied."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def lora_path(tmp_path, sd15_unet):
    path = tmp_path / "bad.safetensors"
    write_kohya_lora(sd15_unet, path, targets=attn_only, rank=4, alpha=2.0)
    return path


# ---- non-finite tensors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [(f"{TO_Q}.lora_up.weight", float("nan")),
                                       (f"{TO_Q}.lora_down.weight", float("inf")),
                                       (f"{TO_Q}.alpha", float("nan"))])
def test_nan_or_inf_in_a_tensor_or_alpha_is_refused_naming_file_and_key(lora_path, key, value):
    def poison(tensors):
        t = tensors[key].clone()
        t.view(-1)[-1] = value
        tensors[key] = t
        k = tensors[f"{TO_V}.lora_up.weight"].clone()     # a later key is bad too: the first one is named
        k[0, 0] = float("nan")
        tensors[f"{TO_V}.lora_up.weight"] = k
    _edited(lora_path, poison)
    with pytest.raises(LoraFormatError) as err:
        load_lora(lora_path)
    assert "bad.safetensors" in str(err.value) and key in str(err.value) and TO_V not in str(err.value)
    assert "NaN or Inf" in str(err.value)


def test_fp16_inf_is_found_and_integer_tensors_are_skipped():
    ok = torch.zeros(3, dtype=torch.float16)
    assert first_nonfinite([("a", ok), ("i", torch.tensor([1, 2])), ("b", ok)]) is None
    assert first_nonfinite([("a", ok), ("b", torch.tensor([65504.0], dtype=torch.float16) * 2), ("c", ok / 0)]) == "b"


# ---- user weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight,error", [(float("nan"), ValueError), (float("inf"), ValueError), (1e30, ValueError),
                                          (-1e3, ValueError), ("1.0", TypeError), (None, TypeError),
                                          (True, TypeError)])
def test_bad_weights_are_refused_naming_the_weight(lora_path, weight, error):
    with pytest.raises(error, match="weight"):
        load_lora(lora_path, weight)
    lora = load_lora(lora_path)
    with pytest.raises(error, match="weight"):
        lora.with_weight(weight)


def test_good_weights_pass_as_floats():
    import numpy as np
    assert check_weight(np.float32(0.5)) == 0.5 and check_weight(-2) == -2.0 and check_weight(100) == 100.0
    assert type(check_weight(np.float32(0.5))) is float


# ---- malformed layers -------------------------------------------------------------------------------------------

def test_rank_zero_layer_names_file_and_key(lora_path):
    def empty(tensors):
        tensors[f"{TO_Q}.lora_down.weight"] = torch.zeros(0, tensors[f"{TO_Q}.lora_down.weight"].shape[1])
        tensors[f"{TO_Q}.lora_up.weight"] = torch.zeros(tensors[f"{TO_Q}.lora_up.weight"].shape[0], 0)
    _edited(lora_path, empty)
    with pytest.raises(LoraFormatError, match=rf"bad\.safetensors: {TO_Q}\.lora_down\.weight has rank 0"):
        load_lora(lora_path)


def test_down_and_up_of_different_ranks_are_a_shape_error_naming_the_key(lora_path):
    def mismatch(tensors):
        down = tensors[f"{TO_Q}.lora_down.weight"]
        tensors[f"{TO_Q}.lora_down.weight"] = torch.ones(8, down.shape[1])
        tensors[f"{TO_Q}.lora_up.weight"] = torch.ones(tensors[f"{TO_Q}.lora_up.weight"].shape[0], 3)
    _edited(lora_path, mismatch)
    with pytest.raises(LoraFormatError, match=rf"bad\.safetensors: {TO_Q}\.lora_up\.weight has shape \(\d+, 3\), "
                                              rf"which does not fit the rank 8 of {TO_Q}\.lora_down\.weight"):
        load_lora(lora_path)


def test_cp_core_of_another_rank_is_a_shape_error(tmp_path, sd15_unet):
    path = tmp_path / "cp.safetensors"
    write_kohya_lora(sd15_unet, path, include_conv=True, cp=True, rank=4)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    _edited(path, lambda t: t.__setitem__(f"{stem}.lora_mid.weight", torch.ones(2, 2, 3, 3)))
    with pytest.raises(LoraFormatError, match=rf"{stem}\.lora_mid\.weight has shape \(2, 2, 3, 3\)"):
        load_lora(path)


# ---- alpha 0 --------------------------------------------------------------------------------------------------

def test_alpha_zero_means_alpha_equals_rank_as_in_kohyas_trainers(tmp_path, sd15_unet):
    zero = write_kohya_lora(sd15_unet, tmp_path / "a0.safetensors", targets=attn_only, rank=4, alpha=0.0, seed=3)
    write_kohya_lora(sd15_unet, tmp_path / "ar.safetensors", targets=attn_only, rank=4, alpha=4.0, seed=3)
    a0, ar = load_lora(tmp_path / "a0.safetensors", 0.5), load_lora(tmp_path / "ar.safetensors", 0.5)
    assert zero and set(a0.layers) == set(ar.layers)
    for key, delta in a0.layers.items():
        assert delta.scale == ar.layers[key].scale == 0.5
        assert torch.equal(delta.dense_weight(), ar.layers[key].dense_weight())
        assert delta.dense_weight().abs().max() > 0


# ---- set_step ---------------------------------------------------------------------------------------------------

def test_set_step_needs_a_step_inside_the_schedule():
    lin = _linear(0)
    session = FuseSession([FuseTarget("l", lin, _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 2, 2))], method="dynamic")
    session.set_step(9, 10)
    for step, total in ((10, 10), (10 ** 6, 10), (-1, 10), (0, 0)):
        with pytest.raises(ValueError, match="0 <= step < total"):
            session.set_step(step, total)
    assert session.progress == 0.9
    with session, torch.no_grad():
        lin(_x(2, 5, 6))
    assert session.selection.shape == (10, 1)


# ---- nested weight_space sessions -------------------------------------------------------------------------------

def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(module, snap):
    return all(torch.equal(p, snap[n]) for n, p in module.named_parameters())


@pytest.mark.parametrize("inner_method", ["merge", "klora", "dynamic"])
def test_a_nested_weight_space_session_is_refused_before_it_writes(inner_method):
    model = torch.nn.Sequential(_linear(0), torch.nn.ReLU(), _linear(1, in_f=8, out_f=5)).eval()
    first = [FuseTarget("0", model[0], _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 2, 2)),
             FuseTarget("2", model[2], _linear_delta(5, 8, 2, 3), None)]
    second = [FuseTarget("2", model[2], _linear_delta(5, 8, 2, 5), _linear_delta(5, 8, 2, 6))]
    x, original = _x(2, 5, 6), _snapshot(model)
    with torch.no_grad():
        base = model(x)
        with FuseSession(first, method="merge", weight_space=True):
            baked, outer = model(x), _snapshot(model)
            inner = FuseSession(second, method=inner_method, weight_space=True)
            with pytest.raises(RuntimeError, match="layer '2' already holds the baked deltas of another open"):
                inner.open()
            assert not inner.is_open and _same(model, outer) and not model[2]._forward_hooks
            with FuseSession(second, method="merge"):            # forward hooks on top are fine
                assert not torch.equal(model(x), baked)
            assert torch.equal(model(x), baked)
        assert _same(model, original) and torch.equal(model(x), base)
        with FuseSession(second, method="merge", weight_space=True):   # free again once the first is closed
            assert not _same(model, original)
        assert _same(model, original)


@pytest.mark.parametrize("close_first", ["outer", "inner"])
def test_weight_space_sessions_on_other_layers_restore_exactly_in_either_order(close_first):
    model = torch.nn.Sequential(_linear(0), torch.nn.ReLU(), _linear(1, in_f=8, out_f=5)).eval()
    a = FuseSession([FuseTarget("0", model[0], _linear_delta(8, 6, 2, 1), _linear_delta(8, 6, 2, 2))],
                    method="merge", weight_space=True)
    b = FuseSession([FuseTarget("2", model[2], _linear_delta(5, 8, 2, 3), _linear_delta(5, 8, 2, 4))],
                    method="klora", weight_space=True)
    original = _snapshot(model)
    a.open()
    b.open()
    assert not _same(model[0], {k[2:]: v for k, v in original.items() if k.startswith("0.")})
    assert not _same(model[2], {k[2:]: v for k, v in original.items() if k.startswith("2.")})
    for s in ((a, b) if close_first == "outer" else (b, a)):
        s.close()
    assert _same(model, original)


# ---- what fuse accepts, and the warnings a library user sees ----------------------------------------------------

def test_fuse_accepts_paths_and_refuses_other_objects_naming_load_lora(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "c.safetensors", targets=attn_only, seed=1)
    write_kohya_lora(sd15_unet, tmp_path / "s.safetensors", targets=attn_only, seed=2)
    inputs = unet_inputs(sd15_unet, batch=2, seed=0)
    outputs = []
    with torch.no_grad():
        for subject, style in ((str(tmp_path / "c.safetensors"), tmp_path / "s.safetensors"),
                               (load_lora(tmp_path / "c.safetensors"), load_lora(tmp_path / "s.safetensors"))):
            with fuse(sd15_unet, subject, style, method="merge") as session:
                outputs.append(unet_forward(sd15_unet, inputs))
            assert session.resolved.reports["subject"].name == "c" and session.klora_sums is None
    assert torch.equal(outputs[0], outputs[1])
    for bad in (123, {"layers": 1}.items(), [tmp_path / "c.safetensors"]):
        with pytest.raises(TypeError, match=r"subject must be a LoraFile from lib_dynfuse\.load_lora"):
            fuse(sd15_unet, bad, tmp_path / "s.safetensors", method="dynamic")


def test_a_directory_path_says_it_is_a_directory(tmp_path, sd15_unet):
    with pytest.raises(LoraFormatError, match="is a directory"):
        load_lora(tmp_path)
    with pytest.raises(LoraFormatError, match="is a directory"):
        fuse(sd15_unet, tmp_path, tmp_path, method="dynamic")


def test_partial_matches_and_same_file_warn_through_logging_and_warnings(tmp_path, sd15_unet, caplog):
    path = tmp_path / "p.safetensors"
    write_kohya_lora(sd15_unet, path, targets=attn_only)
    _edited(path, lambda t: t.update({"lora_unet_down_blocks_9_proj_in.lora_down.weight": torch.ones(2, 8),
                                      "lora_unet_down_blocks_9_proj_in.lora_up.weight": torch.ones(8, 2)}))
    caplog.set_level(logging.WARNING, logger="lib_dynfuse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = fuse(sd15_unet, path, str(path), method="dynamic")
    messages = session.resolved.warnings
    assert len(messages) == 3 and "same file" in messages[2] and "1 of" in messages[0]
    assert [r.getMessage() for r in caplog.records if r.name == "lib_dynfuse"] == messages
    ours = [w for w in caught if issubclass(w.category, LoraMatchWarning)]
    assert [str(w.message) for w in ours] == messages
    assert all(w.filename == __file__ for w in ours)          # shown at the caller's line, not inside the library
    assert not session.is_open and _unhooked(sd15_unet)


def _unhooked(model):
    return not any(m._forward_hooks for m in model.modules())


def test_a_refused_file_leaves_the_model_as_it_was(lora_path, sd15_unet):
    _edited(lora_path, lambda t: t[f"{TO_Q}.lora_up.weight"].fill_(math.inf))
    inputs = unet_inputs(sd15_unet, batch=2, seed=0)
    snap = _snapshot(sd15_unet)
    with torch.no_grad():
        base = unet_forward(sd15_unet, inputs)
        with pytest.raises(LoraFormatError, match=f"{TO_Q}.lora_up.weight holds NaN or Inf"):
            fuse(sd15_unet, lora_path, lora_path, weight_space=True, method="dynamic")
        assert torch.equal(unet_forward(sd15_unet, inputs), base)
    assert _same(sd15_unet, snap) and _unhooked(sd15_unet)
