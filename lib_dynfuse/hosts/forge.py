"""Stable Diffusion WebUI Forge adapter (`ForgeHost`, see common.py's HostAdapter): Forge's own LoRA parser ->
LayerDeltas; Forge's own weight merge for constant deltas, hooks per UNet call for the others.

Forge merges every LoRA into the weights; its `backend.operations.Linear` is not an `nn.Linear`; it samples
under `torch.inference_mode()`. So (host facts: shared/reference/webui-forge.md, real-host-facts.md):
- the two fused LoRAs are read with Forge's parser (`load_lora` + `model_lora_keys_unet/clip`, a fresh key-map
  dict on every call: the defaults are shared mutable dicts) and become LayerDeltas; targets are found by the
  key map's model key, never by module type;
- a `<lora:...>` tag naming a fused LoRA has its patches dropped from the cloned patchers; the deltas that do
  not depend on the input or the step (`constant_deltas`) go to Forge's own weight merge instead, as DynFuse's
  own patch sets (`add_constant_patches`), and only the others are hooked;
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
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from ..baked import constant_deltas
from ..flux import join_slices
from ..lora_file import check_safetensors
from ..layer_delta import LayerDelta
from . import common
from .common import FuseInputError, HostLora, LoraLayer

# cond_or_uncond codes of Forge's batching (backend/sampling/sampling_function.py:161-162)
COND, UNCOND = 0, 1
# Forge declares a LoRA a version mismatch above this many unmatched keys (sd_forge_lora/networks.py:25)
MAX_UNMATCHED = 12
UNET_PREFIX = "diffusion_model."


# ---------------------------------------------------------------------------- detection
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_lora_file(path: str) -> None:
    """Refuse a file that is not a whole safetensors file (pickles included) without loading it."""
    from safetensors import safe_open
    check_safetensors(path)
    with safe_open(path, framework="pt") as f:   # parses the header and checks it against the file size
        f.keys()


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


# ---------------------------------------------------------------------------- Forge's LoRA parser
@dataclass(frozen=True)
class ForgeLora:
    """The Forge functions this adapter uses (real ones from `forge_lora()`, stand-ins in tests)."""

    load_lora: Callable            # (lora_sd, key_map) -> (patch_dict, remaining_dict)
    keys_unet: Callable            # (KModel, key_map) -> key_map
    keys_clip: Callable            # (JointTextEncoder, key_map) -> key_map
    merge: Callable                # merge_lora_to_weight(patches, weight, key, computation_dtype)
    load_state_dict: Callable      # filename -> state dict


def forge_lora() -> ForgeLora:
    """Bind Forge's parser (backend/patcher/lora.py:19-48, :84) and its cached state-dict reader."""
    from backend.patcher import lora as forge_lora_module
    try:
        import networks  # the builtin sd_forge_lora's module: shares its lru_cache (networks.py:56-58)
        load_sd = networks.load_lora_state_dict
    except (ImportError, AttributeError):
        from backend.utils import load_torch_file

        def load_sd(filename):
            return load_torch_file(filename, safe_load=True)
    return ForgeLora(load_lora=forge_lora_module.load_lora, keys_unet=forge_lora_module.model_lora_keys_unet,
                     keys_clip=forge_lora_module.model_lora_keys_clip,
                     merge=forge_lora_module.merge_lora_to_weight, load_state_dict=load_sd)


def split_patch_key(key) -> Tuple[str, Optional[Tuple[int, int, int]], Optional[Callable]]:
    """A patch-dict key -> (model key, (dim, offset, size) or None, function or None).

    Keys are model keys, or tuples (model_key, (dim, offset, size)) for slices of FLUX's fused qkv/linear1
    and (model_key, None, fn) for re-ordered outputs (comfy utils.py:407-509; base.py:98-108 unpacks them).
    """
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1], (key[2] if len(key) > 2 else None)


def low_rank_delta(value, strength: float, offset=None) -> Optional[LayerDelta]:
    """("lora", (up, down, alpha, mid, dora_scale)) -> LayerDelta, scale = alpha/rank x strength; None if not plain.

    Comfy naming: v[0] is *up* [out, r(,1,1)], v[1] is *down* [r, in(,kh,kw)] (backend/patcher/lora.py:147-153).
    DoRA (dora_scale set) depends on the base weight: not low rank, built dense instead.
    """
    if not (isinstance(value, tuple) and len(value) == 2 and value[0] == "lora"):
        return None
    up, down, alpha, mid, dora_scale = value[1]
    if dora_scale is not None:
        return None
    rank = int(down.shape[0])
    scale = (float(alpha) / rank if alpha is not None else 1.0) * strength
    out_slice = None
    if offset is not None:
        if offset[0] != 0:
            return None
        out_slice = (int(offset[1]), int(offset[2]))
    return LayerDelta(down=down, up=up, mid=mid, scale=scale, out_slice=out_slice)


def _depends_on_weight(value) -> bool:
    """Whether a patch's dW depends on the base weight: DoRA (dora_scale, last item), GLoRA, set, unknown forms."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)):
        return True
    kind, v = value
    if kind in ("diff",):
        return False
    if kind in ("lora", "loha", "lokr"):
        return v[-1] is not None
    return True


def _weight_for_dense(module: torch.nn.Module, model_key: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "bnb_quantized", False) or getattr(weight, "gguf_cls", None) is not None:
        raise FuseInputError(f"DynFuse: {model_key} is stored quantized (NF4/FP4/GGUF); only plain LoRA "
                        "(lora_up/lora_down) works there, not LoHa/LoKr/DoRA/GLoRA/full diffs")
    return weight


def dense_delta(entries: Sequence[Tuple[Any, Any, Any]], module: torch.nn.Module, model_key: str,
                merge: Callable, strength: float) -> LayerDelta:
    """dW of one layer for non-low-rank patches (LoHa, LoKr, GLoRA, DoRA, diff, set, re-ordered outputs).

    Built once per generation with Forge's own `merge_lora_to_weight` on a normal (non-inference) copy:
    on zeros when dW does not depend on W (exact), else merged(W) - W (DoRA/GLoRA/set depend on W).
    `entries` are (value, offset, function) of one model key.
    """
    weight = _weight_for_dense(module, model_key)
    needs_base = any(_depends_on_weight(value) for value, _, _ in entries)
    patches = [[strength, value, 1.0, offset, function] for value, offset, function in entries]
    with torch.inference_mode(False), torch.no_grad():
        if needs_base:
            base = weight.detach().to(torch.float32).clone()
        else:
            base = torch.zeros(tuple(weight.shape), dtype=torch.float32, device=weight.device)
        merged = merge(patches, base.clone(), model_key, computation_dtype=torch.float32)
        dw = (merged.to(torch.float32) - base) if needs_base else merged.to(torch.float32).clone()
    return LayerDelta(dense=dw.to(weight.dtype if weight.dtype.is_floating_point else torch.float32))


def layer_deltas(patch_dict: Dict[Any, Any], root: torch.nn.Module, merge: Callable, strength: float
                 ) -> Tuple[Dict[str, LayerDelta], List[str]]:
    """Forge patch dict -> {module path under root: LayerDelta}, plus the patch keys that are skipped and why.

    All patches of one model key (FLUX: q, k, v, mlp slices of one fused layer) become one delta.
    """
    grouped: Dict[str, List[Tuple[Any, Any, Any]]] = {}
    skipped: List[str] = []
    for key, value in patch_dict.items():
        model_key, offset, function = split_patch_key(key)
        if not model_key.endswith(".weight"):
            skipped.append(f"{model_key} (only weights are fused, not biases or norms)")
            continue
        grouped.setdefault(model_key, []).append((value, offset, function))
    deltas: Dict[str, LayerDelta] = {}
    for model_key, entries in grouped.items():
        path = model_key[: -len(".weight")]
        try:
            module = root.get_submodule(path)
        except AttributeError:
            skipped.append(f"{model_key} (no such layer)")
            continue
        low = [None if function is not None else low_rank_delta(value, strength, offset)
               for value, offset, function in entries]
        if all(d is not None for d in low):
            out_channels = _out_channels(module, low)
            for d in low:
                _check_fits(d, module, out_channels, model_key)
            deltas[path] = join_slices(low, out_channels)
        else:
            deltas[path] = dense_delta(entries, module, model_key, merge, strength)
    return deltas, skipped


def _out_channels(module: torch.nn.Module, deltas: Sequence[LayerDelta]) -> int:
    """The layer's output channels: its weight's rows, else out_features/out_channels, else (a quantized layer
    without them, operations.py:355-438) the end of the furthest slice."""
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(weight, "shape") and len(weight.shape) >= 2 \
            and not getattr(weight, "bnb_quantized", False):
        return int(weight.shape[0])
    for attr in ("out_features", "out_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return max(int(d.up.shape[0]) if d.out_slice is None else sum(d.out_slice) for d in deltas)


def _check_fits(delta: LayerDelta, module: torch.nn.Module, out_channels: int, model_key: str) -> None:
    size = delta.out_slice[1] if delta.out_slice is not None else out_channels
    if int(delta.up.shape[0]) != size:
        raise FuseInputError(f"DynFuse: the LoRA's {model_key} has {delta.up.shape[0]} outputs, the layer {size}: "
                        "the LoRA was made for another model")
    in_features = getattr(module, "in_features", getattr(module, "in_channels", None))
    if in_features is not None and int(delta.down.shape[1]) != int(in_features):
        raise FuseInputError(f"DynFuse: the LoRA's {model_key} takes {delta.down.shape[1]} inputs, the layer "
                        f"{in_features}: the LoRA was made for another model")


def parse_lora(api: ForgeLora, name: str, lora_sd: Dict[str, torch.Tensor], unet_model: torch.nn.Module,
               clip_model: Optional[torch.nn.Module]) -> HostLora:
    """Read one LoRA state dict with Forge's parser, UNet first then text encoders (as networks.py:15-23).

    Deltas at strength 1 (the user weights are applied when pairing). Layer names: UNet layers by their path
    under `diffusion_model` (e.g. `input_blocks.1.1.proj_in`, `double_blocks.0.img_attn.qkv`), text-encoder
    layers by their path under `clip.cond_stage_model` (`clip_l.transformer.text_model...`).
    """
    unet_patches, rest = api.load_lora(lora_sd, api.keys_unet(unet_model, {}))
    te_patches: Dict[Any, Any] = {}
    if clip_model is not None:
        te_patches, rest = api.load_lora(rest, api.keys_clip(clip_model, {}))
    unet, skipped = layer_deltas(unet_patches, unet_model, api.merge, 1.0)
    te: Dict[str, LayerDelta] = {}
    if clip_model is not None:
        te, skipped_te = layer_deltas(te_patches, clip_model, api.merge, 1.0)
        skipped += skipped_te
    unmatched = sorted(k for k in rest if not k.endswith(".alpha"))
    if not unet and not te:
        raise FuseInputError(f"DynFuse: LoRA {name!r} matches no layer of the loaded model "
                             f"({len(lora_sd)} keys, e.g. {next(iter(sorted(lora_sd)), '')!r}): made for another base model?")
    if len(unmatched) > MAX_UNMATCHED:
        raise FuseInputError(f"DynFuse: LoRA {name!r} does not fit the loaded model: {len(unmatched)} of its keys "
                             f"match no layer (e.g. {', '.join(unmatched[:3])})")
    out = HostLora(name=name, skipped=skipped + [f"{k} (no layer)" for k in unmatched])
    for path, delta in unet.items():
        layer = path[len(UNET_PREFIX):] if path.startswith(UNET_PREFIX) else path
        out.layers[layer] = LoraLayer(module=unet_model.get_submodule(path), group="unet", delta=delta)
    for path, delta in te.items():
        out.layers[path] = LoraLayer(module=clip_model.get_submodule(path), group="te", delta=delta)
    out.order_as(itertools.chain(unet_model.modules(), clip_model.modules() if clip_model is not None else ()))
    return out


# ---------------------------------------------------------------------------- keep Forge from merging them
def drop_lora_patches(patcher: Any, filenames: Iterable[str]) -> List[str]:
    """Remove these files' entries from a (cloned) patcher's `lora_patches` (keyed (filename, ...), base.py:92).

    The fused LoRAs must never be merged into the weights too (a `<lora:...>` tag naming one of them).
    Returns the removed filenames.
    """
    wanted = {os.path.normcase(os.path.abspath(f)) for f in filenames if f}
    removed = []
    for key in list(getattr(patcher, "lora_patches", {}) or {}):
        filename = key[0] if isinstance(key, tuple) else key
        if isinstance(filename, str) and os.path.normcase(os.path.abspath(filename)) in wanted:
            del patcher.lora_patches[key]
            removed.append(filename)
    return removed


def _has_patches_of(patcher: Any, filenames: Iterable[str]) -> bool:
    wanted = {os.path.normcase(os.path.abspath(f)) for f in filenames if f}
    return any(isinstance(k, tuple) and isinstance(k[0], str) and os.path.normcase(os.path.abspath(k[0])) in wanted
               for k in getattr(patcher, "lora_patches", {}) or {})


# ---------------------------------------------------------------------------- constant deltas: Forge's own merge
def forge_patch_value(delta: LayerDelta):
    """A LayerDelta as the patch value Forge merges (backend/patcher/lora.py:85-160): low rank as ("lora", (up,
    down, alpha, mid, None)) with alpha = scale x rank (Forge scales by alpha / rank), dense as ("diff", (dW,))."""
    if delta.is_low_rank:
        return "lora", (delta.up, delta.down, delta.scale * delta.rank, delta.mid, None)
    return "diff", (delta.dense if delta.scale == 1.0 else delta.dense * delta.scale,)


def forge_patch_key(prefix: str, name: str, delta: LayerDelta):
    """The patch-dict key of a layer: its model key, with (dim, offset, size) for a slice (split_patch_key)."""
    model_key = prefix + name + ".weight"
    if delta.out_slice is None:
        return model_key
    return model_key, (0, int(delta.out_slice[0]), int(delta.out_slice[1]))


def lora_online_mode(unet: Any) -> bool:
    """Whether Forge merges LoRA patches per forward, decided as for <lora> (sd_forge_lora/networks.py:102-105)."""
    try:
        from backend.args import dynamic_args
        online = bool(dynamic_args.get("online_lora", False))
    except ImportError:
        online = False
    if getattr(unet.model, "storage_dtype", None) in (torch.float32, torch.float16, torch.bfloat16):
        online = False
    return online


def add_constant_patches(objects: Any, group: str, targets: Sequence[Any], args: Any,
                         identities: Tuple[str, str]) -> Set[str]:
    """Give Forge's own weight merge every delta of `group` that does not depend on the input or the step.

    `constant_deltas`: all of them for `merge`, and for every method the layers only one LoRA touches, except the
    UNet deltas of a LoRA with a step window (`FuseArgs.windowed`: they change with the step, so the hooks keep them). They
    become two patch sets (subject, style) on a clone of `objects.unet` (group "unet", model keys under the
    KModel) or `objects.clip` ("te", keys under its cond_stage_model), assigned back, so Forge merges them into
    the weights when it loads that model, as it does for <lora>: each call then costs what the plain model
    costs, and the weights come from <lora>'s own arithmetic. Forge keeps its own copy of the weights and puts
    it back when the patches change, so the next job without them gets the weights back bit for bit.
    `identities` (`patch_identities`) name the two sets: Forge skips its re-merge while the names of the patch
    sets are unchanged (LoraLoader.refresh), so they must change whenever the deltas do. Returns the names of
    the targets patched.
    """
    prefix = UNET_PREFIX if group == "unet" else ""
    sets: Tuple[Dict[Any, Any], Dict[Any, Any]] = ({}, {})
    names: Dict[Any, str] = {}
    for t in targets:
        deltas = constant_deltas(t, args.method, args.text_encoder, args.windowed()) if t.group == group else None
        for delta in deltas or []:
            key = forge_patch_key(prefix, t.name, delta)
            sets[0 if delta is t.subject else 1][key] = forge_patch_value(delta)
            names[key] = t.name
    attr = "unet" if group == "unet" else "clip"
    holder = getattr(objects, attr, None)
    if not names or holder is None:
        return set()
    clone = holder.clone()
    patcher = clone if group == "unet" else clone.patcher   # a CLIP holds its patcher (backend/patcher/clip.py:20)
    online = lora_online_mode(objects.unet)
    taken = set()
    for identity, patches in zip(identities, sets):
        if patches:
            taken |= set(patcher.add_patches(filename=identity, patches=patches, strength_patch=1.0,
                                             strength_model=1.0, online_mode=online))
    setattr(objects, attr, clone)
    refused = {name for key, name in names.items() if key not in taken}   # a layer is Forge's only if all its
    return set(names.values()) - refused                                 # patches were taken


def patch_identities(run: "common.FuseRun") -> Tuple[str, str]:
    """Names of the subject and style patch sets: what the deltas are made of (see add_constant_patches)."""
    a = run.args
    which = "all layers" if a.method == "merge" else "one-LoRA layers"
    which += f", te {a.text_encoder}"
    if a.windowed():   # a windowed LoRA's UNet deltas leave the sets (add_constant_patches)
        which += ", windows " + " ".join(f"{role} {a.window(role)[0]}-{a.window(role)[1]}" for role in a.windowed())
    return tuple(f"DynFuse {role} {name} {run.hashes.get(role, '')} x{weight} ({which})"
                 for role, name, weight in (("subject", a.subject, a.subject_weight), ("style", a.style, a.style_weight)))


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

    def read_lora(self, name: str) -> HostLora:
        from modules import shared
        on_disk = self._hashed_on_disk(name)
        try:
            # Forge's loader renames a file it fails to read to `<file>.corrupted` (modules_forge/patch_basic.py:27-57),
            # so a broken LoRA is refused here first, by a header read that Forge does not wrap.
            check_lora_file(on_disk.filename)
            lora_sd = self.api.load_state_dict(on_disk.filename)
        except Exception as e:  # unreadable, pickled, truncated: say which file
            raise FuseInputError(f"DynFuse: cannot read LoRA file {on_disk.filename!r}: {e}") from e
        objects = shared.sd_model.forge_objects
        clip = getattr(objects, "clip", None)
        out = parse_lora(self.api, on_disk.name, lora_sd, objects.unet.model, getattr(clip, "cond_stage_model", None))
        device = getattr(objects.unet, "load_device", None)
        dtype = getattr(objects.unet.model, "computation_dtype", None)
        for layer in out.layers.values():
            if layer.group == "unet":   # once here, not per UNet call (the session's casts live one scope)
                layer.delta = on_device(layer.delta, device, dtype)
        out.shorthash = getattr(on_disk, "shorthash", "") or ""
        out.base = _LORA_BASES.get(getattr(getattr(on_disk, "sd_version", None), "name", "Unknown"), "unknown")
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
        if _has_patches_of(objects.unet, files):
            unet = objects.unet.clone()
            removed.update(drop_lora_patches(unet, files))
            objects.unet = unet
        clip = getattr(objects, "clip", None)
        if clip is not None and _has_patches_of(clip.patcher, files):
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
# Forge's network.SdVersion names (sd_forge_lora/network.py:9-15) -> model families
_LORA_BASES = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl", "Flux": "flux"}


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
