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
  `pipe.scheduler.timesteps` was last replaced are the loop index i of `pipe._num_timesteps`, the length of the
  timesteps the loop runs, set before the loop (img2img: what its strength leaves; SDXL `denoising_end`: the
  steps before the cut; second-order schedulers: their interleaved timesteps). The session gets the progress
  through the scheduler's whole schedule (`schedule_progress`: img2img runs its tail, so it starts part-way), in
  effect for step i's UNet call, step 0's included.
- rows: with classifier-free guidance the UNet batch is [negative rows; positive rows] (`torch.cat([negative_
  prompt_embeds, prompt_embeds])`, :939-940), labelled uncond then cond. `pipe.do_classifier_free_guidance` is
  read at every call, so a callback that turns guidance off mid-run (diffusers' SDCFGCutoffCallback) is followed.
- the text encoders (SDXL: both) are fused too, as in a WebUI (K-LoRA: progress 0, the prompt is encoded first).
Nothing reads a tensor's value on the host in these hooks: the step comes from counts and Python attributes.

Latent refinement (paper Sec. 4.2, Eq. 20 with the x0 gradient): `guidance=LatentRefiner(...)`. A forward hook on
the UNet takes the step's combined prediction p = p_u + s (p_c - p_u) (eps or v) to x0-hat and the gradient of R
to x_t (`refiner.move_eps` / `move_v`); the UNet's output stays as it is. The move -m grad is added to what
`pipe.scheduler.step` returns, x_{t-1}, for the time of the call (an instance wrapper on the scheduler), in the
scheduler's latent scale: 1 / scale_model_input (Euler-type schedulers keep x_t sqrt(sigma^2 + 1)). So m is in
the paper's x_t units for every scheduler, multistep ones keep the model's own predictions, and a second-order
scheduler (`state_in_first_order`) is corrected at its first stage and moved after its second. The UNet input is
x_t in DDPM scaling for every scheduler, with alpha-bar 1 / (1 + sigma^2) of the scheduler's own sigma for the
step (schedulers with `sigmas`), else `alphas_cumprod[t]`. Not supported (a clear error at the first guided
step): the x_t gradient (the pipeline's UNet call would have to run with gradients, which hooks cannot arrange),
`guidance_rescale > 0` (not linear in the prediction), KDPM2 schedulers (interpolated sigmas), other
prediction types.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .guidance import conversions as cv
from .guidance.step import GuidedStep, apply_move, skipped_steps
from .fuse_model import fuse
from .session import FuseSession

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
                "needs the pipeline's UNet call run with gradients, which hooks cannot arrange")
    if hasattr(pipe.scheduler, "sigmas_interpol"):
        return f"{type(pipe.scheduler).__name__} samples its second stage at interpolated sigmas; use another scheduler"
    kind = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        return f"the scheduler's prediction_type {kind!r} is not eps or v"
    if getattr(pipe, "do_classifier_free_guidance", False) and float(getattr(pipe, "guidance_rescale", 0.0) or 0.0) > 0:
        return "guidance_rescale > 0 is not linear in the prediction; use guidance_rescale=0 with the refinement"
    return ""


def schedule_progress(step: int, steps: int, schedule: int, denoising_end: Any = None) -> Tuple[int, int]:
    """(step, total) through the scheduler's whole schedule of `schedule` entries for step `step` of the `steps`
    the loop runs: img2img and inpaint (strength, SDXL `denoising_start`) run its tail
    (get_timesteps: `timesteps[t_start * order:]`), SDXL's `denoising_end` its head, txt2img all of it. K-LoRA's
    t_now / t_all (Eq. 7) counts the whole backward process, so a tail starts part-way, not at 0."""
    schedule = max(int(schedule), int(steps))
    skipped = 0 if denoising_end is not None else schedule - int(steps)
    return skipped + int(step), schedule


def latent_scale(scheduler: Any, timestep: Any, like: torch.Tensor) -> torch.Tensor:
    """d latents / d x_t after `scheduler.step`: 1 / scale_model_input at the step index it has moved on to
    (Euler-type: sqrt(sigma_next^2 + 1), 1 at the end; DDIM, DPM-Solver, UniPC: 1)."""
    one = torch.ones((1,) * like.dim(), dtype=cv.wide_dtype(like.dtype), device=like.device)
    return 1.0 / scheduler.scale_model_input(one, timestep)


class PipelineFusion:
    """A FuseSession on `pipe` plus the hooks on `pipe.unet` that feed it steps and row labels (module doc).

    Context manager; the FuseSession's results are reachable on it (`selection`, `record`, `heatmap()`, ...).
    `steps` lists (step, total) per UNet call; `guidance_log` the refiner's corrections (GuidedStep, read after
    the call).
    """

    def __init__(self, pipe: Any, session: FuseSession, guidance: Any = None):
        self.pipe, self.session, self.guidance = pipe, session, guidance
        self.steps: List[Tuple[int, int]] = []
        self.guidance_log: List[GuidedStep] = []
        self._handles: list = []
        self._wrapped: List[Tuple[Any, Any]] = []     # (scheduler, our step) while open
        self._pending: Optional[Tuple[torch.Tensor, GuidedStep]] = None
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
        wrapped, self._wrapped = self._wrapped, []
        self._pending = None
        try:
            for h in handles:
                h.remove()
            for scheduler, ours in wrapped:
                if scheduler.__dict__.get("step") is ours:
                    del scheduler.__dict__["step"]
        finally:
            self.session.close()

    def skipped_steps(self) -> List[int]:
        """Steps whose move some image did not take (a NaN/Inf gradient or moved latent)."""
        return skipped_steps(self.guidance_log)

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
        progress = schedule_progress(step, total, len(timesteps) if timesteps is not None else total,
                                     getattr(self.pipe, "_denoising_end", None))
        self.steps.append(progress)
        self.session.set_step(*progress)
        sample = args[0] if args else kwargs["sample"]
        self.session.set_row_labels(cfg_row_labels(sample.shape[0], self._cfg()))
        return None

    def _after_unet(self, module, args, kwargs, output):
        """grad_{x_t} R of the combined prediction (x0 gradient), queued as the move of this step's x_{t-1}."""
        step, total = self._step
        refiner, scheduler = self.guidance, self.pipe.scheduler
        if not refiner.active(step, total) or not getattr(scheduler, "state_in_first_order", True):
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
        alpha = step_alpha_cumprod(scheduler, torch.as_tensor(timestep, device=pred.device))
        if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
            move, info = refiner.move_v(x_t, combined, alpha)
        else:
            move, info = refiner.move_eps(x_t, combined, alpha)
        entry = GuidedStep(step, total, info.residual)
        self.guidance_log.append(entry)
        self._pending = (move, entry)
        self._wrap_step(scheduler)
        return None

    def _wrap_step(self, scheduler: Any) -> None:
        """`scheduler.step` returns x_{t-1} with the queued move (for the time the fusion is open)."""
        if any(s is scheduler for s, _ in self._wrapped):
            return
        step = scheduler.step

        def step_then_move(model_output, timestep, sample, *args, **kwargs):
            out = step(model_output, timestep, sample, *args, **kwargs)
            if self._pending is None or not getattr(scheduler, "state_in_first_order", True):
                return out
            move, entry = self._pending
            self._pending = None
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            moved, entry.moved = apply_move(prev, move, latent_scale(scheduler, timestep, prev))
            if isinstance(out, tuple):
                return (moved,) + tuple(out[1:])
            out.prev_sample = moved
            return out
        scheduler.__dict__["step"] = step_then_move
        self._wrapped.append((scheduler, step_then_move))


def fuse_pipeline(pipe: Any, subject, style, method: str = "merge", criterion: str = "kl", guidance: Any = None,
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
