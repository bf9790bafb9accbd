"""Forge side of the latent refinement (hosts/forge_guidance.py): everything happens under inference_mode, the
host's weights are inference tensors, so scoring goes through private copies; x_t falls back to x0 with a message."""
from types import SimpleNamespace

import numpy as np
import torch

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.guidance import LatentRefiner, paper_scorer, residual_grad_x0, vae_decoder
from lib_dynfuse.hosts import guidance_run
from lib_dynfuse.hosts.forge_guidance import XT_PROBLEM, ForgeGuidance
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


def _run_hooked(denoiser, grun, x, t):
    grun.attach(denoiser)
    try:
        with torch.inference_mode():   # k-diffusion: model(x, sigma, **extra_args) (sd_samplers_kdiffusion.py)
            return denoiser(x, t, uncond=None, cond=None, cond_scale=7.0, s_min_uncond=0.0, image_cond=None)
    finally:
        grun.detach()


def test_forge_denoiser_outputs_are_corrected_inside_inference_mode():
    host_vae = forge_first_stage(0)
    alphas = torch.linspace(0.999, 0.01, 1000)
    glue = ForgeGuidance(host=None)
    p = forge_p(host_vae, alphas)
    decoder, _ = glue.decoder(p, "full")
    scorer = scorer_for(0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([400.0])
    a = alphas[400]
    for eps_mode in (False, True):
        denoiser = ForgeTimestepsDenoiser(eps_mode)
        grun = guidance_run.GuidanceRun(run=None, host=glue, p=p)
        grun.refiner = LatentRefiner(decoder, scorer, scale=10.0, grad="x0")
        with torch.inference_mode():
            raw = denoiser(x, t, None, None, 7.0, 0.0, None)
        out = _run_hooked(denoiser, grun, x, t)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()   # modes as the caller left them
        assert out.grad_fn is None and not out.requires_grad
        raw = raw.clone()
        if eps_mode:
            x0 = (x - (1 - a).sqrt() * raw) / a.sqrt()
            _, grad = residual_grad_x0(x0, decoder, scorer, decoder.image_range)
            want = raw - (a / (1 - a)).sqrt() * (-10.0 * grad)
        else:
            _, grad = residual_grad_x0(raw, decoder, scorer, decoder.image_range)
            want = raw - 10.0 * grad
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert (out - raw).abs().max() > 1e-5 and [s.step for s in grun.log] == [1]


def test_xt_gradient_falls_back_to_x0_with_a_message():
    notes = []
    lin = torch.nn.Linear(2, 2)
    delta = LayerDelta(down=torch.ones(1, 2), up=torch.ones(2, 1))
    args = FuseArgs(enabled=True, subject="a", style="b", guidance=True, guidance_grad="xt", guidance_decoder="full",
                    subject_image=np.random.default_rng(0).random((24, 24, 3)),
                    style_image=np.random.default_rng(1).random((24, 24, 3)))
    run = SimpleNamespace(args=args, hashes={}, prepare=lambda p: [FuseTarget(name="l", module=lin, group="unet", subject=delta, style=delta)],
                          note=lambda message, p=None: notes.append(message))
    clip, dino = tiny_encoders(0)
    encoders = SimpleNamespace(get=lambda **kw: (clip, dino))
    glue = ForgeGuidance(host=None)
    glue.encoder_settings = lambda: {}
    grun = guidance_run.GuidanceRun(run, glue, p=None, encoders=encoders)
    assert grun.prepare(forge_p(forge_first_stage(0)))
    assert grun.refiner.grad == "x0" and any(XT_PROBLEM in n for n in notes)


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
    p.sampler.model_wrap_cfg = ForgeTimestepsDenoiser(False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def sample():   # one k-diffusion call of the pass's denoiser, in Forge's inference mode (processing.py:911)
        with torch.inference_mode():
            return p.sampler.model_wrap_cfg(x, torch.tensor([400.0]), uncond=None, cond=None, cond_scale=5.0,
                                            s_min_uncond=0.0, image_cond=None)
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
        torch.testing.assert_close(out, raw - 20.0 * grad, rtol=1e-5, atol=1e-5)
        assert [s.step for s in grun.log] == [0] and grad.abs().max() > 0
        assert p.extra_generation_params["DynFuse guidance"].endswith("grad x0")
    finally:
        guidance_run.finish(host, p, None)
        common.finish(host, p, None)
    assert len(p.sampler.model_wrap_cfg._forward_hooks) == 0 and p.sample is sample
