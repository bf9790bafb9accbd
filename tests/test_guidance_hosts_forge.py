"""Forge side of the latent refinement (hosts/forge_guidance.py): everything happens under inference_mode, the
host's weights are inference tensors, so scoring goes through private copies; the x_t gradient's denoiser call
goes through a private copy of the UNet (fused like the host's), and falls back to x0 with a message when a host
tensor made in inference mode would have to be saved for the backward."""
import copy
from types import SimpleNamespace

import pytest

import numpy as np
import torch

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.guidance import LatentRefiner, paper_scorer, residual_grad_x0, residual_grad_xt, vae_decoder
from lib_dynfuse.hosts import guidance_run
from lib_dynfuse.hosts.forge_guidance import ForgeGuidance
from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from tests.test_guidance_encoders import tiny_encoders


class FirstStage(torch.nn.Module):
    """IntegratedAutoencoderKL's decode side (backend/nn/vae.py:278-316): decode(z) in [-1,1], scaling/shift."""

    def __init__(self, scaling_factor=0.18215, shift_factor=0.0):
        super().__init__()
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.norm = torch.nn.GroupNorm(1, 3)

    def decode(self, z):
        h = torch.nn.functional.interpolate(self.post_quant_conv(z), scale_factor=4, mode="nearest")
        return torch.tanh(self.norm(self.conv(h)))


def forge_first_stage(seed=0):
    """Built the way Forge builds weights: inside inference mode (backend/loader.py:497)."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        return FirstStage(0.3611, 0.1159).eval()


def forge_p(first_stage, alphas=None):
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(vae=SimpleNamespace(first_stage_model=first_stage)),
                               alphas_cumprod=alphas)
    return SimpleNamespace(sd_model=sd_model)


def scorer_for(seed=0):
    clip, dino = tiny_encoders(seed)
    g = torch.Generator().manual_seed(seed + 10)
    return paper_scorer(clip, dino, torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g))


def normal_copy(module):
    fresh = FirstStage(module.scaling_factor, module.shift_factor)
    with torch.no_grad():
        for (_, a), (_, b) in zip(fresh.named_parameters(), module.named_parameters()):
            a.copy_(b.clone())
    return fresh.eval().requires_grad_(False)


def test_private_decoder_is_cached_and_differentiable_under_inference_mode():
    host_vae = forge_first_stage(0)
    before = {k: v.clone() for k, v in host_vae.state_dict().items()}
    glue = ForgeGuidance(host=None)
    p = forge_p(host_vae)
    decoder, note = glue.decoder(p, "full")
    again, _ = glue.decoder(p, "full")
    assert note == "" and again is decoder and decoder.module is not host_vae
    assert all(not t.is_inference() for t in decoder.state_dict().values())
    assert (decoder.scaling_factor, decoder.shift_factor) == (0.3611, 0.1159)
    scorer = scorer_for(0)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x0_inf = x0.clone()
        result, grad = residual_grad_x0(x0_inf, decoder, scorer, decoder.image_range)
        assert torch.is_inference_mode_enabled()
    reference = vae_decoder(normal_copy(host_vae), scaling_factor=0.3611, shift_factor=0.1159)
    _, want = residual_grad_x0(x0, reference, scorer, reference.image_range)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    assert grad.abs().max() > 0 and grad.grad_fn is None
    assert all(torch.equal(before[k], v) and v.is_inference() for k, v in host_vae.state_dict().items())
    other, _ = glue.decoder(forge_p(forge_first_stage(1)), "full")     # another model: a new copy
    assert other is not decoder


class ForgeTimestepsDenoiser(torch.nn.Module):
    """Forge CFGDenoiser/CFGDenoiserTimesteps (modules/sd_samplers_cfg_denoiser.py:156-228, sd_samplers_timesteps.py:37-48):
    returns x0, or eps when `classic_ddim_eps_estimation` is set; `step` += 1 per call; weights built in
    inference mode."""

    def __init__(self, eps_mode):
        super().__init__()
        torch.manual_seed(3)
        with torch.inference_mode():
            self.net = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.classic_ddim_eps_estimation = eps_mode
        self.step, self.total_steps = 0, 2

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        self.step += 1
        return self.net(x)


def _two_steps(denoiser, grun, x, levels):
    """The first calls of two sampler steps on the sampler's own x, in Forge's inference mode (k-diffusion:
    model(x, sigma, **extra_args), sd_samplers_kdiffusion.py); returns the first call's output and x in between."""
    grun.attach(denoiser)
    try:
        with torch.inference_mode():
            out = denoiser(x, levels[0], uncond=None, cond=None, cond_scale=7.0, s_min_uncond=0.0, image_cond=None)
            between = x.clone()
            denoiser(x, levels[1], uncond=None, cond=None, cond_scale=7.0, s_min_uncond=0.0, image_cond=None)
    finally:
        grun.detach()
    return out, between


def test_forge_corrections_work_inside_inference_mode():
    """x0 gradient in Forge's inference mode on inference weights: the denoiser's output goes to the sampler as it
    is, and the sampler's own (inference) x of the next step moves by -m grad_{x_t} R in its variable: eps models
    1/sqrt(a) from x0-hat, k-diffusion sqrt(1 + sigma^2) twice (chain rule, then the next sigma's scale)."""
    host_vae = forge_first_stage(0)
    alphas = torch.linspace(0.999, 0.01, 1000)
    glue = ForgeGuidance(host=None)
    p = forge_p(host_vae, alphas)
    decoder, _ = glue.decoder(p, "full")
    scorer = scorer_for(0)
    for eps_mode in (False, True):
        levels = (torch.tensor([400.0]), torch.tensor([300.0])) if eps_mode else (torch.tensor([2.0]), torch.tensor([1.5]))
        denoiser = ForgeTimestepsDenoiser(eps_mode)
        grun = guidance_run.GuidanceRun(run=None, host=glue, p=p)
        grun.refiner = LatentRefiner(decoder, scorer, scale=10.0, grad="x0", end=0.5)
        with torch.inference_mode():
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
            raw = denoiser(x, levels[0], None, None, 7.0, 0.0, None).clone()
            x_start = x.clone()
        denoiser.step = 0
        out, between = _two_steps(denoiser, grun, x, levels)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()   # modes as the caller left them
        assert torch.equal(out, raw) and torch.equal(between, x_start)             # output and x of step 0 stay
        if eps_mode:
            a = alphas[400]
            x0 = (x_start - (1 - a).sqrt() * raw) / a.sqrt()
            _, grad = residual_grad_x0(x0, decoder, scorer, decoder.image_range)
            want = x_start - 10.0 * grad / a.sqrt()
        else:
            _, grad = residual_grad_x0(raw, decoder, scorer, decoder.image_range)
            want = x_start - 10.0 * 5 ** 0.5 * 3.25 ** 0.5 * grad
        torch.testing.assert_close(x.clone(), want, rtol=1e-5, atol=1e-5)
        assert (x - x_start).abs().max() > 1e-5 and [s.step for s in grun.log] == [0]


# ----------------------------------------------------------------------------- the prompt tag alone in Forge
from tests.test_forge_adapter import fh, sd15_files  # noqa: E402,F401  (the Forge stand-ins on sys.path)


class RecordingForgeGuidance(ForgeGuidance):
    """ForgeGuidance with the nested process_images replaced by a record of what would be rendered."""

    def __init__(self, host):
        super().__init__(host)
        self.renders = []

    def render_reference(self, p, prompt, steps, targets, args):
        role = "subject" if all(t.style is None for t in targets) else "style"
        self.renders.append((role, prompt, steps, len(targets)))
        from PIL import Image
        return Image.fromarray(np.full((32, 32, 3), 60 if role == "subject" else 200, dtype=np.uint8))


def test_forge_tag_alone_starts_guidance_and_counts_the_renders(fh, sd15_files):
    """Script.process in Forge with the accordion off and `<dynlora:...:g=1:gm=20:refsteps=1:gdec=full>` in the prompt:
    the run has the tag's fields before Forge activates the tag, references are planned as 2 jobs, and the
    pass's denoiser output is corrected inside inference mode."""
    from lib_dynfuse.guidance import ReferenceCache
    from lib_dynfuse.hosts import common, forge
    for name, (path, _) in sd15_files.items():
        fh.networks.register(name, str(path))
    p = fh.world.make_p(fh.world.sd15_unet_patcher(), fh.world.sd15_clip(), steps=2)
    fh.shared.sd_model = p.sd_model
    p.sd_model.forge_objects.vae = SimpleNamespace(first_stage_model=forge_first_stage(0))
    p.sd_model.sd_checkpoint_info = SimpleNamespace(shorthash="f00d")
    p.prompt = "a cat <dynlora:subject:style:g=1:gm=20:refsteps=1:gdec=full>"
    p.all_prompts, p.all_seeds, p.negative_prompt = [p.prompt], [3], ""
    p.width = p.height = 32
    p.sampler_name, p.steps, p.cfg_scale, p.n_iter = "Euler", 2, 5.0, 1
    p.setup_conds = lambda: None
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def sampler_sample():   # one k-diffusion step to sigma 0: the result is the denoiser's x0 (sampling.py)
        return p.sampler.model_wrap_cfg(x, torch.tensor([1.5]), uncond=None, cond=None, cond_scale=5.0,
                                        s_min_uncond=0.0, image_cond=None)
    p.sampler = SimpleNamespace(model_wrap_cfg=ForgeTimestepsDenoiser(False), sample=sampler_sample)

    def sample():   # the pass, in Forge's inference mode (processing.py:911)
        with torch.inference_mode():
            return p.sampler.sample()
    p.sample = sample
    fh.shared.state.__init__()
    fh.shared.total_tqdm.__init__()
    host = forge.ForgeHost(fh.api)
    ghost = RecordingForgeGuidance(host)
    ghost.encoder_settings = lambda: {}
    clip, dino = tiny_encoders(0)
    defaults = [getattr(FuseArgs(), f) for f in FuseArgs.__dataclass_fields__]
    run = common.begin(host, p, defaults)
    assert (run.args.enabled, run.args.guidance, run.args.guidance_scale, run.args.reference_steps) == (True, True, 20.0, 1)
    grun = guidance_run.begin(host, p, ghost=ghost, encoders=SimpleNamespace(get=lambda **kw: (clip, dino)),
                              references=ReferenceCache())
    try:
        assert [r[:3] for r in ghost.renders] == [("subject", "a cat", 1), ("style", "a cat", 1)]
        assert grun.refiner is not None and grun.refiner.scale == 20.0 and grun.refiner.grad == "x0"
        assert fh.shared.state.job_count == 1 + 2 and fh.shared.total_tqdm._tqdm.total == 2 + 2 * 1
        guidance_run.before_every_sampling(host, p, ghost=ghost)
        with torch.inference_mode():
            raw = p.sampler.model_wrap_cfg.net(x).clone()
        out = p.sample()
        decoder, _ = ghost.decoder(p, "full")
        _, grad = residual_grad_x0(raw, decoder, grun.refiner.scorer, decoder.image_range)
        torch.testing.assert_close(out, raw - 20.0 * 3.25 ** 0.5 * grad, rtol=1e-5, atol=1e-5)   # the pass's result
        assert [s.step for s in grun.log] == [0] and grad.abs().max() > 0
        assert p.extra_generation_params["DynFuse guidance"].endswith("grad x0")
    finally:
        guidance_run.finish(host, p, None)
        common.finish(host, p, None)
    assert "forward" not in p.sampler.model_wrap_cfg.__dict__ and p.sampler.sample is sampler_sample
    assert p.sample is sample


# ----------------------------------------------------------------------------- x_t gradient through a private UNet
from tests.test_forge_adapter import _reference_subject_only  # noqa: E402


def to_inference_tensors(module):
    """Every parameter and buffer remade inside inference mode, as Forge's loader builds them (loader.py:497)."""
    with torch.inference_mode():
        for m in module.modules():
            for name, prm in list(m.named_parameters(recurse=False)):
                setattr(m, name, torch.nn.Parameter(prm.detach().clone(), requires_grad=False))
            for name, buf in list(m.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(m, name, buf.clone())
    return module


class ForgeCFGDenoiser(torch.nn.Module):
    """Forge's CFGDenoiser.forward with sampling_function (modules/sd_samplers_cfg_denoiser.py:156-228,
    backend/sampling/sampling_function.py:292-334): the UNet patcher is read from sd_model.forge_objects.unet on
    every call, cond/uncond batched by calc_cond_uncond_batch (through model_function_wrapper), CFG, then
    `step += 1`; returns x0 (the KModel stand-in predicts x0). `mask`: the inpainting blend x*nmask + ... (:178-181)."""

    def __init__(self, sd_model, total_steps, mask=None):
        super().__init__()
        self.sd_model, self.step, self.total_steps, self.mask = sd_model, 0, total_steps, mask
        if mask is not None:
            with torch.inference_mode():   # the sampler sets mask/nmask inside the inference-mode block
                self.nmask = 1 - mask
        self.classic_ddim_eps_estimation = False

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from backend.sampling.sampling_function import calc_cond_uncond_batch
        if self.mask is not None:
            x = x * self.nmask + self.mask * 0.5
        unet = self.sd_model.forge_objects.unet
        cond_pred, uncond_pred = calc_cond_uncond_batch(unet.model, cond, uncond, x, sigma, unet.model_options)
        self.step += 1
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def _xt_setup(fh, sd15_files, mask=None):
    from lib_dynfuse.hosts import common, forge
    for name, (path, _) in sd15_files.items():
        fh.networks.register(name, str(path))
    unet = fh.world.sd15_unet_patcher()
    reference_model = copy.deepcopy(unet.model)                  # normal tensors, for the hand reference
    to_inference_tensors(unet.model)
    p = fh.world.make_p(unet, fh.world.sd15_clip(), steps=2)
    fh.shared.sd_model = p.sd_model
    p.sd_model.forge_objects.vae = SimpleNamespace(first_stage_model=forge_first_stage(0))
    p.sampler.model_wrap_cfg = ForgeCFGDenoiser(p.sd_model, 2, mask)
    host = forge.ForgeHost(fh.api)
    g = np.random.default_rng(0)
    args = FuseArgs(enabled=True, subject="subject", style="zero", method="dynamic", guidance=True, guidance_grad="xt",
                    guidance_decoder="full", guidance_scale=10.0, subject_image=g.random((32, 32, 3)),
                    style_image=g.random((32, 32, 3)))
    run = common.FuseRun(host, ui_args=args)
    setattr(p, common.RUN_ATTR, run)
    glue = ForgeGuidance(host)
    glue.encoder_settings = lambda: {}
    clip, dino = tiny_encoders(0)
    grun = guidance_run.GuidanceRun(run, glue, p, encoders=SimpleNamespace(get=lambda **kw: (clip, dino)))
    setattr(p, guidance_run.GUIDANCE_ATTR, grun)
    assert grun.prepare(p) and grun.refiner.grad == "xt"
    host.before_every_sampling(p)                                  # the fusion's wrapper (Script hook order)
    guidance_run.before_every_sampling(host, p, ghost=glue)        # then the correction hooks and the redirect
    return host, p, grun, glue, unet, reference_model


def _sample_call(p, x, ctx, sigma=500.0):
    with torch.inference_mode():   # the sampler's x is an inference tensor, moved in place at the next step's call
        x_inf = x.clone()
        out = p.sampler.model_wrap_cfg(x_inf, torch.tensor([sigma]), uncond=ctx.flip(1), cond=ctx, cond_scale=5.0,
                                       s_min_uncond=0.0, image_cond=None)
    return x_inf, out


def test_forge_xt_gradient_goes_through_a_private_fused_unet(fh, sd15_files):
    """grad_{x_t} R (Eq. 20) with the host's weights inference tensors, from the step's only denoiser call: its
    output and gradient equal a hand reference on a normal copy with the subject LoRA added by hand (zero style:
    dynamic keeps the subject); the copy's layers record into the run's selection record; the next step's x moves
    by -m grad; the host's model, patcher and hooks untouched; the copy dropped when the generation ends."""
    host, p, grun, glue, unet, reference_model = _xt_setup(fh, sd15_files)
    grun.refiner.end = 0.5                                          # step 0 of 2
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    written = sd15_files["subject"][1]
    with pytest.raises(RuntimeError, match="nference tensors"):    # why a private copy is needed
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            unet.model.apply_model(xg, torch.tensor([500.0]), c_crossattn=ctx).sum().backward()

    def cfg_reference(z):
        both = _reference_subject_only(reference_model, written, z, ctx, ctx.flip(1))
        uncond, cond = both.chunk(2)
        return uncond + (cond - uncond) * 5.0
    decoder = grun.refiner.decoder
    _, grad, _ = residual_grad_xt(x, cfg_reference, decoder, grun.refiner.scorer, decoder.image_range)
    calls = []
    handle = reference_model.register_forward_hook(lambda *a: calls.append(1))
    x_inf, out = _sample_call(p, x, ctx)
    handle.remove()
    assert torch.equal(x_inf, x)                                    # this step's own x stays
    with torch.no_grad():
        torch.testing.assert_close(out, cfg_reference(x.clone()), rtol=1e-4, atol=1e-5)   # the step's output
    scale = (1 + 500.0 ** 2) ** 0.5                                 # k-diffusion x = x_t sqrt(1 + sigma^2)
    torch.testing.assert_close(grun.correction.pending[0], -10.0 * scale * grad, rtol=1e-4, atol=1e-6 * scale)
    assert grad.abs().max() > 0 and [s.step for s in grun.log] == [0] and p.sampler.model_wrap_cfg.step == 1
    record = grun.run.session_for("unet", grun.run.prepare(p)).record
    assert record.counts()[1][0].sum() > 0                          # the copy's layers counted step 0 ...
    with torch.inference_mode():
        p.sampler.model_wrap_cfg(x_inf, torch.tensor([0.0]), uncond=ctx.flip(1), cond=ctx, cond_scale=5.0,
                                 s_min_uncond=0.0, image_cond=None)
    torch.testing.assert_close(x_inf.clone(), x - 10.0 * scale * grad, rtol=1e-4, atol=1e-6 * scale)   # sigma 0
    assert record.counts()[1][1].sum() == record.counts()[1][0].sum()                 # ... once, as the host's step 1
    private = grun.host_state["redirect"]["private"]
    assert private.model is not unet.model and not private.model.diffusion_model.conv_in.weight.is_inference()
    assert all(torch.equal(before[k], v) and v.is_inference() for k, v in unet.model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.model.modules()) == 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in private.model.modules()) == 0
    assert not any("x_t" in m for m in grun.run.messages)
    guidance_run.finish(host, p, None)
    assert "private" not in grun.host_state.get("redirect", {}) and grun.correction is None


def test_forge_xt_gradient_falls_back_to_x0_when_a_host_tensor_blocks_the_backward(fh, sd15_files):
    """An inpainting mask made in inference mode is saved by the blend's backward: that step and the rest use
    the x0 gradient, with a message; the call is made again without gradients and counted once."""
    with torch.inference_mode():
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4] = 1.0
    host, p, grun, glue, unet, _ = _xt_setup(fh, sd15_files, mask=mask)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    x_inf, out = _sample_call(p, x, ctx)
    assert torch.equal(x_inf, x) and grun.refiner.grad == "x0" and [s.step for s in grun.log] == [0]
    assert p.sampler.model_wrap_cfg.step == 1                      # the failed call is not counted
    assert any("x_t gradient failed" in m and "x0" in m for m in grun.run.messages)
    assert "x_t gradient failed" in p.extra_generation_params.get("DynFuse message", "")
    guidance_run.finish(host, p, None)


def test_saved_activations_are_copied_so_in_place_residuals_can_be_differentiated():
    """Forge's transformer block: n = norm1(x); x += attn(n) (backend/nn/unet.py:240): the backward needs the
    x that norm1 saw. With the copies the gradient equals the out-of-place reference exactly."""
    from lib_dynfuse.hosts.forge_guidance import saved_activations_copied
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    a = torch.randn(3, 8, requires_grad=True)

    def block(x, in_place):
        x = x * 2
        n = lin(norm(x))
        if in_place:
            x += n
        else:
            x = x + n
        return (norm(x) ** 2).sum()
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(block(a, True), a)
    with saved_activations_copied():
        out = block(a, True)
    (got,) = torch.autograd.grad(out, a)
    (want,) = torch.autograd.grad(block(a, False), a)
    assert torch.equal(got, want) and got.abs().max() > 0


def test_sampler_spaces_follow_the_hosts_denoisers():
    """Which variable the sampler moves: A1111's CFGDenoiserTimesteps (alphas) DDPM x, SD3 (is_sd3) the flow
    latent, other k-diffusion denoisers x = x0 + sigma eps; Forge's classic_ddim_eps_estimation DDPM x, a
    predictor with prediction_type 'const' (FLUX, SD3) the flow latent (k_prediction.py:94-96)."""
    from lib_dynfuse.hosts.a1111_guidance import A1111Guidance
    a1111, forge_glue = A1111Guidance(host=None), ForgeGuidance(host=None)
    plain, sd3 = SimpleNamespace(sd_model=SimpleNamespace()), SimpleNamespace(sd_model=SimpleNamespace(is_sd3=True))
    assert a1111.space(plain, SimpleNamespace(alphas=torch.ones(3))) == "ddpm"
    assert (a1111.space(plain, SimpleNamespace()), a1111.space(sd3, SimpleNamespace())) == ("k", "flow")

    def forge_p_with(kind):
        predictor = SimpleNamespace(prediction_type=kind)
        unet = SimpleNamespace(model=SimpleNamespace(predictor=predictor))
        return SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet)))
    assert forge_glue.space(forge_p_with("eps"), SimpleNamespace(classic_ddim_eps_estimation=True)) == "ddpm"
    assert forge_glue.space(forge_p_with("const"), SimpleNamespace(classic_ddim_eps_estimation=False)) == "flow"
    assert forge_glue.space(forge_p_with("v_prediction"), SimpleNamespace()) == "k"
