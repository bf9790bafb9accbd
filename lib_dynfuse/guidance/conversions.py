"""Exact conversions between a sampler's variable, the x0 prediction and the paper's x_t.

DDPM/DDIM (alphas_cumprod a):  x_t = sqrt(a) x0 + sqrt(1-a) eps,   v = sqrt(a) eps - sqrt(1-a) x0.
k-diffusion (sigma):            x = x0 + sigma eps (x = x_t / sqrt(a), sigma = sqrt((1-a)/a)); denoised = x0.
Flow matching (FLUX, t):        x_t = (1-t) x0 + t noise,          v = noise - x0.
Eq. 20 moves x_{t-1} by -m grad_{x_t} R in the paper's x_t scale, the DDPM x_t (flow: the flow latent itself).
`sampler_x_scale` converts such a move into a sampler's variable, `x0_gain` a gradient w.r.t. x0-hat into
one w.r.t. x_t. `*_for_x0_shift` give a move of x0 in the sampler's variable with x_t held fixed.
"""
from __future__ import annotations

from typing import Union

import torch

Scalar = Union[float, torch.Tensor]


def append_dims(v: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A scalar, or a per-row [B] tensor, shaped to broadcast against `like` [B,...]."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() else v


# ---------------------------------------------------------------------------- DDPM / DDIM (eps and v)
def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """x0 = (x_t - sqrt(1-a) eps) / sqrt(a)."""
    a = append_dims(alpha_cumprod, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """eps = (x_t - sqrt(a) x0) / sqrt(1-a)."""
    a = append_dims(alpha_cumprod, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """x0 = sqrt(a) x_t - sqrt(1-a) v (v-prediction)."""
    a = append_dims(alpha_cumprod, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def x0_to_v(x_t: torch.Tensor, x0: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """v = (sqrt(a) x_t - x0) / sqrt(1-a), the v that gives x0 at x_t."""
    a = append_dims(alpha_cumprod, x_t)
    return (a.sqrt() * x_t - x0) / (1 - a).sqrt()


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """eps = sqrt(1-a) x_t + sqrt(a) v."""
    a = append_dims(alpha_cumprod, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def eps_for_x0_shift(eps: torch.Tensor, delta_x0: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """The eps whose x0 (at the same x_t) is x0 + delta: eps - sqrt(a/(1-a)) delta (DDIM/PLMS/UniPC callbacks)."""
    a = append_dims(alpha_cumprod, eps)
    return eps - (a / (1 - a)).sqrt() * delta_x0


def v_for_x0_shift(v: torch.Tensor, delta_x0: torch.Tensor, alpha_cumprod: Scalar) -> torch.Tensor:
    """The v whose x0 (at the same x_t) is x0 + delta: v - delta / sqrt(1-a)."""
    a = append_dims(alpha_cumprod, v)
    return v - delta_x0 / (1 - a).sqrt()


# ---------------------------------------------------------------------------- k-diffusion (sigma)
def sigma_to_alpha_cumprod(sigma: Scalar) -> torch.Tensor:
    """a = 1 / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma)
    return 1 / (1 + sigma ** 2)


def alpha_cumprod_to_sigma(alpha_cumprod: Scalar) -> torch.Tensor:
    """sigma = sqrt((1-a)/a)."""
    a = torch.as_tensor(alpha_cumprod)
    return ((1 - a) / a).sqrt()


def denoised_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """k-diffusion x0: denoised = x - sigma eps."""
    return x - append_dims(sigma, x) * eps


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """eps = (x - denoised) / sigma."""
    return (x - denoised) / append_dims(sigma, x)


def k_to_ddpm(x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """x_t = x / sqrt(1 + sigma^2): the k-diffusion variable in DDPM scaling."""
    return x / (1 + append_dims(sigma, x) ** 2).sqrt()


def ddpm_to_k(x_t: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """x = x_t * sqrt(1 + sigma^2)."""
    return x_t * (1 + append_dims(sigma, x_t) ** 2).sqrt()


# ---------------------------------------------------------------------------- flow matching (FLUX)
def flow_v_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: Scalar) -> torch.Tensor:
    """x0 = x_t - t v (rectified flow, v = noise - x0)."""
    return x_t - append_dims(t, x_t) * v


def flow_x0_to_v(x_t: torch.Tensor, x0: torch.Tensor, t: Scalar) -> torch.Tensor:
    """v = (x_t - x0) / t."""
    return (x_t - x0) / append_dims(t, x_t)


def flow_v_for_x0_shift(v: torch.Tensor, delta_x0: torch.Tensor, t: Scalar) -> torch.Tensor:
    """The v whose x0 (at the same x_t) is x0 + delta: v - delta / t."""
    return v - delta_x0 / append_dims(t, v)


# ---------------------------------------------------------------------------- Eq. 20 in the paper's x_t scale
SPACES = ("k", "ddpm", "flow")   # k-diffusion's sigma-scaled x, DDPM-scaled x (timestep samplers), flow latents


def sampler_x_scale(space: str, level: Scalar, like: torch.Tensor) -> torch.Tensor:
    """d x / d x_t: one unit of the paper's x_t in the sampler's variable x, to broadcast against `like` (>= float32).

    k (level = sigma): x = x_t sqrt(1 + sigma^2); ddpm (level = alphas_cumprod) and flow (level = t): x = x_t."""
    if space == "k":
        return (1 + _level(level, like) ** 2).sqrt()
    _check_space(space)
    return torch.ones((), dtype=wide_dtype(like.dtype), device=like.device)


def x0_gain(space: str, level: Scalar, like: torch.Tensor) -> torch.Tensor:
    """d x0-hat / d x_t with the model's prediction held fixed (the chain rule of an x0-hat gradient to x_t).

    k and ddpm hold eps fixed: x0 = (x_t - sqrt(1-a) eps) / sqrt(a) gives 1/sqrt(a) = sqrt(1 + sigma^2). flow holds
    the velocity fixed: x0 = x_t - t v gives 1 (holding the noise fixed would give 1/(1-t), unbounded at t = 1)."""
    if space == "k":
        return (1 + _level(level, like) ** 2).sqrt()
    if space == "ddpm":
        return _level(level, like).rsqrt()
    _check_space(space)
    return torch.ones((), dtype=wide_dtype(like.dtype), device=like.device)


def prediction_to_x0(space: str, x: torch.Tensor, output: torch.Tensor, level: Scalar) -> torch.Tensor:
    """x0-hat from a CFG denoiser's output: k-diffusion and flow denoisers return x0, DDPM ones eps."""
    if space == "ddpm":
        return eps_to_x0(x, output, level)
    _check_space(space)
    return output


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, else the dtype: gradients and moves are kept at least in float32."""
    return torch.promote_types(dtype, torch.float32)


def _level(level: Scalar, like: torch.Tensor) -> torch.Tensor:
    """sigma / alpha-bar / t as a scalar or per row [B], in at least float32, broadcasting against `like`."""
    v = torch.as_tensor(level, device=like.device).to(wide_dtype(like.dtype))
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() else v


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"DynFuse guidance: sampler space must be one of {SPACES}, got {space!r}")
