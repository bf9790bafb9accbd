"""DDIM sampling with classifier-free guidance, optionally inside a fusion session and with latent refinement.

cond and uncond rows go through one UNet call ([cond rows; uncond rows], labelled for the session); every seed
has its own initial noise, so a row's image does not depend on which other seeds share its batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .diffusion import scheduler_config


def initial_noise(seeds: Sequence[int], size: int) -> torch.Tensor:
    """x_T [B, 3, size, size]: one generator per seed."""
    return torch.cat([torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds])


def sample(unet, text, prompts: Sequence[str], seeds: Sequence[int], size: int, steps: int = 20,
           cfg: float = 1.5, session=None, refiner=None, log_info: Optional[list] = None) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1]: DDIM (eta 0) with CFG; `session` a FuseSession (open) or None;
    `refiner` a lib_dynfuse LatentRefiner (grad "x0": move_eps; grad "xt": move_xt, the gradient through the UNet);
    either way x_{t-1} moves by -m grad_{x_t} R (Eq. 20)."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(**scheduler_config())
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod
    b = len(seeds)
    x = initial_noise(seeds, size)
    emb = torch.cat([text.encode(list(prompts)), text.encode([""] * b)])
    labels = ["cond"] * b + ["uncond"] * b

    def guided_eps(x_t: torch.Tensor, t) -> torch.Tensor:
        inp = torch.cat([x_t, x_t]).contiguous(memory_format=torch.channels_last)
        out = unet(inp, t, encoder_hidden_states=emb).sample
        e_c, e_u = out[:b], out[b:]
        return e_u + cfg * (e_c - e_u)

    for i, t in enumerate(sched.timesteps):
        if session is not None:
            session.set_step(i, steps)
            session.set_row_labels(labels)
        a = abar[t].to(x.dtype)
        info = None
        if refiner is not None and refiner.active(i, steps) and refiner.grad == "xt":
            # Eq. 20: x_{t-1} = DDIM(x_t, eps) - m * grad_{x_t} R, eps and gradient from one grad-enabled forward
            eps, move, info = refiner.move_xt(x, lambda x_t: guided_eps(x_t, t),
                                              lambda x_t, e: (x_t - (1 - a).sqrt() * e) / a.sqrt())
            x = sched.step(eps.detach(), t, x).prev_sample + move
        else:
            with torch.no_grad():
                eps = guided_eps(x, t)
            x_prev = sched.step(eps, t, x).prev_sample
            if refiner is not None and refiner.active(i, steps):
                move, info = refiner.move_eps(x, eps, a)   # the x0-hat gradient taken to x_t, eps held fixed
                x_prev = x_prev + move
            x = x_prev
        if log_info is not None and info is not None:
            log_info.append(info)
    return ((x + 1) / 2).clamp(0, 1)
