"""The latent correction of paper Eq. 20 (Eq. 7): x <- x - m * grad R(x0-hat), as functions and `LatentRefiner`.

Two gradients:
- "x0": grad of R w.r.t. x0-hat (decoder + encoders backward only; the host moves its x0 prediction);
- "xt": grad w.r.t. x_t through the denoiser (the paper's; one more model forward and its backward).
Every call works on detached clones made outside inference mode, with grad enabled locally: the host may call
it under no_grad (A1111) or inference_mode (Forge); no graph survives and grad mode is left as it was.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import conversions as cv
from .score import MetricScorer, ScoreResult

GRADS = ("x0", "xt")


@dataclass
class CorrectionInfo:
    """What one correction saw: R and the similarities before the move (CPU floats), and the gradient."""
    residual: torch.Tensor
    similarities: Dict[str, torch.Tensor]
    grad: torch.Tensor
    x0: Optional[torch.Tensor] = None     # "xt" mode: the model's x0-hat from the grad-enabled call (detached)

    @property
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the gradient per row."""
        return self.grad.detach().flatten(1).norm(dim=1).float().cpu()


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
    """(R per row, d(sum R)/d x0-hat): the gradient w.r.t. the x0 prediction, in x0_hat's dtype."""
    with grad_scope():
        z = fresh_leaf(x0_hat, dtype)
        result = score_image_of_latent(z, decoder, scorer, image_range)
        (grad,) = torch.autograd.grad(result.residual.sum(), z)
        return _detached(result), grad.to(x0_hat.dtype)


def residual_grad_xt(x_t: torch.Tensor, model_fn: Callable[[torch.Tensor], torch.Tensor], decoder: Callable,
                     scorer: MetricScorer, image_range: Tuple[float, float] = (0.0, 1.0),
                     dtype: Optional[torch.dtype] = None) -> Tuple[ScoreResult, torch.Tensor, torch.Tensor]:
    """(R per row, d(sum R)/d x_t, x0-hat): the paper's gradient through model_fn (x_t -> x0-hat)."""
    with grad_scope():
        x = fresh_leaf(x_t)
        x0 = model_fn(x)
        z = x0 if dtype is None else x0.to(dtype)
        result = score_image_of_latent(z, decoder, scorer, image_range)
        (grad,) = torch.autograd.grad(result.residual.sum(), x)
        return _detached(result), grad.to(x_t.dtype), x0.detach()


class LatentRefiner:
    """Eq. 20 for a host's sampling loop: `active(step, total)`, then `correct_x0` or `correct_xt`.

    decoder: latent -> image (a LatentDecoder, whose range is [0,1], or any callable; `image_range` says
    its output range, default (-1,1) for plain callables like `lambda z: vae.decode(z / sf).sample`).
    scorer: a MetricScorer (e.g. ReferenceEmbeddings.scorer(clip, dino)). scale: m (paper: 10).
    start/end: the active part of the steps as fractions, steps s with start*total <= s < end*total.
    dtype: the decoder's compute dtype (default: that of its first parameter, else the latent's).
    """

    def __init__(self, decoder: Callable, scorer: MetricScorer, scale: float = 10.0, grad: str = "x0",
                 start: float = 0.0, end: float = 1.0, image_range: Optional[Tuple[float, float]] = None,
                 dtype: Optional[torch.dtype] = None):
        if grad not in GRADS:
            raise ValueError(f"DynFuse guidance: grad must be one of {GRADS}, got {grad!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"DynFuse guidance: need 0 <= start <= end <= 1, got start={start}, end={end}")
        self.decoder, self.scorer = decoder, scorer
        self.scale, self.grad, self.start, self.end = float(scale), grad, float(start), float(end)
        self.image_range = tuple(image_range or getattr(decoder, "image_range", (-1.0, 1.0)))
        self.dtype = dtype or _param_dtype(decoder)

    def active(self, step: int, total: int) -> bool:
        """Whether step `step` (0-based) of `total` lies in [start, end) of the run."""
        return self.scale != 0.0 and total > 0 and self.start * total - 1e-9 <= step < self.end * total - 1e-9

    def correct_x0(self, x0_hat: torch.Tensor) -> Tuple[torch.Tensor, CorrectionInfo]:
        """(x0-hat - m * grad_x0 R, info): the x0-space correction; hosts hand the result back as the prediction."""
        result, grad = residual_grad_x0(x0_hat, self.decoder, self.scorer, self.image_range, self.dtype)
        with torch.inference_mode(False):
            return _moved(x0_hat, grad, self.scale), _info(result, grad)

    def correct_xt(self, x_t: torch.Tensor, model_fn: Callable[[torch.Tensor], torch.Tensor]
                   ) -> Tuple[torch.Tensor, CorrectionInfo]:
        """(x_t - m * grad_xt R, info), grad through model_fn: x_t -> x0-hat (Eq. 20). For the exact Eq. 20
        update apply `-scale * info.grad` to the step's output x_{t-1} instead."""
        result, grad, x0 = residual_grad_xt(x_t, model_fn, self.decoder, self.scorer, self.image_range, self.dtype)
        with torch.inference_mode(False):
            return _moved(x_t, grad, self.scale), _info(result, grad, x0)

    def correct_eps(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod) -> Tuple[torch.Tensor, CorrectionInfo]:
        """x0-space correction for eps samplers (DDIM/PLMS/UniPC): eps -> x0-hat, correct, the eps of the new x0.

        x_t in DDPM scaling (sqrt(a) x0 + sqrt(1-a) eps); for k-diffusion's x use conversions.k_to_ddpm first."""
        x0 = cv.eps_to_x0(x_t, eps, alpha_cumprod)
        new_x0, info = self.correct_x0(x0)
        with torch.inference_mode(False):
            return cv.eps_for_x0_shift(eps.detach().clone(), new_x0 - x0.detach().clone(), alpha_cumprod), info

    def correct_v(self, x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod) -> Tuple[torch.Tensor, CorrectionInfo]:
        """The same for v-prediction models (SD2-v, v-pred SDXL)."""
        x0 = cv.v_to_x0(x_t, v, alpha_cumprod)
        new_x0, info = self.correct_x0(x0)
        with torch.inference_mode(False):
            return cv.v_for_x0_shift(v.detach().clone(), new_x0 - x0.detach().clone(), alpha_cumprod), info

    def correct_flow_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> Tuple[torch.Tensor, CorrectionInfo]:
        """The same for flow-matching velocity (FLUX: x0 = x_t - t v)."""
        x0 = cv.flow_v_to_x0(x_t, v, t)
        new_x0, info = self.correct_x0(x0)
        with torch.inference_mode(False):
            return cv.flow_v_for_x0_shift(v.detach().clone(), new_x0 - x0.detach().clone(), t), info

    def score(self, x0_hat: torch.Tensor) -> ScoreResult:
        """R of a latent without gradient (logging, tests)."""
        with torch.inference_mode(False), torch.no_grad():
            z = x0_hat.detach().clone()
            result = score_image_of_latent(z if self.dtype is None else z.to(self.dtype), self.decoder,
                                           self.scorer, self.image_range)
            return ScoreResult(result.residual.float().cpu(), {k: v.float().cpu() for k, v in result.similarities.items()})


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


def _moved(x: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return x.detach().clone() - scale * grad


def _detached(result: ScoreResult) -> ScoreResult:
    return ScoreResult(result.residual.detach(), {k: v.detach() for k, v in result.similarities.items()})


def _info(result: ScoreResult, grad: torch.Tensor, x0: Optional[torch.Tensor] = None) -> CorrectionInfo:
    return CorrectionInfo(result.residual.float().cpu(), {k: v.float().cpu() for k, v in result.similarities.items()},
                          grad, x0)


def _param_dtype(obj) -> Optional[torch.dtype]:
    if isinstance(obj, nn.Module):
        p = next(obj.parameters(), None)
        if p is not None:
            return p.dtype
    return None
