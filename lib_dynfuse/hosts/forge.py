"""Stable Diffusion WebUI Forge adapter (`ForgeHost`, see common.py's HostAdapter): Forge's own LoRA parser ->
LayerDeltas; Forge's own weight merge for constant deltas, hooks per UNet call for the others.

Forge merges every LoRA into the weights; its `backend.operations.Linear` is not an `nn.Linear`; it samples
under `torch.inference_mode()`. So (host facts: shared/reference/webui-forge.md, real-host-facts.md):
- the two fused LoRAs are read with Forge's parser and become LayerDeltas (forge_parser.py), their files cached
  by identity (a replaced file is read again);
- a `<lora:...>` tag naming a fused LoRA has its patches dropped from the cloned patchers; the deltas that do
  not depend on the input or the step (`constant_deltas`) go to Forge's own weight merge instead, as DynFuse's
  own patch sets (forge_patches.py), and only the others are hooked;
- the forward hooks live only inside one UNet call: a wrapper on a *cloned* UnetPatcher
  (`set_model_unet_function_wrapper`, backend/patcher/base.py:146), called as
  `wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})` (backend/sampling/sampling_function.py:270-273);
  the wrapper opens the run's UNet scope (`FuseRun.scope`) with step/total from the pass's denoiser and
  cond/uncond row labels from `cond_or_uncond`;
- the text encoder's hooks live only while the conditionings are computed (a per-instance wrapper of
  `p.setup_conds`, with cond caches private to `p`).
Host modules are imported lazily, inside functions.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layer_delta import LayerDelta
from . import common
from .common import FuseInputError, HostLora
# the halves of the adapter, re-exported: tests and the guidance glue name them through this module
from .forge_parser import (MAX_UNMATCHED, UNET_PREFIX, ForgeLora, check_lora_file, dense_delta,  # noqa: F401
                           forge_lora, layer_deltas, low_rank_delta, parse_lora, split_patch_key)
from .forge_patches import (add_constant_patches, drop_lora_patches, forge_patch_key, forge_patch_value,  # noqa: F401
                            has_patches_of, lora_online_mode, our_patch_sets, our_wrappers, patch_identities)

# cond_or_uncond codes of Forge's batching (backend/sampling/sampling_function.py:161-162)
COND, UNCOND = 0, 1


# ---------------------------------------------------------------------------- detection
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_forge() -> bool:
    """Forge (2.x backend) is running: its LoRA parser module can be found. By feature, never by version tag."""
    return _has_module("backend.patcher.lora")


def uses_forge_objects(sd_model: Any) -> bool:
    """The loaded model is a Forge diffusion engine (has `forge_objects.unet`)."""
    return getattr(getattr(sd_model, "forge_objects", None), "unet", None) is not None


def is_flux(sd_model: Any) -> bool:
    """FLUX-family model: Forge has no `is_flux` flag; its key map checks the repo name (comfy lora.py:342)."""
    if type(sd_model).__name__ in ("Flux", "Chroma"):
        return True
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    repo = getattr(getattr(getattr(unet, "model", None), "config", None), "huggingface_repo", "") or ""
    return "flux" in repo.lower() or "chroma" in repo.lower()


# ---------------------------------------------------------------------------- per-call UNet hooks
def row_labels(cond_or_uncond: Sequence[int], rows: int) -> List[str]:
    """Per batch row 'cond'/'uncond' from Forge's chunk codes (0 cond, 1 uncond; each chunk = rows/len rows)."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or rows % chunks:
        return ["cond"] * rows
    per = rows // chunks
    return [("uncond" if code == UNCOND else "cond") for code in cond_or_uncond for _ in range(per)]


def denoiser_progress(sampler: Any) -> Callable[[], Tuple[int, int]]:
    """(step, total) of the pass's CFG denoiser's next call through the full schedule (common.pass_progress):
    `step` counts its calls from 0, `total_steps` and `steps` are set at sampling start (modules/
    sd_samplers_common.py:274-276; cfg_denoiser.py:47-52); an img2img or hires pass (`init_latent` set,
    sd_samplers_kdiffusion.py:178, sd_samplers_timesteps.py:106) enters the full schedule part-way. A new
    sampler per pass (hires: processing.py:1452) restarts the counter."""
    def progress() -> Tuple[int, int]:
        from modules import shared
        denoiser = getattr(sampler, "model_wrap_cfg", None)
        fix_steps = bool(getattr(getattr(shared, "opts", None), "img2img_fix_steps", False))
        return common.pass_progress(denoiser, fix_steps)
    return progress


CallScope = Callable[[List[str]], Any]  # row labels -> context manager with the hooks installed


def make_unet_wrapper(scope: CallScope, previous: Optional[Callable] = None) -> Callable:
    """A `model_function_wrapper` that installs the hooks for exactly one UNet call (chains `previous`).

    It is a plain closure: patcher clones deep-copy `model_options` (base.py:83) and functions copy as
    themselves, whereas a bound method would drag a copy of its object along.
    """
    def dynfuse_unet_wrapper(apply_model, args):
        labels = row_labels(args.get("cond_or_uncond", []), int(args["input"].shape[0]))
        with scope(labels):
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

    dynfuse_unet_wrapper.dynfuse_previous = previous
    return dynfuse_unet_wrapper


def install_unet_wrapper(sd_model: Any, scope: CallScope) -> Any:
    """Clone `forge_objects.unet`, set our wrapper on the clone (chaining any other), assign the clone back.

    Call from `process_before_every_sampling` (once per pass, 3x with hires fix, processing.py:1376, :1510,
    :1522): each call starts from the host's current patcher; a wrapper of ours already there is unwrapped,
    never stacked. The torch model is shared by all clones (base.py:79-84); only this patcher has the wrapper.
    """
    objects = sd_model.forge_objects
    unet = objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    while previous is not None and hasattr(previous, "dynfuse_previous"):
        previous = previous.dynfuse_previous
    unet.set_model_unet_function_wrapper(make_unet_wrapper(scope, previous))
    objects.unet = unet
    return unet


def _normal_tensor(t: Optional[torch.Tensor], device=None, dtype=None) -> Optional[torch.Tensor]:
    """A non-inference copy on device/dtype (Forge builds and samples under inference mode)."""
    if t is None:
        return None
    with torch.inference_mode(False), torch.no_grad():
        out = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None)
        return out.clone() if out.is_inference() else out


def on_device(delta: Optional[LayerDelta], device, dtype) -> Optional[LayerDelta]:
    """The delta moved once per pass to the UNet's device and compute dtype (not once per call)."""
    if delta is None:
        return None
    return LayerDelta(down=_normal_tensor(delta.down, device, dtype), up=_normal_tensor(delta.up, device, dtype),
                      mid=_normal_tensor(delta.mid, device, dtype), dense=_normal_tensor(delta.dense, device, dtype),
                      scale=delta.scale, out_slice=delta.out_slice)


class PassHooks:
    """One sampling pass: `call(labels)` opens the run's UNet scope for exactly one UNet call.

    Step and total come from the pass's denoiser (`progress`), the row labels from the call's `cond_or_uncond`.
    The run keeps one session per generation (its record spans the calls and passes); the hooks live only
    inside `call`.
    """

    def __init__(self, run: Any, p: Any, progress: Callable[[], Tuple[int, int]]):
        self.run, self.p, self.progress = run, p, progress
        self.session = None
        self.calls = 0

    @contextlib.contextmanager
    def call(self, labels: List[str]):
        step, total = self.progress()
        self.run.set_step(step, total)
        with self.run.scope(self.p, "unet") as session:
            if session is not None:
                self.run.set_rows(labels)
                self.session = session
                self.calls += 1
            yield session


class ForgeHost(common.WebUIHost):
    """HostAdapter for Stable Diffusion WebUI Forge (2.x backend), see common.py for the contract."""

    wrapped_methods = ("setup_conds",)

    name = "forge"
    # Forge's gradio shim takes `tooltip=` on every component (modules/gradio_extensions.py:135-149)
    gradio_tooltips = True

    def __init__(self, api: Optional[ForgeLora] = None):
        self._api = api
        self.files = common.FileCache(4)   # the fused LoRAs' state dicts, by file identity

    @property
    def api(self) -> ForgeLora:
        if self._api is None:
            self._api = forge_lora()
        return self._api

    # ------------------------------------------------------------------ LoRA list (sd_forge_lora/networks.py:130-167)
    def networks(self) -> Any:
        return networks_module()

    # ------------------------------------------------------------------ model and files
    def model_base(self) -> str:
        from modules import shared
        return model_family(shared.sd_model)

    def model_roots(self) -> List[torch.nn.Module]:
        """The torch modules of the loaded model (UNet, text encoders, VAE; shared by every patcher clone)."""
        from modules import shared
        objects = getattr(shared.sd_model, "forge_objects", None)
        found = [getattr(getattr(objects, holder, None), attr, None)
                 for holder, attr in (("unet", "model"), ("clip", "cond_stage_model"), ("vae", "first_stage_model"))]
        return [m for m in found if isinstance(m, torch.nn.Module)]

    def state_counts(self) -> Dict[str, int]:
        """DynFuse's patch sets and UNet wrappers on the current patchers (the last job's, replaced by the next
        job's copy, processing.py:937) and on the ones Forge keeps between jobs (which must hold none)."""
        from modules import shared
        model = shared.sd_model
        current = getattr(model, "forge_objects", None)
        kept = [getattr(model, a, None) for a in ("forge_objects_original", "forge_objects_after_applying_lora")]
        return {"patch_sets": our_patch_sets(current), "unet_wrappers": our_wrappers(current),
                "patch_sets_kept": sum(our_patch_sets(o) + our_wrappers(o) for o in kept)}

    def read_lora(self, name: str) -> HostLora:
        from modules import shared
        on_disk, identity = self._hashed_on_disk(name)
        try:
            # Forge's loader renames a file it fails to read to `<file>.corrupted` (modules_forge/patch_basic.py:27-57),
            # so a broken LoRA is refused here first, by a header read that Forge does not wrap.
            check_lora_file(on_disk.filename)
            lora_sd = self.files.get(on_disk.filename, self.api.load_state_dict)
        except Exception as e:  # unreadable, pickled, truncated: say which file
            raise FuseInputError(f"DynFuse: cannot read the file of LoRA {name!r} ({on_disk.filename}): {e}") from e
        objects = shared.sd_model.forge_objects
        clip = getattr(objects, "clip", None)
        out = parse_lora(self.api, on_disk.name, lora_sd, objects.unet.model, getattr(clip, "cond_stage_model", None))
        device = getattr(objects.unet, "load_device", None)
        dtype = getattr(objects.unet.model, "computation_dtype", None)
        for layer in out.layers.values():
            if layer.group == "unet":   # once here, not per UNet call (the session's casts live one scope)
                layer.delta = on_device(layer.delta, device, dtype)
        out.shorthash = getattr(on_disk, "shorthash", "") or ""
        out.base = common.LORA_BASES.get(getattr(getattr(on_disk, "sd_version", None), "name", "Unknown"), "unknown")
        out.identity = identity
        return out

    # ------------------------------------------------------------------ the builtin's own <lora:...>
    def prompt_lora_names(self, p: Any) -> List[str]:
        nets = networks_module()
        names = []
        for data in (getattr(p, "extra_network_data", None), getattr(p, "hr_extra_network_data", None)):
            for params in (data or {}).get("lora", []):
                if params.positional:
                    found = nets.available_network_aliases.get(params.positional[0])
                    names.append(found.name if found is not None else params.positional[0])
        return names

    def suppress_builtin(self, p: Any, names: Sequence[str]) -> List[str]:
        """Drop these LoRAs' patches from clones of the current UNet/CLIP patchers (assigned back), so Forge's
        weight merge at the next model load (memory_management.py:518 -> LoraLoader.refresh) leaves them out."""
        files = {}
        for name in names:
            try:
                files[self._on_disk(name).filename] = name
            except FuseInputError:
                continue
        objects = p.sd_model.forge_objects
        removed = set()
        if has_patches_of(objects.unet, files):
            unet = objects.unet.clone()
            removed.update(drop_lora_patches(unet, files))
            objects.unet = unet
        clip = getattr(objects, "clip", None)
        if clip is not None and has_patches_of(clip.patcher, files):
            clip = clip.clone()
            removed.update(drop_lora_patches(clip.patcher, files))
            objects.clip = clip
        by_norm = {os.path.normcase(os.path.abspath(f)): n for f, n in files.items()}
        return sorted({by_norm.get(os.path.normcase(os.path.abspath(f)), f) for f in removed})

    # ------------------------------------------------------------------ install points
    def install(self, p: Any, run: "common.FuseRun") -> None:
        """Per-instance wrapper of p.setup_conds (text-encoder hooks while the conds are computed), private cond
        caches (processing.py:175-176, :247-248 share them class-wide); the UNet hooks come per pass from
        `before_sampling`."""
        if getattr(p, "_dynfuse_wrapped", False):
            return
        p._dynfuse_wrapped = True
        for cache in _COND_CACHES:
            value = getattr(p, cache, None)
            if isinstance(value, list):
                setattr(p, cache, [None] * len(value))
        setup_conds = p.setup_conds

        def setup_conds_fused(*args, **kwargs):
            targets = run.prepare(p)
            if targets:
                run.exclude_duplicates(p)
                run.host_applied["te"] = add_constant_patches(p.sd_model.forge_objects, "te", targets, run.args,
                                                              patch_identities(run))
            with run.scope(p, "te"):
                self._publish(p, run)
                return setup_conds(*args, **kwargs)

        p.setup_conds = setup_conds_fused

    def before_every_sampling(self, p: Any, **kwargs) -> Optional[PassHooks]:
        """Script.process_before_every_sampling(p, x=, noise=, c=, uc=) (modules/scripts.py:194-199)."""
        run = getattr(p, common.RUN_ATTR, None)
        if run is None or not run.enabled:
            return None
        return self.before_sampling(p, run)

    def before_sampling(self, p: Any, run: "common.FuseRun") -> Optional[PassHooks]:
        """Script.process_before_every_sampling: the deltas that do not depend on the input go to Forge's own
        merge as patches, the others get the wrapper, for this pass, on a cloned UnetPatcher."""
        targets = run.prepare(p)
        if not any(t.group == "unet" for t in targets or []):
            return None
        run.exclude_duplicates(p)
        self._publish(p, run)
        run.host_applied["unet"] = add_constant_patches(p.sd_model.forge_objects, "unet", targets, run.args,
                                                        patch_identities(run))
        if not any(t.group == "unet" for t in run.forward_targets(targets)):
            return None
        hooks = PassHooks(run, p, denoiser_progress(getattr(p, "sampler", None)))
        install_unet_wrapper(p.sd_model, hooks.call)
        return hooks


_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def model_family(sd_model: Any) -> str:
    """'sd1'/'sd2'/'sdxl'/'sd3'/'flux' from the engine's flags (diffusion_engine/base.py:59-68) or 'unknown'."""
    for attr, base in (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, attr, False):
            return base
    return "flux" if is_flux(sd_model) else "unknown"


def networks_module():
    """Forge's builtin LoRA extension module (extensions-builtin/sd_forge_lora/networks.py), once loaded."""
    import networks
    return networks
