"""FuseRun: the fusion state of one generation (host -> FuseArgs -> FuseSession -> hooks), see common.py.

Nothing here imports a WebUI module.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from ..args import ArgsError, FuseArgs
from ..layer_delta import FuseTarget
from .host_lora import FuseInputError, HostLora, check_base, check_finite, check_shapes, pair_targets
from .progress import RowCursor

if TYPE_CHECKING:
    from .common import HostAdapter

log = logging.getLogger("dynfuse")

MERGE_NOTE = ("merge adds both LoRAs in every layer at every step:",
              "it makes no choice, so there is no selection to show.")


def balance_line(balance: float) -> Tuple[str, ...]:
    """The heat-map note's line on merge's balance (none at the neutral 0.5)."""
    if balance == 0.5:
        return ()
    from ..blend import merge_scales
    c, s = merge_scales(balance)
    return (f"balance {balance:g}: the subject at {c:g}x, the style at {s:g}x their weights.",)


def identity_key(lora: HostLora) -> str:
    """What a LoRA's file is, for cache keys: its hash and its identity on disk ('' when neither is known)."""
    return f"{lora.shorthash}@{lora.identity}" if lora.shorthash or lora.identity else ""


def without_prefix(error: Exception) -> str:
    text = str(error)
    return text[len("DynFuse: "):] if text.startswith("DynFuse: ") else text


def parse_ui_values(values: Sequence[Any]) -> FuseArgs:
    """FuseArgs from the script's positional values (UI / API), or one dict of named fields (API); validated."""
    return FuseArgs.from_values(list(values)).validate()


def tag_args(base: FuseArgs, tags: Sequence[Tuple[Sequence[str], Dict[str, str]]]) -> FuseArgs:
    """Apply the first `<dynlora:...>` tag (positional items, named items) on top of the UI settings."""
    positional, named = tags[0]
    return base.with_tag(list(positional), dict(named)).validate()



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
        self._loaded: Dict[Tuple, Any] = {}     # (subject, style, weights, te) -> (targets, hashes, identities) or error text
        self._session_cache: Dict[Tuple, Any] = {}
        self._last_unet: Any = None
        self._active: List[Any] = []
        self.hashes: Dict[str, str] = {}       # role -> short hash (infotext)
        self.identities: Dict[str, str] = {}   # role -> hash and file identity (the key of every cache)
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
        return (a.subject, a.style, *a.lora_weights(), a.text_encoder)

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
        targets, self.hashes, self.identities = got
        self.fused_names = (self.args.subject, self.args.style)
        return targets

    def _load(self, p: Any = None):
        a = self.args
        try:
            if a.subject == a.style:
                raise FuseInputError(f"DynFuse: subject and style are the same LoRA ({a.subject!r}); "
                                     "use it with <lora:...> instead")
            base = self.host.model_base()
            lora_base = getattr(self.host, "lora_base", None)
            if lora_base is not None:   # before any layer is read: a LoRA for another model fails its shapes too
                for name in (a.subject, a.style):
                    check_base(name, lora_base(name), base)
            loras = [self._read(name, base) for name in (a.subject, a.style)]
            subject, style = loras
            for lora in loras:
                if lora.skipped:
                    self.note(f"DynFuse: {len(lora.skipped)} layer(s) of {lora.name!r} cannot be fused on this "
                              f"host and are left out (e.g. {lora.skipped[0]})", p)
            targets = pair_targets(subject, style, *a.lora_weights(), a.text_encoder)   # merge: balance-tilted
            return targets, {"subject": subject.shorthash, "style": style.shorthash}, \
                {"subject": identity_key(subject), "style": identity_key(style)}
        except FuseInputError as e:
            return f"{e} - the image was generated without fusion"

    def _read(self, name: str, base: str) -> HostLora:
        """One LoRA read by the host and checked; every refusal names the LoRA."""
        try:
            lora = self.host.read_lora(name)
            check_base(lora.name, lora.base, base)
            check_shapes(lora)
            check_finite(lora)
        except FuseInputError as e:
            raise e if repr(name) in str(e) else FuseInputError(f"DynFuse: LoRA {name!r}: {without_prefix(e)}") from e
        except Exception as e:  # the host's loader failed on this file
            raise FuseInputError(f"DynFuse: could not read LoRA {name!r}: {type(e).__name__}: {e}") from e
        return lora

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
            if self.identities.get("subject") and self.identities.get("style"):
                klora_key = (self.identities["subject"], a.subject_weight, self.identities["style"], a.style_weight)
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
            return render_note(title, MERGE_NOTE + balance_line(self.args.balance))
        if self._last_unet is None:
            return None
        try:
            return self._last_unet.heatmap(title=title)
        except Exception as e:  # nothing recorded (e.g. interrupted before the first step)
            log.info("DynFuse: no heat-map: %s", e)
            return None

