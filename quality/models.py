"""The lab's networks: a frozen token-embedding text encoder, the diffusers UNet, and the small CNNs of the
judges and guide encoders."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from . import world

SEQ_LEN = 6
TEXT_DIM = 64
# Trigger words: tokens of the table that base training never shows (like "sks"); the LoRAs learn them.
SUBJECT_TRIGGER, STYLE_TRIGGER = "sks", "zwx"
RARE_WORDS = (SUBJECT_TRIGGER, STYLE_TRIGGER, "ohwx", "qlx", "vrk")
VOCAB: List[str] = (["<bos>", "<eos>", "<pad>"] + [world.SUBJECT_NAMES[i] for i in world.KNOWN_SUBJECTS]
                    + [world.STYLE_NAMES[i] for i in world.KNOWN_STYLES] + list(RARE_WORDS))
TOKEN = {w: i for i, w in enumerate(VOCAB)}


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Space-separated words -> token ids [B, SEQ_LEN]: <bos> words <eos> <pad>... (CLIP's layout)."""
    rows = []
    for p in prompts:
        words = p.split()
        if len(words) > SEQ_LEN - 2:
            raise ValueError(f"prompt {p!r} is longer than {SEQ_LEN - 2} words")
        unknown = [w for w in words if w not in TOKEN]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in prompt {p!r}")
        ids = [TOKEN["<bos>"]] + [TOKEN[w] for w in words] + [TOKEN["<eos>"]]
        rows.append(ids + [TOKEN["<pad>"]] * (SEQ_LEN - len(ids)))
    return torch.tensor(rows)


class TextEncoder(nn.Module):
    """Frozen stand-in for CLIP's text tower: random token and position embeddings, one random causal
    transformer layer and a final LayerNorm; never trained, so a rare token's embedding means nothing until a
    LoRA's cross-attention learns it."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.token = nn.Embedding(len(VOCAB), TEXT_DIM)
            self.position = nn.Parameter(torch.randn(SEQ_LEN, TEXT_DIM) * 0.5)
            self.layer = nn.TransformerEncoderLayer(TEXT_DIM, 4, 2 * TEXT_DIM, dropout=0.0, batch_first=True,
                                                    norm_first=True)
            self.norm = nn.LayerNorm(TEXT_DIM)
        self.register_buffer("causal", torch.triu(torch.full((SEQ_LEN, SEQ_LEN), float("-inf")), 1))
        self.requires_grad_(False).eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens) + self.position
        return self.norm(self.layer(h, src_mask=self.causal))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """encoder_hidden_states [B, SEQ_LEN, TEXT_DIM] of the prompts."""
        with torch.no_grad():
            return self(tokenize(prompts))


def unet_config(size: int) -> dict:
    """A small SD-like UNet: three levels, cross-attention at the two lower resolutions and the middle."""
    return dict(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=TEXT_DIM, attention_head_dim=4,
                norm_num_groups=8)


def build_unet(size: int, seed: int = 0):
    """A freshly initialised diffusers UNet2DConditionModel (diffusers' own init, seeded)."""
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(size))


class SmallCNN(nn.Module):
    """Conv net [B,3,S,S] in [0,1] -> [B, out]: three conv stages (GroupNorm, SiLU), pooled, linear head."""

    def __init__(self, out: int, width: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            w = width

            def stage(cin, cout, stride):
                return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

            self.features = nn.Sequential(*stage(3, w, 1), *stage(w, w, 1), *stage(w, 2 * w, 2),
                                          *stage(2 * w, 2 * w, 1), *stage(2 * w, 4 * w, 2),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(4 * w, out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))


def cosine_step(opt: torch.optim.Optimizer, lr: float, step: int, steps: int, loss: torch.Tensor) -> None:
    """One optimiser step on `loss` at the cosine-decayed learning rate of `step` of `steps`."""
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
