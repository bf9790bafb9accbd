"""Forge adapter against stand-ins that follow Forge's signatures (tests/standins_forge, each cites Forge file:line).

What is checked: Forge's parser output -> LayerDeltas (exact against Forge-semantics merges and hand references),
fresh key-map dicts, targets by name on a Linear that is not an nn.Linear, the per-call UNet wrapper on a cloned
patcher (hooks gone after every call, also when the model raises; chained wrappers; cond/uncond rows; steps
from the denoiser, reset per pass with hires' three process_before_every_sampling calls), inference mode, the
fused LoRAs kept out of Forge's weight merge, and the text-encoder hooks around setup_conds.
"""
import dataclasses
import importlib
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.hosts import common
from lib_dynfuse.hosts import forge
from lib_dynfuse.layer_delta import LayerDelta
from lib_dynfuse.lowrank import delta_output
from tests.fixtures import lora_files, models

STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins_forge")
HOST_MODULES = ("backend", "networks", "modules", "tests.standins_forge.world")


def _purge():
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in HOST_MODULES):
            del sys.modules[name]


@pytest.fixture(scope="module")
def fh():
    """The Forge stand-ins on sys.path for this module: `fh.world`, `fh.networks`, `fh.shared`, `fh.api`."""
    assert importlib.util.find_spec("backend") is None, "a real `backend` package would shadow the stand-ins"
    sys.path.insert(0, STANDINS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: extra threads only contend on a shared 2-core box
    try:
        world = importlib.import_module("tests.standins_forge.world")
        ns = types.SimpleNamespace(world=world, networks=importlib.import_module("networks"),
                                   shared=importlib.import_module("modules.shared"), api=forge.forge_lora(),
                                   lora=importlib.import_module("backend.patcher.lora"),
                                   sampling=importlib.import_module("backend.sampling.sampling_function"))
        yield ns
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(STANDINS)
        _purge()


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    """A subject LoRA (random), a zero style LoRA and a random style LoRA for the tiny SD1.5 UNet (+ TE)."""
    d = tmp_path_factory.mktemp("forge_loras")
    unet = models.tiny_sd15_unet(0)
    te = models.tiny_sd15_text_encoder(0)
    files = {}
    files["subject"] = (d / "subject.safetensors", lora_files.write_kohya_lora(
        unet, d / "subject.safetensors", rank=2, alpha=1.0, seed=1, te_layers={"lora_te": te}))
    files["zero"] = (d / "zero.safetensors", lora_files.write_kohya_lora(
        unet, d / "zero.safetensors", rank=2, seed=2, zero=True, te_layers={"lora_te": te}))
    files["style"] = (d / "style.safetensors", lora_files.write_kohya_lora(
        unet, d / "style.safetensors", rank=3, seed=3, alpha=1.5))
    return files


def _register(fh, files):
    for name, (path, _) in files.items():
        fh.networks.register(name, str(path))


def _inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 7, 32, generator=g)


def _hook_counts(root):
    return sum(len(m._forward_hooks) for m in root.modules())


def _run(p, host, args):
    run = common.FuseRun(host, ui_args=args)
    setattr(p, common.RUN_ATTR, run)
    return run


def _sample_step(fh, p, x, ctx, cfg=True):
    """One denoiser call as Forge batches it (sampling_function.py:154-289, stand-in), then step += 1."""
    unet = p.sd_model.forge_objects.unet
    sigma = torch.full((x.shape[0],), 500.0)
    out = fh.sampling.calc_cond_uncond_batch(unet.model, ctx, ctx.flip(1) if cfg else None, x, sigma, unet.model_options)
    p.sampler.model_wrap_cfg.step += 1
    return out


# ---------------------------------------------------------------------------- parsing
def test_stand_in_linear_is_not_nn_linear(fh):
    unet = fh.world.sd15_unet_patcher()
    q = unet.model.get_submodule("diffusion_model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not isinstance(q, torch.nn.Linear) and type(q).__name__ == "Linear"


def test_parsed_low_rank_deltas_equal_forge_merge_and_written_factors(fh, sd15_files):
    unet, clip = fh.world.sd15_unet_patcher(), fh.world.sd15_clip()
    path, written = sd15_files["subject"]
    lora = forge.parse_lora(fh.api, "subject", fh.api.load_state_dict(str(path)), unet.model, clip.cond_stage_model)
    by_module = lora_files.written_by_module(written)
    te_written = [w for w in written if w.group == "te1"]
    unet_written = [w for w in written if w.group == "unet"]
    assert len(lora.layers) == len(written) and not lora.skipped
    for w in unet_written:
        layer = lora.layers[w.module]
        assert layer.group == "unet" and layer.delta.is_low_rank and layer.delta.scale == w.scale
        assert torch.equal(layer.delta.up, w.up) and torch.equal(layer.delta.down, w.down)  # v[0] is up
        # Forge's own merge of the same patch on a zero weight gives the same dW
        patch = ("lora", (w.up, w.down, w.alpha, None, None))
        ref = fh.lora.merge_lora_to_weight([[1.0, patch, 1.0, None, None]], torch.zeros_like(layer.module.weight))
        torch.testing.assert_close(layer.delta.dense_weight(), ref, rtol=0, atol=1e-6)
    for w in te_written:
        layer = lora.layers[f"clip_l.transformer.{w.module}"]
        assert layer.group == "te" and layer.module is clip.cond_stage_model.get_submodule(f"clip_l.transformer.{w.module}")
    assert by_module  # written_by_module covers both groups


def test_key_maps_get_a_fresh_dict_every_time(fh, sd15_files):
    """model_lora_keys_unet/clip write into a shared default dict (lora.py:28, :43); we must never use it."""
    defaults = fh.lora.model_lora_keys_unet.__defaults__[0], fh.lora.model_lora_keys_clip.__defaults__[0]
    unet, clip = fh.world.sd15_unet_patcher(), fh.world.sd15_clip()
    forge.parse_lora(fh.api, "s", fh.api.load_state_dict(str(sd15_files["subject"][0])), unet.model, clip.cond_stage_model)
    flux = fh.world.flux_unet_patcher()
    forge.parse_lora(fh.api, "s", fh.api.load_state_dict(str(sd15_files["style"][0])), unet.model, None)
    assert defaults == ({}, {})
    with pytest.raises(common.FuseInputError, match="matches no layer"):
        forge.parse_lora(fh.api, "subject", fh.api.load_state_dict(str(sd15_files["subject"][0])), flux.model, None)


def test_non_low_rank_patches_become_dense_forge_deltas(fh):
    """LoHa and DoRA are built once with Forge's merge: LoHa on zeros, DoRA as merged(W) - W."""
    unet = fh.world.sd15_unet_patcher()
    path = "diffusion_model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    module = unet.model.get_submodule(path)
    out_f, in_f = module.weight.shape
    g = torch.Generator().manual_seed(5)
    loha = ("loha", (torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g), 1.0,
                     torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g), None, None, None))
    dora = ("lora", (torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g), 2.0, None,
                     torch.rand(out_f, generator=g) + 0.5))
    w = module.weight.detach().clone()
    for patch, base in ((loha, torch.zeros_like(w)), (dora, w)):
        deltas, skipped = forge.layer_deltas({path + ".weight": patch}, unet.model, fh.api.merge, 1.0)
        merged = fh.lora.merge_lora_to_weight([[1.0, patch, 1.0, None, None]], base)
        assert not skipped and not deltas[path].is_low_rank
        assert torch.equal(deltas[path].dense, merged - base)
    assert torch.equal(module.weight, w)


def test_bias_patches_are_reported_not_applied(fh):
    unet = fh.world.sd15_unet_patcher()
    path = "diffusion_model.conv_in"
    deltas, skipped = forge.layer_deltas({path + ".bias": ("diff", (torch.ones(32),))}, unet.model, fh.api.merge, 1.0)
    assert deltas == {} and skipped and "only weights" in skipped[0]


def test_wrong_shapes_are_refused(fh):
    unet = fh.world.sd15_unet_patcher()
    path = "diffusion_model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    bad = ("lora", (torch.randn(7, 2), torch.randn(2, 32), None, None, None))
    with pytest.raises(common.FuseInputError, match="LoRA 'x' does not fit the loaded model: .* has 7 outputs"):
        forge.layer_deltas({path + ".weight": bad}, unet.model, fh.api.merge, 1.0, "x")


# ---------------------------------------------------------------------------- the per-call UNet wrapper
@pytest.mark.parametrize("key", ["lora_up.weight", "alpha"])
def test_a_lora_with_nan_values_is_refused_naming_it_and_the_layer(fh, sd15_files, tmp_path, key):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(sd15_files["style"][0]))
    tensors[sorted(k for k in tensors if k.endswith(key))[0]].fill_(float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    host, run, p, unet = _host_and_p(fh, dict(sd15_files, nan=(tmp_path / "nan.safetensors", None)), style="nan")
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    assert run.prepare(p) is None
    assert any("LoRA 'nan' holds NaN or Inf values in layer" in m and "without fusion" in m for m in run.messages)
    assert all(torch.equal(v, before[k]) for k, v in unet.model.state_dict().items())


def _host_and_p(fh, sd15_files, method="dynamic", steps=3, **kw):
    _register(fh, sd15_files)
    unet, clip = fh.world.sd15_unet_patcher(), fh.world.sd15_clip()
    p = fh.world.make_p(unet, clip, steps=steps)
    fh.shared.sd_model = p.sd_model
    host = forge.ForgeHost(fh.api)
    args = FuseArgs(enabled=True, subject=kw.pop("subject", "subject"), style=kw.pop("style", "zero"),
                    method=method, **kw)
    run = _run(p, host, args)
    return host, run, p, unet


def _reference_subject_only(unet_model, written, x, ctx, uncond_ctx=None):
    """Reference: the base model plus x -> down -> up * alpha/r on every subject layer (own hooks, one LoRA, no selection)."""
    handles = []
    for w in (w for w in written if w.group == "unet"):
        m = unet_model.get_submodule("diffusion_model." + w.module)

        def hook(mod, args, out, w=w):   # the engine's low-rank op order (bits are compared)
            x_in = args[0]
            return out + delta_output(LayerDelta(down=w.down.to(x_in), up=w.up.to(x_in), scale=w.scale), x_in, mod)
        handles.append(m.register_forward_hook(hook))
    try:
        xs = torch.cat([x, x]) if uncond_ctx is not None else x
        cs = torch.cat([uncond_ctx, ctx]) if uncond_ctx is not None else ctx
        return unet_model.apply_model(xs, torch.full((xs.shape[0],), 500.0), c_crossattn=cs)
    finally:
        for h in handles:
            h.remove()


def test_zero_style_gives_the_subject_output_and_hooks_live_one_call(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files)
    x, ctx = _inputs()
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    original = p.sd_model.forge_objects.unet
    hooks = host.before_sampling(p, run)
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and patched.model is original.model               # a clone, shared model
    assert "model_function_wrapper" not in original.model_options                      # the host's patcher untouched
    seen = []
    inner = patched.model_options["model_function_wrapper"]

    def spy(apply_model, args):
        seen.append(_hook_counts(unet.model))
        return inner(apply_model, args)
    patched.model_options["model_function_wrapper"] = spy
    cond, uncond = _sample_step(fh, p, x, ctx)
    ref = _reference_subject_only(unet.model, sd15_files["subject"][1], x, ctx, ctx.flip(1))
    # the hooks compute both branches side by side, the reference the subject alone: equal within rounding
    torch.testing.assert_close(torch.cat([uncond, cond]), ref, rtol=1e-4, atol=1e-5)
    assert seen == [0] and _hook_counts(unet.model) == 0 and hooks.calls == 1
    assert all(torch.equal(v, before[k]) for k, v in unet.model.state_dict().items())
    plain = unet.model.apply_model(x, torch.full((1,), 500.0), c_crossattn=ctx)
    assert not torch.equal(plain, cond)


def test_hooks_are_removed_when_the_model_raises(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files)
    host.before_sampling(p, run)
    wrapper = p.sd_model.forge_objects.unet.model_options["model_function_wrapper"]
    counts = []

    def failing_apply(x, t, **c):
        counts.append(_hook_counts(unet.model))
        raise KeyboardInterrupt
    x, ctx = _inputs()
    with pytest.raises(KeyboardInterrupt):
        wrapper(failing_apply, {"input": x, "timestep": torch.ones(1), "c": {"c_crossattn": ctx}, "cond_or_uncond": [0]})
    assert counts[0] > 0 and _hook_counts(unet.model) == 0


def test_existing_wrapper_is_chained_and_ours_never_stacked(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files)
    calls = []

    def other(apply_model, args):
        calls.append(_hook_counts(unet.model))
        return apply_model(args["input"], args["timestep"], **args["c"])
    base = p.sd_model.forge_objects.unet
    base.set_model_unet_function_wrapper(other)
    host.before_sampling(p, run)
    host.before_sampling(p, run)   # a second call without the host's reset in between (processing.py:1510)
    ours = p.sd_model.forge_objects.unet.model_options["model_function_wrapper"]
    assert ours.dynfuse_previous is other
    _sample_step(fh, p, *_inputs())
    assert len(calls) == 1 and calls[0] > 0 and _hook_counts(unet.model) == 0


def test_cond_uncond_rows_follow_cond_or_uncond(fh, sd15_files):
    """cond_or_uncond [1, 0]: uncond rows first (sampling_function.py:161-162, 187); CFG 1: [0], cond only."""
    assert forge.row_labels([1, 0], 4) == ["uncond", "uncond", "cond", "cond"]
    assert forge.row_labels([0], 2) == ["cond", "cond"]
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", steps=2)
    hooks = host.before_sampling(p, run)
    x, ctx = _inputs(batch=2)
    _sample_step(fh, p, x, ctx, cfg=True)
    _sample_step(fh, p, x, ctx, cfg=False)
    rec = hooks.session.record
    assert not torch.isnan(rec.cond[0]).any() and not torch.isnan(rec.uncond[0]).any()
    assert not torch.isnan(rec.cond[1]).any() and torch.isnan(rec.uncond[1]).all()


def test_steps_come_from_the_denoiser_and_the_hires_pass_enters_the_schedule_part_way(fh, sd15_files):
    """Three process_before_every_sampling calls with hires (processing.py:1376, :1510, :1522); the
    forge_objects reset between the last two (:1518) and a new sampler for the hires pass (:1452), whose
    progress continues where its pass enters the full schedule (K-LoRA's S = alpha * p + beta)."""
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", method="klora", steps=3)
    after_lora = p.sd_model.forge_objects.unet
    x, ctx = _inputs()
    first = host.before_every_sampling(p, x=x, noise=x, c=None, uc=None)   # Script hook kwargs (scripts.py:194)
    steps_seen = []
    for _ in range(3):
        steps_seen.append(first.progress())
        _sample_step(fh, p, x, ctx)
    p.is_hr_pass, p.steps, p.denoising_strength = True, 3, 0.5                # hires: 2 steps at 0.5 (:1434)
    p.sampler = types.SimpleNamespace(model_wrap_cfg=fh.world.Denoiser(2, init_latent=x, p=p))   # :1452
    p.sd_model.forge_objects.unet = after_lora
    host.before_every_sampling(p, x=x, noise=x, c=None, uc=None)             # :1510, then discarded
    p.sd_model.forge_objects.unet = after_lora                                # :1518
    second = host.before_every_sampling(p, x=x, noise=x, c=None, uc=None)    # :1522
    for _ in range(2):
        steps_seen.append(second.progress())
        _sample_step(fh, p, x, ctx)
    # the hires pass is the tail of a 4-step schedule (setup_img2img_steps: int(2 / 0.5)): steps 2 and 3 of 4
    assert steps_seen == [(0, 3), (1, 3), (2, 3), (2, 4), (3, 4)]
    assert first.calls == 3 and second.calls == 2 and run.step == (3, 4)
    rec = second.session.record                         # one record per generation: both passes' steps
    chosen, rows = rec.counts()
    assert rec.total_steps == 4 and rows[0, 0, 0] == 1 and rows[2, 0, 0] == 2 and rows[3, 0, 0] == 1
    assert _hook_counts(unet.model) == 0


def test_hooks_work_under_inference_mode_on_inference_weights(fh, sd15_files):
    """Forge builds, moves and samples under torch.inference_mode() (processing.py:911, loader.py:497)."""
    with torch.inference_mode():
        host, run, p, unet = _host_and_p(fh, sd15_files)
        unet.model.to(torch.float32)
        for prm in unet.model.parameters():
            prm.data = prm.data.clone()
        assert next(unet.model.parameters()).is_inference()
        host.before_sampling(p, run)
        x, ctx = _inputs()
        cond, uncond = _sample_step(fh, p, x, ctx)
        ref = _reference_subject_only(unet.model, sd15_files["subject"][1], x, ctx, ctx.flip(1))
    torch.testing.assert_close(torch.cat([uncond, cond]), ref, rtol=1e-4, atol=1e-5)   # other rounding, see above
    assert _hook_counts(unet.model) == 0


def test_fused_loras_never_reach_forges_weight_merge(fh, sd15_files):
    """A <lora:subject> tag next to the fusion: its patches leave the cloned patchers; other LoRAs stay."""
    host, run, p, unet = _host_and_p(fh, sd15_files)
    subject_file, style_file = str(sd15_files["subject"][0]), str(sd15_files["style"][0])
    base = p.sd_model.forge_objects.unet
    for f in (subject_file, style_file):
        base.add_patches(filename=f, patches={"diffusion_model.conv_in.weight": ("diff", (torch.zeros(32, 4, 3, 3),))})
    p.sd_model.forge_objects.clip.patcher.lora_patches[(subject_file, 1.0, 1.0, False)] = {}
    p.extra_network_data = {"lora": [types.SimpleNamespace(positional=["subject", "1"], named={})]}
    host.before_sampling(p, run)
    kept = [k[0] for k in p.sd_model.forge_objects.unet.lora_patches]
    assert kept == [style_file]
    assert [k[0] for k in base.lora_patches] == [subject_file, style_file]          # host's patcher untouched
    assert p.sd_model.forge_objects.clip.patcher.lora_patches == {}
    assert any("also fused" in m for m in run.messages)


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
