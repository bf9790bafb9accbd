"""Guide encoders for latent refinement: self-supervised (SimCLR, NT-Xent) on known concepts only.

They are not the judges: no labels, other architectures' seeds, and they never see a new subject or style.
Two roles as in the paper's R (Eq. 16-18): "clip" (global views: shape and look) and "dino" (a global view
against a local crop, DINO's multi-crop idea: what a patch shares with the whole image, mostly the look).
Each maps images [B, 3, H, W] in [0, 1] to an embedding and is differentiable.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import world
from .models import SmallCNN, cosine_step

ROLES = ("clip", "dino")


class GuideEncoder(nn.Module):
    """Backbone features (the embedding used for guidance); the projection head is only for training."""

    def __init__(self, dim: int = 64, width: int = 24, seed: int = 0):
        super().__init__()
        self.net = SmallCNN(dim, width, seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images * 2 - 1)


def random_view(images: torch.Tensor, g: torch.Generator, scale_lo: float, scale_hi: float) -> torch.Tensor:
    """A random crop (area fraction scale_lo..scale_hi, anywhere) resized back to full size, plus light noise."""
    b = images.shape[0]
    s = (scale_lo + (scale_hi - scale_lo) * torch.rand(b, generator=g)).sqrt()
    tx, ty = ((torch.rand(b, generator=g) * 2 - 1) * (1 - s), (torch.rand(b, generator=g) * 2 - 1) * (1 - s))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (out + 0.03 * torch.randn(out.shape, generator=g)).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's contrastive loss over the 2B views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_encoder(role: str, size: int, steps: int, batch: int, pool: int, seed: int, lr: float = 2e-3,
                  log=print) -> GuideEncoder:
    """SimCLR on renders of known subjects x known styles only."""
    subs, stys = world.random_pairs(world.KNOWN_SUBJECTS, world.KNOWN_STYLES, pool, seed)
    images = torch.cat([world.render(subs[i:i + 2048], stys[i:i + 2048], size, seed * 1000 + i)
                        for i in range(0, pool, 2048)])
    enc = GuideEncoder(seed=seed)
    feat = enc.net.head.in_features
    head = nn.Sequential(nn.Linear(feat, feat), nn.SiLU(), nn.Linear(feat, 64))
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    local = (0.5, 1.0) if role == "clip" else (0.15, 0.35)
    enc.train()
    for step in range(steps):
        x = images[torch.randint(pool, (batch,), generator=g)]
        v1, v2 = random_view(x, g, 0.5, 1.0), random_view(x, g, *local)
        loss = nt_xent(head(enc(v1)), head(enc(v2)))
        cosine_step(opt, lr, step, steps, loss)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"{role} encoder: step {step + 1}/{steps} loss {loss.item():.3f}")
    return enc.eval().requires_grad_(False)
