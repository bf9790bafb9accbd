"""Eq. 20 as the paper writes it, through the WebUI glue (hosts/guidance_run.py) on three sampler families.

x_{t-1} = x_{t-1}^ori - m grad_{x_t} R with m in the paper's x_t scale (the DDPM x_t): one correction at one
step moves the next state by exactly -m grad in DDPM units, whether the sampler is k-diffusion's Euler or
DPM++ 2M (x = x0 + sigma eps, the denoiser returns x0) or DDIM (DDPM x, the denoiser returns eps). The sampler
loops are k-diffusion's formulas (sampling.py sample_euler, sample_dpmpp_2m) and A1111's DDIM
(sd_samplers_timesteps_impl.py:12-35), calling the CFG denoiser as `model(x, sigma, **extra_args)`.
"""

import pytest
import torch

from lib_dynfuse.guidance import LatentRefiner, paper_scorer, residual_grad_x0, residual_grad_xt, vae_decoder
from lib_dynfuse.guidance import conversions as cv
from lib_dynfuse.hosts import guidance_run
from tests.test_guidance_encoders import tiny_encoders, tiny_taesd

ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
TIMESTEPS = (899, 599, 299)                 # three sampler steps, then x_0
SIGMAS = torch.cat([((1 - ALPHAS[list(TIMESTEPS)]) / ALPHAS[list(TIMESTEPS)]).sqrt(), torch.zeros(1, dtype=torch.float64)])
EXTRA = dict(uncond=None, cond=None, cond_scale=5.0, s_min_uncond=0.0, image_cond=None)


class EpsModel(torch.nn.Module):
    """A DDPM eps predictor eps(x_t, t) (float64), with a count of its forwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(4, 4, 3, padding=1).double()
        self.forwards = 0

    def forward(self, x_t, t):
        self.forwards += 1
        return self.net(x_t) * (1.0 + t.double()[:, None, None, None] / 1000) + 0.1 * x_t


class KDenoiser(torch.nn.Module):
    """A k-diffusion CFG denoiser (sd_samplers_cfg_denoiser.py:156-311 with CompVisDenoiser): x = x_t sqrt(1+sigma^2),
    returns x0 = x - sigma eps; the host's counters `step` (+1 per call), `steps`, `total_steps`."""

    def __init__(self, model, steps):
        super().__init__()
        self.model, self.step, self.steps, self.total_steps, self.seen = model, 0, steps, steps, []

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        self.seen.append(x.clone())
        t = torch.tensor([min(range(1000), key=lambda i: abs(float(cv.alpha_cumprod_to_sigma(ALPHAS[i])) - float(s)))
                          for s in sigma], dtype=torch.float64)
        eps = self.model(cv.k_to_ddpm(x, sigma), t)
        self.step += 1
        return x - cv.append_dims(sigma, x) * eps


class TimestepsDenoiser(KDenoiser):
    """CFGDenoiserTimesteps (sd_samplers_timesteps.py:48-72): DDPM x, the timestep as `sigma`, returns eps."""

    alphas = ALPHAS

    def forward(self, x, t, uncond, cond, cond_scale, s_min_uncond, image_cond):
        self.seen.append(x.clone())
        eps = self.model(x, t)
        self.step += 1
        return eps


def sample_euler(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **EXTRA)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    t_fn = lambda sigma: sigma.log().neg()   # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **EXTRA)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_ddim(model, x, timesteps):
    s_in = x.new_ones(x.shape[0])
    for i, t in enumerate(timesteps):
        a_t = ALPHAS[t]
        a_prev = ALPHAS[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        e_t = model(x, t * s_in, **EXTRA)
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
    return x


class Sampler:
    """One pass: `sample` runs the loop (what the pass's sampler returns), `model_wrap_cfg` the denoiser."""

    def __init__(self, kind, model):
        self.kind = kind
        self.model_wrap_cfg = (TimestepsDenoiser if kind == "ddim" else KDenoiser)(model, len(TIMESTEPS))

    def sample(self, x_ddpm):
        if self.kind == "ddim":
            return sample_ddim(self.model_wrap_cfg, x_ddpm.clone(), TIMESTEPS)
        loop = sample_euler if self.kind == "euler" else sample_dpmpp_2m
        return loop(self.model_wrap_cfg, cv.ddpm_to_k(x_ddpm, SIGMAS[0]), SIGMAS)


class Host:
    """GuidanceHost as far as the correction goes: the sampler space and DDIM's alphas."""

    def space(self, p, denoiser):
        return "ddpm" if hasattr(denoiser, "alphas") else "k"

    def alphas_cumprod(self, p, denoiser):
        return denoiser.alphas


class Run:
    """A FuseRun as far as guidance's messages go."""

    def __init__(self):
        self.messages = []

    def note(self, message, p=None):
        self.messages.append(message)


@pytest.fixture(scope="module")
def parts():
    clip, dino = tiny_encoders(0, dtype=torch.float64)
    decoder = vae_decoder(tiny_taesd(0).double(), scaling_factor=0.18215)
    g = torch.Generator().manual_seed(3)
    scorer = paper_scorer(clip, dino, torch.rand(1, 3, 32, 32, generator=g).double(),
                          torch.rand(1, 3, 32, 32, generator=g).double())
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    return decoder, scorer, x


def run_pass(kind, parts, grad="x0", scale=10.0, start=0.0, end=1.0, decoder=None):
    """(sampler, GuidanceRun, result) of one pass with the correction on steps [start, end) of 3."""
    dec, scorer, x = parts
    model = EpsModel()
    sampler = Sampler(kind, model)
    grun = guidance_run.GuidanceRun(run=Run(), host=Host())
    grun.refiner = LatentRefiner(decoder or dec, scorer, scale=scale, grad=grad, start=start, end=end)
    grun.attach(sampler.model_wrap_cfg, sampler)
    try:
        with torch.no_grad():
            out = sampler.sample(x)
    finally:
        grun.detach()
    return sampler, grun, out


def ddpm_states(sampler):
    """The sampler's state at the first call of every step, in DDPM units."""
    seen = sampler.model_wrap_cfg.seen
    if sampler.kind == "ddim":
        return seen
    return [cv.k_to_ddpm(x, s) for x, s in zip(seen, SIGMAS)]


def paper_grad(parts, x_t, step, grad):
    """grad_{x_t} R at DDPM state x_t of step `step`, by hand: x0 mode through x0-hat with eps held fixed."""
    decoder, scorer, _ = parts
    model = EpsModel()
    a = ALPHAS[TIMESTEPS[step]]
    t = torch.full((x_t.shape[0],), float(TIMESTEPS[step]), dtype=torch.float64)

    def x0_of(z):
        return (z - (1 - a).sqrt() * model(z, t)) / a.sqrt()
    if grad == "xt":
        _, g, _ = residual_grad_xt(x_t, x0_of, decoder, scorer, decoder.image_range)
        return g
    with torch.no_grad():
        x0 = x0_of(x_t)
    _, g0 = residual_grad_x0(x0, decoder, scorer, decoder.image_range)
    return g0 / a.sqrt()


@pytest.mark.parametrize("grad", ["x0", "xt"])
def test_one_correction_moves_the_next_state_by_m_grad_on_every_sampler(parts, grad):
    """Step 1's correction only (start 1/3, end 2/3): the state at step 2 moves by -m grad_{x_t} R (DDPM units)
    in Euler, DPM++ 2M (which also reuses step 1's x0 at step 2: its own history stays the model's) and DDIM."""
    moves = {}
    for kind in ("euler", "dpmpp_2m", "ddim"):
        plain, _, _ = run_pass(kind, parts, grad, scale=0.0)
        guided, grun, _ = run_pass(kind, parts, grad, start=1 / 3, end=2 / 3)
        before, after = ddpm_states(plain), ddpm_states(guided)
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)      # step 1 itself is not moved
        g = paper_grad(parts, before[1], 1, grad)
        moves[kind] = after[2] - before[2]
        torch.testing.assert_close(moves[kind], -10.0 * g, rtol=1e-6, atol=1e-9)
        assert [e.step for e in grun.log] == [1] and bool(grun.log[0].moved.all())
        assert g.abs().max() > 1e-3
    torch.testing.assert_close(moves["euler"], moves["ddim"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(moves["dpmpp_2m"], moves["ddim"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m", "ddim"])
def test_the_last_step_moves_what_the_pass_returns(parts, kind):
    """At the last step there is no next call: the pass's result (x_0) takes the move."""
    plain, _, out_plain = run_pass(kind, parts, scale=0.0)
    guided, grun, out = run_pass(kind, parts, start=2 / 3)
    g = paper_grad(parts, ddpm_states(plain)[2], 2, "x0")
    torch.testing.assert_close(out - out_plain, -10.0 * g, rtol=1e-6, atol=1e-9)
    assert [e.step for e in grun.log] == [2]
    assert "sample" not in guided.__dict__ and "forward" not in guided.model_wrap_cfg.__dict__


def test_xt_mode_is_one_forward_per_step(parts):
    """The x_t gradient comes from the step's own denoiser call: as many model forwards as an unguided pass,
    the call counter counts each call once."""
    plain, _, _ = run_pass("euler", parts, "x0", scale=0.0)
    guided, grun, _ = run_pass("euler", parts, "xt")
    assert guided.model_wrap_cfg.model.forwards == plain.model_wrap_cfg.model.forwards == 3
    assert guided.model_wrap_cfg.step == 3 and [e.step for e in grun.log] == [0, 1, 2]


class NaNRow(torch.nn.Module):
    """A decoder whose second row decodes to NaN (an fp16 overflow, say)."""

    image_range = (0.0, 1.0)

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        image = self.decoder(z)
        return image * torch.tensor([1.0, float("nan")], dtype=image.dtype).view(-1, 1, 1, 1)


def test_a_non_finite_gradient_skips_that_rows_move_with_a_message(parts):
    plain, _, out_plain = run_pass("euler", parts, scale=0.0)
    guided, grun, out = run_pass("euler", parts, decoder=NaNRow(parts[0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], out_plain[1], rtol=0, atol=0)           # row 1: never moved
    assert not torch.allclose(out[0], out_plain[0])                            # row 0: corrected
    assert grun.skipped_steps() == [0, 1, 2]
    grun.report_skipped()
    assert any("step(s) 0, 1, 2 was skipped" in m and "not finite" in m for m in grun.run.messages)


def test_an_overflowing_latent_keeps_its_value():
    """apply_move in float16: a row that would overflow keeps its latent, the others move."""
    from lib_dynfuse.guidance import apply_move
    x = torch.ones(2, 4, 2, 2, dtype=torch.float16)
    move = torch.zeros(2, 4, 2, 2)
    move[0] = 0.5
    move[1, 0, 0, 0] = 1e6
    moved, ok = apply_move(x, move)
    assert ok.tolist() == [True, False] and moved.dtype == torch.float16
    assert torch.equal(moved[0], torch.full((4, 2, 2), 1.5, dtype=torch.float16)) and torch.equal(moved[1], x[1])
