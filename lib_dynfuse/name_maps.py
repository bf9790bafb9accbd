"""LoRA layer keys (`LayerKey`) -> module names of a torch model.

A name map is any object with `resolve(key) -> module name or None` (or a plain callable doing that); the
hosts supply their own (A1111's `network_layer_mapping`, Forge's key maps). An optional `module(name)` method
returns the module for a name; without it `targets.py` uses `model.get_submodule(name)`.

`ModuleNameMap` is the built-in one for diffusers / transformers models:
- every module path of each root, with "_" for ".": kohya's diffusers-style names
  (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`) and the dotted PEFT keys after
  `lora_file.layer_key` normalised them; built from `named_modules()`, never by splitting underscores;
- for a diffusers `UNet2DConditionModel`, also the compvis (ldm) names kohya/sd-scripts write for SDXL
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), computed from the UNet config by `compvis_to_diffusers`;
- text encoders (transformers CLIPTextModel paths `text_model.encoder.layers.N.self_attn.q_proj`) under their
  group "te1" / "te2"; their names come back as "te1:text_model.encoder.layers.0.self_attn.q_proj".
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from .lora_file import LayerKey

# ldm ResBlock part -> diffusers ResnetBlock2D part (the transformer blocks use the same names in both).
LDM_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
DIFFUSERS_RESNET_PARTS = {v: k for k, v in LDM_RESNET_PARTS.items()}
TE_GROUPS = ("te1", "te2")


@runtime_checkable
class NameMap(Protocol):
    """LoRA layer key -> module name (None when the model has no such layer)."""

    def resolve(self, key: LayerKey) -> Optional[str]:
        ...


def underscored(path: str) -> str:
    """kohya spelling of a module path: "." -> "_"."""
    return path.replace(".", "_")


def _per_block(value, count: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * count


def compvis_to_diffusers(config) -> Dict[str, str]:
    """ldm block path -> diffusers UNet2DConditionModel block path, for the config's layout (SD1.5, SD2, SDXL).

    ldm numbers blocks flat: input_blocks.0 is conv_in; then per level `layers_per_block` blocks of
    (resnet, attention if cross-attn) and a downsampler block except on the last level; middle_block is
    (resnet, attention, resnet); output_blocks mirror with one extra block per level, the last of which
    carries the upsampler (after the attention if there is one).
    """
    down_types, up_types = list(config.down_block_types), list(config.up_block_types)
    levels = len(down_types)
    per_level = _per_block(config.layers_per_block, levels)
    table = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if getattr(config, "addition_embed_type", None) == "text_time":
        table.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    block = 1
    for level, kind in enumerate(down_types):
        for j in range(per_level[level]):
            table[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            if "CrossAttn" in kind:
                table[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level < levels - 1:
            table[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    mid_type = getattr(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type:
        table["middle_block.0"] = "mid_block.resnets.0"
        if "CrossAttn" in mid_type:
            table["middle_block.1"] = "mid_block.attentions.0"
            table["middle_block.2"] = "mid_block.resnets.1"
        else:
            table["middle_block.1"] = "mid_block.resnets.1"
    up_per_level = list(reversed(per_level))
    block = 0
    for level, kind in enumerate(up_types):
        attn = "CrossAttn" in kind
        for j in range(up_per_level[level] + 1):
            table[f"output_blocks.{block}.0"] = f"up_blocks.{level}.resnets.{j}"
            if attn:
                table[f"output_blocks.{block}.1"] = f"up_blocks.{level}.attentions.{j}"
            if j == up_per_level[level] and level < levels - 1:
                table[f"output_blocks.{block}.{2 if attn else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            block += 1
    return table


def diffusers_to_compvis_paths(config, paths: Iterable[str]) -> Dict[str, str]:
    """diffusers module path -> ldm module path, for each path that has one (blocks per `compvis_to_diffusers`)."""
    blocks = {d: c for c, d in compvis_to_diffusers(config).items()}
    out: Dict[str, str] = {}
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix not in blocks:
                continue
            rest = ".".join(parts[i:])
            if ".resnets." in f".{prefix}." and rest:
                head = rest.split(".")[0]
                rest = DIFFUSERS_RESNET_PARTS.get(head, head) + rest[len(head):]
            out[path] = f"{blocks[prefix]}.{rest}" if rest else blocks[prefix]
            break
    return out


def _is_diffusers_unet(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "down_block_types") and hasattr(config, "up_block_types")


def _weighted_modules(root: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(path, module) for every module with its own weight tensor (what a LoRA can target)."""
    return [(n, m) for n, m in root.named_modules()
            if n and isinstance(getattr(m, "weight", None), torch.Tensor)]


class ModuleNameMap:
    """Built-in name map over torch roots: {"unet": UNet, "te1": text encoder 1, "te2": text encoder 2}."""

    def __init__(self, roots: Dict[str, torch.nn.Module]):
        self.roots = {g: r for g, r in roots.items() if r is not None}
        self._names: Dict[LayerKey, str] = {}
        self._modules: Dict[str, torch.nn.Module] = {}
        self.order: Dict[str, int] = {}
        self.ambiguous: Dict[LayerKey, List[str]] = {}
        for group, root in self.roots.items():
            self._add_root(group, root)

    def _qualified(self, group: str, path: str) -> str:
        return path if group == "unet" else f"{group}:{path}"

    def _register(self, key: LayerKey, name: str) -> None:
        known = self._names.get(key)
        if known is not None and known != name:
            self.ambiguous.setdefault(key, [known]).append(name)
        else:
            self._names[key] = name

    def _add_root(self, group: str, root: torch.nn.Module) -> None:
        modules = _weighted_modules(root)
        for path, module in modules:
            name = self._qualified(group, path)
            self._modules[name] = module
            self.order[name] = len(self.order)
            self._register(LayerKey(group, underscored(path)), name)
        if group == "unet" and _is_diffusers_unet(root):
            for path, ldm in diffusers_to_compvis_paths(root.config, (p for p, _ in modules)).items():
                self._register(LayerKey(group, underscored(ldm)), self._qualified(group, path))
        if group in TE_GROUPS and not any(p.startswith("text_model.") for p, _ in modules):
            # a bare CLIPTextTransformer: kohya keys still say text_model_encoder_...
            for path, _ in modules:
                self._register(LayerKey(group, "text_model_" + underscored(path)), self._qualified(group, path))
        for key in self.ambiguous:
            self._names.pop(key, None)

    def resolve(self, key: LayerKey) -> Optional[str]:
        return self._names.get(LayerKey(*key))

    def module(self, name: str) -> torch.nn.Module:
        return self._modules[name]

    def has_group(self, group: str) -> bool:
        return group in self.roots

    def __call__(self, key: LayerKey) -> Optional[str]:
        return self.resolve(key)


class CallableNameMap:
    """Wrap a plain function key -> module name as a NameMap."""

    def __init__(self, fn: Callable[[LayerKey], Optional[str]]):
        self.fn = fn

    def resolve(self, key: LayerKey) -> Optional[str]:
        return self.fn(key)


def as_name_map(obj: Union[NameMap, Callable, None]) -> Optional[NameMap]:
    """A NameMap from an object with `resolve` or from a plain callable (None stays None)."""
    if obj is None or hasattr(obj, "resolve"):
        return obj
    if callable(obj):
        return CallableNameMap(obj)
    raise TypeError(f"name_map must have resolve(key) or be callable, got {type(obj).__name__}")
