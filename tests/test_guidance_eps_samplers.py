"""Latent refinement on A1111's eps samplers (DDIM/PLMS/UniPC through CFGDenoiserTimesteps), with a float64
stand-in denoiser: the sampler's output stays the model's, the next state moves by the correction, a layer one
LoRA touches keeps its branch.
"""
import torch

from lib_dynfuse.guidance import LatentRefiner, paper_scorer, residual_grad_x0, vae_decoder
from lib_dynfuse.hosts import guidance_run
from tests.test_guidance_encoders import tiny_taesd
from tests.test_guidance_eq20 import Host, Run   # a GuidanceHost of sampler spaces, a run that keeps notes


class TimestepsDenoiser(torch.nn.Module):
    """CFGDenoiserTimesteps (sd_samplers_timesteps.py:48-72): forward(x, t, uncond, cond, cond_scale, s_min_uncond,
    image_cond) returns the CFG-combined eps; `alphas` = sd_model.alphas_cumprod; `step` += 1 per call
    (sd_samplers_cfg_denoiser.py:310)."""

    def __init__(self, alphas):
        super().__init__()
        torch.manual_seed(0)
        self.eps_model = torch.nn.Conv2d(4, 4, 3, padding=1).double()
        self.alphas, self.step, self.total_steps = alphas, 0, 4

    def forward(self, x, t, uncond, cond, cond_scale, s_min_uncond, image_cond):
        out = self.eps_model(x) * (1.0 + t.double()[:, None, None, None] / 1000)
        self.step += 1
        return out


def _eps_guidance(seed: int, grad: str):
    """Tiny float64 CLIP/DINO/TAESD, the paper's scorer against two random references, an eps denoiser over 1000
    alphas and a GuidanceRun refining with `grad`; the generator goes on to make the test's inputs."""
    from tests.test_guidance_encoders import tiny_encoders
    clip, dino = tiny_encoders(0, dtype=torch.float64)
    decoder = vae_decoder(tiny_taesd(0).double(), scaling_factor=0.18215)
    g = torch.Generator().manual_seed(seed)
    scorer = paper_scorer(clip, dino, torch.rand(1, 3, 32, 32, generator=g).double(),
                          torch.rand(1, 3, 32, 32, generator=g).double())
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    denoiser = TimestepsDenoiser(alphas)
    grun = guidance_run.GuidanceRun(run=Run(), host=Host())
    grun.refiner = LatentRefiner(decoder, scorer, scale=10.0, grad=grad)
    return decoder, scorer, alphas, denoiser, grun, g


EXTRA_ARGS = dict(uncond=None, cond=None, cond_scale=7.0, s_min_uncond=0.0, image_cond=None)


def _two_calls(denoiser, grun, x, t):
    """Two sampler steps' first calls as DDIM makes them (model(x, t, **extra_args), sd_samplers_timesteps_impl.py:25),
    the second on the sampler's own x after the first; returns the first output and x as the second call got it."""
    grun.attach(denoiser)
    try:
        with torch.no_grad():
            out = denoiser(x, t, **EXTRA_ARGS)
            x_before_second = x.clone()
            denoiser(x, t - 100, **EXTRA_ARGS)
    finally:
        grun.detach()
    return out, x_before_second


def test_eps_sampler_output_stays_the_models_and_the_next_state_moves():
    """x0 gradient on DDIM/PLMS/UniPC: eps -> x0-hat, grad_{x0-hat} R, chain rule 1/sqrt(a) to x_t; the sampler gets
    the model's eps as it is and its next state x_{t-1} (the x of the next step's call) moves by -m grad."""
    decoder, scorer, alphas, denoiser, grun, g = _eps_guidance(3, "x0")
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x_start = x.clone()
    t = torch.tensor([500.0, 500.0], dtype=torch.float64)
    with torch.no_grad():
        eps = denoiser(x, t, None, None, 7.0, 0.0, None)
    denoiser.step = 0
    grun.refiner.end = 0.25                                           # step 0 of 4 only
    out, x_seen = _two_calls(denoiser, grun, x, t)
    torch.testing.assert_close(out, eps, rtol=0, atol=0)
    a = alphas[500]
    x0 = (x_start - (1 - a).sqrt() * eps) / a.sqrt()                  # eps -> x0-hat
    _, grad = residual_grad_x0(x0, decoder, scorer, decoder.image_range)
    torch.testing.assert_close(x_seen, x_start, rtol=0, atol=0)       # the first call leaves x alone
    torch.testing.assert_close(x, x_start - 10.0 * grad / a.sqrt(), rtol=1e-8, atol=1e-10)
    assert (x - x_start).abs().max() > 1e-4 and [s.step for s in grun.log] == [0]
    assert "forward" not in denoiser.__dict__ and len(denoiser._forward_hooks) == 0


def test_single_lora_targets_keep_one_branch():
    from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
    lin = torch.nn.Linear(2, 2)
    d = LayerDelta(down=torch.ones(1, 2), up=torch.ones(2, 1))
    targets = [FuseTarget(name="a", module=lin, group="unet", subject=d, style=d),
               FuseTarget(name="b", module=lin, group="unet", subject=None, style=d),
               FuseTarget(name="c", module=lin, group="te", subject=d, style=None)]
    subj = guidance_run.single_lora_targets(targets, "subject")
    sty = guidance_run.single_lora_targets(targets, "style")
    assert [(t.name, t.subject is d, t.style) for t in subj] == [("a", True, None), ("c", True, None)]
    assert [(t.name, t.subject, t.style is d) for t in sty] == [("a", None, True), ("b", None, True)]
    assert guidance_run.strip_tags("a cat <dynlora:x:y:g=1> <lora:z:1>") == "a cat  <lora:z:1>"


def test_xt_gradient_on_an_eps_sampler_moves_the_next_state_exactly():
    """x_{t-1} <- x_{t-1} - m d R(x0-hat(x_t)) / d x_t (Eq. 20), x0-hat from the denoiser's eps of the same call,
    which the sampler gets unchanged; the sampler's own tensor moves at the next step's call."""
    from lib_dynfuse.guidance import residual_grad_xt
    decoder, scorer, alphas, denoiser, grun, g = _eps_guidance(5, "xt")
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([300.0], dtype=torch.float64)
    a = alphas[300]
    x_before = x.clone()
    grun.refiner.end = 0.25                                           # step 0 of 4 only
    out, x_seen = _two_calls(denoiser, grun, x, t)
    probe = TimestepsDenoiser(alphas)
    _, grad, _ = residual_grad_xt(x_before, lambda z: (z - (1 - a).sqrt() * probe(z, t, **EXTRA_ARGS)) / a.sqrt(),
                                  decoder, scorer, decoder.image_range)
    torch.testing.assert_close(x_seen, x_before, rtol=0, atol=0)
    torch.testing.assert_close(x, x_before - 10.0 * grad, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(out, TimestepsDenoiser(alphas)(x_before, t, **EXTRA_ARGS), rtol=0, atol=0)
    assert denoiser.step == 2 and grad.abs().max() > 0 and [s.step for s in grun.log] == [0]


