"""World and evaluation settings: the full lab and the tiny world of the smoke test, and where artifacts live."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

CACHE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the built artifacts (their cache key)."""
    size: int = 16                 # image side, pixels (pixel-space diffusion, no VAE)
    seed: int = 0                  # base model, text encoder, judges and encoders
    pairs: int = 5                 # LoRA pairs; pair k: new subject k, new style k, LoRAs from seed 1000 + k
    base_steps: int = 1500
    base_batch: int = 64
    base_pool: int = 16384         # rendered training images of known concepts
    base_lr: float = 3e-3
    base_min_snr: float = 5.0      # Min-SNR-gamma loss weighting (0: DDPM's plain loss)
    lora_shots: int = 12           # few-shot images per LoRA
    lora_steps: int = 500
    lora_rank: int = 4
    lora_lr: float = 2e-3
    lora_conv: bool = True         # LoCon: also the resnet convs (kohya conv_dim), both LoRAs alike
    judge_steps: int = 800
    judge_batch: int = 128
    judge_pool: int = 16384
    encoder_steps: int = 600
    encoder_batch: int = 128
    encoder_pool: int = 8192

    def key(self, prefixes=("",)) -> str:
        """A short hash of the settings whose names start with one of `prefixes` (all by default), with size
        and seed: an artifact's cache key covers exactly what it depends on."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k in ("size", "seed") or any(k.startswith(p) for p in prefixes)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    def pair_seed(self, k: int) -> int:
        return 1000 + 17 * k + self.seed

    def folder(self, root: str = CACHE_ROOT) -> str:
        return os.path.join(root, f"world-{self.size}px-seed{self.seed}")

    def file(self, stem: str, prefixes, ext: str) -> str:
        """An artifact's file name: its stem and the key of the settings it depends on."""
        return f"{stem}-{self.key(prefixes)}.{ext}"


FULL = WorldConfig()
# the smoke test's world: two pairs, a few minutes of training cut to seconds (quality is not the point there)
TINY = WorldConfig(size=8, pairs=2, base_steps=30, base_batch=16, base_pool=256, lora_shots=4, lora_steps=10,
                   judge_steps=60, judge_batch=64, judge_pool=1024, encoder_steps=10, encoder_batch=32,
                   encoder_pool=256)
