"""AUTOMATIC1111 WebUI v1.10 adapter: the builtin Lora's loader -> LayerDelta, per-generation install points.

Host facts (upstream 82a973c0, tag v1.10.1) this relies on:
- `networks.load_network(name, networks.available_networks[name])` reads a file into `Network.modules`
  (sd_key -> NetworkModule, `.sd_module` = the live layer) without activating it
  (extensions-builtin/Lora/networks.py:158-270); only `networks.loaded_networks` is merged (:411-542), so the two
  fused LoRAs never go there and their deltas only pass through our hooks.
- `NetworkModuleLora` keeps `up_model`/`down_model`/`mid_model` and `calc_scale()` (network_lora.py:24-92,
  network.py:167); every other type gives its full dW through `calc_updown(orig_weight)` (network.py:196-227).
- Sampling: `p.setup_conds()` computes the conds (processing.py:966), `p.sample()` runs every pass, hires
  included (processing.py:987, :1338, :1446); the denoiser counts its calls in `step` and expects `total_steps`
  (sd_samplers_common.py:265-291) and calls `on_cfg_denoiser` with itself as `params.denoiser` before the UNet
  (sd_samplers_cfg_denoiser.py:211).
- Conds are cached in class-level lists keyed without our settings (processing.py:188-189, :440-491).
- open_clip text encoders (SD2, SDXL's second) attend with nn.MultiheadAttention: the builtin names their q/k/v
  `..._attn_{q,k,v}_proj` with the MHA as `sd_module` (the `_[qkv]_proj` fallback, networks.py:207-211) and
  `..._attn_out_proj` with the MHA's `out_proj` (named by `assign_network_names_to_compvis_modules`, :122-147),
  and merges them into `in_proj_weight` rows and `out_proj.weight` (:486-505). These become FuseTargets with a
  `part` on the MHA (lib_dynfuse/mha.py).
Host modules are imported inside functions only.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .. import mha
from ..layer_delta import LayerDelta
from . import common
from .common import FuseInputError, HostLora, LoraLayer


RUN_ATTR = common.RUN_ATTR


def networks_module():
    """The builtin Lora extension's `networks` module (in sys.modules once its script has loaded)."""
    try:
        import networks  # noqa: F401  (extensions-builtin/Lora/networks.py)
    except ImportError:
        from modules import paths  # the builtin's folder, when our script is imported before it
        sys.path.append(os.path.join(paths.script_path, "extensions-builtin", "Lora"))
        import networks  # noqa: F811
    return networks


def layer_group(sd_key: str) -> str:
    """UNet layers are named `diffusion_model_...`; every text-encoder name has 'transformer' early (network.py:161)."""
    return "unet" if sd_key.startswith("diffusion_model") else "te"


def unfusable(module: torch.nn.Module) -> str:
    """Why a forward hook on this layer cannot carry a delta ('' = it can).

    open_clip text encoders (SD2, SDXL's second) use nn.MultiheadAttention: the builtin maps q/k/v to the MHA
    itself (networks.py:208-211) and its out_proj is read as a weight inside the MHA, never called as a module;
    `read_lora` gives both to an MHA hook instead (`mha_part`).
    """
    if isinstance(module, torch.nn.MultiheadAttention):
        return "MultiheadAttention q/k/v"
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return "MultiheadAttention out_proj"
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return type(module).__name__
    return ""


_QKV_KEY = re.compile(r"_([qkv])_proj$")


def mha_part(sd_key: str, sd_module: torch.nn.Module, layer_mapping: dict) -> Tuple[torch.nn.Module, Optional[str]]:
    """The builtin's layer -> (module to hook, MultiheadAttention part or None), from its names (networks.py:207-211).

    q/k/v: the key ends in `_{q,k,v}_proj` and `sd_module` is the MHA; out: `sd_module` is the MHA's `out_proj`,
    whose parent is named by the key without `_out_proj` (networks.py:122-147)."""
    if isinstance(sd_module, torch.nn.MultiheadAttention):
        found = _QKV_KEY.search(sd_key)
        return sd_module, (found.group(1) if found else None)
    if sd_key.endswith("_out_proj"):
        parent = layer_mapping.get(sd_key[:-len("_out_proj")])
        if isinstance(parent, torch.nn.MultiheadAttention) and parent.out_proj is sd_module:
            return parent, "out"
    return sd_module, None


def module_delta(m: Any, part: Optional[str] = None) -> LayerDelta:
    """One builtin NetworkModule -> LayerDelta: low rank for plain LoRA/LoCon, else dense from calc_updown
    (on the part's rows of `in_proj_weight` for an MHA q/k/v, as the builtin does, networks.py:496-499)."""
    sd_module = m.sd_module
    weight = mha.part_weight(sd_module, part) if isinstance(sd_module, torch.nn.MultiheadAttention) else sd_module.weight
    plain = (type(m).__name__ == "NetworkModuleLora" and getattr(m, "dora_scale", None) is None
             and getattr(m, "bias", None) is None and getattr(m.network, "dyn_dim", None) is None)
    if plain:
        mid = m.mid_model.weight.detach() if getattr(m, "mid_model", None) is not None else None
        return LayerDelta(down=m.down_model.weight.detach(), up=m.up_model.weight.detach(), mid=mid,
                          scale=float(m.calc_scale()) * float(m.multiplier()))
    with torch.no_grad():
        updown, ex_bias = m.calc_updown(weight)
    if ex_bias is not None:
        raise FuseInputError(f"DynFuse: layer {m.sd_key} of LoRA {m.network.name!r} changes a bias, "
                             "which fusion does not support")
    return LayerDelta(dense=updown.detach().reshape(weight.shape).to(weight.dtype))


def _rows(cond: Any) -> int:
    """Rows of a conditioning tensor or of an SDXL cond dict (`crossattn`)."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[0])


class A1111Host(common.WebUIHost):
    """HostAdapter for AUTOMATIC1111 v1.10 (see common.py for the contract)."""

    wrapped_methods = ("setup_conds", "sample", "calculate_hr_conds")

    name = "a1111"
    gradio_tooltips = True      # gradio_extensons.py IOComponent_init takes tooltip= and sets the element title

    def on_cfg_denoiser(self, params: Any) -> None:
        on_cfg_denoiser(params)

    # ------------------------------------------------------------------ LoRA list
    def networks(self) -> Any:
        return networks_module()

    # ------------------------------------------------------------------ model and files
    def model_base(self) -> str:
        from modules import shared
        m = shared.sd_model
        for attr, base in (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
            if getattr(m, attr, False):
                return base
        return "unknown"

    def model_roots(self) -> List[torch.nn.Module]:
        """The loaded model (UNet, text encoders, VAE under one LatentDiffusion) for the diagnostics' hook count."""
        from modules import shared
        model = shared.sd_model
        return [model] if isinstance(model, torch.nn.Module) else []

    def read_lora(self, name: str) -> HostLora:
        nets = networks_module()
        on_disk, identity = self._hashed_on_disk(name)
        version = getattr(getattr(on_disk, "sd_version", None), "name", "Unknown")
        out = HostLora(name=on_disk.name, shorthash=getattr(on_disk, "shorthash", "") or "",
                       base=common.LORA_BASES.get(version, "unknown"), identity=identity)
        net = nets.load_network(on_disk.name, on_disk)
        from modules import shared
        layer_mapping = getattr(shared.sd_model, "network_layer_mapping", {}) or {}
        for sd_key, m in net.modules.items():
            module, part = mha_part(sd_key, m.sd_module, layer_mapping)
            problem = unfusable(module) if part is None else mha.unsupported(module)
            if problem:
                out.skipped.append(f"{sd_key} ({problem})")
                continue
            out.layers[sd_key] = LoraLayer(module=module, group=layer_group(sd_key), delta=module_delta(m, part),
                                           part=part)
        out.order_as(shared.sd_model.modules())
        return out

    # ------------------------------------------------------------------ the builtin's own <lora:...>
    def prompt_lora_names(self, p: Any) -> List[str]:
        nets = networks_module()
        names = []
        for data in (getattr(p, "extra_network_data", None), getattr(p, "hr_extra_network_data", None)):
            for key in ("lora", "lyco"):
                for params in (data or {}).get(key, []):
                    if params.positional:
                        found = nets.available_network_aliases.get(params.positional[0])
                        names.append(found.name if found is not None else params.positional[0])
        return names

    def suppress_builtin(self, p: Any, names: Sequence[str]) -> List[str]:
        nets = networks_module()
        keep = [n for n in nets.loaded_networks if n.name not in names]
        removed = [n.name for n in nets.loaded_networks if n.name in names]
        nets.loaded_networks[:] = keep   # the builtin re-merges each layer from its backup on the next forward
        return removed

    def bakes_weights(self) -> bool:
        """Input-independent deltas go into the weights (baked.py) unless the builtin runs functionally: its network_forward
        copies its own backups into the weights on every call (networks.py:545-569), which would undo ours."""
        from modules import shared
        return not getattr(shared.opts, "lora_functional", False)

    def sync_builtin(self, modules: Sequence[torch.nn.Module]) -> None:
        """Bring the fused layers' weights to what the builtin wants now, under no_grad (it restores with copy_,
        see real-host-facts). Also in functional mode: there `network_forward` skips its restore when no
        `<lora>` is active (networks.py:551), so weights a merge-mode job left merged would stay under our hooks."""
        nets = networks_module()
        with torch.no_grad():
            for m in {id(m): m for m in modules}.values():   # an MHA is the module of up to four targets
                if getattr(m, "network_layer_name", None) is not None and (
                        hasattr(m, "weight") or isinstance(m, torch.nn.MultiheadAttention)):
                    nets.network_apply_weights(m)

    # ------------------------------------------------------------------ install points
    def install(self, p: Any, run: "common.FuseRun") -> None:
        """Per-instance wrappers of p.setup_conds, p.calculate_hr_conds (TE hooks) and p.sample (UNet hooks);
        fresh cond caches so no cond is shared with generations made with other settings."""
        if getattr(p, "_dynfuse_wrapped", False):
            return
        p._dynfuse_wrapped = True
        for cache in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if hasattr(p, cache):
                setattr(p, cache, [None, None])
        setup_conds, sample = p.setup_conds, p.sample

        def sync(targets):
            self.sync_builtin([t.module for t in targets])

        def setup_conds_fused(*args, **kwargs):
            with run.scope(p, "te", before_open=sync):
                self._publish(p, run)
                return setup_conds(*args, **kwargs)

        def sample_fused(*args, **kwargs):
            with run.scope(p, "unet", before_open=sync) as session:
                self._publish(p, run)
                if session is None:
                    return sample(*args, **kwargs)
                unet = p.sd_model.model.diffusion_model
                handle = unet.register_forward_pre_hook(functools.partial(_label_rows, run))
                try:
                    return sample(*args, **kwargs)
                finally:
                    handle.remove()

        p.setup_conds = setup_conds_fused
        p.sample = sample_fused
        calculate_hr_conds = getattr(p, "calculate_hr_conds", None)
        if calculate_hr_conds is not None:
            def calculate_hr_conds_fused(*args, **kwargs):
                # hires conds are computed inside p.sample after the builtin re-activated its <lora>s
                # (processing.py:1437-1440), or inside setup_conds (:1525-1536)
                with run.scope(p, "te"):
                    if run.enabled and run.fused_names:
                        run.exclude_duplicates(p)
                    return calculate_hr_conds(*args, **kwargs)
            p.calculate_hr_conds = calculate_hr_conds_fused

    def before_every_sampling(self, p: Any, **kwargs) -> None:
        """Script.process_before_every_sampling (processing.py:1338, :1446): the hires pass re-activates the
        builtin's `<lora>`s (:1437), so a fused LoRA's own `<lora>` is taken out again before that pass."""
        run = getattr(p, RUN_ATTR, None)
        if run is not None and run.enabled and run.fused_names:
            run.exclude_duplicates(p)


def _label_rows(run: "common.FuseRun", module: torch.nn.Module, args: tuple) -> None:
    """UNet forward pre-hook: the next rows of this denoiser call's [cond..., uncond...] layout."""
    run.set_rows(run.rows.take(_batch(args)))


def _batch(args: tuple) -> int:
    x = args[0] if args else None
    return int(x.shape[0]) if torch.is_tensor(x) else 0


def session_targets(session: Any) -> list:
    return list(getattr(session, "targets", []) or [])


def img2img_fix_steps() -> bool:
    """opts.img2img_fix_steps (shared_options.py:220): img2img runs exactly its steps slider."""
    from modules import shared
    return bool(getattr(shared.opts, "img2img_fix_steps", False))


def on_cfg_denoiser(params: Any) -> None:
    """Step, total and cond/uncond rows of this denoiser call, from the denoiser itself (script_callbacks.py:45);
    an img2img or hires pass counts from where it enters the full schedule (common.pass_progress)."""
    denoiser = getattr(params, "denoiser", None)
    run = getattr(getattr(denoiser, "p", None), RUN_ATTR, None)
    if run is None or not run.active_sessions:
        return
    if getattr(denoiser, "step", None) is None or not getattr(denoiser, "total_steps", None):
        run.set_step(params.sampling_step, params.total_sampling_steps)
    else:
        run.set_step(*common.pass_progress(denoiser, img2img_fix_steps()))
    n_uncond = _rows(params.text_uncond)
    run.rows.reset(int(params.x.shape[0]) - n_uncond, n_uncond)
