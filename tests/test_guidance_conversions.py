"""eps / x0 / v conversions (DDPM, k-diffusion sigma, flow matching) against the forward-process definitions."""
import torch

from lib_dynfuse.guidance import conversions as cv


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0.9991, 0.5, 0.0047], dtype=torch.float64)   # per-row alphas_cumprod (early, mid, late)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    return x0, eps, a, x_t


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_eps_and_x0_recover_the_forward_process():
    x0, eps, a, x_t = _setup()
    close(cv.eps_to_x0(x_t, eps, a), x0)
    close(cv.x0_to_eps(x_t, x0, a), eps)
    close(cv.x0_to_eps(x_t, cv.eps_to_x0(x_t, eps, a), a), eps)


def test_v_prediction_round_trips():
    x0, eps, a, x_t = _setup(1)
    v = a.sqrt().view(-1, 1, 1, 1) * eps - (1 - a).sqrt().view(-1, 1, 1, 1) * x0   # definition of v
    close(cv.v_to_x0(x_t, v, a), x0)
    close(cv.x0_to_v(x_t, x0, a), v)
    close(cv.v_to_eps(x_t, v, a), eps)


def test_scalar_alpha_broadcasts_like_per_row():
    x0, eps, a, x_t = _setup(2)
    row = cv.eps_to_x0(x_t[1:2], eps[1:2], float(a[1]))
    assert torch.equal(row, cv.eps_to_x0(x_t, eps, a)[1:2])


def test_shifted_x0_written_back_as_eps_and_v():
    x0, eps, a, x_t = _setup(3)
    delta = 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    new_eps = cv.eps_for_x0_shift(eps, delta, a)
    close(cv.eps_to_x0(x_t, new_eps, a), x0 + delta)
    close(new_eps, cv.x0_to_eps(x_t, x0 + delta, a))
    v = cv.x0_to_v(x_t, x0, a)
    close(cv.v_to_x0(x_t, cv.v_for_x0_shift(v, delta, a), a), x0 + delta)


def test_k_diffusion_sigma_form_agrees_with_ddpm():
    x0, eps, a, x_t = _setup(4)
    sigma = cv.alpha_cumprod_to_sigma(a)
    close(cv.sigma_to_alpha_cumprod(sigma), a)
    x = cv.ddpm_to_k(x_t, sigma)
    close(x, x0 + sigma.view(-1, 1, 1, 1) * eps)               # k-diffusion: x = x0 + sigma eps
    close(cv.k_to_ddpm(x, sigma), x_t)
    close(cv.denoised_from_eps(x, eps, sigma), x0)
    close(cv.denoised_from_eps(x, eps, sigma), cv.eps_to_x0(x_t, eps, a))
    close(cv.eps_from_denoised(x, x0, sigma), eps)


def test_flow_matching_round_trip():
    x0, noise, _, _ = _setup(5)
    t = torch.tensor([0.97, 0.5, 0.03], dtype=torch.float64)
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
    v = noise - x0
    close(cv.flow_v_to_x0(x_t, v, t), x0)
    close(cv.flow_x0_to_v(x_t, x0, t), v)
    delta = torch.full_like(x0, 0.02)
    close(cv.flow_v_to_x0(x_t, cv.flow_v_for_x0_shift(v, delta, t), t), x0 + delta)


def test_float32_round_trip_is_tight():
    x0, eps, a, x_t = (t.float() for t in _setup(6))
    torch.testing.assert_close(cv.x0_to_eps(x_t, cv.eps_to_x0(x_t, eps, a), a)[:2], eps[:2], rtol=1e-5, atol=1e-5)
