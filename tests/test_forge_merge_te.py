"""Forge adapter, constant deltas and text encoders, against the stand-ins (tests/standins_forge): merge and the
layers one LoRA touches go to Forge's own weight merge (online mode as `<lora>` tags take it) and come back
for the next job, patch-set names, text-encoder hooks around setup_conds and Forge's CLIP merge, SDXL targets,
and nothing installed without an enabled run.
"""
import dataclasses
import importlib
import types

import pytest
import torch
import torch.nn.functional as F

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.hosts import common
from lib_dynfuse.hosts import forge
from tests.fixtures import lora_files, models
from tests.forge_fixtures import _hook_counts, _host_and_p, _inputs, _sample_step, fh, sd15_files  # noqa: F401


# ---------------------------------------------------------------------------- constant deltas: Forge's own merge
def _dense(delta, like):
    return delta.dense_weight().reshape(like.shape)


def test_merge_goes_to_forges_weight_merge_and_the_next_job_gets_the_weights_back(fh, sd15_files):
    """`merge` depends on neither the input nor the step: both LoRAs become two Forge patch sets on a cloned
    patcher (no wrapper, no hooks), which Forge merges into W + dW_c + dW_s when it loads the UNet
    (LoraLoader.refresh); the output is the forward-time merge's up to rounding, and the next job without the
    patches (the host's own patcher) gets every weight back bit for bit."""
    host, run, p, unet = _host_and_p(fh, sd15_files, method="merge", subject="subject", style="style",
                                     style_weight=0.5)
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    original = p.sd_model.forge_objects.unet
    assert host.before_sampling(p, run) is None
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and original.lora_patches == {}
    assert "model_function_wrapper" not in patched.model_options
    names = [k[0] for k in patched.lora_patches]
    assert len(names) == 2 and names[0].startswith("DynFuse subject subject") and "x0.5" in names[1]
    targets = [t for t in run.prepare(p) if t.group == "unet"]
    assert run.host_applied["unet"] == {t.name for t in targets} and run.forward_targets(targets) == []

    patched.refresh_loras()                               # the load (memory_management.py:518)
    state = unet.model.state_dict()
    for t in targets:
        key = forge.UNET_PREFIX + t.name + ".weight"
        expected = before[key] + _dense(t.subject, before[key]) + _dense(t.style, before[key])
        torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-6)
    x, ctx = _inputs()
    forge_merged = torch.cat(_sample_step(fh, p, x, ctx))
    assert _hook_counts(unet.model) == 0

    original.refresh_loras()                              # the next job, without the patches
    assert all(torch.equal(v, before[k]) for k, v in unet.model.state_dict().items())
    from lib_dynfuse.session import FuseSession
    with FuseSession(targets, method="merge"):            # the same merge, forward-time
        forward_time = torch.cat(_sample_step(fh, p, x, ctx))
    torch.testing.assert_close(forge_merged, forward_time, rtol=1e-4, atol=1e-4)
    assert not torch.equal(forge_merged, torch.cat(_sample_step(fh, p, x, ctx)))   # the merge changes the image


@pytest.mark.parametrize("method", ["dynamic", "klora"])
def test_layers_one_lora_touches_go_to_forges_merge_for_every_method(fh, sd15_files, method):
    """A layer only one LoRA touches takes that LoRA's delta whatever the method: it goes to Forge's merge (the
    subject's set only, here), the hooks cover the other layers, and the output equals fusing every layer
    forward-time up to rounding."""
    host, run, p, unet = _host_and_p(fh, sd15_files, method=method, subject="subject", style="style")
    targets = run.prepare(p)
    unet_indices = [i for i, t in enumerate(targets) if t.group == "unet"]
    for i in unet_indices[:3]:                            # the style LoRA leaves these layers alone
        targets[i] = dataclasses.replace(targets[i], style=None)
    lone = {targets[i].name for i in unet_indices[:3]}
    hooks = host.before_sampling(p, run)
    patched = p.sd_model.forge_objects.unet
    assert hooks is not None and run.host_applied["unet"] == lone
    (identity, patches), = patched.lora_patches.items()
    assert identity[0].startswith("DynFuse subject") and "one-LoRA layers" in identity[0]
    assert set(patches) == {forge.UNET_PREFIX + n + ".weight" for n in lone}
    patched.refresh_loras()
    x, ctx = _inputs()
    got = torch.cat(_sample_step(fh, p, x, ctx))
    assert {t.name for t in hooks.session.targets} == {targets[i].name for i in unet_indices[3:]}
    p.sd_model.forge_objects.unet = unet                  # the next job, without the patches
    unet.refresh_loras()
    from lib_dynfuse.session import FuseSession
    p.sampler.model_wrap_cfg.step = 0
    session = FuseSession([t for t in targets if t.group == "unet"], method=method)
    session.set_step(0, 3)
    session.set_row_labels(["uncond", "cond"])
    with session:
        reference = torch.cat(_sample_step(fh, p, x, ctx))
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_patch_sets_take_forges_online_mode_as_lora_tags_do(fh, sd15_files):
    """Online LoRA (the UI's low-bit option) only for weights not stored as fp32/fp16/bf16, as for <lora>
    (sd_forge_lora/networks.py:102-105); the mode is the last item of each patch set's key (base.py:92)."""
    args = importlib.import_module("backend.args")
    unet = types.SimpleNamespace(model=types.SimpleNamespace(storage_dtype=torch.float8_e4m3fn))
    assert forge.lora_online_mode(unet) is False
    args.dynamic_args["online_lora"] = True
    try:
        assert forge.lora_online_mode(unet) is True
        unet.model.storage_dtype = torch.float16
        assert forge.lora_online_mode(unet) is False
        host, run, p, _ = _host_and_p(fh, sd15_files, method="merge", subject="subject", style="style")
        p.sd_model.forge_objects.unet.model.storage_dtype = torch.float8_e4m3fn
        host.before_sampling(p, run)
        assert [k[3] for k in p.sd_model.forge_objects.unet.lora_patches] == [True, True]
    finally:
        del args.dynamic_args["online_lora"]


def test_patch_set_names_change_with_what_the_deltas_are_made_of():
    """Forge re-merges only when the names of the patch sets change (LoraLoader.refresh): every input of the
    deltas is in the name (LoRA, its file's hash and identity, weight, and which layers the method leaves to Forge)."""
    def names(identities=("h1@1-2-3", "h2@4-5-6"), **kw):
        run = common.FuseRun(None, ui_args=FuseArgs(enabled=True, **dict(dict(subject="a", style="b", method="dynamic"), **kw)))
        run.identities = dict(zip(("subject", "style"), identities))
        return forge.patch_identities(run)
    base = names()
    assert base[0] != base[1] and "h1@1-2-3" in base[0] and "h2@4-5-6" in base[1]
    for changed in (names(subject="c"), names(style_weight=0.5), names(subject_weight=0.8), names(method="merge"),
                    names(identities=("h1@1-2-9", "h2@4-5-6"))):   # the same name and hash, the file replaced
        assert changed != base
    assert names(method="klora") == base and names(criterion="js") == base   # same one-LoRA layers, same deltas
    merged = names(method="merge")   # merge's balance tilts the deltas: a new name for every balance but 0.5's
    assert names(method="merge", balance=0.5) == merged and names(method="merge", balance=0.3) != merged
    assert names(balance=0.3) == base                                         # other methods ignore it


# ---------------------------------------------------------------------------- text encoder
def test_text_encoder_hooks_live_only_inside_setup_conds(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="zero")
    clip = p.sd_model.forge_objects.clip
    te = clip.cond_stage_model["clip_l"].transformer
    ids = torch.tensor([[1, 5, 9, 2]])
    seen = {}

    def setup_conds():
        seen["hooks"] = _hook_counts(te)
        seen["out"] = te(input_ids=ids).last_hidden_state
    p.setup_conds = setup_conds
    shared_cache = p.cached_c
    host.install(p, run)
    assert p.cached_c is not shared_cache and p.cached_c == [None, None, None]
    p.setup_conds()
    assert seen["hooks"] > 0 and _hook_counts(te) == 0
    # reference: the subject's TE deltas by hand (the style is zero)
    handles = []
    for w in (w for w in sd15_files["subject"][1] if w.group == "te1"):
        m = te.get_submodule(w.module)
        handles.append(m.register_forward_hook(
            lambda mod, a, out, w=w: out + F.linear(F.linear(a[0], w.down), w.up) * w.scale))
    try:
        ref = te(input_ids=ids).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["out"], ref, rtol=1e-4, atol=1e-5)   # the hook folds the scale into up
    host.uninstall(p)
    assert "_dynfuse_wrapped" not in p.__dict__


def test_text_encoder_merge_goes_to_forges_clip_merge(fh, sd15_files):
    """Text-encoder layers whose deltas are constant (here `merge`) become patch sets on a clone of
    forge_objects.clip before setup_conds, so Forge merges them when it loads the CLIP: no hooks, the
    forward-time merge's output up to rounding, and the CLIP's weights back bit for bit for the next job."""
    host, run, p, unet = _host_and_p(fh, sd15_files, method="merge", subject="subject", style="zero")
    original = p.sd_model.forge_objects.clip
    te = original.cond_stage_model["clip_l"].transformer
    before = {k: v.clone() for k, v in te.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 2]])
    seen = {}

    def setup_conds():   # Forge loads the CLIP (and merges its patches) when it encodes
        p.sd_model.forge_objects.clip.patcher.refresh_loras()
        seen["hooks"] = _hook_counts(te)
        seen["out"] = te(input_ids=ids).last_hidden_state
    p.setup_conds = setup_conds
    host.install(p, run)
    p.setup_conds()
    te_targets = [t for t in run.prepare(p) if t.group == "te"]
    assert te_targets and run.host_applied["te"] == {t.name for t in te_targets} and seen["hooks"] == 0
    clone = p.sd_model.forge_objects.clip
    assert clone is not original and original.patcher.lora_patches == {} and len(clone.patcher.lora_patches) == 2
    original.patcher.refresh_loras()                      # the next job, without the patches
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())
    from lib_dynfuse.session import FuseSession
    with FuseSession(te_targets, method="merge"):
        forward_time = te(input_ids=ids).last_hidden_state
    torch.testing.assert_close(seen["out"], forward_time, rtol=1e-5, atol=1e-5)
    assert not torch.equal(forward_time, te(input_ids=ids).last_hidden_state)
    host.uninstall(p)


def test_detection_by_feature(fh):
    assert forge.is_forge()
    sd = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=fh.world.flux_unet_patcher()))
    assert forge.uses_forge_objects(sd) and forge.is_flux(sd) and forge.model_family(sd) == "flux"
    sd15 = types.SimpleNamespace(is_sd1=True, forge_objects=types.SimpleNamespace(unet=fh.world.sd15_unet_patcher()))
    assert not forge.is_flux(sd15) and forge.model_family(sd15) == "sd1"


def test_sdxl_targets_by_name_with_two_text_encoders(fh, tmp_path):
    """SDXL: proj_in/proj_out are Linears (not convs) and the TE LoRA keys lora_te1_/lora_te2_ go to clip_l/clip_g."""
    from backend.modules.k_model import KModel
    from backend.operations import forgeify
    from backend.patcher.clip import CLIP
    unet_nn = models.tiny_sdxl_unet(0)
    te1, te2 = models.tiny_sdxl_text_encoders(0)
    path = tmp_path / "sdxl.safetensors"
    written = lora_files.write_kohya_lora(unet_nn, path, rank=2, seed=7, te_layers={"lora_te1": te1, "lora_te2": te2})
    holders = {}
    for key, te in (("clip_l", te1), ("clip_g", te2)):
        holders[key] = torch.nn.Module()
        holders[key].transformer = te
        forgeify(holders[key])
    clip = CLIP(model_dict=holders)
    kmodel = KModel(forgeify(unet_nn), huggingface_repo="stabilityai/stable-diffusion-xl-base-1.0")
    lora = forge.parse_lora(fh.api, "sdxl", fh.api.load_state_dict(str(path)), kmodel, clip.cond_stage_model)
    assert len(lora.layers) == len(written) and not lora.skipped
    proj_in = lora.layers["down_blocks.1.attentions.0.proj_in"]
    assert not isinstance(proj_in.module, torch.nn.Linear) and proj_in.delta.down.dim() == 2
    groups = {name.split(".")[0] for name, layer in lora.layers.items() if layer.group == "te"}
    assert groups == {"clip_l", "clip_g"}
    for w in written:
        name = w.module if w.group == "unet" else f"{'clip_l' if w.group == 'te1' else 'clip_g'}.transformer.{w.module}"
        assert torch.equal(lora.layers[name].delta.up, w.up) and lora.layers[name].delta.scale == w.scale


def test_nothing_is_installed_without_an_enabled_run(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files)
    original = p.sd_model.forge_objects.unet
    setattr(p, common.RUN_ATTR, common.FuseRun(host, ui_args=FuseArgs()))
    assert host.before_every_sampling(p) is None and p.sd_model.forge_objects.unet is original
    delattr(p, common.RUN_ATTR)
    assert host.before_every_sampling(p) is None and p.sd_model.forge_objects.unet is original
    assert "model_function_wrapper" not in original.model_options


def test_read_lora_under_inference_mode_gives_normal_tensors_on_the_unet_dtype(fh, sd15_files):
    """Forge reads inside setup_conds, under inference mode: the UNet deltas come back as normal tensors in the
    UNet's computation dtype (so no per-call copies, and later autograd use is possible)."""
    host, run, p, unet = _host_and_p(fh, sd15_files)
    unet.model.computation_dtype = torch.float64
    with torch.inference_mode():
        lora = host.read_lora("subject")
    unet_layers = [layer for layer in lora.layers.values() if layer.group == "unet"]
    assert unet_layers and lora.shorthash
    for layer in unet_layers:
        assert layer.delta.up.dtype == torch.float64 and not layer.delta.up.is_inference()
        assert not layer.delta.down.is_inference()
    with pytest.raises(common.FuseInputError, match="unknown LoRA"):
        host.read_lora("not_there")
