"""Differentiable latent -> image [0,1] decoders for scoring x0-hat: a full VAE or TAESD, any host's.

A decoder is a module so that `make_private_copy` can copy it whole (a lambda would keep the host's module).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple

import torch
from torch import nn


class LatentDecoder(nn.Module):
    """UNet-space latent -> image [B,3,H,W] in [0,1]: module.decode(z / scaling + shift) (or module(...)), rescaled."""

    image_range = (0.0, 1.0)

    def __init__(self, module: nn.Module, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 output_range: Tuple[float, float] = (-1.0, 1.0), use_decode_method: bool = True,
                 max_latent_side: Optional[int] = None):
        super().__init__()
        self.module = module
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self.output_range = (float(output_range[0]), float(output_range[1]))
        self.use_decode_method = use_decode_method
        self.max_latent_side = max_latent_side

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = shrink_latents(latents, self.max_latent_side) / self.scaling_factor + self.shift_factor
        param = next(self.module.parameters(), None)
        if param is not None:
            z = z.to(device=param.device, dtype=param.dtype)
        out = self.module.decode(z) if self.use_decode_method else self.module(z)
        out = getattr(out, "sample", out)          # diffusers DecoderOutput
        if isinstance(out, (tuple, list)):
            out = out[0]
        lo, hi = self.output_range
        return (out - lo) / (hi - lo)


def shrink_latents(latents: torch.Tensor, max_side: Optional[int]) -> torch.Tensor:
    """Latents area-downscaled so the longer side is at most max_side: the encoders see ~224 px anyway, so
    decoding 128x128 SDXL latents to 1024 px would only cost memory (an approximation of the full decode)."""
    h, w = latents.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return latents
    scale = max_side / max(h, w)
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", align_corners=False, antialias=True)


def vae_decoder(vae: nn.Module, scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                max_latent_side: Optional[int] = None) -> LatentDecoder:
    """Full VAE: diffusers AutoencoderKL / AutoencoderTiny (factors from vae.config) or an ldm/sgm/Forge
    first-stage model whose decode(z) gives [-1,1] (pass the checkpoint's scale factor, e.g. 0.18215 SD1,
    0.13025 SDXL, FLUX 0.3611 with shift 0.1159)."""
    config = getattr(vae, "config", None)
    if scaling_factor is None:
        scaling_factor = getattr(config, "scaling_factor", None)
        if scaling_factor is None:
            raise ValueError("DynFuse guidance: give the VAE's latent scaling factor (its module has no config)")
    if shift_factor is None:
        shift_factor = getattr(config, "shift_factor", None) or 0.0
    return LatentDecoder(vae, scaling_factor, shift_factor, (-1.0, 1.0), True, max_latent_side)


def taesd_decoder(decoder: nn.Module, max_latent_side: Optional[int] = None) -> LatentDecoder:
    """A TAESD decoder module that maps UNet-space latents straight to [0,1] (e.g. the WebUI's
    sd_vae_taesd.decoder_model()). For diffusers' AutoencoderTiny use vae_decoder(tiny)."""
    return LatentDecoder(decoder, 1.0, 0.0, (0.0, 1.0), False, max_latent_side)


def make_private_copy(module: nn.Module) -> nn.Module:
    """A deep copy made outside inference mode, every tensor a normal one, requires_grad False, eval mode.

    Forge creates weights inside inference mode; backward through them fails, through this copy it works.
    """
    with torch.inference_mode(False):
        private = copy.deepcopy(module)
        with torch.no_grad():
            for m in private.modules():
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.is_inference():
                        setattr(m, name, nn.Parameter(p.clone(), requires_grad=False))
                for name, b in list(m.named_buffers(recurse=False)):
                    if b is not None and b.is_inference():
                        setattr(m, name, b.clone())
    return private.requires_grad_(False).eval()


def is_half(module: nn.Module) -> bool:
    """Whether any weight of the module is float16 or bfloat16."""
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())


def gradient_decoder(decoder: Callable) -> Callable:
    """The decoder a gradient goes through: a private float32 copy of a decoder module whose weights are
    float16/bfloat16 (the full VAE's backward overflows in half precision on SDXL; the copy costs the module
    once more in float32), any other decoder as it is."""
    if isinstance(decoder, nn.Module) and is_half(decoder):
        return make_private_copy(decoder).float()
    return decoder
