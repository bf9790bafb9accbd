"""Host-independent glue between a WebUI and the fusion engine: host -> FuseArgs -> FuseSession -> hooks.

Every host (AUTOMATIC1111 in `a1111.py`, Forge in `forge.py`) implements the small `HostAdapter` protocol
below; everything else (arguments from UI/API/tag, reading and checking the two LoRAs, pairing their
layers into `FuseTarget`s, messages, infotext, the heat-map) lives here, once, in `FuseRun`.

One generation (one `p`) owns one `FuseRun`:

    run = FuseRun(host, ui_values)            # Script.process: positional UI values or one dict (API)
    run.use_tag(tags)                         # ExtraNetwork.activate: `<dynlora:subject:style:k=v>` items
    host.install(p, run)                      # host: arrange the scopes below around its own TE / UNet calls
        with run.scope(p, "te"): ...          #   around the conditioning computation (per prompt)
        with run.scope(p, "unet"): ...        #   around sampling (all passes); hooks removed in `finally`
        run.set_step(step, total)             #   from the denoiser's own counters, never a call counter
        run.set_rows(labels)                  #   "cond" / "uncond" per batch row of the next UNet call
    run.infotext()                            # value of the `DynFuse` infotext entry
    run.heatmap()                             # PIL image or None

`HostAdapter` (what a host provides; every method is cheap and has no side effect unless it says so):
    name: str                                  "a1111" / "forge"
    lora_names() -> list[str]                  names the host's LoRA list offers (for dropdowns and checks)
    refresh_loras() -> list[str]               rescan the LoRA folders, then `lora_names()`
    model_base() -> str                        the loaded checkpoint's family: "sd1", "sd2", "sdxl", ... or "unknown"
    read_lora(name) -> HostLora                read one LoRA with the host's own loader into `LayerDelta`s keyed
                                               by layer, never activating it in the host; raises `FuseInputError`
    prompt_lora_names(p) -> list[str]          names of the host's own `<lora:...>` tags active for this batch
    suppress_builtin(p, names) -> list[str]    stop the host's LoRA support from applying these names (they are
                                               fused instead); returns the names it actually removed
    install(p, run) -> None                    per-generation install points (see above); nothing global
    report(p, message) -> None                 show a message in the UI, the console and the infotext / API info
    add_image(p, processed, image, infotext)   append an image to the gallery (not saved as a generation)
Optional, used by scripts/dynfuse.py when present:
    gradio_tooltips: bool                      the host's gradio takes `tooltip=` on components
    before_every_sampling(p, **kwargs)         Script.process_before_every_sampling (x=, noise=, c=, uc=)
    on_cfg_denoiser(params)                    registered with script_callbacks.on_cfg_denoiser
    uninstall(p)                               undo `install` on this p (called from Script.postprocess)
    save_beside(p, processed, image, suffix, infotext)   save an extra image beside the generation's saved one

Nothing here imports a WebUI module or gradio.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

import torch

from ..args import ArgsError, FuseArgs
from ..layer_delta import FuseTarget, LayerDelta, check_weight, delta_parts, first_nonfinite

log = logging.getLogger("dynfuse")

GROUPS = ("unet", "te")
INFOTEXT_KEY = "DynFuse"
MESSAGE_KEY = "DynFuse message"
RUN_ATTR = "dynfuse_run"        # the FuseRun of a generation, kept on its `p`
OVERRIDES_ATTR = "dynfuse_xyz"  # field -> value set on a `p` by the X/Y/Z plot's DynFuse axes (hosts/xyz.py)
TAG_NAME = "dynlora"            # <dynlora:subject:style[:key=value...]>
HEATMAP_SUFFIX = "-dynfuse-heatmap"   # the heat-map's file name: the generation's first saved image's + this
MERGE_NOTE = ("merge adds both LoRAs in every layer at every step:",
              "it makes no choice, so there is no selection to show.")


def one_line(message: str) -> str:
    """A message as one plain infotext value: the host splits infotext at newlines (infotext_utils.py:254) and
    only keeps a multi-line value on its line as an escaped JSON string (quote, :56-60), unreadable in the info
    box. A line ending in ':' runs on with a space, other line breaks become '; '."""
    out = ""
    for line in (s.strip() for s in str(message).splitlines()):
        if line:
            out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def report_on_p(p: Any, message: str) -> None:
    """Show a message in the UI's info box (`p.comment`, full text) and in the infotext / API info (one line;
    both hosts; the console has it already from the `dynfuse` logger, so nothing is printed here)."""
    if hasattr(p, "comment"):
        p.comment(message)
    message = one_line(message)
    params = getattr(p, "extra_generation_params", None)
    if params is not None:
        old = params.get(MESSAGE_KEY)
        if not old:
            params[MESSAGE_KEY] = message
        elif message not in old:
            params[MESSAGE_KEY] = f"{old}; {message}"


def append_to_gallery(processed: Any, image: Any, infotext: str) -> None:
    """An extra gallery image with its own infotext (`Processed.images` / `.infotexts`), not saved as a generation."""
    processed.images.append(image)
    processed.infotexts.append(infotext)


class FuseInputError(ValueError):
    """A problem with the LoRAs a user picked (unknown, unreadable, other base model): shown, then no fusion."""


@dataclass
class LoraLayer:
    """One layer one LoRA changes: the live host module, its group ("unet"/"te") and the delta."""

    module: torch.nn.Module
    group: str
    delta: LayerDelta
    part: Optional[str] = None          # q/k/v/out of an nn.MultiheadAttention `module` (FuseTarget.part)


@dataclass
class HostLora:
    """A LoRA as read by the host's own loader (not activated in the host)."""

    name: str
    shorthash: str = ""
    base: str = "unknown"                 # "sd1", "sd2", "sdxl", ... as the file's metadata says
    layers: Dict[str, LoraLayer] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)   # layers read but not fusable here (reason in the name)

    def order_as(self, modules: Iterable[torch.nn.Module]) -> None:
        """Put the layers in the order of `modules` (the model's own), whatever order the file or the host's parser
        gave: the targets, the selection record and the heat-map's layer axis follow it, the same on every start."""
        rank: Dict[int, int] = {}
        for i, m in enumerate(modules):
            rank.setdefault(id(m), i)
        self.layers = dict(sorted(self.layers.items(), key=lambda kv: rank.get(id(kv[1].module), len(rank))))


class BuiltinLoraList:
    """The LoRA list of the host's builtin Lora extension: its `networks` module has the same globals in
    AUTOMATIC1111 (extensions-builtin/Lora/networks.py:725-737) and Forge (sd_forge_lora/networks.py:130-167).
    A host adapter provides `networks()`, which returns that module."""

    def networks(self) -> Any:
        raise NotImplementedError

    def lora_names(self) -> List[str]:
        try:
            return sorted(self.networks().available_networks, key=str.lower)
        except Exception as e:  # the builtin Lora extension is disabled
            log.warning("DynFuse: the WebUI's builtin Lora extension is not available: %s", e)
            return []

    def refresh_loras(self) -> List[str]:
        self.networks().list_available_networks()
        return self.lora_names()

    def _on_disk(self, name: str):
        nets = self.networks()
        found = nets.available_networks.get(name) or nets.available_network_aliases.get(name)
        if found is None:
            raise FuseInputError(f"DynFuse: unknown LoRA {name!r} (not in the LoRA list; refresh it or check the name)")
        return found

    def _hashed_on_disk(self, name: str):
        """The list entry for `name` with its short hash read (the infotext names both LoRAs by hash); a hash
        that cannot be read is logged and left empty, it never stops the fusion."""
        on_disk = self._on_disk(name)
        if not getattr(on_disk, "shorthash", ""):
            try:
                on_disk.read_hash()
            except Exception as e:
                log.info("DynFuse: no hash for %s: %s", name, e)
        return on_disk


class WebUIHost(BuiltinLoraList):
    """What both WebUI adapters do alike: messages, gallery, infotext and dropping their per-instance wrappers.
    A subclass names the `p` methods it wraps in `wrapped_methods`."""

    wrapped_methods: Tuple[str, ...] = ()

    def report(self, p: Any, message: str) -> None:
        report_on_p(p, message)

    def add_image(self, p: Any, processed: Any, image: Any, infotext: str) -> None:
        append_to_gallery(processed, image, infotext)

    def save_beside(self, p: Any, processed: Any, image: Any, suffix: str, infotext: str) -> Optional[str]:
        from .saving import save_beside
        return save_beside(p, processed, image, suffix, infotext)

    def uninstall(self, p: Any) -> None:
        for attr in self.wrapped_methods:
            p.__dict__.pop(attr, None)
        p.__dict__.pop("_dynfuse_wrapped", None)

    def _publish(self, p: Any, run: "FuseRun") -> None:
        text = run.infotext()
        if text:
            p.extra_generation_params[INFOTEXT_KEY] = text


class HostAdapter(Protocol):
    """What a WebUI provides to `FuseRun` (see the module docstring for the contract of each method)."""

    name: str

    def lora_names(self) -> List[str]: ...

    def refresh_loras(self) -> List[str]: ...

    def model_base(self) -> str: ...

    def read_lora(self, name: str) -> HostLora: ...

    def prompt_lora_names(self, p: Any) -> List[str]: ...

    def suppress_builtin(self, p: Any, names: Sequence[str]) -> List[str]: ...

    def install(self, p: Any, run: "FuseRun") -> None: ...

    def report(self, p: Any, message: str) -> None: ...

    def add_image(self, p: Any, processed: Any, image: Any, infotext: str) -> None: ...


# ----------------------------------------------------------------------------- pure helpers
def parse_ui_values(values: Sequence[Any]) -> FuseArgs:
    """FuseArgs from the script's positional values (UI / API), or one dict of named fields (API); validated."""
    return FuseArgs.from_values(list(values)).validate()


def tag_args(base: FuseArgs, tags: Sequence[Tuple[Sequence[str], Dict[str, str]]]) -> FuseArgs:
    """Apply the first `<dynlora:...>` tag (positional items, named items) on top of the UI settings."""
    positional, named = tags[0]
    return base.with_tag(list(positional), dict(named)).validate()


def check_base(lora: HostLora, model_base: str) -> None:
    """Refuse a LoRA whose metadata names another model family than the loaded checkpoint."""
    if lora.base != "unknown" and model_base != "unknown" and lora.base != model_base:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} is for {lora.base.upper()}, "
                             f"but the loaded model is {model_base.upper()}")


def is_packed_weight(weight: torch.Tensor) -> bool:
    """Quantized storage (bitsandbytes NF4/FP4, GGUF in Forge) whose tensor shape is not the layer's shape."""
    return bool(getattr(weight, "bnb_quantized", False) or getattr(weight, "gguf_cls", None) is not None
                or weight.dtype in (torch.uint8, torch.int8))


def check_shapes(lora: HostLora) -> None:
    """Refuse a LoRA whose deltas do not fit the layers they matched (a LoRA for another architecture).

    A Linear/1x1-conv spelling of a delta is first reshaped to the layer's own form (some trainers store a
    Linear proj_in as a 1x1 conv); packed quantized weights can't be compared and are not checked."""
    from ..targets import fit_to_weight, shape_problem
    from ..mha import part_weight
    bad = []
    for name, layer in lora.layers.items():
        weight = layer.module.weight if layer.part is None else part_weight(layer.module, layer.part)
        if is_packed_weight(weight):
            continue
        layer.delta = fit_to_weight(layer.delta, weight)
        problem = shape_problem(layer.delta, weight)
        if problem:
            bad.append((name, problem))
    if bad:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} does not fit the loaded model "
                             f"({len(bad)} of {len(lora.layers)} layers have other shapes, e.g. {bad[0][0]}: "
                             f"{bad[0][1]}); is it for another base model?")
    if not lora.layers:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} changes no layer of the loaded model")


def check_finite(lora: HostLora) -> None:
    """Refuse a LoRA whose deltas (or scales, e.g. from a NaN alpha) hold NaN or Inf: every image would be NaN."""
    bad = first_nonfinite((f"{name} ({part})", t) for name, layer in lora.layers.items()
                          for part, t in delta_parts(layer.delta))
    if bad is not None:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} holds NaN or Inf values in layer {bad} (a diverged "
                             "training or a damaged file); it would turn every image into NaN")


def pair_targets(subject: HostLora, style: HostLora, subject_weight: float, style_weight: float,
                 text_encoder: str) -> List[FuseTarget]:
    """One FuseTarget per layer either LoRA changes, weights applied; text-encoder layers dropped when 'off'."""
    subject_weight = check_weight(subject_weight, "subject_weight")
    style_weight = check_weight(style_weight, "style_weight")
    names = list(subject.layers) + [n for n in style.layers if n not in subject.layers]
    targets = []
    for name in names:
        c, s = subject.layers.get(name), style.layers.get(name)
        first = c or s
        if first.group == "te" and text_encoder == "off":
            continue
        targets.append(FuseTarget(
            name=name, module=first.module, group=first.group, part=first.part,
            subject=c.delta.with_weight(subject_weight) if c is not None else None,
            style=s.delta.with_weight(style_weight) if s is not None else None))
    return targets


def img2img_schedule(pass_steps: int, requested_steps: int, strength: float, steps_given: bool) -> Tuple[int, int]:
    """(skipped, full): a pass that starts from a noised image (img2img, hires fix) runs the last `pass_steps`
    sampler steps of a schedule of `full` steps, so the first `skipped` = full - pass_steps are not run.

    The hosts' `setup_img2img_steps` (A1111 and Forge sd_samplers_common.py:22-31): with the steps given (hires:
    the hires steps; img2img with img2img_fix_steps: p.steps) full = int(steps / min(strength, 0.999)) and the
    pass has steps = t_enc + 1 steps; otherwise full = p.steps and the pass has int(min(strength, 0.999) * full) + 1.
    Either way the pass's first sampler step is step `skipped` of `full` (kdiffusion :137-138, timesteps :98-102).
    """
    if steps_given:
        full = int(pass_steps / min(strength, 0.999)) if strength > 0 else 0
    else:
        full = int(requested_steps)
    full = max(full, pass_steps)
    return full - pass_steps, full


def schedule_progress(call: int, calls: int, pass_steps: int, skipped: int, full: int) -> Tuple[int, int]:
    """(step, total) for `set_step` so that step / total is the progress through the full schedule: call `call` of
    `calls` expected denoiser calls of a pass that skips the first `skipped` of `full` steps (K-LoRA Eq. 7 counts
    t_now in the whole backward process). Second-order samplers make calls = 2 x steps: both count double."""
    per_step = max(1, int(calls) // max(1, int(pass_steps)))
    return int(skipped) * per_step + int(call), int(full) * per_step



def pass_progress(denoiser: Any, img2img_fix_steps: bool = False) -> Tuple[int, int]:
    """(step, total) of the denoiser's next call through the full schedule, for `set_step`.

    The CFG denoiser (the same fields in AUTOMATIC1111 and Forge, sd_samplers_cfg_denoiser.py:41-54 and :42-53) counts its
    calls in `step` and expects `total_steps`; `launch_sampling` sets `steps`, the pass's sampler steps
    (sd_samplers_common.py:265-269). A pass that starts from a noised image has `init_latent` set by its sampler
    (sd_samplers_kdiffusion.py:174, sd_samplers_timesteps.py:125) and runs the tail of a longer schedule
    (`img2img_schedule`; hires passes give their steps, `p.is_hr_pass`). Plain arithmetic on host counters: no
    tensor is read, so no device sync.
    """
    call = int(getattr(denoiser, "step", 0) or 0)
    calls = int(getattr(denoiser, "total_steps", 0) or 0)
    pass_steps = int(getattr(denoiser, "steps", 0) or 0)
    p = getattr(denoiser, "p", None)
    if getattr(denoiser, "init_latent", None) is None or pass_steps < 1 or calls < 1 or p is None:
        return call, max(calls, call + 1)
    given = bool(getattr(p, "is_hr_pass", False)) or bool(img2img_fix_steps)
    skipped, full = img2img_schedule(pass_steps, int(getattr(p, "steps", pass_steps) or pass_steps),
                                     float(getattr(p, "denoising_strength", 1.0) or 0.0), given)
    return schedule_progress(call, calls, pass_steps, skipped, full)

class RowCursor:
    """Labels the rows of successive UNet calls within one denoiser call (batched or chunked cond/uncond).

    The denoiser's input is [cond rows..., uncond rows] (A1111 sd_samplers_cfg_denoiser.py:203); when the host
    splits it into several UNet calls it does so in row order, so each call takes the next `n` labels.
    """

    def __init__(self):
        self.labels: List[str] = []
        self.offset = 0

    def reset(self, n_cond: int, n_uncond: int) -> None:
        self.labels = ["cond"] * n_cond + ["uncond"] * n_uncond
        self.offset = 0

    def take(self, n: int) -> List[str]:
        if self.offset + n > len(self.labels):
            self.offset = 0
        out = self.labels[self.offset:self.offset + n]
        self.offset += n
        return out if len(out) == n else ["cond"] * n


# ----------------------------------------------------------------------------- one generation
class FuseRun:
    """The fusion state of one generation: effective args, the two LoRAs' targets, sessions, messages."""

    def __init__(self, host: HostAdapter, ui_values: Optional[Sequence[Any]] = None,
                 ui_args: Optional[FuseArgs] = None):
        self.host = host
        self.messages: List[str] = []
        self.ui_args = FuseArgs()
        if ui_args is not None:
            self.ui_args = ui_args
        elif ui_values is not None:
            try:
                self.ui_args = parse_ui_values(ui_values)
            except ArgsError as e:
                self.messages.append(f"{e} - the image was generated without fusion")
                log.warning("%s", self.messages[-1])
        self.args: FuseArgs = self.ui_args
        self.overrides: Dict[str, Any] = {}
        self.rows = RowCursor()
        self.step: Tuple[int, int] = (0, 1)
        self._loaded: Dict[Tuple, Any] = {}     # (subject, style, weights, te) -> (targets, hashes) or error text
        self._session_cache: Dict[Tuple, Any] = {}
        self._last_unet: Any = None
        self._active: List[Any] = []
        self.hashes: Dict[str, str] = {}
        self.fused_names: Tuple[str, ...] = ()
        self.suppressed: List[str] = []
        self.installed = False
        self.host_applied: Dict[str, Set[str]] = {}   # group -> targets the host's own weight merge applies

    # ------------------------------------------------------------------ arguments
    @property
    def enabled(self) -> bool:
        return bool(self.args.enabled)

    def use_tag(self, tags: Sequence[Tuple[Sequence[str], Dict[str, str]]], p: Any = None) -> None:
        """Apply `<dynlora:...>` tags of the current batch (empty: back to the UI settings)."""
        self.args = self.ui_args
        if tags:
            if len(tags) > 1:
                self.note("DynFuse: only the first <dynlora:...> tag of a prompt is used", p)
            try:
                self.args = tag_args(self.ui_args, tags)
            except ArgsError as e:
                self.note(f"{e} - the image was generated without fusion", p)
                self.args = FuseArgs()
                return
        self._apply_overrides(p)

    def use_overrides(self, changes: Dict[str, Any], p: Any = None) -> None:
        """Field values an X/Y/Z plot cell sets: they win over the UI settings and the tag, for this generation."""
        self.overrides = dict(changes or {})
        self._apply_overrides(p)

    def _apply_overrides(self, p: Any = None) -> None:
        if not self.overrides:
            return
        try:
            self.args = self.args.with_changes(self.overrides).validate()
        except ArgsError as e:
            self.note(f"{e} - the image was generated without fusion", p)
            self.args = FuseArgs()

    def note(self, message: str, p: Any = None) -> None:
        """A user-facing message: logged, and shown through the host (UI, console, infotext) once per run."""
        if message in self.messages:
            return
        self.messages.append(message)
        log.warning("%s", message)
        if p is not None:
            self.host.report(p, message)

    def report_all(self, p: Any) -> None:
        for m in self.messages:
            self.host.report(p, m)

    @property
    def active_sessions(self) -> List[Any]:
        return list(self._active)

    # ------------------------------------------------------------------ LoRAs -> targets
    def _key(self) -> Tuple:
        a = self.args
        return (a.subject, a.style, a.subject_weight, a.style_weight, a.text_encoder)

    def prepare(self, p: Any = None) -> Optional[List[FuseTarget]]:
        """The targets for the current args (read once per generation), or None (disabled or a reported error)."""
        if not self.enabled:
            return None
        key = self._key()
        if key not in self._loaded:
            self._loaded[key] = self._load(p)
            if isinstance(self._loaded[key], str):
                self.note(self._loaded[key], p)
        got = self._loaded[key]
        if isinstance(got, str):
            return None
        targets, self.hashes = got
        self.fused_names = (self.args.subject, self.args.style)
        return targets

    def _load(self, p: Any = None):
        a = self.args
        try:
            if a.subject == a.style:
                raise FuseInputError(f"DynFuse: subject and style are the same LoRA ({a.subject!r}); "
                                     "use it with <lora:...> instead")
            base = self.host.model_base()
            loras = []
            for name in (a.subject, a.style):
                try:
                    lora = self.host.read_lora(name)
                except FuseInputError:
                    raise
                except Exception as e:  # the host's loader failed on this file
                    raise FuseInputError(f"DynFuse: could not read LoRA {name!r}: {type(e).__name__}: {e}") from e
                check_base(lora, base)
                check_shapes(lora)
                check_finite(lora)
                loras.append(lora)
            subject, style = loras
            for lora in loras:
                if lora.skipped:
                    self.note(f"DynFuse: {len(lora.skipped)} layer(s) of {lora.name!r} cannot be fused on this "
                              f"host and are left out (e.g. {lora.skipped[0]})", p)
            targets = pair_targets(subject, style, a.subject_weight, a.style_weight, a.text_encoder)
            return targets, {"subject": subject.shorthash, "style": style.shorthash}
        except FuseInputError as e:
            return f"{e} - the image was generated without fusion"

    def forward_targets(self, targets: Optional[Sequence[FuseTarget]]) -> List[FuseTarget]:
        """The targets DynFuse applies itself (hooks or baked weights): all but those the host merges."""
        return [t for t in targets or [] if t.name not in self.host_applied.get(t.group, ())]

    def exclude_duplicates(self, p: Any) -> None:
        """A `<lora:x>` of a fused LoRA would apply it twice: keep it out of the host's own LoRA support."""
        if not self.enabled or not self.fused_names:
            return
        dup = [n for n in self.host.prompt_lora_names(p) if n in self.fused_names]
        if not dup:
            return
        removed = self.host.suppress_builtin(p, dup)
        for name in removed:
            if name not in self.suppressed:
                self.suppressed.append(name)
                self.note(f"DynFuse: <lora:{name}> is also fused by DynFuse; it is applied once, "
                          "through the fusion (the <lora> tag is ignored)", p)

    # ------------------------------------------------------------------ hooks
    def _session(self, group: str, targets: List[FuseTarget]):
        """One FuseSession per (settings, group) for the whole generation, so its record spans every scope."""
        from ..session import FuseSession  # the engine; imported here so hosts load without it
        a = self.args
        # deltas that do not depend on the input (merge, K-LoRA's pick, layers one LoRA touches) cost nothing
        # per call once baked into the weights, where the host's own weight handling allows it (baked.py)
        bake = bool(getattr(self.host, "bakes_weights", lambda: False)())
        windows = {f"{role}_window": a.window(role) for role in ("subject", "style")}
        key = (self._key(), a.method, a.criterion, a.klora_alpha, a.klora_beta, a.klora_scale, group, bake,
               tuple(windows.values()))
        session = self._session_cache.get(key)
        if session is None:
            klora_key = None
            if self.hashes.get("subject") and self.hashes.get("style"):
                klora_key = (self.hashes["subject"], a.subject_weight, self.hashes["style"], a.style_weight)
            session = FuseSession(targets, method=a.method, criterion=a.criterion, klora_alpha=a.klora_alpha,
                                  klora_beta=a.klora_beta, klora_scale=a.klora_scale, record=(group == "unet"),
                                  te_mode=a.text_encoder, klora_key=klora_key, weight_space=bake, **windows)
            self._session_cache[key] = session
        return session

    def session_for(self, group: str, targets: Optional[Sequence[FuseTarget]]) -> Optional[Any]:
        """The session `scope` opens for `group` (one per generation and settings), or None when nothing is fused
        there; e.g. for the selection record of a private model copy that takes one of the host's calls."""
        chosen = [t for t in self.forward_targets(targets) if t.group == group]
        return self._session(group, chosen) if chosen else None

    @contextlib.contextmanager
    def scope(self, p: Any, group: str,
              before_open: Optional[Callable[[Sequence[FuseTarget]], None]] = None) -> Iterator[Optional[Any]]:
        """Hooks (or baked weights) on the layers of `group` for the duration of the block; removed whatever
        happens. `before_open(targets)` runs first: the host settles its own state of those layers there, before
        a baked session saves and changes their weights."""
        targets = self.prepare(p)
        if not targets:
            yield None
            return
        self.exclude_duplicates(p)
        chosen = [t for t in self.forward_targets(targets) if t.group == group]
        if not chosen:
            yield None
            return
        session = self._session(group, chosen)
        if session in self._active:      # nested (the host computes hires conds inside setup_conds): already on
            yield session
            return
        session.set_step(*((0, 1) if group == "te" else self.step))
        if before_open is not None:
            before_open(chosen)
        self._active.append(session)
        try:
            with session:
                yield session
        finally:
            self._active.remove(session)
            if group == "unet":
                self._last_unet = session
            if getattr(session, "rewritten_layers", None):
                names = session.rewritten_layers
                self.messages.append(f"DynFuse: {len(names)} layer(s) (e.g. {names[0]}) were rewritten by another "
                                     "extension during the generation (per-step LoRA weights?); DynFuse's delta "
                                     "was re-applied at its next step change or dropped, and the weights were left "
                                     "as that extension set them")
                log.warning("%s", self.messages[-1])

    def set_step(self, step: int, total: int) -> None:
        """Denoising progress from the host's own counters (0-based call index, expected number of calls)."""
        total = max(int(total or 1), 1)
        self.step = (min(int(step), total - 1), total)
        for s in self._active:
            s.set_step(*self.step)

    def set_rows(self, labels: Sequence[str]) -> None:
        for s in self._active:
            s.set_row_labels(list(labels))

    # ------------------------------------------------------------------ outputs
    def infotext(self) -> Optional[str]:
        """The `DynFuse` infotext value (with both LoRAs' short hashes), or None when not fusing."""
        if not self.enabled or not self.fused_names or self._loaded.get(self._key()) is None \
                or isinstance(self._loaded.get(self._key()), str):
            return None
        return self.args.infotext({k: v for k, v in self.hashes.items() if v})

    def heatmap(self):
        """The selection heat-map of the generation's sampling, when asked for and something was recorded."""
        if not self.enabled or not self.args.heatmap:
            return None
        title = f"DynFuse {self.args.method}: {self.args.subject} vs {self.args.style}"
        if self.args.method == "merge" and self.infotext() is not None:   # fused (the host may own every layer)
            from ..heatmap import render_note
            return render_note(title, MERGE_NOTE)
        if self._last_unet is None:
            return None
        try:
            return self._last_unet.heatmap(title=title)
        except Exception as e:  # nothing recorded (e.g. interrupted before the first step)
            log.info("DynFuse: no heat-map: %s", e)
            return None


def infotext_field_value(params: Dict[str, Any], name: str) -> Any:
    """For paste: the value of FuseArgs field `name` from parsed infotext params; None leaves a control alone."""
    text = params.get(INFOTEXT_KEY)
    if not text:
        return False if name == "enabled" else None
    try:
        args = FuseArgs.from_infotext(text)
    except ArgsError:
        return None
    return getattr(args, name)


# ----------------------------------------------------------------------------- lifecycle, called by the Script
def prompts_have_tag(p: Any) -> bool:
    """Does any prompt of this job mention `<dynlora:`? (cheap; the host parses the tag itself later)"""
    texts = []
    for attr in ("all_prompts", "all_hr_prompts", "prompt", "hr_prompt"):
        v = getattr(p, attr, None)
        texts.extend(v if isinstance(v, (list, tuple)) else [v])
    marker = f"<{TAG_NAME}:"
    return any(isinstance(t, str) and marker in t for t in texts)


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")   # the host's re_extra_net (extra_networks.py:175)


def prompt_tags(prompt: Any) -> List[Tuple[List[str], Dict[str, str]]]:
    """The `<dynlora:...>` items of one prompt as the host will hand them to ExtraNetwork.activate: args split
    at ':', an item with exactly one '=' named, any other positional (extra_networks.py:31-45, :178-191)."""
    tags = []
    for name, text in _EXTRA_NETWORK.findall(prompt if isinstance(prompt, str) else ""):
        if name != TAG_NAME:
            continue
        positional, named = [], {}
        for item in text.split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        tags.append((positional, named))
    return tags


def first_batch_tags(p: Any) -> List[Tuple[List[str], Dict[str, str]]]:
    """The tags the host will activate for the first batch: the first prompt's (parse_prompts keeps the
    first prompt's networks, extra_networks.py:194-206); none when the job disables extra networks."""
    if getattr(p, "disable_extra_networks", False):
        return []
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")]
    first = prompts[0] if isinstance(prompts, (list, tuple)) else prompts
    return prompt_tags(first)


def begin(host: HostAdapter, p: Any, values: Sequence[Any]) -> FuseRun:
    """Script.process: the run of this generation from the UI/API values and the first batch's tag (parsed
    here, before the host activates it per batch, so that what is decided once per generation - install,
    guidance and its references - sees the tag's fields too); install only when it may fuse."""
    run = FuseRun(host, ui_values=values)
    setattr(p, RUN_ATTR, run)
    overrides = getattr(p, OVERRIDES_ATTR, None)
    if overrides:
        # an X/Y/Z plot cell is a shallow copy of the plot's p (xyz_grid.py:711): its own dicts keep a cell's
        # messages and infotext out of the next cell's
        for attr in ("extra_generation_params", "comments"):
            if isinstance(getattr(p, attr, None), dict):
                setattr(p, attr, dict(getattr(p, attr)))
        run.use_overrides(overrides, p)
    run.report_all(p)
    tags = first_batch_tags(p)
    if tags:
        run.use_tag(tags, p)
    if run.enabled or prompts_have_tag(p):
        host.install(p, run)
        run.installed = True
    return run


def activate_tag(host: HostAdapter, p: Any, tags: Sequence[Tuple[Sequence[str], Dict[str, str]]]) -> None:
    """ExtraNetwork.activate: this batch's tags; a job without our Script (p.scripts None) gets a run here."""
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        if not tags:
            return
        run = FuseRun(host)
        setattr(p, RUN_ATTR, run)
    run.use_tag(tags, p)
    if run.enabled and not getattr(run, "installed", False):
        host.install(p, run)
        run.installed = True


def finish(host: HostAdapter, p: Any, processed: Any) -> None:
    """Script.postprocess: heat-map into the gallery when asked, and beside the saved image when the host saved
    one; the per-instance wrappers go."""
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        return
    image = run.heatmap()
    if image is not None and processed is not None:
        text = f"DynFuse selection heat-map ({run.args.subject} vs {run.args.style})"
        save = getattr(host, "save_beside", None)
        if save is not None:
            save(p, processed, image, HEATMAP_SUFFIX, text)   # before add_image: the heat-map is no generation image
        host.add_image(p, processed, image, text)
    uninstall = getattr(host, "uninstall", None)
    if uninstall is not None:
        uninstall(p)


def info(host: HostAdapter, version: str) -> Dict[str, Any]:
    """The `GET /dynfuse/v1/info` body: version, choices, defaults and every field's UI metadata (JSON-safe)."""
    from dataclasses import fields as dc_fields
    from .. import args as args_mod
    defaults = FuseArgs()
    described = []
    for f in dc_fields(FuseArgs):
        m = f.metadata
        if m["ui"] == "image":
            default = None
        else:
            default = getattr(defaults, f.name)
        described.append({"name": f.name, "label": m["label"], "tip": m["tip"], "default": default,
                          "choices": list(m["choices"]) or None, "minimum": m["minimum"], "maximum": m["maximum"],
                          "infotext": m["infotext"], "tag_aliases": list(m["aliases"])})
    return {
        "version": version,
        "host": getattr(host, "name", "unknown"),
        "methods": list(args_mod.METHODS),
        "criteria": list(args_mod.CRITERIA),
        "text_encoder_modes": list(args_mod.TEXT_ENCODER_MODES),
        "defaults": {d["name"]: d["default"] for d in described},
        "fields": described,
        "tag": f"<{TAG_NAME}:subject:style[:key=value...]>",
        "api_args": "alwayson_scripts: {\"dynfuse\": {\"args\": [positional values in field order] or [{name: value}]}}",
        "loras": host.lora_names(),
    }
