"""Forge side of the latent refinement: what differs from A1111 (a1111_guidance.py) under inference mode.

Host facts (Forge @ dfdcbab6, shared/reference/webui-forge.md sections 3-4):
- the batch loop runs in `torch.inference_mode()` (processing.py:911) and the weights are built there
  (`forge_loader` is decorated with it, backend/loader.py:497): autograd refuses to save an inference tensor
  for backward, so no backward can pass through the host's VAE or UNet, whatever grad mode is set. The decoder
  used for scoring is a private non-inference copy (built once per model, kept) and the encoders are loaded
  outside inference mode;
- x_t gradient: the CFG denoiser reads the UNet patcher from `sd_model.forge_objects.unet` on every call and
  calls the model through `model_options["model_function_wrapper"]` (sampling_function.py:325-334, :270-273).
  For the denoiser call that is run with gradients (the step's own call, once), a wrapper of ours (outermost on
  a cloned patcher, like the fusion's) passes the host's model function on down the wrapper chain with the
  model swapped for a private non-inference copy of the KModel (made at the first x_t step of a generation,
  dropped at its end: one more UNet in memory meanwhile), on which the fusion's UNet targets are mapped by
  name and record into the run's selection record; autograd keeps copies of the activations that Forge's UNet
  changes in place. The host's model, its patcher and every other call stay as they were. Any tensor of the
  host's made in inference mode that the backward would have to save (an inpainting mask, processing.py blend)
  makes that step fall back to the x0 gradient with a message;
- progress: the same job counters and console total as A1111 (processing.py:921-922, :1019 nextjob,
  :1325-1334 hires; shared_state.py, shared_total_tqdm.py), so A1111Guidance.count_reference_jobs applies;
- the CFG denoiser returns x0 for every sampler except CFGDenoiserTimesteps, which sets
  `classic_ddim_eps_estimation`, samples DDPM-scaled x and returns eps (modules/sd_samplers_cfg_denoiser.py:160-166,
  :222-224; sd_samplers_timesteps.py:37-48); its alphas are `sd_model.alphas_cumprod` (sd_samplers_timesteps.py:31);
  a flow model's predictor (FLUX, SD3: `prediction_type == "const"`, backend/modules/k_prediction.py:94-96,
  :253-289) samples x = (1 - t) x0 + t noise with sigma = t;
- the VAE is `forge_objects.vae.first_stage_model` (IntegratedAutoencoderKL, decode(z) in [-1,1] with
  `scaling_factor`/`shift_factor`, backend/nn/vae.py:278-316); FLUX is sampled as x0 predictions too.
- references: a nested process_images in Script.process, before the inference-mode block (webui-forge.md sec. 4).
"""
from __future__ import annotations

import os
import contextlib
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..guidance import LatentDecoder, make_private_copy
from ..guidance.decoders import is_half
from ..layer_delta import FuseTarget
from .a1111_guidance import A1111Guidance, taesd_file
from .forge import denoiser_progress, row_labels

XT_NO_UNET = "the x_t gradient found no UNet to copy (no sd_model.forge_objects.unet)"


def private_copy32(module: torch.nn.Module) -> torch.nn.Module:
    """A private, non-inference copy, in float32 where the host's weights are half precision (decoders.is_half)."""
    copy = make_private_copy(module)
    return copy.float() if is_half(copy) else copy


def private_vae_decoder(first_stage: torch.nn.Module) -> LatentDecoder:
    """A differentiable decoder from a private, non-inference copy of Forge's first stage model."""
    shift = getattr(first_stage, "shift_factor", 0.0)
    return LatentDecoder(private_copy32(first_stage), float(first_stage.scaling_factor),
                         float(shift if isinstance(shift, float) else 0.0), (-1.0, 1.0), True)


def private_taesd_decoder(decoder: torch.nn.Module) -> LatentDecoder:
    """The host's TAESD decoder (latents -> [0,1]) as a private copy."""
    return LatentDecoder(private_copy32(decoder), 1.0, 0.0, (0.0, 1.0), False)


class PrivateUNet:
    """A non-inference copy of the host's KModel with the fusion's UNet targets mapped onto its layers, called
    in place of the host's model during the x_t gradient's denoiser call only. `record`: the run's selection
    record, which the copy's layers write into (that call is the step's own)."""

    def __init__(self, kmodel: torch.nn.Module, targets: List[FuseTarget], args: Any, record: Any = None):
        from ..session import FuseSession
        self.source = kmodel
        self.model = make_private_copy(kmodel)
        names = {id(m): n for n, m in kmodel.named_modules()}
        mapped = [replace(t, module=self.model.get_submodule(names[id(t.module)]))
                  for t in targets if t.group == "unet" and id(t.module) in names]
        self.session = None
        if mapped:
            self.session = FuseSession(mapped, method=args.method, criterion=args.criterion,
                                       klora_alpha=args.klora_alpha, klora_beta=args.klora_beta,
                                       klora_scale=args.klora_scale, record=record is not None,
                                       te_mode=args.text_encoder)
            if record is not None and self.session.record is not None:
                if list(self.session.record.layer_names) == list(record.layer_names):
                    self.session.record = record
                else:
                    self.session.record = None

    def apply_model(self, labels: List[str], progress: Callable[[], Tuple[int, int]]) -> Callable:
        """`apply_model(input, timestep, **c)` of the copy (what Forge's wrappers call), fused like the host's."""
        def apply(input, timestep, **c):
            if self.session is None:
                return self.model.apply_model(input, timestep, **c)
            self.session.set_step(*progress())
            self.session.set_row_labels(labels)
            with self.session:
                return self.model.apply_model(input, timestep, **c)
        return apply


def _copy_activation(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.grad_fn is not None else t


def saved_activations_copied():
    """Autograd keeps its own copy of every saved activation (not of weights or inputs): Forge's UNet adds
    residuals in place (`x += n` after `norm1(x)`, backend/nn/unet.py:240, :272), which a backward through
    the saved originals refuses. Thread-local (torch.autograd.graph.saved_tensors_hooks); costs one more copy
    of the saved activations for the x_t call only."""
    return torch.autograd.graph.saved_tensors_hooks(_copy_activation, lambda t: t)


def make_redirect_wrapper(state: Dict[str, Any], previous: Optional[Callable] = None) -> Callable:
    """A `model_function_wrapper` that, while `state["active"]`, hands the rest of the chain (`previous`: the
    fusion's or another extension's wrapper) the private copy's model function instead of the host's, and
    otherwise passes the call on unchanged."""
    def dynfuse_guidance_wrapper(apply_model, args):
        if state.get("active"):
            labels = row_labels(args.get("cond_or_uncond", []), int(args["input"].shape[0]))
            apply_model = state["private"].apply_model(labels, state["progress"])
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    dynfuse_guidance_wrapper.dynfuse_previous = previous
    dynfuse_guidance_wrapper.dynfuse_redirect = True
    return dynfuse_guidance_wrapper


def install_redirect_wrapper(sd_model: Any, state: Dict[str, Any]) -> Any:
    """Our redirect outermost on a clone of `forge_objects.unet` (assigned back; an older one of ours unwrapped)."""
    objects = sd_model.forge_objects
    unet = objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    while previous is not None and getattr(previous, "dynfuse_redirect", False):
        previous = previous.dynfuse_previous
    unet.set_model_unet_function_wrapper(make_redirect_wrapper(state, previous))
    objects.unet = unet
    return unet


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

    def space(self, p: Any, denoiser: Any) -> str:
        if getattr(denoiser, "classic_ddim_eps_estimation", False):
            return "ddpm"
        unet = getattr(getattr(p.sd_model, "forge_objects", None), "unet", None)
        predictor = getattr(getattr(unet, "model", None), "predictor", None)
        return "flow" if getattr(predictor, "prediction_type", "") == "const" else "k"

    def alphas_cumprod(self, p: Any, denoiser: Any) -> torch.Tensor:
        return p.sd_model.alphas_cumprod

    def xt_problem(self) -> str:
        return ""

    # ------------------------------------------------------------------ the x_t gradient (private UNet)
    def before_pass(self, p: Any, grun: Any) -> None:
        """process_before_every_sampling, after the fusion's wrapper: the redirect goes on this pass's patcher."""
        if grun.refiner is None or grun.refiner.grad != "xt":
            return
        state = grun.host_state.setdefault("redirect", {"active": False})
        state["progress"] = denoiser_progress(getattr(p, "sampler", None))
        install_redirect_wrapper(p.sd_model, state)

    @contextlib.contextmanager
    def differentiable(self, p: Any, grun: Any) -> Iterator[None]:
        """Around the gradient's denoiser call: its UNet call goes to the private copy (made on first use)."""
        state = grun.host_state.get("redirect")
        unet = getattr(getattr(p.sd_model, "forge_objects", None), "unet", None)
        if state is None or unet is None:
            raise RuntimeError(XT_NO_UNET)
        private = state.get("private")
        if private is None or private.source is not unet.model:
            state["private"] = None       # free an old copy first
            targets = grun.run.forward_targets(grun.run.prepare(p))
            session = grun.run.session_for("unet", targets)
            state["private"] = PrivateUNet(unet.model, targets, grun.run.args, getattr(session, "record", None))
        state["active"] = True
        try:
            with saved_activations_copied():
                yield
        finally:
            state["active"] = False

    def release(self, p: Any, grun: Any) -> None:
        """The generation is over: the private copy goes (it holds a whole UNet)."""
        state = grun.host_state.get("redirect")
        if state is not None:
            state["active"] = False
            state.pop("private", None)
