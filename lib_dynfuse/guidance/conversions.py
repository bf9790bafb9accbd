"""Exact conversions between a sampler's variable and the x0 prediction, and back for a corrected x0.

DDPM/DDIM (alphas_cumprod a):  x_t = sqrt(a) x0 + sqrt(1-a) eps,   v = sqrt(a) eps - sqrt(1-a) x0.
k-diffusion (sigma):            x = x0 + sigma eps (x = x_t / sqrt(a), sigma = sqrt((1-a)/a)); denoised = x0.
Flow matching (FLUX, t):        x_t = (1-t) x0 + t noise,          v = noise - x0.
Guidance moves x0 by delta (Eq. 20 on x0-hat); `*_for_x0_shift` give the same move in the sampler's variable
with x_t held fixed, so hosts whose callbacks see eps or v can write the correction back.
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
