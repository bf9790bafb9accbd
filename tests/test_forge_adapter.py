"""Forge adapter against stand-ins that follow Forge's signatures (tests/standins_forge, each cites Forge file:line).

What is checked: Forge's parser output -> LayerDeltas (exact against Forge-semantics merges and hand references),
fresh key-map dicts, targets by name on a Linear that is not an nn.Linear, the per-call UNet wrapper on a cloned
patcher (hooks gone after every call, also when the model raises; chained wrappers; cond/uncond rows; steps
from the denoiser, reset per pass with hires' three process_before_every_sampling calls), inference mode, and the
fused LoRAs kept out of Forge's weight merge (constant deltas and text encoders: test_forge_merge_te.py).
"""
import types

import pytest
import torch

from lib_dynfuse.hosts import common
from lib_dynfuse.hosts import forge
from tests.fixtures import lora_files
from tests.forge_fixtures import (_hook_counts, _host_and_p, _inputs, _reference_subject_only, _sample_step,
                                  fh, sd15_files)  # noqa: F401  (fixtures)


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
