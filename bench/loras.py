"""Real-format kohya LoRA pairs for a benchmark UNet, and the merged-weights floor they are compared with.

The files are written by the test fixtures' kohya writer (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`,
`.lora_up.weight`, `.alpha`), in float16 like real files, over kohya's default targets (attention q/k/v/out,
feed-forward, proj_in/out; with `convs`, the LoCon resnet/sampler convs too), and read back with
`lib_dynfuse.load_lora` exactly as a user's files would be.

The floor is what `<lora:a><lora:b>` costs in a WebUI: both deltas added into the weights once, then a plain
UNet call. `MergedWeights` computes W + s_c up_c down_c + s_s up_s down_s per layer from the written tensors
(independently of lib_dynfuse) and swaps it in and out by reference, so the original weights stay untouched.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from tests.fixtures.lora_files import WrittenLayer, write_kohya_lora


@dataclass
class LoraPair:
    """One subject/style pair at one rank: file paths, what was written, and the parsed LoraFiles."""

    rank: int
    subject_path: str
    style_path: str
    subject_layers: List[WrittenLayer]
    style_layers: List[WrittenLayer]

    def load(self, weight: float = 1.0):
        """(subject, style) as lib_dynfuse LoraFiles."""
        from lib_dynfuse import load_lora
        return load_lora(self.subject_path, weight), load_lora(self.style_path, weight)

    def file_mib(self) -> float:
        return (os.path.getsize(self.subject_path) + os.path.getsize(self.style_path)) / 2 ** 20


def write_pair(unet, folder: str, rank: int, convs: bool = False, seed: int = 0) -> LoraPair:
    """Write subject (seed) and style (seed + 1) kohya LoRAs of `rank` for `unet` into `folder`."""
    os.makedirs(folder, exist_ok=True)
    tag = f"r{rank}{'_conv' if convs else ''}"
    paths = [os.path.join(folder, f"{role}_{tag}.safetensors") for role in ("subject", "style")]
    layers = [write_kohya_lora(unet, path, rank=rank, seed=seed + i, include_conv=convs, dtype=torch.float16,
                               metadata={"ss_base_model_version": "sd_v1"})
              for i, path in enumerate(paths)]
    return LoraPair(rank, paths[0], paths[1], layers[0], layers[1])


def dense_delta(layer: WrittenLayer) -> torch.Tensor:
    """s * up @ down in the layer's weight shape, float32 (kohya: s = alpha / rank)."""
    up, down = layer.up.float().flatten(1), layer.down.float()
    dw = up @ down.flatten(1)
    return (dw.reshape(up.shape[0], *down.shape[1:]) * layer.scale)


class MergedWeights:
    """Both LoRAs merged into copies of the touched weights; `applied()` swaps them in for a block."""

    def __init__(self, unet: torch.nn.Module, pair: LoraPair):
        modules = dict(unet.named_modules())
        self.swaps: List[Tuple[torch.nn.Module, torch.Tensor]] = []
        merged: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for layer in pair.subject_layers + pair.style_layers:
                w = merged.get(layer.module)
                if w is None:
                    w = modules[layer.module].weight.detach().float().clone()
                w += dense_delta(layer)
                merged[layer.module] = w
        for name, w in merged.items():
            module = modules[name]
            self.swaps.append((module, w.to(module.weight.dtype)))

    @contextlib.contextmanager
    def applied(self):
        """The merged weights in place of the originals (by reference), restored on exit."""
        saved = []
        try:
            for module, w in self.swaps:
                saved.append((module, module.weight.data))
                module.weight.data = w
            yield
        finally:
            for module, w in saved:
                module.weight.data = w
