"""The judges: classifiers trained on ground-truth renders of every subject and every style (known and new).

The subject judge sees each subject in every style and the style judge each style on every subject, so each is
trained to ignore the other concept. Renders are degraded during training (noise, blur) like samples of a small
diffusion model. "subject kept" = the subject judge's argmax is the pair's new subject; likewise for style.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch.nn import functional as F

from . import world
from .models import SmallCNN, cosine_step


def degrade(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random pixel noise (sigma up to 0.08) and, for half the images, a light blur."""
    b = images.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.08
    out = images + sigma * torch.randn(images.shape, generator=g)
    blur = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3), groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    return (pick * blurred + (1 - pick) * out).clamp(0, 1)


def all_pairs(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """n uniform draws over every subject and every style."""
    subs, stys = world.random_pairs(range(len(world.SUBJECT_NAMES)), range(len(world.STYLE_NAMES)), n, seed)
    return torch.tensor(subs), torch.tensor(stys)


def train_judge(kind: str, size: int, steps: int, batch: int, pool: int, seed: int, width: int = 24,
                lr: float = 3e-3, log=print) -> SmallCNN:
    """A classifier of `kind` ("subject" or "style") over all concepts, from a pool of rendered images."""
    subs, stys = all_pairs(pool, seed)
    images = torch.cat([world.render(subs[i:i + 2048].tolist(), stys[i:i + 2048].tolist(), size, seed * 1000 + i)
                        for i in range(0, pool, 2048)])
    labels = subs if kind == "subject" else stys
    classes = len(world.SUBJECT_NAMES) if kind == "subject" else len(world.STYLE_NAMES)
    net = SmallCNN(classes, width, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    net.train()
    for step in range(steps):
        idx = torch.randint(pool, (batch,), generator=g)
        loss = F.cross_entropy(net(degrade(images[idx], g)), labels[idx])
        cosine_step(opt, lr, step, steps, loss)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"{kind} judge: step {step + 1}/{steps} loss {loss.item():.3f}")
    return net.eval().requires_grad_(False)


def classify(net: SmallCNN, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """argmax class per image."""
    with torch.no_grad():
        return torch.cat([net(images[i:i + chunk]).argmax(1) for i in range(0, images.shape[0], chunk)])


def judge_accuracy(subject_judge: SmallCNN, style_judge: SmallCNN, size: int, n: int, seed: int) -> Dict[str, float]:
    """Accuracy on fresh renders (unseen jitter and seeds): clean and degraded, overall and on the new concepts."""
    subs, stys = all_pairs(n, seed)
    clean = world.render(subs.tolist(), stys.tolist(), size, seed)
    noisy = degrade(clean, torch.Generator().manual_seed(seed))
    new_s = torch.isin(subs, torch.tensor(world.NEW_SUBJECTS))
    new_t = torch.isin(stys, torch.tensor(world.NEW_STYLES))
    out = {}
    for tag, imgs in (("clean", clean), ("degraded", noisy)):
        ps, pt = classify(subject_judge, imgs), classify(style_judge, imgs)
        out[f"subject_{tag}"] = (ps == subs).float().mean().item()
        out[f"style_{tag}"] = (pt == stys).float().mean().item()
        out[f"subject_new_{tag}"] = (ps == subs)[new_s].float().mean().item()
        out[f"style_new_{tag}"] = (pt == stys)[new_t].float().mean().item()
    return out
