"""AUTOMATIC1111 v1.10 side of the latent refinement (guidance_run.py): references, decoder, denoiser, settings.

Host facts (upstream 82a973c0) this relies on:
- Script.process runs before `with torch.no_grad()` (processing.py:914-919); seeds are known (:901-909).
- A nested `process_images(p2)` with `p2.scripts = None` runs no script hook (every call is guarded by
  `if p.scripts is not None`); class-level cond caches are replaced by fresh lists on p2 (processing.py:188-189).
- Progress (modules/progress.py:102-108): job_no / job_count + sampling_step / sampling_steps / job_count; each
  batch of a processing run ends with state.nextjob() (job_no += 1, processing.py:1014, shared_state.py:87-93);
  the first run fills `job_count == -1` with n_iter (:929-930) and txt2img hires doubles it once, setting
  shared.total_tqdm's total to the steps of both passes (:1290-1299); otherwise the console's total progress
  bar takes job_count * sampling_steps at its first step (shared_total_tqdm.py:8-14). `count_reference_jobs`
  settles these before the first reference render, so each render is one job of the same bar.
- The CFG denoiser is an nn.Module, `p.sampler.model_wrap_cfg`, called as forward(x, sigma, uncond, cond,
  cond_scale, s_min_uncond, image_cond) (sd_samplers_cfg_denoiser.py:33, :156) with the sampler's own x
  (k-diffusion: `model(x, sigmas[i] * s_in, **extra_args)`; DDIM/PLMS/UniPC: sd_samplers_timesteps_impl.py:25,
  :64, :114), its call counter `step`, `steps` and `total_steps` (sd_samplers_common.py:265-291); it returns x0
  for k-diffusion samplers and eps for CFGDenoiserTimesteps (DDIM/PLMS/UniPC: sd_samplers_timesteps.py:48-72,
  `alphas` = sd_model.alphas_cumprod). The pass's result comes from `p.sampler.sample` / `sample_img2img`
  (processing.py:1346, :1454, :1774), a new sampler per pass (:1308, :1386, :1607).
- First stage: `sd_model.first_stage_model.decode(z / sd_model.scale_factor)` in [-1,1]; TAESD:
  `sd_vae_taesd.decoder_model()` maps UNet latents to [0,1] (sd_vae_taesd.py:97-119) but downloads a missing
  file, so it is used only when models/VAE-taesd/<name> is on disk.
Host modules are imported inside functions only.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..guidance import LatentDecoder, taesd_decoder, vae_decoder
from ..guidance.triggers import trigger_words
from ..layer_delta import FuseTarget

log = logging.getLogger("dynfuse")

SECTION = ("dynfuse", "DynFuse")
OPTIONS = {   # key -> (default, label)
    "dynfuse_clip_arch": ("ViT-B-32", "DynFuse guidance: CLIP architecture (open_clip name; ViT-L-14 scores finer, at ~18x the cost)"),
    "dynfuse_clip_weights": ("", "DynFuse guidance: CLIP weights file or folder (empty: models/dynfuse, then the hub cache)"),
    "dynfuse_dino_kind": ("dino-vits16", "DynFuse guidance: DINO model (dino-vits16, dino-vitb16, dinov2-small, dinov2-base)"),
    "dynfuse_dino_weights": ("", "DynFuse guidance: DINO weights file or folder (empty: models/dynfuse, then the hub cache)"),
    "dynfuse_show_references": (False, "DynFuse guidance: add the rendered references to the gallery"),
    "dynfuse_score_clip_arch": ("", "DynFuse scores: CLIP architecture (empty: the guidance one; another one keeps "
                                    "guided images from scoring high only because they were guided)"),
    "dynfuse_score_clip_weights": ("", "DynFuse scores: CLIP weights file or folder (empty: as for guidance)"),
    "dynfuse_score_dino_kind": ("", "DynFuse scores: DINO model (empty: the guidance one)"),
    "dynfuse_score_dino_weights": ("", "DynFuse scores: DINO weights file or folder (empty: as for guidance)"),
}
TAESD_FILES = (("is_sd3", "taesd3_decoder.pth"), ("is_sdxl", "taesdxl_decoder.pth"))


def on_ui_settings() -> None:
    """script_callbacks.on_ui_settings: the guidance weight paths (shared.opts, options.py:256)."""
    from modules import shared
    for key, (default, label) in OPTIONS.items():
        shared.opts.add_option(key, shared.OptionInfo(default, label, section=SECTION))


def option(key: str) -> Any:
    from modules import shared
    return getattr(shared.opts, key, OPTIONS[key][0])


def taesd_file(sd_model: Any, models_path: str) -> str:
    """Where the host keeps the TAESD decoder for this model family (sd_vae_taesd.py:98-110)."""
    name = next((f for attr, f in TAESD_FILES if getattr(sd_model, attr, False)), "taesd_decoder.pth")
    return os.path.join(models_path, "VAE-taesd", name)


class A1111Guidance:
    """GuidanceHost for AUTOMATIC1111 v1.10 (contract in guidance_run.py)."""

    def __init__(self, host: Any):
        self.host = host

    # ------------------------------------------------------------------ references
    def reference_settings(self, p: Any) -> Dict[str, Any]:
        sd_model = p.sd_model
        info = getattr(sd_model, "sd_checkpoint_info", None)
        prompt = p.prompt if isinstance(p.prompt, str) else (p.prompt or [""])[0]
        negative = p.negative_prompt if isinstance(p.negative_prompt, str) else (p.negative_prompt or [""])[0]
        seeds = getattr(p, "all_seeds", None) or [p.seed]
        return dict(model_hash=getattr(info, "shorthash", None) or getattr(sd_model, "sd_model_hash", "") or "",
                    prompt=prompt, negative_prompt=negative, seed=int(seeds[0]), width=int(p.width),
                    height=int(p.height), sampler=str(p.sampler_name), steps=int(p.steps),
                    cfg_scale=float(p.cfg_scale), extra=(str(getattr(p, "scheduler", "") or ""),))

    def nested_processing(self, p: Any, prompt: str, steps: int) -> Any:
        """p2 for one reference: same seed, size, sampler, scheduler, CFG; no scripts, saving or grid."""
        from modules import processing
        s = self.reference_settings(p)
        p2 = processing.StableDiffusionProcessingTxt2Img(
            sd_model=p.sd_model, prompt=prompt, negative_prompt=s["negative_prompt"], seed=s["seed"],
            subseed=-1, sampler_name=p.sampler_name, scheduler=getattr(p, "scheduler", None), steps=steps,
            cfg_scale=p.cfg_scale, width=p.width, height=p.height, batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True, override_settings={})
        p2.scripts = None
        p2.cached_c, p2.cached_uc = [None, None], [None, None]
        p2.dynfuse_reference = True
        return p2

    def count_reference_jobs(self, p: Any, render_steps: Sequence[int]) -> None:
        """Before the renders: job_count and the console's total include them (one job per render, whose
        nested run ends with its own nextjob), and the main run's own count is settled now as the host would."""
        from modules import shared
        state = shared.state
        jobs, main_steps, refined = main_job_plan(
            state.job_count, state.processing_has_refined_job_count, int(p.n_iter), int(p.steps),
            hires=bool(getattr(p, "enable_hr", False)) and hasattr(p, "hr_second_pass_steps"),
            hr_steps=int(getattr(p, "hr_second_pass_steps", 0) or 0),
            upscale_only=bool(getattr(p, "txt2img_upscale", False)))
        state.job_count = jobs + len(render_steps)
        state.processing_has_refined_job_count = refined
        tqdm = shared.total_tqdm
        if main_steps is not None:
            tqdm.updateTotal(main_steps + sum(render_steps))
        elif getattr(tqdm, "_tqdm", None) is not None:   # a total another script set (x/y/z plot): add ours
            tqdm.updateTotal(tqdm._tqdm.total + sum(render_steps))

    def render_reference(self, p: Any, prompt: str, steps: int, targets: List[FuseTarget], args: Any) -> Optional[Any]:
        """One nested generation with only this LoRA's deltas through our hooks; None when interrupted/skipped.
        It counts as one job (count_reference_jobs planned it; its batch loop's nextjob advances job_no)."""
        from modules import processing, shared
        from ..session import FuseSession
        state = shared.state
        p2 = self.nested_processing(p, prompt, steps)
        try:
            with FuseSession(targets, method="merge", record=False, te_mode=args.text_encoder):
                processed = processing.process_images(p2)
        finally:
            p2.close()
        if state.interrupted or state.skipped or not processed.images:
            return None
        return processed.images[0]

    def trigger_words(self, lora: str) -> List[str]:
        """From the LoRA list entry's safetensors metadata (NetworkOnDisk.metadata, network.py:24-47) and the user
        metadata beside the file (extra_networks.get_user_metadata, extra_networks.py:209-225: "activation text",
        what the card's metadata editor saves, ui_edit_user_metadata.py:59-68)."""
        from modules import extra_networks
        on_disk = self.host._on_disk(lora)
        user = extra_networks.get_user_metadata(getattr(on_disk, "filename", None))
        return trigger_words(getattr(on_disk, "metadata", None) or {}, user)

    # ------------------------------------------------------------------ encoders and decoder
    def models_dir(self) -> str:
        from modules import paths
        return os.path.join(paths.models_path, "dynfuse")

    def encoder_settings(self) -> Dict[str, Any]:
        from modules import devices
        return dict(clip_arch=option("dynfuse_clip_arch"), clip_weights=option("dynfuse_clip_weights") or None,
                    dino_kind=option("dynfuse_dino_kind"), dino_weights=option("dynfuse_dino_weights") or None,
                    search_dirs=(self.models_dir(),), device=devices.device, dtype=torch.float32)

    def score_encoder_settings(self) -> Dict[str, Any]:
        """encoder_settings with the score options that are set (an architecture of its own drops the guidance
        weights path, which belongs to the guidance architecture)."""
        settings = self.encoder_settings()
        for arch, weights in (("clip_arch", "clip_weights"), ("dino_kind", "dino_weights")):
            own_arch = option(f"dynfuse_score_{arch}")
            own_weights = option(f"dynfuse_score_{weights}") or None
            if own_arch:
                settings[arch], settings[weights] = own_arch, own_weights
            elif own_weights:
                settings[weights] = own_weights
        return settings

    def decoder(self, p: Any, kind: str) -> Tuple[torch.nn.Module, str]:
        """TAESD when asked ('taesd') or available ('auto') and on disk; else the full first stage."""
        sd_model = p.sd_model
        note = ""
        if kind in ("auto", "taesd"):
            from modules import paths
            path = taesd_file(sd_model, paths.models_path)
            if os.path.isfile(path):
                from modules import sd_vae_taesd
                return taesd_decoder(sd_vae_taesd.decoder_model()), ""
            if kind == "taesd":
                note = f"DynFuse guidance: no TAESD decoder at {path} (nothing is downloaded); using the full VAE"
        return vae_decoder(sd_model.first_stage_model, scaling_factor=float(sd_model.scale_factor)), note

    # ------------------------------------------------------------------ sampling
    def denoiser(self, p: Any) -> Optional[torch.nn.Module]:
        return getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)

    def space(self, p: Any, denoiser: Any) -> str:
        """CFGDenoiserTimesteps (it has `alphas`, sd_samplers_timesteps.py:56-64) returns eps and samples DDPM-scaled
        x; the k-diffusion denoisers return x0 and sample x = x0 + sigma eps (sd_samplers_kdiffusion.py:52-64), SD3's
        the flow latent x = (1 - sigma) x0 + sigma noise (models/sd3/sd3_impls.py:41-46, `is_sd3`)."""
        if type(denoiser).__name__ == "CFGDenoiserTimesteps" or hasattr(denoiser, "alphas"):
            return "ddpm"
        return "flow" if getattr(getattr(p, "sd_model", None), "is_sd3", False) else "k"

    def alphas_cumprod(self, p: Any, denoiser: Any) -> torch.Tensor:
        alphas = getattr(denoiser, "alphas", None)
        return alphas if alphas is not None else p.sd_model.alphas_cumprod

    def xt_problem(self) -> str:
        return ""

    def show_references(self) -> bool:
        return bool(option("dynfuse_show_references"))


def main_job_plan(job_count: int, refined: bool, n_iter: int, steps: int, hires: bool, hr_steps: int,
                  upscale_only: bool) -> Tuple[int, Optional[int], bool]:
    """(jobs, total sampling steps or None, refined) of the main run, as the host would settle them:
    job_count -1 -> n_iter (processing.py:929-930); txt2img hires, once: total = (steps + hires steps) * jobs
    (hires steps only for txt2img_upscale), jobs doubled (:1290-1299). None: the host would not set the total."""
    jobs = n_iter if job_count == -1 else job_count
    if hires and not refined:
        second = hr_steps or steps
        return jobs * 2, (second if upscale_only else steps + second) * jobs, True
    if job_count == -1:
        return jobs, steps * jobs, refined    # what total_tqdm would take at its first step (sampling_steps = steps)
    return jobs, None, refined


def first_stage(decoder: LatentDecoder) -> torch.nn.Module:
    """The module a LatentDecoder decodes with (tests compare it with the host's)."""
    return decoder.module
