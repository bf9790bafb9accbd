"""The noise schedule and the epsilon-prediction training loop shared by the base model and the LoRAs."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterable, Optional, Tuple

import torch

TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02   # DDPM's linear schedule


def alphas_cumprod() -> torch.Tensor:
    """abar_t of the linear beta schedule, [TRAIN_TIMESTEPS] float64."""
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def scheduler_config() -> dict:
    """diffusers DDIMScheduler settings matching the training schedule (SD's flags)."""
    return dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                beta_schedule="linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                prediction_type="epsilon", timestep_spacing="leading")


def eps_loss(unet, x0: torch.Tensor, cond: torch.Tensor, g: torch.Generator, abar: torch.Tensor,
             min_snr: float = 0.0) -> torch.Tensor:
    """MSE of the UNet's noise prediction at uniformly drawn timesteps (DDPM's simple loss); x0 in [-1, 1].
    min_snr > 0: each timestep weighted by min(SNR, min_snr) / SNR (Min-SNR-gamma, Hang et al. 2023)."""
    b = x0.shape[0]
    t = torch.randint(0, TRAIN_TIMESTEPS, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = abar[t].float().view(b, 1, 1, 1)
    xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last)
    pred = unet(xt, t, encoder_hidden_states=cond).sample
    if min_snr <= 0:
        return torch.nn.functional.mse_loss(pred, noise)
    snr = a / (1 - a)
    weight = snr.clamp(max=min_snr) / snr
    return (weight * (pred - noise).pow(2)).mean()


def train_eps(unet, params: Iterable[torch.nn.Parameter], batches: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
              steps: int, lr: float, seed: int, ema_decay: Optional[float] = None, warmup: int = 50,
              log: Callable[[str], None] = print, name: str = "train", min_snr: float = 0.0) -> None:
    """AdamW on `params` with warmup + cosine decay; batches(step) -> (x0 in [-1,1], encoder_hidden_states).

    With ema_decay the parameters end as their exponential moving average (with the usual warmup)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    abar = alphas_cumprod()
    ema = [p.detach().clone() for p in params] if ema_decay else None
    start, running = time.time(), None
    for step in range(steps):
        warm = min(1.0, (step + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        x0, cond = batches(step)
        loss = eps_loss(unet, x0, cond, g, abar, min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"{name}: step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)")
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with every parameter frozen."""
    return copy.deepcopy(module).eval().requires_grad_(False)
