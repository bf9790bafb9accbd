"""Eq. 20 on one sampling pass of a WebUI generation: x_{t-1} = x_{t-1}^ori - m grad_{x_t} R (guidance_run.py).

The pass's CFG denoiser gets an instance `forward` and its sampler instance `sample` / `sample_img2img`, all
removed by `detach` (each only where it is still ours). The denoiser is called by the sampler as
`denoiser(x, sigma, **extra_args)` with the sampler's own x (k-diffusion; DDIM/PLMS/UniPC pass the timestep as
`sigma`): at the first call of a step the gradient is taken (from its output, or through the call itself for
"xt"), and the move is added to x in place at the first call of the next step, converted to the sampler's
variable; the last step's move is added to what the pass returns.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..guidance import conversions as cv
from ..guidance.step import GuidedStep, apply_move


def call_position(denoiser: Any) -> Tuple[int, int, bool]:
    """(sampler step, steps of the pass, first call of its step?) of the denoiser's next call: its call counter
    `step` (incremented at the end of forward, sd_samplers_cfg_denoiser.py:310), `steps` and `total_steps` =
    steps x calls per step (2 for second-order samplers, whose last step makes one; sd_samplers_common.py:15-19,
    :265-269). PLMS makes one uncounted extra call in its first step (sd_samplers_timesteps_impl.py:114-120):
    that step's move lands on its temporary latent and the later steps count one late."""
    call = int(getattr(denoiser, "step", 0) or 0)
    calls = int(getattr(denoiser, "total_steps", 0) or 0)
    steps = int(getattr(denoiser, "steps", 0) or 0)
    per_step = calls // steps if steps and calls >= steps else 1
    return call // per_step, (steps if steps else max(calls, call + 1)), call % per_step == 0


class PassCorrection:
    """The correction state of one pass: its wrappers and the move of the last step, not yet applied."""

    def __init__(self, grun: Any, denoiser: torch.nn.Module, sampler: Any = None):
        self.grun, self.refiner, self.host, self.p = grun, grun.refiner, grun.host, grun.p
        self.denoiser, self.space = denoiser, grun.host.space(grun.p, denoiser)
        self.pending: Optional[Tuple[torch.Tensor, GuidedStep]] = None
        self._wrapped: List[Tuple[Any, str, Any, Any]] = []   # (object, attribute, ours, its own before)
        forward = denoiser.forward

        def guided_forward(*args, **kwargs):
            return self._call(forward, args, kwargs)
        self._wrap(denoiser, "forward", guided_forward)
        for name in ("sample", "sample_img2img"):
            method = getattr(sampler, name, None) if sampler is not None else None
            if callable(method):
                self._wrap(sampler, name, self._sample_then_move(method))

    def _wrap(self, obj: Any, name: str, ours: Callable) -> None:
        own = obj.__dict__.get(name)
        object.__setattr__(obj, name, ours)
        self._wrapped.append((obj, name, ours, own))

    def _sample_then_move(self, sample: Callable) -> Callable:
        def sample_guided_pass(*args, **kwargs):
            return self._finish_pass(sample(*args, **kwargs))
        return sample_guided_pass

    def detach(self) -> None:
        """The wrappers gone (each only where it is still ours); a move not applied is dropped."""
        wrapped, self._wrapped = self._wrapped, []
        for obj, name, ours, own in reversed(wrapped):
            if obj.__dict__.get(name) is ours:
                if own is None:
                    object.__delattr__(obj, name)
                else:
                    object.__setattr__(obj, name, own)
        self.pending = None

    def _call(self, forward: Callable, args: tuple, kwargs: dict):
        """One denoiser call: the last step's move onto x (first call of a step), then this step's gradient."""
        denoiser = self.denoiser
        x = args[0]
        step, steps, first = call_position(denoiser)
        if first and self.pending is not None:
            self._apply_pending(x, args[1])
        if not first or not self.refiner.active(step, steps):
            return forward(*args, **kwargs)
        level = self._level(denoiser, args[1])
        if self.refiner.grad == "xt":
            got = self._xt_call(forward, args, kwargs, level, step)
            if got is not None:
                out, info = got
                self._queue(self.refiner.move(info), GuidedStep(step, steps, info.residual))
                return out
        out = forward(*args, **kwargs)
        x0 = cv.prediction_to_x0(self.space, x, out, level)
        info = self.refiner.grad_x0(x0, cv.x0_gain(self.space, level, x))
        self._queue(self.refiner.move(info), GuidedStep(step, steps, info.residual))
        return out

    def _xt_call(self, forward: Callable, args: tuple, kwargs: dict, level: torch.Tensor, step: int):
        """(output, info) of this call run once with gradients (Eq. 20's grad_{x_t} R), or None after a failure
        (then the run goes on with the x0 gradient, which re-runs this call)."""
        denoiser, x = self.denoiser, args[0]
        differentiable = getattr(self.host, "differentiable", None)
        to_x0 = (lambda z, out: cv.eps_to_x0(z, out, level)) if self.space == "ddpm" else None

        def model_fn(z):
            with (differentiable(self.p, self.grun) if differentiable is not None else contextlib.nullcontext()):
                return forward(z, *args[1:], **kwargs)
        counter = denoiser.step
        try:
            return self.refiner.grad_xt(x, model_fn, to_x0, cv.sampler_x_scale(self.space, level, x))
        except RuntimeError as e:   # e.g. an inpainting mask made under inference mode meets the backward
            denoiser.step = counter
            self.grun.run.note(f"DynFuse guidance: the x_t gradient failed at step {step} ({e}); using the x0 "
                               "gradient from here on", self.p)
            self.refiner.grad = "x0"
            return None

    def _queue(self, move: torch.Tensor, entry: GuidedStep) -> None:
        self.grun.log.append(entry)
        self.pending = (move, entry)

    def _apply_pending(self, x: torch.Tensor, level_in: Any) -> None:
        """x_{t-1} <- x_{t-1} - m grad (Eq. 20), in place on the sampler's own tensor, in its variable."""
        move, entry = self.pending
        self.pending = None
        scale = cv.sampler_x_scale(self.space, self._level(self.denoiser, level_in), move)
        moved, entry.moved = apply_move(x, move, scale)
        x.copy_(moved)

    def _finish_pass(self, samples: Any) -> Any:
        """The pass's result with its last step's move (at sigma 0 the sampler's x is x_t itself)."""
        if self.pending is None or not torch.is_tensor(samples):
            return samples
        move, entry = self.pending
        self.pending = None
        samples, entry.moved = apply_move(samples, move)
        return samples

    def _level(self, denoiser: Any, level_in: Any) -> torch.Tensor:
        """sigma (k), alpha-bar (ddpm: of the timesteps the samplers pass as `sigma`, sd_samplers_timesteps_impl.py:24)
        or t (flow) per row."""
        if self.space != "ddpm":
            return level_in
        alphas = self.host.alphas_cumprod(self.p, denoiser)
        t = level_in.round().long().clamp(0, alphas.shape[0] - 1)
        return alphas.to(t.device)[t].to(cv.wide_dtype(alphas.dtype))
