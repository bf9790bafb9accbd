"""Latent refinement in a WebUI generation (paper Sec. 4.2, Eq. 14-20): references, encoders, per-step correction.

Host-independent; a host supplies a small `GuidanceHost` (a1111_guidance.py, forge_guidance.py). One generation:

    begin(host, p)                  Script.process (outside no_grad / inference_mode; common.begin has applied
                                    the first batch's tag, so `g=1` alone turns it on): load encoders, count the
                                    renders as jobs, then the subject and style references (given images, the
                                    cache, or nested renders through a FuseSession holding only that LoRA's
                                    deltas), build the refiner
    before_every_sampling(host, p)  after the host made its sampler: this pass's denoiser and sampler wrapped
    finish(host, p, processed)      Script.postprocess: wrappers gone, a summary in the infotext, references shown

Eq. 20 is applied as written, x_{t-1} = x_{t-1}^ori - m grad_{x_t} R with m in the paper's x_t scale, on each
pass's CFG denoiser and sampler (guidance_pass.py): the gradient from the first denoiser call of a step ("x0"
through its output, "xt" through the call itself, run once with gradients), the move added to the sampler's
own x at the next step's first call, the last one to what the pass returns. A row whose gradient or moved
latent is not finite keeps its latent and the run reports the step. A host whose weights cannot be
differentiated (Forge) routes the x_t call to private state (`differentiable`); a failing x_t call switches the
run to "x0" with a message. When anything needed is missing the generation goes on without guidance and the
run's report says why. The references' prompts default to the main prompt without the other LoRA's trigger
words (guidance/triggers.py).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from ..guidance import (EncoderStore, GuidanceUnavailable, LatentRefiner, ReferenceCache, ReferenceImageError,
                        ReferenceKey, decode_image_arg, paper_scorer)
from ..guidance.triggers import reference_prompt
from ..layer_delta import FuseTarget
from . import common
from ..guidance.step import GuidedStep, skipped_steps
from .guidance_pass import PassCorrection

log = logging.getLogger("dynfuse")

GUIDANCE_ATTR = "dynfuse_guidance"
SUMMARY_KEY = "DynFuse guidance"
REFERENCES_KEY = "DynFuse references"     # where each reference came from: rendered, cached or given
ROLES = ("subject", "style")
ENCODERS = EncoderStore()        # CLIP and DINO stay loaded between generations (reloaded when a setting changes)
REFERENCES = ReferenceCache()    # rendered references, keyed by everything that changes them
_TAG = re.compile(r"<%s:[^>]*>" % common.TAG_NAME)


class GuidanceHost(Protocol):
    """What a WebUI provides (see a1111_guidance.py for the real one and its host citations)."""

    def reference_settings(self, p: Any) -> Dict[str, Any]: ...       # model_hash, prompt, seed, width, height, ...

    def render_reference(self, p: Any, prompt: str, steps: int, targets: List[FuseTarget],
                         args: Any) -> Optional[Any]: ...               # one PIL image, None when interrupted

    def encoder_settings(self) -> Dict[str, Any]: ...                   # EncoderStore.get kwargs

    def trigger_words(self, lora: str) -> List[str]: ...                # from its metadata ([] = none known)

    def decoder(self, p: Any, kind: str) -> Tuple[torch.nn.Module, str]: ...   # (decoder, note or '')

    def denoiser(self, p: Any) -> Optional[torch.nn.Module]: ...        # the CFG denoiser of the current pass

    def space(self, p: Any, denoiser: Any) -> str: ...                  # "k", "ddpm" or "flow" (conversions.SPACES)

    def alphas_cumprod(self, p: Any, denoiser: Any) -> torch.Tensor: ...

    def xt_problem(self) -> str: ...                                    # why "xt" cannot run here ('' = it can)

    # optional: count_reference_jobs(p, steps_of_each_render) before the renders (progress bar, job counts);
    # before_pass(p, grun) after the hooks of a pass are on; differentiable(p, grun) a context manager around the
    # x_t gradient's denoiser call; release(p, grun) when the generation's sampling is over

    def show_references(self) -> bool: ...


# ----------------------------------------------------------------------------- pure helpers
def strip_tags(prompt: str) -> str:
    """The prompt without `<dynlora:...>` (a reference is one LoRA alone, never the fusion)."""
    return _TAG.sub("", prompt or "").strip()


def single_lora_targets(targets: Sequence[FuseTarget], role: str) -> List[FuseTarget]:
    """The targets of one LoRA alone (Eq. 14-15): the other branch None, layers it does not touch dropped."""
    keep = "subject" if role == "subject" else "style"
    drop = "style" if keep == "subject" else "subject"
    return [replace(t, **{drop: None}) for t in targets if getattr(t, keep) is not None]


def reference_key(role: str, settings: Dict[str, Any], lora_hash: str, weight: float, prompt: str,
                  steps: int) -> ReferenceKey:
    """The cache key of one reference render: model, LoRA hash and weight, prompts, seed, size, sampler, steps."""
    return ReferenceKey(role=role, model_hash=str(settings.get("model_hash", "")), loras=((lora_hash, float(weight)),),
                        prompt=prompt, seed=int(settings["seed"]), width=int(settings["width"]),
                        height=int(settings["height"]), sampler=str(settings.get("sampler", "")), steps=int(steps),
                        negative_prompt=str(settings.get("negative_prompt", "")),
                        cfg_scale=float(settings.get("cfg_scale", 0.0)), extra=tuple(settings.get("extra", ())))


# ----------------------------------------------------------------------------- one generation
class GuidanceRun:
    """The refinement state of one generation: references, refiner, denoiser hooks, log."""

    def __init__(self, run: "common.FuseRun", host: GuidanceHost, p: Any = None, encoders: Any = None,
                 references: Optional[ReferenceCache] = None):
        self.run, self.host, self.p = run, host, p
        self.encoders = encoders if encoders is not None else ENCODERS
        self.cache = references if references is not None else REFERENCES    # an empty cache is falsy
        self.refiner: Optional[LatentRefiner] = None
        self.images: Dict[str, Any] = {}
        self.prompts: Dict[str, str] = {}     # role -> the main prompt less the other LoRA's trigger words
        self.rendered: List[str] = []
        self.sources: Dict[str, str] = {}     # role -> "rendered", "cached" or "given"
        self.log: List[GuidedStep] = []
        self.correction: Optional[PassCorrection] = None   # the current pass's
        self.host_state: Dict[str, Any] = {}   # what the GuidanceHost keeps for this generation only

    # ------------------------------------------------------------------ set-up (Script.process)
    def prepare(self, p: Any) -> bool:
        """Encoders, references and the refiner; False (and a message in the report) when guidance is off."""
        args = self.run.args
        try:
            targets = self.run.prepare(p)
            if not targets:
                return False          # the fusion itself reported why
            clip, dino = self.encoders.get(**self.host.encoder_settings())   # first: no renders if weights are missing
            plans = {role: self._plan(p, role, targets) for role in ROLES}
            renders = [plan for plan in plans.values() if plan.key is not None and plan.key not in self.cache]
            count_jobs = getattr(self.host, "count_reference_jobs", None)
            if renders and count_jobs is not None:
                count_jobs(p, [plan.steps for plan in renders])    # the progress bar includes the renders
            for role in ROLES:
                image = self._reference(plans[role])
                if image is None:
                    self.run.note("DynFuse guidance: the reference render was interrupted - no guidance", p)
                    return False
                self.images[role] = image
            self._publish_sources(p)
            decoder, note = self.host.decoder(p, args.guidance_decoder)
            if note:
                self.run.note(note, p)
            grad = args.guidance_grad
            problem = self.host.xt_problem() if grad == "xt" else ""
            if problem:
                self.run.note(f"DynFuse guidance: {problem}; using the x0 gradient instead", p)
                grad = "x0"
            scorer = paper_scorer(clip, dino, self.images["subject"], self.images["style"])
            self.refiner = LatentRefiner(decoder, scorer, scale=args.guidance_scale, grad=grad,
                                         start=args.guidance_start, end=args.guidance_end)
            return True
        except (GuidanceUnavailable, ReferenceImageError) as e:
            self.run.note(f"{e}\n(the image was generated without guidance)", p)
        return False

    def _plan(self, p: Any, role: str, targets: List[FuseTarget]) -> "_ReferencePlan":
        """Where one reference comes from: the given image, or the cache key and settings of its render."""
        args = self.run.args
        given = args.subject_image if role == "subject" else args.style_image
        if given is not None and not (isinstance(given, str) and not given.strip()):
            return _ReferencePlan(role, given=decode_image_arg(given))
        settings = self.host.reference_settings(p)
        own = args.subject_prompt if role == "subject" else args.style_prompt
        prompt = strip_tags(own)
        if not prompt:       # Eq. 14-15 with the main prompt: the other LoRA's trigger words mean nothing here
            other = args.style if role == "subject" else args.subject
            main = strip_tags(settings.get("prompt", ""))
            prompt = reference_prompt(main, self._trigger_words(other))
            if prompt != main:
                self.prompts[role] = prompt
        steps = int(args.reference_steps or settings["steps"])
        weight = args.subject_weight if role == "subject" else args.style_weight
        lora = args.subject if role == "subject" else args.style
        key = reference_key(role, settings, self.run.identities.get(role) or lora, weight, prompt, steps)
        return _ReferencePlan(role, key=key, prompt=prompt, steps=steps, p=p,
                              targets=single_lora_targets(targets, role))

    def _trigger_words(self, lora: str) -> List[str]:
        words = getattr(self.host, "trigger_words", None)
        try:
            return list(words(lora)) if words is not None else []
        except Exception as e:   # unreadable metadata: the main prompt as it is
            log.info("DynFuse guidance: no trigger words for %s: %s", lora, e)
            return []

    def _publish_sources(self, p: Any) -> None:
        params = getattr(p, "extra_generation_params", None)
        if params is not None:
            params[REFERENCES_KEY] = "; ".join(f"{role} {self.sources[role]}" for role in ROLES if role in self.sources)

    def _reference(self, plan: "_ReferencePlan") -> Optional[Any]:
        if plan.key is None:
            self.sources[plan.role] = "given"
            return plan.given

        def render():
            image = self.host.render_reference(plan.p, plan.prompt, plan.steps, plan.targets, self.run.args)
            if image is None:
                raise _Interrupted()
            self.rendered.append(plan.role)
            return [image]

        try:
            images, hit = self.cache.get_or_render(plan.key, render)
        except _Interrupted:
            return None
        self.sources[plan.role] = "cached" if hit else "rendered"
        return images[0]

    # ------------------------------------------------------------------ per pass (process_before_every_sampling)
    def attach(self, denoiser: torch.nn.Module, sampler: Any = None) -> None:
        """Eq. 20 on this pass (guidance_pass.PassCorrection); the last pass's wrappers go first."""
        self.detach()
        if self.refiner is not None and denoiser is not None:
            self.correction = PassCorrection(self, denoiser, sampler)

    def detach(self) -> None:
        correction, self.correction = self.correction, None
        if correction is not None:
            correction.detach()

    def release(self) -> None:
        """Wrappers gone and the host's per-generation state dropped (Forge: the private UNet copy)."""
        self.detach()
        release = getattr(self.host, "release", None)
        if release is not None:
            release(self.p, self)
        self.host_state.clear()

    # ------------------------------------------------------------------ outputs
    def summary(self) -> Optional[str]:
        """e.g. `R 0.512 -> 0.498, 4 corrections (steps 0, 1, 2, 3 of 4), grad x0` for the infotext, or None
        when nothing was corrected; read after sampling (the log's tensors stay on the device until then)."""
        if not self.log:
            return None
        first, last = (float(e.residual.float().mean()) for e in (self.log[0], self.log[-1]))
        steps = ", ".join(str(e.step) for e in self.log)
        prompts = "".join(f"; {key}: {self.prompts[role]}" for role, key in (("subject", "l_c"), ("style", "l_s"))
                          if role in self.prompts)
        return (f"R {first:.4f} -> {last:.4f}, {len(self.log)} corrections (steps {steps} of {self.log[-1].total}), "
                f"grad {self.refiner.grad}{prompts}")

    def skipped_steps(self) -> List[int]:
        """Steps whose move was left out for some row (a NaN/Inf gradient or moved latent); read after sampling."""
        return skipped_steps(self.log)

    def report_skipped(self) -> None:
        skipped = self.skipped_steps()
        if skipped:
            self.run.note(f"DynFuse guidance: the correction of step(s) {', '.join(map(str, skipped))} was skipped "
                          "(the gradient or the moved latent was not finite)", self.p)


@dataclass
class _ReferencePlan:
    """One reference: a given image, or a render (cache key, prompt, steps, that LoRA's targets)."""
    role: str
    given: Any = None
    key: Optional[ReferenceKey] = None
    prompt: str = ""
    steps: int = 0
    p: Any = None
    targets: Optional[List[FuseTarget]] = None


class _Interrupted(Exception):
    """A reference render came back without an image (the user interrupted or skipped)."""


# ----------------------------------------------------------------------------- entry points (scripts/dynfuse.py)
def glue(host: Any) -> GuidanceHost:
    """The GuidanceHost of a HostAdapter (built once per adapter and kept on it)."""
    got = getattr(host, "_dynfuse_guidance_glue", None)
    if got is None:
        if getattr(host, "name", "") == "forge":
            from .forge_guidance import ForgeGuidance
            got = ForgeGuidance(host)
        else:
            from .a1111_guidance import A1111Guidance
            got = A1111Guidance(host)
        host._dynfuse_guidance_glue = got
    return got


def on_ui_settings() -> None:
    """script_callbacks.on_ui_settings: the guidance settings (the same shared.opts API in both hosts)."""
    from .a1111_guidance import on_ui_settings as add_options
    add_options()


def begin(host: Any, p: Any, ghost: Optional[GuidanceHost] = None, **kwargs) -> Optional[GuidanceRun]:
    """Script.process, after common.begin: set up guidance when asked; p.sample drops the hooks in `finally`."""
    run = getattr(p, common.RUN_ATTR, None)
    if run is None or not run.enabled or not run.args.guidance:
        return None
    if getattr(p, GUIDANCE_ATTR, None) is not None:
        return getattr(p, GUIDANCE_ATTR)
    grun = GuidanceRun(run, ghost or glue(host), p, **kwargs)
    setattr(p, GUIDANCE_ATTR, grun)
    if not grun.prepare(p):
        return grun
    sample = p.sample
    inner = p.__dict__.get("sample")    # an instance wrapper of another part (hosts' install), or None

    def sample_guided(*a, **kw):
        try:
            return sample(*a, **kw)
        finally:
            grun.release()
            grun.report_skipped()
            summary = grun.summary()
            params = getattr(p, "extra_generation_params", None)
            if summary and params is not None:
                params[SUMMARY_KEY] = summary
    sample_guided.dynfuse_inner = inner
    p.sample = sample_guided
    return grun


def before_every_sampling(host: Any, p: Any, ghost: Optional[GuidanceHost] = None) -> None:
    """Script.process_before_every_sampling: the sampler of this pass exists (processing.py:1308/1386)."""
    grun = getattr(p, GUIDANCE_ATTR, None)
    if grun is not None and grun.refiner is not None:
        ghost = ghost or grun.host
        grun.attach(ghost.denoiser(p), getattr(p, "sampler", None))
        before_pass = getattr(ghost, "before_pass", None)
        if before_pass is not None:
            before_pass(p, grun)


def finish(host: Any, p: Any, processed: Any) -> None:
    """Script.postprocess: hooks gone (also done by p.sample), rendered references into the gallery if asked."""
    grun = getattr(p, GUIDANCE_ATTR, None)
    if grun is None:
        return
    grun.release()
    wrapper = p.__dict__.get("sample")
    if getattr(wrapper, "__name__", "") == "sample_guided":
        if wrapper.dynfuse_inner is None:
            p.__dict__.pop("sample")
        else:
            p.sample = wrapper.dynfuse_inner
    if processed is not None and grun.images and grun.host.show_references():
        for role in ROLES:
            if role in grun.images:
                host.add_image(p, processed, grun.images[role], f"DynFuse {role} reference")
