"""Training the base UNet on the known subjects x known styles, with caption dropout for CFG."""
from __future__ import annotations

import random
from typing import List, Tuple

import torch

from . import world
from .diffusion import train_eps
from .models import TextEncoder, build_unet

P_NULL, P_SUBJECT_ONLY, P_STYLE_ONLY = 0.1, 0.1, 0.1   # caption dropout: empty prompt, one word left out


def caption(subject: int, style: int, rng: random.Random) -> str:
    """'<subject word> <style word>' with the dropout above (known concepts only)."""
    s, t = world.SUBJECT_NAMES[subject], world.STYLE_NAMES[style]
    r = rng.random()
    if r < P_NULL:
        return ""
    if r < P_NULL + P_SUBJECT_ONLY:
        return s
    if r < P_NULL + P_SUBJECT_ONLY + P_STYLE_ONLY:
        return t
    return f"{s} {t}"


def train_base(size: int, steps: int, batch: int, pool: int, seed: int, text: TextEncoder, lr: float = 1e-3,
               log=print, min_snr: float = 0.0):
    """The base UNet (EMA weights), trained from scratch on a pool of rendered known-concept images."""
    subjects, styles = world.random_pairs(world.KNOWN_SUBJECTS, world.KNOWN_STYLES, pool, seed)
    images = torch.cat([world.render(subjects[i:i + 2048], styles[i:i + 2048], size, seed * 1000 + i)
                        for i in range(0, pool, 2048)]) * 2 - 1
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def batches(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(pool, (batch,), generator=g)
        prompts: List[str] = [caption(subjects[i], styles[i], rng) for i in idx.tolist()]
        return images[idx].contiguous(memory_format=torch.channels_last), text.encode(prompts)

    unet = build_unet(size, seed).to(memory_format=torch.channels_last).train()
    train_eps(unet, unet.parameters(), batches, steps, lr, seed + 2, ema_decay=0.995, log=log, name="base unet",
              min_snr=min_snr)
    return unet.eval().requires_grad_(False)
