"""Few-shot LoRAs in kohya's format: low-rank adapters trained on the frozen base UNet, saved as safetensors.

Keys: `lora_unet_<module path with _ for .>.lora_down.weight` [r, in(, kh, kw)], `.lora_up.weight`
[out, r(, 1, 1)] and `.alpha` (scale = alpha / r), the layout kohya's sd-scripts writes and lib_dynfuse reads.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import world
from .diffusion import train_eps
from .models import STYLE_TRIGGER, SUBJECT_TRIGGER

# kohya's default UNet set (attention projections, feed-forward, proj_in/out) and, with LoCon, the resnet convs
ATTENTION_LAYERS = re.compile(r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)))$")
CONV_LAYERS = re.compile(r"resnets\.\d+\.(conv1|conv2)$")


@dataclass
class LoraSpec:
    """What one LoRA learns: images of (subject, style) with their captions."""
    subjects: List[int]
    styles: List[int]
    captions: List[str]


def subject_spec(new_subject: int, shots: int, seed: int) -> LoraSpec:
    """The new subject in two known styles, captioned '<trigger> <style word>' (like photos of one dog)."""
    rng = random.Random(seed)
    styles = rng.sample(list(world.KNOWN_STYLES), 2)
    sty = [styles[i % 2] for i in range(shots)]
    return LoraSpec([new_subject] * shots, sty, [f"{SUBJECT_TRIGGER} {world.STYLE_NAMES[s]}" for s in sty])


def style_spec(new_style: int, shots: int, seed: int) -> LoraSpec:
    """Known subjects in the new style, captioned '<subject word> <trigger>'."""
    rng = random.Random(seed)
    subs = rng.sample(list(world.KNOWN_SUBJECTS), shots) if shots <= len(world.KNOWN_SUBJECTS) else \
        [rng.choice(world.KNOWN_SUBJECTS) for _ in range(shots)]
    return LoraSpec(subs, [new_style] * shots, [f"{world.SUBJECT_NAMES[s]} {STYLE_TRIGGER}" for s in subs])


class LoraAdapters:
    """Forward hooks adding up(down(x)) * alpha / r to each target layer while installed."""

    def __init__(self, unet: nn.Module, rank: int, alpha: float, conv: bool, seed: int):
        self.rank, self.alpha = rank, float(alpha)
        self.layers: Dict[str, Tuple[nn.Module, nn.Parameter, nn.Parameter]] = {}
        g = torch.Generator().manual_seed(seed)
        for name, m in unet.named_modules():
            hit = ATTENTION_LAYERS.search(name) or (conv and CONV_LAYERS.search(name))
            if not hit or not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(m, nn.Linear):
                down_shape, up_shape = (rank, m.in_features), (m.out_features, rank)
            else:
                down_shape, up_shape = (rank, m.in_channels) + tuple(m.kernel_size), (m.out_channels, rank, 1, 1)
            fan_in = math.prod(down_shape[1:])
            down = nn.Parameter((torch.rand(down_shape, generator=g) * 2 - 1) / math.sqrt(fan_in))  # kohya: kaiming
            up = nn.Parameter(torch.zeros(up_shape))                                                # kohya: zeros
            self.layers[name] = (m, down, up)
        self._handles: list = []

    def parameters(self) -> List[nn.Parameter]:
        return [p for _, d, u in self.layers.values() for p in (d, u)]

    def _hook(self, name: str, module, args, output):
        m, down, up = self.layers[name]
        x = args[0]
        scale = self.alpha / self.rank
        if isinstance(m, nn.Linear):
            return output + F.linear(F.linear(x, down), up) * scale
        h = F.conv2d(x, down, None, m.stride, m.padding, m.dilation)
        return output + F.conv2d(h, up) * scale

    def __enter__(self):
        for name, (m, _, _) in self.layers.items():
            self._handles.append(m.register_forward_hook(lambda mod, a, o, n=name: self._hook(n, mod, a, o)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The kohya-format tensors."""
        out = {}
        for name, (_, down, up) in self.layers.items():
            stem = "lora_unet_" + name.replace(".", "_")
            out[stem + ".lora_down.weight"] = down.detach().clone().contiguous()
            out[stem + ".lora_up.weight"] = up.detach().clone().contiguous()
            out[stem + ".alpha"] = torch.tensor(self.alpha)
        return out


def train_lora(unet: nn.Module, text, spec: LoraSpec, size: int, steps: int, rank: int, lr: float, seed: int,
               conv: bool = True, batch: int = 16, log=print, name: str = "lora") -> Dict[str, torch.Tensor]:
    """Train adapters on the spec's few shots (the base UNet stays frozen); returns the kohya tensors."""
    shots = world.render(spec.subjects, spec.styles, size, seed) * 2 - 1
    cond = text.encode(spec.captions)
    g = torch.Generator().manual_seed(seed + 5)
    adapters = LoraAdapters(unet, rank, rank, conv, seed + 3)

    def batches(step: int):
        idx = torch.randint(len(spec.captions), (batch,), generator=g)
        return shots[idx].contiguous(memory_format=torch.channels_last), cond[idx]

    unet.requires_grad_(False)
    with adapters:
        train_eps(unet, adapters.parameters(), batches, steps, lr, seed + 4, warmup=20, log=log, name=name)
    return adapters.state_dict()
