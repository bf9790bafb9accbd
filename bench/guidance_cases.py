"""Guidance-step cases (paper Eq. 20 via lib_dynfuse.guidance.LatentRefiner) and the reference-render cache.

One sampling step = the UNet call on cond + uncond rows, classifier-free guidance, eps -> x0-hat. Guided:
- x0 (TAESD / full VAE): then grad_{x0-hat} R (decoder + CLIP + DINO forward and backward) and the move
  -m grad_{x_t} R (Eq. 20);
- xt (TAESD): the UNet call itself runs with grad and R's gradient flows back through it to x_t (the paper's
  form); the step uses the x0-hat of that call, so no second UNet forward is made (as in the WebUI).
The encoders are the extension's defaults (CLIP ViT-B/32 image tower, DINO ViT-S/16) with random weights;
R is scored against two random reference images.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from . import models
from .timing import Case

CFG_SCALE = 7.0
ALPHA_CUMPROD = 0.5   # a mid-schedule step; the value changes no cost


@dataclass
class GuidanceModels:
    taesd: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    dino: torch.nn.Module


def build_models(clip_arch: str = "ViT-B-32", device="cpu", dtype=torch.float32) -> GuidanceModels:
    return GuidanceModels(models.taesd(device=device, dtype=dtype), models.sd_vae(device=device, dtype=dtype),
                          models.clip_image_encoder(clip_arch, device=device, dtype=dtype),
                          models.dino_image_encoder(device=device, dtype=dtype))


def scorer(gm: GuidanceModels, size: int, device="cpu"):
    """The paper's R (Eq. 16-19) against two random reference images of `size` pixels."""
    from lib_dynfuse.guidance import paper_scorer
    g = torch.Generator().manual_seed(5)
    content = torch.rand(1, 3, size, size, generator=g).to(device)
    style = torch.rand(1, 3, size, size, generator=g).to(device)
    return paper_scorer(gm.clip, gm.dino, content, style)


def refiners(gm: GuidanceModels, size: int, device="cpu") -> Dict[str, object]:
    from lib_dynfuse.guidance import LatentRefiner, vae_decoder
    score = scorer(gm, size, device)
    taesd, vae = vae_decoder(gm.taesd), vae_decoder(gm.vae)
    return {"x0_taesd": LatentRefiner(taesd, score, 10.0, grad="x0"),
            "x0_vae": LatentRefiner(vae, score, 10.0, grad="x0"),
            "xt_taesd": LatentRefiner(taesd, score, 10.0, grad="xt")}


def x0_of(unet, inputs: Dict, x_t: torch.Tensor) -> torch.Tensor:
    """x0-hat of one CFG step for latent x_t [1,4,h,w]: the UNet on [x_t, x_t] (cond, uncond rows)."""
    eps = unet(**dict(inputs, sample=torch.cat([x_t, x_t]))).sample
    cond, uncond = eps.chunk(2)
    eps = uncond + CFG_SCALE * (cond - uncond)
    from lib_dynfuse.guidance import eps_to_x0
    return eps_to_x0(x_t, eps, torch.tensor(ALPHA_CUMPROD, device=x_t.device))


def step_cases(unet, inputs: Dict, refine: Dict[str, object], names: List[str],
               scope: Callable = contextlib.nullcontext) -> List[Case]:
    """Cases "step_off" plus the guided steps in `names`, each a full sampling step, all inside `scope`."""
    x_t = inputs["sample"][:1].clone()

    def off(_r: int) -> None:
        with torch.inference_mode():
            x0_of(unet, inputs, x_t)

    def guided_x0(name: str):
        def call(_r: int) -> None:
            with torch.inference_mode():
                x0 = x0_of(unet, inputs, x_t)
                refine[name].move(refine[name].grad_x0(x0))
        return call

    def guided_xt(name: str):
        def call(_r: int) -> None:
            with torch.inference_mode():
                _, info = refine[name].grad_xt(x_t, lambda x: x0_of(unet, inputs, x))
                refine[name].move(info)
        return call

    cases = [Case("step_off", off, scope)]
    for name in names:
        call = guided_xt(name) if name.startswith("xt") else guided_x0(name)
        cases.append(Case(f"step_{name}", call, scope, floor="step_off"))
    return cases


def reference_render(unet, inputs: Dict, lora, decoder, steps: int) -> Callable[[], List[torch.Tensor]]:
    """A reference render for ReferenceCache (Eq. 14-15): `steps` Euler-like UNet steps with one LoRA, decoded."""
    from lib_dynfuse import fuse

    def render() -> List[torch.Tensor]:
        x = inputs["sample"][:1].clone()
        with fuse(unet, lora, None, method="merge") as session, torch.inference_mode():
            for i in range(steps):
                session.set_step(i, steps)
                x = x0_of(unet, inputs, x)
            return [decoder(x)]
    return render


def reference_seconds(unet, inputs: Dict, loras, gm: GuidanceModels, steps: int) -> Dict[str, float]:
    """Seconds to get both references on a first generation (two renders) and on a second one (cache hits)."""
    from lib_dynfuse.guidance import ReferenceCache, ReferenceKey, vae_decoder
    cache = ReferenceCache()
    decoder = vae_decoder(gm.vae)
    size = inputs["sample"].shape[-1] * 8
    out: Dict[str, float] = {}
    for label in ("first", "cached"):
        t0 = time.perf_counter()
        for role, lora in zip(("subject", "style"), loras):
            key = ReferenceKey(role, "bench-unet", ((lora.sha256, 1.0),), f"{role} prompt", 1, size, size,
                               "euler", steps)
            cache.get_or_render(key, reference_render(unet, inputs, lora, decoder, steps))
        out[label] = time.perf_counter() - t0
    out["renders"], out["hits"] = float(cache.renders), float(cache.hits)
    return out
