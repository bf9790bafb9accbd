"""Encoder preprocessing in torch, so that gradients flow from the embedding back to the image (paper Sec. 4.2)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter_side(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize [B,C,H,W] so that the shorter side is `size`, antialiased like PIL's resize (differentiable)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_hw = (max(size, int(round(h * scale))), max(size, int(round(w * scale))))
    if new_hw == (h, w):
        return images
    return F.interpolate(images, size=new_hw, mode=mode, align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of [B,C,H,W] (offsets rounded like torchvision's CenterCrop)."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def preprocess(images: torch.Tensor, resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
               mode: str = "bicubic") -> torch.Tensor:
    """Images in [0,1] -> encoder input: shorter side to `resize`, centre crop `crop`, normalise."""
    return normalize(center_crop(resize_shorter_side(images, resize, mode), crop), mean, std)
