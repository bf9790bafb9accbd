"""Forge side of the latent refinement: what differs from A1111 (a1111_guidance.py) under inference mode.

Host facts (Forge @ dfdcbab6, shared/reference/webui-forge.md sections 3-4):
- the batch loop runs in `torch.inference_mode()` (processing.py:911) and the weights are built there
  (`forge_loader` is decorated with it, backend/loader.py:497): autograd refuses to save an inference tensor
  for backward, so no backward can pass through the host's VAE or UNet, whatever grad mode is set. The decoder
  used for scoring is a private non-inference copy (built once per model, kept) and the encoders are loaded
  outside inference mode. The x_t gradient needs that backward through the UNet: a private copy would be a
  second whole UNet in memory, with the LoRAs Forge merged at that moment, called past Forge's patcher and
  without the fusion's hooks (they sit on the host's layers); changing the host's parameters to normal tensors
  is not allowed. So "xt" falls back to "x0" here, with XT_PROBLEM in the message;
- progress: the same job counters and console total as A1111 (processing.py:921-922, :1019 nextjob,
  :1325-1334 hires; shared_state.py, shared_total_tqdm.py), so A1111Guidance.count_reference_jobs applies;
- the CFG denoiser returns x0 for every sampler except CFGDenoiserTimesteps, which sets
  `classic_ddim_eps_estimation` and returns eps (modules/sd_samplers_cfg_denoiser.py:160-166, :222-224;
  sd_samplers_timesteps.py:37-48); its alphas are `sd_model.alphas_cumprod` (sd_samplers_timesteps.py:31);
- the VAE is `forge_objects.vae.first_stage_model` (IntegratedAutoencoderKL, decode(z) in [-1,1] with
  `scaling_factor`/`shift_factor`, backend/nn/vae.py:278-316); FLUX is sampled as x0 predictions too.
- references: a nested process_images in Script.process, before the inference-mode block (webui-forge.md sec. 4).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import torch

from ..guidance import LatentDecoder, make_private_copy
from ..layer_delta import FuseTarget
from .a1111_guidance import A1111Guidance, taesd_file

XT_PROBLEM = ("the x_t gradient needs a backward pass through the UNet, but Forge builds the UNet weights under "
              "torch.inference_mode and autograd cannot save inference tensors for backward (a differentiable "
              "private copy would be a second UNet in memory, without the fusion hooks)")


def private_vae_decoder(first_stage: torch.nn.Module) -> LatentDecoder:
    """A differentiable decoder from a private, non-inference copy of Forge's first stage model."""
    shift = getattr(first_stage, "shift_factor", 0.0)
    return LatentDecoder(make_private_copy(first_stage), float(first_stage.scaling_factor),
                         float(shift if isinstance(shift, float) else 0.0), (-1.0, 1.0), True)


def private_taesd_decoder(decoder: torch.nn.Module) -> LatentDecoder:
    """The host's TAESD decoder (latents -> [0,1]) as a private copy."""
    return LatentDecoder(make_private_copy(decoder), 1.0, 0.0, (0.0, 1.0), False)


class ForgeGuidance(A1111Guidance):
    """GuidanceHost for Forge 2.x."""

    def __init__(self, host: Any):
        super().__init__(host)
        self._private: Optional[Tuple[Any, str, LatentDecoder]] = None   # (source module, kind, copy)

    def render_reference(self, p: Any, prompt: str, steps: int, targets: List[FuseTarget], args: Any) -> Optional[Any]:
        from .forge import on_device
        moved = []
        for t in targets:
            w = t.module.weight
            moved.append(type(t)(name=t.name, module=t.module, group=t.group,
                                 subject=on_device(t.subject, w.device, w.dtype),
                                 style=on_device(t.style, w.device, w.dtype)))
        return super().render_reference(p, prompt, steps, moved, args)

    def decoder(self, p: Any, kind: str) -> Tuple[torch.nn.Module, str]:
        """Private copies, cached while the host's module stays the same (a model change makes a new one)."""
        sd_model = p.sd_model
        note = ""
        source, chosen = None, "full"
        if kind in ("auto", "taesd"):
            from modules import paths
            path = taesd_file(sd_model, paths.models_path)
            if os.path.isfile(path):
                from modules import sd_vae_taesd
                source, chosen = sd_vae_taesd.decoder_model(), "taesd"
            elif kind == "taesd":
                note = f"DynFuse guidance: no TAESD decoder at {path} (nothing is downloaded); using the full VAE"
        if source is None:
            source = sd_model.forge_objects.vae.first_stage_model
        if self._private is None or self._private[0] is not source or self._private[1] != chosen:
            self._private = None   # free the old copy first
            copy = private_taesd_decoder(source) if chosen == "taesd" else private_vae_decoder(source)
            self._private = (source, chosen, copy)
        return self._private[2], note

    def prediction(self, denoiser: Any) -> str:
        return "eps" if getattr(denoiser, "classic_ddim_eps_estimation", False) else "x0"

    def alphas_cumprod(self, p: Any, denoiser: Any) -> torch.Tensor:
        return p.sd_model.alphas_cumprod

    def xt_problem(self) -> str:
        return XT_PROBLEM
