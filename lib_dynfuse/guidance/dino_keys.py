"""Original DINO checkpoints (facebookresearch/dino, timm-style keys) -> transformers ViTModel keys.

The torch hub keeps them as e.g. ~/.cache/torch/hub/checkpoints/dino_deitsmall16_pretrain.pth (ViT-S/16).
"""
from __future__ import annotations

from typing import Dict

import torch

TORCH_HUB_FILES = {"dino-vits16": "dino_deitsmall16_pretrain.pth", "dino-vitb16": "dino_vitbase16_pretrain.pth"}
LAYER_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def is_timm_dino(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the original DINO names (cls_token, blocks.N...)."""
    return "cls_token" in state and any(k.startswith("blocks.") for k in state)


def timm_dino_to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename (and split the fused qkv of) an original DINO ViT state dict for transformers' ViTModel."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for i in layers:
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for old, new in LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"{dst}attention.attention.{name}.{kind}"] = t.clone()
    return out
