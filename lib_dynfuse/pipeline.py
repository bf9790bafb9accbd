"""`fuse_pipeline`: two LoRAs fused on a diffusers Stable Diffusion / SDXL pipeline, its steps and rows wired.

    from lib_dynfuse import load_lora, fuse_pipeline
    with fuse_pipeline(pipe, load_lora("subject.safetensors"), load_lora("style.safetensors"), method="klora") as session:
        image = pipe("a photo of sks dog", num_inference_steps=30).images[0]
    session.heatmap()

A plain `pipe(...)` call is enough (the call's own `callback_on_step_end` stays the user's). How the session learns
what the pipelines' loops know (diffusers 0.30.3, pipeline_stable_diffusion.py:989-1014 and the SDXL, img2img and
inpaint pipelines alike):
- step: a forward pre-hook on `pipe.unet`. The loops call the UNet exactly once per entry of the timesteps they
  run (`for i, t in enumerate(timesteps): ... self.unet(...)`) and every call sets the scheduler's timesteps
  anew (`retrieve_timesteps` -> `scheduler.set_timesteps`, a new tensor), so the UNet calls since
  `pipe.scheduler.timesteps` was last replaced are the loop index i; total is `pipe._num_timesteps`, the length
  of the timesteps the loop runs, set before the loop (img2img: what its strength leaves; SDXL `denoising_end`:
  the steps before the cut; second-order schedulers: their interleaved timesteps). So set_step(i, total) is in
  effect for step i's UNet call, step 0's included.
- rows: with classifier-free guidance the UNet batch is [negative rows; positive rows] (`torch.cat([negative_
  prompt_embeds, prompt_embeds])`, :939-940), labelled uncond then cond. `pipe.do_classifier_free_guidance` is
  read at every call, so a callback that turns guidance off mid-run (diffusers' SDCFGCutoffCallback) is followed.
- the text encoders (SDXL: both) are fused too, as in a WebUI (K-LoRA: progress 0, the prompt is encoded first).
Nothing reads a tensor's value on the host in these hooks: the step comes from counts and Python attributes.

Latent refinement (paper Sec. 4.2, Eq. 20 with the x0 gradient): `guidance=LatentRefiner(...)`. A forward hook on
the UNet corrects the step's combined prediction p = p_u + s (p_c - p_u) (eps or v) as `refiner.correct_eps` /
`correct_v` would, and adds the shift d to both halves, which moves the pipeline's combination by exactly d
((1 - s) d + s d = d). The UNet input is x_t in DDPM scaling for every scheduler (Euler-type schedulers divide by
sqrt(sigma^2 + 1) first), with alpha-bar 1 / (1 + sigma^2) of the scheduler's own sigma for the step (schedulers
with `sigmas`), else `alphas_cumprod[t]`. Not supported (a clear error at the first guided step): the x_t gradient
(it would have to move the pipeline's own latents, which the UNet never sees), `guidance_rescale > 0` (not linear
in the prediction), KDPM2 schedulers (their second stage uses interpolated sigmas), other prediction types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

import torch

from .guidance import conversions as cv
from .session import FuseSession, fuse

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
             "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_supported_pipeline(pipe: Any) -> bool:
    """A diffusers pipeline (or a subclass) whose loop is the one described in the module doc."""
    return any(cls.__name__ in SUPPORTED for cls in type(pipe).__mro__)


def cfg_row_labels(rows: int, cfg: bool) -> List[str]:
    """Labels of a UNet batch: [uncond rows; cond rows] under classifier-free guidance, else every row cond."""
    if cfg and rows % 2 == 0:
        return ["uncond"] * (rows // 2) + ["cond"] * (rows // 2)
    return ["cond"] * rows


def step_alpha_cumprod(scheduler: Any, timestep: torch.Tensor) -> torch.Tensor:
    """alpha-bar of the noise level of the step's UNet input: 1 / (1 + sigma^2) for the sigma the scheduler uses
    at its step index (Euler, Heun, LMS, DPM-Solver, UniPC), else alphas_cumprod[t] (DDIM, DDPM, PNDM, LCM)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        if index is None:   # multistep schedulers set it in their first step(), after this call
            index = getattr(scheduler, "begin_index", None) or 0
        return cv.sigma_to_alpha_cumprod(sigmas[index].float()).to(timestep.device)
    alphas = scheduler.alphas_cumprod.to(timestep.device)
    return alphas[timestep.long()].float()


def guidance_problem(pipe: Any, refiner: Any) -> str:
    """Why the refiner cannot run on this pipeline's loop ('' = it can); see the module doc."""
    if refiner.grad != "x0":
        return ("fuse_pipeline runs the latent refinement with the x0 gradient only (grad='x0'); the x_t gradient "
                "would have to move the pipeline's latents, which the UNet never sees")
    if hasattr(pipe.scheduler, "sigmas_interpol"):
        return f"{type(pipe.scheduler).__name__} samples its second stage at interpolated sigmas; use another scheduler"
    kind = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        return f"the scheduler's prediction_type {kind!r} is not eps or v"
    if getattr(pipe, "do_classifier_free_guidance", False) and float(getattr(pipe, "guidance_rescale", 0.0) or 0.0) > 0:
        return "guidance_rescale > 0 is not linear in the prediction; use guidance_rescale=0 with the refinement"
    return ""


@dataclass
class GuidedStep:
    step: int
    total: int
    residual: float      # mean R over the images before the move (paper Eq. 19)


class PipelineFusion:
    """A FuseSession on `pipe` plus the hooks on `pipe.unet` that feed it steps and row labels (module doc).

    Context manager; the FuseSession's results are reachable on it (`selection`, `record`, `heatmap()`, ...).
    `steps` lists (step, total) per UNet call; `guidance_log` the refiner's corrections.
    """

    def __init__(self, pipe: Any, session: FuseSession, guidance: Any = None):
        self.pipe, self.session, self.guidance = pipe, session, guidance
        self.steps: List[Tuple[int, int]] = []
        self.guidance_log: List[GuidedStep] = []
        self._handles: list = []
        self._schedule: Any = None
        self._calls = 0
        self._step = (0, 1)

    def __enter__(self) -> "PipelineFusion":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        session = self.__dict__.get("session")
        if session is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(session, name)

    def open(self) -> "PipelineFusion":
        """The session's hooks, then ours on the UNet (all undone if anything fails)."""
        self.session.open()
        try:
            unet = self.pipe.unet
            self._handles.append(unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
            if self.guidance is not None:
                self._handles.append(unet.register_forward_hook(self._after_unet, with_kwargs=True))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Our hooks off, then the session closed (hooks off, baked weights restored); idempotent."""
        handles, self._handles = self._handles, []
        try:
            for h in handles:
                h.remove()
        finally:
            self.session.close()

    # ------------------------------------------------------------------ hooks
    def _cfg(self) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _before_unet(self, module, args, kwargs):
        """Step i of the loop and the rows' labels, before the UNet's layers run."""
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is not self._schedule:   # set_timesteps ran: a new pipeline call
            self._schedule, self._calls = timesteps, 0
        total = int(getattr(self.pipe, "_num_timesteps", 0) or 0) or (len(timesteps) if timesteps is not None else 1)
        step = min(self._calls, total - 1)
        self._calls += 1
        self._step = (step, total)
        self.steps.append(self._step)
        self.session.set_step(step, total)
        sample = args[0] if args else kwargs["sample"]
        self.session.set_row_labels(cfg_row_labels(sample.shape[0], self._cfg()))
        return None

    def _after_unet(self, module, args, kwargs, output):
        """The refiner's x0 correction of the combined prediction, as a shift of both CFG halves."""
        step, total = self._step
        refiner = self.guidance
        if not refiner.active(step, total):
            return None
        problem = guidance_problem(self.pipe, refiner)
        if problem:
            raise ValueError(f"DynFuse: {problem}")
        pred = output[0] if isinstance(output, tuple) else output.sample
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        cfg = self._cfg() and pred.shape[0] % 2 == 0
        x_t = sample[:, :pred.shape[1]]            # inpainting UNets also take the mask and the masked image
        if cfg:
            uncond, cond = pred.chunk(2)
            combined, x_t = uncond + self.pipe.guidance_scale * (cond - uncond), x_t.chunk(2)[1]
        else:
            combined = pred
        alpha = step_alpha_cumprod(self.pipe.scheduler, torch.as_tensor(timestep, device=pred.device))
        if getattr(self.pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction":
            new, info = refiner.correct_v(x_t, combined, alpha)
        else:
            new, info = refiner.correct_eps(x_t, combined, alpha)
        shift = (new - combined).to(pred.dtype)
        moved = pred + (torch.cat([shift, shift]) if cfg else shift)
        self.guidance_log.append(GuidedStep(step, total, float(info.residual.mean())))
        if isinstance(output, tuple):
            return (moved,) + tuple(output[1:])
        output.sample = moved
        return output


def fuse_pipeline(pipe: Any, subject, style, method: str = "dynamic", criterion: str = "kl", guidance: Any = None,
                  **session_kwargs) -> PipelineFusion:
    """`fuse` on pipe.unet and the pipeline's text encoders, with steps and cond/uncond rows wired (module doc).

    guidance: an optional LatentRefiner (x0 gradient) applied at every step it is active for.
    session_kwargs: as for `fuse` (klora_alpha, klora_beta, klora_scale, te_mode, record, weight_space, ...).
    """
    if not is_supported_pipeline(pipe):
        raise TypeError(f"DynFuse: fuse_pipeline takes a diffusers {', '.join(SUPPORTED)} (or a subclass), got "
                        f"{type(pipe).__name__}; for another loop use fuse(pipe.unet, ...) and call "
                        "session.set_step(i, total) and session.set_row_labels(...) from it")
    encoders = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    session = fuse(pipe.unet, subject, style, method=method, criterion=criterion,
                   text_encoders=encoders if any(e is not None for e in encoders) else None, **session_kwargs)
    return PipelineFusion(pipe, session, guidance)
