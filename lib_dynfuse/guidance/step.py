"""The latent correction of paper Eq. 20 (Eq. 7): x_{t-1} = x_{t-1}^ori - m * grad_{x_t} R(x0-hat), and `LatentRefiner`.

m is defined in the paper's x_t scale (the DDPM x_t; see conversions.py): the step's own x_{t-1} moves by
exactly -m * grad in that scale, whatever the sampler, so a sampler only converts the move to its variable.
Two gradients:
- "x0": grad of R w.r.t. x0-hat (decoder + encoders backward only), taken to x_t by the chain rule with the
  model's prediction held fixed (`conversions.x0_gain`);
- "xt": grad w.r.t. x_t through the denoiser (the paper's), from the same forward that gives the step its output.
Every call works on detached clones made outside inference mode, with grad enabled locally: the host may call
it under no_grad (A1111) or inference_mode (Forge); no graph survives and grad mode is left as it was. Nothing
here reads a tensor back to the host: a row whose gradient or moved latent is not finite keeps its latent
(`apply_move`), and the caller reads which rows were skipped when sampling is over.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import conversions as cv
from .decoders import gradient_decoder, make_private_copy  # noqa: F401  (re-exported)
from .score import MetricScorer, ScoreResult

GRADS = ("x0", "xt")


@dataclass
class CorrectionInfo:
    """What one correction saw: R and the similarities before the move, and grad_{x_t} R in the paper's x_t
    scale; tensors stay on their device (read them after sampling)."""
    residual: torch.Tensor
    similarities: Dict[str, torch.Tensor]
    grad: torch.Tensor
    x0: Optional[torch.Tensor] = None     # "xt" mode: the model's x0-hat from the grad-enabled call (detached)

    @property
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the gradient per row."""
        return self.grad.detach().flatten(1).norm(dim=1).float().cpu()


@dataclass
class GuidedStep:
    """One correction of a sampling loop: its step, R per row before the move (on the device), and which rows
    the move reached (None until it is applied). Read after sampling: nothing is synced while it runs."""
    step: int
    total: int
    residual: torch.Tensor
    moved: Optional[torch.Tensor] = None


def skipped_steps(log) -> list:
    """Steps of a GuidedStep log whose move some row did not take (a NaN/Inf gradient or moved latent)."""
    return [e.step for e in log if e.moved is not None and not bool(e.moved.all())]


@contextlib.contextmanager
def grad_scope():
    """Grad on, inference mode off, for the body only; the caller's modes come back on exit."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Score in the decoder's own dtype even when the host samples under autocast (A1111 does)."""
    enabled = torch.is_autocast_enabled() if device_type == "cuda" else False
    if enabled:
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def fresh_leaf(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A detached, normal (non-inference) copy of x that requires grad; call inside grad_scope()."""
    leaf = x.detach().clone()
    if dtype is not None:
        leaf = leaf.to(dtype)
    return leaf.requires_grad_(True)


def score_image_of_latent(x0: torch.Tensor, decoder: Callable, scorer: MetricScorer,
                          image_range: Tuple[float, float] = (0.0, 1.0)) -> ScoreResult:
    """R of decoder(x0) (Eq. 16-19), differentiable; `image_range` is the decoder's output range."""
    with autocast_off(x0.device.type):
        image = decoder(x0)
        lo, hi = image_range
        if (lo, hi) != (0.0, 1.0):
            image = (image - lo) / (hi - lo)
        return scorer(image)


def residual_grad_x0(x0_hat: torch.Tensor, decoder: Callable, scorer: MetricScorer,
                     image_range: Tuple[float, float] = (0.0, 1.0),
                     dtype: Optional[torch.dtype] = None) -> Tuple[ScoreResult, torch.Tensor]:
    """(R per row, d(sum R)/d x0-hat): the gradient w.r.t. the x0 prediction, in x0_hat's dtype or float32."""
    with grad_scope():
        z = fresh_leaf(x0_hat, dtype)
        result = score_image_of_latent(z, decoder, scorer, image_range)
        (grad,) = torch.autograd.grad(result.residual.sum(), z)
        return _detached(result), grad.to(cv.wide_dtype(x0_hat.dtype))


def residual_grad_xt(x_t: torch.Tensor, model_fn: Callable[[torch.Tensor], torch.Tensor], decoder: Callable,
                     scorer: MetricScorer, image_range: Tuple[float, float] = (0.0, 1.0),
                     dtype: Optional[torch.dtype] = None,
                     to_x0: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                     ) -> Tuple[ScoreResult, torch.Tensor, torch.Tensor]:
    """(R per row, d(sum R)/d x_t in x_t's dtype or float32, the model's output): the paper's gradient through one
    call of model_fn.

    model_fn: x_t -> the model's output, x0-hat unless `to_x0(x_t, output)` makes x0-hat of it (an eps model).
    The output comes back detached: the caller samples on with it, so the step needs no second forward."""
    with grad_scope():
        x = fresh_leaf(x_t)
        out = model_fn(x)
        x0 = out if to_x0 is None else to_x0(x, out)
        z = x0 if dtype is None else x0.to(dtype)
        result = score_image_of_latent(z, decoder, scorer, image_range)
        (grad,) = torch.autograd.grad(result.residual.sum(), x)
        return _detached(result), grad.to(cv.wide_dtype(x_t.dtype)), out.detach()


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[B] bool on t's device: rows without NaN or Inf (no host sync)."""
    return torch.isfinite(t).flatten(1).all(dim=1)


def apply_move(x: torch.Tensor, move: torch.Tensor, scale=1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + scale * move where the row stays finite, else the row of x; [B] bool of the rows moved) (Eq. 20).

    `scale` converts the move into x's variable (`conversions.sampler_x_scale`). A NaN/Inf in the gradient, or
    an overflow of the moved latent (fp16), skips that row's correction: never a NaN image."""
    with torch.inference_mode(False), torch.no_grad():
        moved = x + (scale * move).to(x.dtype)
        ok = finite_rows(moved)
        return torch.where(ok.view((-1,) + (1,) * (x.dim() - 1)), moved, x), ok


class LatentRefiner:
    """Eq. 20 for a sampling loop: `active(step, total)`, then a gradient and `move` (or one `move_*` call).

    decoder: latent -> image (a LatentDecoder, whose range is [0,1], or any callable; `image_range` says
    its output range, default (-1,1) for plain callables like `lambda z: vae.decode(z / sf).sample`). A decoder
    module in float16/bfloat16 is copied once to float32: the full VAE's backward overflows in half precision.
    scorer: a MetricScorer (e.g. ReferenceEmbeddings.scorer(clip, dino)). scale: m (paper: 10), in the paper's
    x_t scale. start/end: the active part of the steps as fractions, steps s with start*total <= s < end*total.
    dtype: the decoder's compute dtype (default: that of its first parameter, else the latent's).
    """

    def __init__(self, decoder: Callable, scorer: MetricScorer, scale: float = 10.0, grad: str = "x0",
                 start: float = 0.0, end: float = 1.0, image_range: Optional[Tuple[float, float]] = None,
                 dtype: Optional[torch.dtype] = None):
        if grad not in GRADS:
            raise ValueError(f"DynFuse guidance: grad must be one of {GRADS}, got {grad!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"DynFuse guidance: need 0 <= start <= end <= 1, got start={start}, end={end}")
        self.decoder, self.scorer = gradient_decoder(decoder), scorer
        self.scale, self.grad, self.start, self.end = float(scale), grad, float(start), float(end)
        self.image_range = tuple(image_range or getattr(decoder, "image_range", (-1.0, 1.0)))
        self.dtype = dtype or _param_dtype(self.decoder)

    def active(self, step: int, total: int) -> bool:
        """Whether step `step` (0-based) of `total` lies in [start, end) of the run."""
        return self.scale != 0.0 and total > 0 and self.start * total - 1e-9 <= step < self.end * total - 1e-9

    # ------------------------------------------------------------------ gradients (paper x_t scale)
    def grad_x0(self, x0_hat: torch.Tensor, gain=1.0) -> CorrectionInfo:
        """grad_{x_t} R = gain * grad_{x0-hat} R, gain = d x0-hat / d x_t (`conversions.x0_gain`)."""
        result, grad = residual_grad_x0(x0_hat, self.decoder, self.scorer, self.image_range, self.dtype)
        with torch.inference_mode(False), torch.no_grad():
            return _info(result, _wide(grad) * _wide(torch.as_tensor(gain, device=grad.device)))

    def grad_xt(self, x: torch.Tensor, model_fn: Callable[[torch.Tensor], torch.Tensor],
                to_x0: Optional[Callable] = None, x_scale=1.0) -> Tuple[torch.Tensor, CorrectionInfo]:
        """(model output, info): grad_{x_t} R through one call of model_fn (Eq. 20), whose output the step uses.

        x is the sampler's variable, x_scale = d x / d x_t (`conversions.sampler_x_scale`): grad_{x_t} R =
        x_scale * grad_x R."""
        result, grad, out = residual_grad_xt(x, model_fn, self.decoder, self.scorer, self.image_range, self.dtype,
                                             to_x0)
        with torch.inference_mode(False), torch.no_grad():
            x0 = out if to_x0 is None else to_x0(x, out)
            return out, _info(result, _wide(grad) * _wide(torch.as_tensor(x_scale, device=grad.device)),
                              x0.detach())

    def move(self, info: CorrectionInfo) -> torch.Tensor:
        """-m * grad_{x_t} R: the move of x_{t-1} in the paper's x_t scale (Eq. 20)."""
        with torch.inference_mode(False), torch.no_grad():
            return -self.scale * info.grad

    # ------------------------------------------------------------------ one call for DDPM-scale loops
    def move_eps(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod) -> Tuple[torch.Tensor, CorrectionInfo]:
        """(move, info) for an eps model, x_t DDPM-scaled (DDIM/PLMS/UniPC/DPM-Solver): add the move to the
        sampler's x_{t-1} (`apply_move`). For k-diffusion's x use conversions.k_to_ddpm first."""
        info = self.grad_x0(cv.eps_to_x0(x_t, eps, alpha_cumprod), cv.x0_gain("ddpm", alpha_cumprod, x_t))
        return self.move(info), info

    def move_v(self, x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod) -> Tuple[torch.Tensor, CorrectionInfo]:
        """The same for v-prediction models (SD2-v, v-pred SDXL); eps is held fixed as for eps models."""
        info = self.grad_x0(cv.v_to_x0(x_t, v, alpha_cumprod), cv.x0_gain("ddpm", alpha_cumprod, x_t))
        return self.move(info), info

    def move_flow_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> Tuple[torch.Tensor, CorrectionInfo]:
        """The same for flow-matching velocity (FLUX: x0 = x_t - t v); the flow latent is its own x_t."""
        info = self.grad_x0(cv.flow_v_to_x0(x_t, v, t), cv.x0_gain("flow", t, x_t))
        return self.move(info), info

    def move_x0(self, x0_hat: torch.Tensor, sigma) -> Tuple[torch.Tensor, CorrectionInfo]:
        """The same for k-diffusion's denoised at sigma; the move is in the paper's scale: a k-diffusion x_{t-1}
        at sigma_next takes conversions.ddpm_to_k(move, sigma_next)."""
        info = self.grad_x0(x0_hat, cv.x0_gain("k", sigma, x0_hat))
        return self.move(info), info

    def move_xt(self, x_t: torch.Tensor, model_fn: Callable[[torch.Tensor], torch.Tensor],
                to_x0: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor, CorrectionInfo]:
        """(model output, move, info) for a DDPM-scaled x_t, the gradient through model_fn (the paper's form)."""
        out, info = self.grad_xt(x_t, model_fn, to_x0)
        return out, self.move(info), info

    def score(self, x0_hat: torch.Tensor) -> ScoreResult:
        """R of a latent without gradient (logging, tests)."""
        with torch.inference_mode(False), torch.no_grad():
            z = x0_hat.detach().clone()
            result = score_image_of_latent(z if self.dtype is None else z.to(self.dtype), self.decoder,
                                           self.scorer, self.image_range)
            return ScoreResult(result.residual.float().cpu(), {k: v.float().cpu() for k, v in result.similarities.items()})


def _detached(result: ScoreResult) -> ScoreResult:
    return ScoreResult(result.residual.detach(), {k: v.detach() for k, v in result.similarities.items()})


def _info(result: ScoreResult, grad: torch.Tensor, x0: Optional[torch.Tensor] = None) -> CorrectionInfo:
    return CorrectionInfo(result.residual.float(), {k: v.float() for k, v in result.similarities.items()}, grad, x0)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(cv.wide_dtype(t.dtype))


def _param_dtype(obj) -> Optional[torch.dtype]:
    if isinstance(obj, nn.Module):
        p = next(obj.parameters(), None)
        if p is not None:
            return p.dtype
    return None
