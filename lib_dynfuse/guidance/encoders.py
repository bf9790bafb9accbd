"""Pluggable image encoders for the guidance score: CLIP (open_clip) and DINO / DINOv2 (transformers).

An encoder is any differentiable module mapping images [B,3,H,W] in [0,1] to embeddings [B,D]. `ImageEncoder`
wraps a backbone with torch preprocessing; the loaders build the paper's defaults from local weights only and
raise `GuidanceUnavailable` with a message that says which file to put where. open_clip and transformers are
imported inside the loaders, so importing this module stays light.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .dino_keys import TORCH_HUB_FILES, is_timm_dino, timm_dino_to_hf
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
from .weights import (GuidanceUnavailable, first_existing, hub_snapshots, load_state_dict_file,
                      missing_weights_message)

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_HUB_REPOS: Dict[str, Tuple[str, ...]] = {
    "ViT-L-14": ("timm/vit_large_patch14_clip_224.openai", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),
    "ViT-B-32": ("timm/vit_base_patch32_clip_224.openai", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    "ViT-B-16": ("timm/vit_base_patch16_clip_224.openai", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "ViT-H-14": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",),
}
# facebook/dino-vits16 and friends: ViT without pooler; DINOv2 takes its config from the snapshot's config.json.
DINO_KINDS: Dict[str, Dict] = {
    "dino-vits16": dict(repo="facebook/dino-vits16", family="vit", resize=224, crop=224, mode="bilinear",
                        config=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, patch_size=16, image_size=224, qkv_bias=True)),
    "dino-vitb16": dict(repo="facebook/dino-vitb16", family="vit", resize=224, crop=224, mode="bilinear",
                        config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, patch_size=16, image_size=224, qkv_bias=True)),
    "dinov2-small": dict(repo="facebook/dinov2-small", family="dinov2", resize=256, crop=224, mode="bicubic",
                         config=None),
    "dinov2-base": dict(repo="facebook/dinov2-base", family="dinov2", resize=256, crop=224, mode="bicubic",
                        config=None),
}


def outside_inference_mode(fn):
    """Build weights as normal tensors even when called inside a host's inference_mode (Forge)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


def identity_head(output):
    """Backbones that already return [B,D] (open_clip's visual tower includes the projection)."""
    return output


def cls_token_head(output):
    """CLS token of a transformers ViT/DINOv2 output, the embedding DINO scores use."""
    return output.last_hidden_state[:, 0]


class ImageEncoder(nn.Module):
    """Differentiable [B,3,H,W] in [0,1] -> [B,D]: resize, centre crop, normalise, backbone, head."""

    def __init__(self, backbone: nn.Module, resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                 mode: str = "bicubic", head: Callable = identity_head, name: str = "encoder"):
        super().__init__()
        self.backbone = backbone
        self.resize, self.crop, self.mode = int(resize), int(crop), mode
        self.mean, self.std = tuple(mean), tuple(std)
        self.head = head
        self.name = name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.backbone.parameters(), None)
        x = preprocess(images, self.resize, self.crop, self.mean, self.std, self.mode)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        out = self.head(self.backbone(x))
        # cosine similarities are taken in at least float32 even when the backbone runs in half precision
        return out.to(torch.promote_types(out.dtype, torch.float32))


# ---------------------------------------------------------------------------- CLIP (open_clip)
def find_clip_weights(arch: str, weights: Optional[str] = None, search_dirs: Sequence[str] = (),
                      hub_cache: Optional[str] = None) -> str:
    """Path of an open_clip state dict for `arch`: explicit path, then `search_dirs`, then the hub cache."""
    own_names = [f"{arch}{ext}" for ext in (".safetensors", ".bin", ".pth")]
    if weights:
        found = weights if os.path.isfile(weights) else (
            first_existing(weights, OPEN_CLIP_FILES + tuple(own_names)) if os.path.isdir(weights) else None)
        if found is None:
            raise GuidanceUnavailable(f"DynFuse guidance: the CLIP weights path {weights!r} is not a file, nor a "
                                      f"folder holding one of {', '.join(OPEN_CLIP_FILES + tuple(own_names))}")
        return found
    for d in search_dirs:
        found = first_existing(d, own_names) or first_existing(os.path.join(d, arch), OPEN_CLIP_FILES)
        if found:
            return found
    for repo in CLIP_HUB_REPOS.get(arch, ()):
        for snap in hub_snapshots(repo, hub_cache):
            found = first_existing(snap, OPEN_CLIP_FILES)
            if found:
                return found
    places = [os.path.join(d, n) for d in search_dirs for n in own_names[:1]]
    places += [os.path.join(d, arch, OPEN_CLIP_FILES[0]) for d in search_dirs]
    places += [f"the Hugging Face cache ({hub_cache or 'HF_HUB_CACHE'}) with {repo} (open_clip_model.safetensors)"
               for repo in CLIP_HUB_REPOS.get(arch, ())]
    places.append("or set an explicit file path in the settings")
    raise GuidanceUnavailable(missing_weights_message(f"CLIP {arch} (open_clip format)", places))


def visual_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image tower's tensors of a full open_clip/OpenAI CLIP state dict (or of a visual-only one)."""
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return visual or state


@outside_inference_mode
def load_clip_encoder(arch: str = "ViT-B-32", weights: Optional[str] = None, search_dirs: Sequence[str] = (),
                      hub_cache: Optional[str] = None, quick_gelu: Optional[bool] = None,
                      device="cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """CLIP image encoder (open_clip architecture `arch`) from local weights; the text tower is dropped.

    quick_gelu: None = guess from the file path (OpenAI-trained weights use QuickGELU).
    """
    path = find_clip_weights(arch, weights, search_dirs, hub_cache)
    try:
        import open_clip
    except ImportError as e:
        raise GuidanceUnavailable("DynFuse guidance needs the open-clip-torch package (pip install open-clip-torch)") from e
    if quick_gelu is None:
        quick_gelu = "openai" in os.path.realpath(path).lower() or "openai" in path.lower()
    # pretrained=None: open_clip 2.20 would torch.load the file with pickles allowed; we load it safely ourselves
    if open_clip.get_model_config(arch) is None:
        raise GuidanceUnavailable(f"DynFuse guidance: open_clip has no architecture {arch!r} "
                                  f"(e.g. {', '.join(a for a in CLIP_HUB_REPOS)})")
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=bool(quick_gelu))
    visual = model.visual
    _load_strict(visual, visual_state_dict(load_state_dict_file(path)), f"CLIP {arch}", path)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    visual.requires_grad_(False).eval()
    return ImageEncoder(visual.to(device=device, dtype=dtype), size, size, mean, std, "bicubic",
                        identity_head, name=f"clip:{arch}")


# ---------------------------------------------------------------------------- DINO / DINOv2 (transformers)
def torch_hub_checkpoints(torch_hub: Optional[str] = None) -> str:
    """The folder where torch.hub keeps downloaded checkpoints ($TORCH_HOME/hub/checkpoints)."""
    if torch_hub:
        return torch_hub
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.path.join(home, "hub", "checkpoints")


def find_dino_weights(kind: str = "dino-vits16", weights: Optional[str] = None, search_dirs: Sequence[str] = (),
                      hub_cache: Optional[str] = None, torch_hub: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(weights file, config.json or None) for a DINO `kind`: explicit path, `search_dirs`, the hub cache,
    then the original DINO file in `search_dirs` or the torch hub checkpoints folder."""
    spec = _dino_spec(kind)

    def in_folder(folder: str):
        found = first_existing(folder, HF_FILES)
        return (found, first_existing(folder, ("config.json",))) if found else None

    if weights:
        if os.path.isfile(weights):
            return weights, first_existing(os.path.dirname(weights), ("config.json",))
        hit = in_folder(weights) if os.path.isdir(weights) else None
        if hit is None:
            raise GuidanceUnavailable(f"DynFuse guidance: the DINO weights path {weights!r} is not a file, nor a "
                                      f"folder holding {' or '.join(HF_FILES)}")
        return hit
    for d in search_dirs:
        hit = in_folder(os.path.join(d, kind))
        if hit:
            return hit
        found = first_existing(d, [f"{kind}{ext}" for ext in (".safetensors", ".bin")])
        if found:
            return found, None
    for snap in hub_snapshots(spec["repo"], hub_cache):
        hit = in_folder(snap)
        if hit:
            return hit
    original = TORCH_HUB_FILES.get(kind)
    for d in ([*search_dirs, torch_hub_checkpoints(torch_hub)] if original else []):
        found = first_existing(d, (original,))
        if found:
            return found, None
    places = [os.path.join(d, kind, "model.safetensors (+ config.json)") for d in search_dirs]
    if spec["config"] is not None:
        places += [os.path.join(d, f"{kind}.safetensors") for d in search_dirs]
    places.append(f"the Hugging Face cache ({hub_cache or 'HF_HUB_CACHE'}) with {spec['repo']}")
    if original:
        places.append(f"the original DINO file {original} in {torch_hub_checkpoints(torch_hub)} or a models folder")
    places.append("or set an explicit file or folder path in the settings")
    raise GuidanceUnavailable(missing_weights_message(f"DINO {kind} ({spec['repo']})", places))


@outside_inference_mode
def load_dino_encoder(kind: str = "dino-vits16", weights: Optional[str] = None, search_dirs: Sequence[str] = (),
                      hub_cache: Optional[str] = None, config: Optional[Dict] = None,
                      device="cpu", dtype: torch.dtype = torch.float32, torch_hub: Optional[str] = None
                      ) -> ImageEncoder:
    """DINO (ViTModel, CLS token) or DINOv2 (Dinov2Model, when transformers has it) from local weights.

    config: architecture fields used when no config.json lies next to the weights (default: the kind's own).
    """
    spec = _dino_spec(kind)
    path, config_json = find_dino_weights(kind, weights, search_dirs, hub_cache, torch_hub)
    try:
        import transformers
    except ImportError as e:
        raise GuidanceUnavailable("DynFuse guidance needs the transformers package for DINO") from e
    if spec["family"] == "dinov2":
        model_cls, config_cls = getattr(transformers, "Dinov2Model", None), getattr(transformers, "Dinov2Config", None)
        if model_cls is None:
            raise GuidanceUnavailable(f"DynFuse guidance: {kind} needs transformers >= 4.31 with Dinov2Model "
                                      f"(installed: {transformers.__version__}); use dino-vits16 instead")
    else:
        model_cls, config_cls = transformers.ViTModel, transformers.ViTConfig
    if config_json:
        with open(config_json, encoding="utf-8") as f:
            fields = {k: v for k, v in json.load(f).items() if k not in ("architectures", "transformers_version")}
    else:
        fields = dict(config or spec["config"] or {})
        if not fields:
            raise GuidanceUnavailable(f"DynFuse guidance: {kind} needs its config.json next to {path}")
    state = load_state_dict_file(path)
    if spec["family"] == "vit" and is_timm_dino(state):
        state = timm_dino_to_hf(state)
        if not config_json and config is None:
            fields["layer_norm_eps"] = 1e-6   # the original DINO models' LayerNorm eps
    kwargs = {"add_pooling_layer": False} if spec["family"] == "vit" else {}
    model = model_cls(config_cls(**fields), **kwargs)
    for prefix in ("vit.", "dinov2."):  # classification checkpoints wrap the backbone
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}
    _load_strict(model, state, f"DINO {kind}", path)
    model.requires_grad_(False).eval()
    resize, crop = spec["resize"], spec["crop"]
    if spec["family"] == "vit":  # ViTModel only takes its configured size (DINOv2 interpolates positions)
        resize = crop = int(model.config.image_size)
    return ImageEncoder(model.to(device=device, dtype=dtype), resize, crop, IMAGENET_MEAN, IMAGENET_STD,
                        spec["mode"], cls_token_head, name=f"dino:{kind}")


def _dino_spec(kind: str) -> Dict:
    if kind not in DINO_KINDS:
        raise GuidanceUnavailable(f"DynFuse guidance: unknown DINO kind {kind!r}; known: {', '.join(DINO_KINDS)}")
    return DINO_KINDS[kind]


def _load_strict(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path: str) -> None:
    """load_state_dict(strict) with a message naming the file and the first mismatching keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        short = str(e).splitlines()
        raise GuidanceUnavailable(f"DynFuse guidance: {path} does not fit {what}: "
                                  f"{' '.join(s.strip() for s in short[:3])[:600]}") from e

