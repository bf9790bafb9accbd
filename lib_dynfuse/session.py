"""FuseSession: two LoRAs on a model through forward hooks, one per target layer, for one generation.

Each hook receives the layer's own output y = F (the base, computed once by the module itself) and adds:
- a layer only one LoRA touches: that LoRA's delta;
- `merge` (the default): dF_c + dF_s (direct arithmetic merge, w_c dW_c + w_s dW_s; the weights are in the
  deltas), each scaled by `balance` (blend.merge_scales; 0.5 leaves both as they are);
- `blend`: both deltas weighted by their divergences (blend.py), a soft form of `dynamic`;
- `dynamic` (dynamic fusion Eq. 9-13): per batch row, dF_c where d_c >= d_s else dF_s, d = the criterion of
  F + dF against F (see selection.py for how features become distributions);
- `klora` (K-LoRA Eq. 1-10): the subject's or the style's delta by a schedule [steps, layers] computed once
  from the top-K sums. K-LoRA's paper selects in attention layers only; here its rule is applied to **every
  layer both LoRAs touch** (convs, feed-forwards and projections too), because a layer that took the sum
  of both would be a merge in disguise and would reintroduce the interference the method avoids. gamma
  (Eq. 9) is summed over the UNet layers both LoRAs touch; dW in the sums is the scaled delta.
Text-encoder targets (group "te") follow `te_mode`: "select" = the same rule (K-LoRA: progress 0, since the
prompt is encoded before the first step), "merge" = the sum, "off" = no delta.

Deltas are computed in low rank, laid out once per session for few ops per call (branches.py). The hooks need no
host sync (the dynamic choice is a `torch.where`; K-LoRA's is a precomputed Python bool), and they work under
no_grad, inference_mode and enable_grad (gradients flow through the kept branch to the input). With
`tie_rows=True` an image's cond and uncond rows keep one branch, chosen by their summed scores.
Step windows (`subject_window`, `style_window`: (start, end) fractions of denoising, p = step/total): outside its
window a LoRA is left out of the UNet's layers, and a shared layer takes the other LoRA alone (recorded as that
branch's choice); text encoders ignore the windows, as the prompt is encoded once before the first step.
Hooks are removed by `close()` / `__exit__` in `finally`, on exceptions and KeyboardInterrupt alike; no module is
swapped and no torch class is patched, so afterwards the model computes bit-identically to before.
With `weight_space=True` the deltas that do not depend on the input (merge, K-LoRA's pick of the step, a layer
one LoRA touches) are added into the weights instead (baked.py) and copied back from a saved copy on close.
Targets with a `part` (q/k/v/out of one nn.MultiheadAttention) share one hook on that MHA (mha.py), which
recomputes the attention with each part fused by the same rule; records and K-LoRA slots stay per part.
"""
from __future__ import annotations

import functools
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from . import blend, branches, mha
from .baked import target_mode
from .layer_delta import FuseTarget
from .lowrank import channel_dim
from .record import LABELS, SelectionRecord
from .session_options import FULL_WINDOW, METHODS, TE_MODES, balanced_targets, check_choice, check_targets, \
    check_window, in_window, partner_order
from .selection import CRITERIA, KLORA_SCALES, branch_outputs, branch_scores, choose_subject, kept_branch, \
    klora_schedule, klora_switch_progress
from .selection import klora_scale as scale_at


class FuseSession:
    """Context manager: hooks on every target while open; `set_step`, `set_row_labels`, `selection`, `heatmap()`."""

    def __init__(self, targets: Sequence[FuseTarget], method: str = "merge", criterion: str = "kl",
                 klora_alpha: float = 1.5, klora_beta: float = 0.5, klora_scale: str = "linear",
                 record: bool = True, te_mode: str = "select", klora_key: Optional[Hashable] = None,
                 weight_space: bool = False, backup_device="cpu", tie_rows: bool = False,
                 subject_window: Tuple[float, float] = FULL_WINDOW, style_window: Tuple[float, float] = FULL_WINDOW,
                 sharpness: float = 1.0, balance: float = 0.5, per_token: bool = False):
        check_choice("method", method, METHODS)
        check_choice("criterion", criterion, CRITERIA)
        check_choice("klora_scale", klora_scale, KLORA_SCALES)
        check_choice("te_mode", te_mode, TE_MODES)
        self.targets: List[FuseTarget] = check_targets(targets)
        self.method, self.criterion, self.te_mode = method, criterion, te_mode
        self.tie_rows = bool(tie_rows)
        if not sharpness >= 0.0:
            raise ValueError(f"DynFuse: sharpness must be >= 0, got {sharpness!r}")
        self.sharpness, self.balance, self.per_token = float(sharpness), float(balance), bool(per_token)
        if method == "blend":
            self._log_ratio = blend.balance_log_ratio(self.balance)
        elif method == "merge":
            self.targets = balanced_targets(self.targets, self.balance)
        elif self.balance != 0.5:
            raise ValueError(f"DynFuse: balance applies to the merge and blend methods, not {method!r}")
        self.windows = {"subject": check_window("subject_window", subject_window),
                        "style": check_window("style_window", style_window)}
        self._full_windows = all(w == FULL_WINDOW for w in self.windows.values())
        self.weight_space, self.backup_device = bool(weight_space), backup_device
        self._baked = None
        self._baked_picks: List[Tuple[int, bool]] = []   # weight_space: the current step's recorded choices
        self._baked_picks_from: Optional[str] = None      # "open", "step" or "call" (recorded with a call's rows)
        self.rewritten_layers: List[str] = []
        self.klora_alpha, self.klora_beta, self.klora_scale = float(klora_alpha), float(klora_beta), klora_scale
        if method == "klora":
            scale_at(0.0, self.klora_alpha, self.klora_beta, klora_scale)  # star needs alpha > 0: fail here, not in a hook

        # the recorded layers: every UNet layer both LoRAs touch, in target order
        recorded = [i for i, t in enumerate(self.targets) if t.is_shared and t.group == "unet"]
        self._record_slot: Dict[int, int] = {i: j for j, i in enumerate(recorded)}
        self.record: Optional[SelectionRecord] = (
            SelectionRecord([self.targets[i].name for i in recorded]) if record else None)

        self.klora_sums = None
        self._klora_slot: Dict[int, int] = {}
        self._klora_tables: Dict[int, List[List[bool]]] = {}
        if self._needs_klora():
            from .klora_cache import SUMS_CACHE
            self.klora_sums = SUMS_CACHE.get(klora_key, self.targets)
            slot = {name: j for j, name in enumerate(self.klora_sums.names)}
            self._klora_slot = {i: slot[t.name] for i, t in enumerate(self.targets) if t.is_shared}

        self._step, self._total = 0, 1
        self._labels: Optional[List[str]] = None
        self._partners: Dict[tuple, Optional[torch.Tensor]] = {}
        self._cast: Dict[tuple, branches.Prepared] = {}
        self._handles: list = []
        self.resolved = None   # set by `fuse`: the targets.ResolveResult (match report, warnings)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FuseSession":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "FuseSession":
        """Bake the input-independent targets (weight_space) and register one forward hook per other target
        (undone completely if anything fails)."""
        if self.is_open:
            raise RuntimeError("DynFuse: this FuseSession is already open")
        try:
            if self.weight_space:
                from .baked import BakedWeights
                self._baked = BakedWeights(self.targets, self.backup_device)
                self._bake_step("open")
            mha_parts: Dict[int, Dict[str, int]] = {}
            for i, t in enumerate(self.targets):
                if self._mode(t) == "off" or self._is_baked(t):
                    continue
                if t.part is not None:
                    mha_parts.setdefault(id(t.module), {})[t.part] = i
                    continue
                hook = functools.partial(self._hook, i)
                self._handles.append(t.module.register_forward_hook(hook, with_kwargs=True))
            for parts in mha_parts.values():
                module = self.targets[next(iter(parts.values()))].module
                self._handles.append(module.register_forward_hook(functools.partial(self._mha_hook, parts),
                                                                  with_kwargs=True))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook and restore every baked weight; idempotent, and safe to call from `finally`."""
        handles, self._handles = self._handles, []
        baked, self._baked = self._baked, None
        first_error = None
        if baked is not None:
            try:
                baked.restore()
            except Exception as e:
                first_error = e
            # layers another component rewrote while baked (left as it set them): for the host to report
            self.rewritten_layers = list(dict.fromkeys(baked.rewritten))
            self._flush_baked_record(closing=True)   # bookkeeping only, after the weights are back
        for h in handles:
            try:
                h.remove()
            except Exception as e:  # still take the others off, then report the first failure
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def clear_cache(self) -> None:
        """Drop the deltas cast to the model's device/dtype (they are kept across open/close: hosts that hook
        per UNet call reopen one session every step, and the cast must happen once per generation)."""
        self._cast.clear()

    @property
    def is_open(self) -> bool:
        return bool(self._handles) or self._baked is not None

    # ------------------------------------------------------------------ caller-supplied state
    def set_step(self, step: int, total: int) -> None:
        """Denoising progress p = step / total (0-based step of `total`), from the caller's sampler loop."""
        step, total = int(step), int(total)
        if total < 1 or not 0 <= step < total:
            raise ValueError(f"DynFuse: set_step needs 0 <= step < total, got step={step}, total={total}")
        if self._baked is not None:
            self._flush_baked_record()
        self._step, self._total = step, total
        if self._baked is not None:
            self._bake_step("step")

    @property
    def progress(self) -> float:
        return self._step / self._total

    def set_row_labels(self, labels: Optional[Sequence[str]]) -> None:
        """Per batch row "cond" or "uncond", for the record (None = every row is cond)."""
        if labels is not None:
            labels = list(labels)
            bad = [lab for lab in labels if lab not in LABELS]
            if bad:
                raise ValueError(f"DynFuse: row labels must be 'cond' or 'uncond', got {bad[0]!r}")
        self._labels = labels
        if self._baked_picks:   # weight_space: a call runs with this step's baked choices, on these rows
            for index, subject in self._baked_picks:
                self._record_all(index, subject, labels or ["cond"])
            self._baked_picks_from = "call"

    def _partner_rows(self, rows: int, device) -> Optional[torch.Tensor]:
        """tie_rows: `partner_order` of the rows' labels as an index tensor, built once per labels and device."""
        labels = tuple(self._row_labels(rows))
        key = (labels, device)
        if key not in self._partners:
            partner = partner_order(labels)
            with torch.inference_mode(False):
                self._partners[key] = torch.tensor(partner, device=device) if partner is not None else None
        return self._partners[key]

    def _row_labels(self, rows: int) -> List[str]:
        # a layer whose batch differs from the labels (none in SD UNets) is recorded as cond
        if self._labels is not None and len(self._labels) == rows:
            return self._labels
        return ["cond"] * rows

    # ------------------------------------------------------------------ results
    @property
    def layer_names(self) -> List[str]:
        return list(self.record.layer_names) if self.record is not None else []

    @property
    def selection(self) -> torch.Tensor:
        """Per step and recorded layer, the share of rows that kept the subject: float [steps, layers], NaN = not run."""
        if self.record is None:
            raise RuntimeError("DynFuse: this session was made with record=False")
        return self.record.both

    def heatmap(self, title: Optional[str] = None):
        """PIL image of the record: steps x layers, cond and uncond panels, legend."""
        from .heatmap import render_heatmap
        if self.record is None:
            raise RuntimeError("DynFuse: this session was made with record=False")
        title = title or f"DynFuse {self.method}" + (f" ({self.criterion})" if self.method == "dynamic" else "")
        return render_heatmap(self.record.cond, self.record.uncond, title=title, layer_names=self.record.layer_names)

    def klora_switch_progress(self) -> Optional[torch.Tensor]:
        """Closed-form p* per shared layer for the linear K-LoRA scale (order of `klora_sums.names`)."""
        if self.klora_sums is None:
            return None
        s = self.klora_sums
        return klora_switch_progress(s.top_c, s.top_s, s.gamma, self.klora_alpha, self.klora_beta)

    # ------------------------------------------------------------------ weight space (merge, klora)
    def _bake_step(self, origin: str) -> None:
        """Bake every target's deltas for the current step (K-LoRA re-bakes only the layers whose pick changed).
        The choices are recorded per call that runs with them (`set_row_labels`, with that call's rows), or once as
        cond when no call was labelled; the bake made on `open`, before the caller's first `set_step`, is not a
        step of the generation unless no `set_step` follows (`_flush_baked_record`)."""
        picks: List[Tuple[int, bool]] = []
        from .baked import baked_deltas
        for i, t in enumerate(self.targets):
            if not self._is_baked(t):
                continue
            mode = self._mode(t)
            active_c, active_s = self._active(t)
            if not (active_c and active_s):   # a step window leaves one LoRA or none
                deltas = [t.subject] if active_c else [t.style] if active_s else []
                if t.is_shared and (active_c or active_s) and mode == "select":
                    picks.append((i, active_c))
                self._baked.bake(i, deltas)
                continue
            keep_subject = None
            if t.is_shared and mode == "select":
                keep_subject = self._klora_pick(i, t)
                picks.append((i, keep_subject))   # one decision per step for every row of every call
            self._baked.bake(i, baked_deltas(t, mode, keep_subject))
        self._baked_picks, self._baked_picks_from = picks, origin

    def _flush_baked_record(self, closing: bool = False) -> None:
        """Record the step's baked choices once as cond if no call was labelled with them ("step"; the bake of
        `open` only when closing, i.e. when no `set_step` replaced it), and forget them."""
        if self._baked_picks and (self._baked_picks_from == "step" or closing and self._baked_picks_from == "open"):
            for index, subject in self._baked_picks:
                self._record_all(index, subject, ["cond"])
        self._baked_picks, self._baked_picks_from = [], None

    def _active(self, target: FuseTarget) -> Tuple[bool, bool]:
        """Whether the target's subject and style act at this step: a UNet layer's LoRA within its window, a text
        encoder's always (the prompt is encoded before the first step)."""
        has_c, has_s = target.subject is not None, target.style is not None
        if target.group == "te" or self._full_windows:
            return has_c, has_s
        p = self.progress
        return has_c and in_window(self.windows["subject"], p), has_s and in_window(self.windows["style"], p)

    def _record_all(self, index: int, subject: bool, labels: Sequence[str]) -> None:
        """Record one choice for every row of a recorded layer (K-LoRA's pick, a step window's one LoRA)."""
        slot = self._record_slot.get(index)
        if slot is not None and self.record is not None:
            self.record.add_all(self._step, slot, subject, labels)

    def _is_baked(self, target: FuseTarget) -> bool:
        """weight_space: every target whose delta does not depend on the input (a layer one LoRA touches, a
        merged layer, K-LoRA's pick); dynamic selection on a shared layer stays a forward hook."""
        mode = self._mode(target)
        if not self.weight_space or mode == "off":
            return False
        from .baked import can_bake
        return (not target.is_shared or mode == "merge" or self.method == "klora") and can_bake(target)

    def _klora_pick(self, index: int, target: FuseTarget) -> bool:
        """K-LoRA's choice for a shared target at the current step (text encoders: progress 0)."""
        te = target.group == "te"
        step = 0 if te else min(self._step, self._total - 1)
        return self._klora_table(self._total, te)[step][self._klora_slot[index]]

    # ------------------------------------------------------------------ the hook
    def _needs_klora(self) -> bool:
        return any(self._mode(t) == "select" for t in self.targets if t.is_shared) and self.method == "klora"

    def _mode(self, target: FuseTarget) -> str:
        """'merge', 'select' or 'off' for this target."""
        return target_mode(target, self.method, self.te_mode)

    def _klora_table(self, total: int, te: bool) -> List[List[bool]]:
        key = 0 if te else total
        table = self._klora_tables.get(key)
        if table is None:
            s = self.klora_sums
            progress = [0.0] if te else None
            table = klora_schedule(s.top_c, s.top_s, s.gamma, total, self.klora_alpha, self.klora_beta,
                                   self.klora_scale, progress=progress).tolist()
            self._klora_tables[key] = table
        return table

    def _prepared(self, index: int, form: str, module, x: torch.Tensor) -> branches.Prepared:
        """The target's deltas laid out for `form` ("pair", "sum", "subject", "style"), cast once per x's device
        and dtype (kept across open/close: hosts reopen one session per UNet call)."""
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        key = (index, form, x.device, dtype)
        prepared = self._cast.get(key)
        if prepared is None:
            target = self.targets[index]
            if form == "pair":
                prepared = branches.prepare_stacked(target.subject, target.style, module, x.device, dtype)
            else:
                deltas = {"sum": (target.subject, target.style), "subject": (target.subject,),
                          "style": (target.style,)}[form]
                prepared = branches.prepare_summed(deltas, module, x.device, dtype)
            self._cast[key] = prepared
        return prepared

    def _hook(self, index: int, module, args, kwargs, output):
        target = self.targets[index]
        try:
            return self._fused_output(index, target, module, args, kwargs, output)
        except Exception as e:  # name the layer; KeyboardInterrupt passes through untouched
            raise RuntimeError(f"DynFuse: fusing layer {target.name!r} failed: {e}") from e

    def _mha_hook(self, parts: Dict[str, int], module, args, kwargs, output):
        """One MultiheadAttention: its output recomputed with each part in `parts` ({part: target index}) fused."""
        def fuse_part(part: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            index = parts.get(part)
            if index is None:
                return y
            target = self.targets[index]
            try:
                return self._fuse(index, target, module, x, y)
            except Exception as e:
                raise RuntimeError(f"DynFuse: fusing layer {target.name!r} failed: {e}") from e
        return mha.fused_forward(module, args, kwargs, fuse_part)

    def _fused_output(self, index: int, target: FuseTarget, module, args, kwargs, y: torch.Tensor):
        x = args[0] if args else next(iter(kwargs.values()))
        return self._fuse(index, target, module, x, y)

    def _fuse(self, index: int, target: FuseTarget, module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's base output y for input x with the target's delta(s) added by the session's rule."""
        active_c, active_s = self._active(target)
        if not (active_c and active_s):   # one LoRA touches the layer, or a step window leaves one (or none)
            if not (active_c or active_s):
                return y
            if target.is_shared and self._mode(target) == "select":
                self._record_all(index, active_c, self._row_labels(y.shape[0]))
            return self._plus(index, "subject" if active_c else "style", module, x, y)
        if self._mode(target) == "merge":
            return self._plus(index, "sum", module, x, y)
        slot = self._record_slot.get(index)
        record = self.record if slot is not None else None
        if self.method == "klora":
            subject = self._klora_pick(index, target)
            self._record_all(index, subject, self._row_labels(y.shape[0]))
            return self._plus(index, "subject" if subject else "style", module, x, y)

        deltas = branches.branch_deltas(self._prepared(index, "pair", module, x), x, module, y)
        f_both = branch_outputs(y, deltas)
        if self.method == "blend":
            return self._blend(index, target, y, deltas, f_both)
        if torch.is_grad_enabled():   # guidance: the choice is a constant, gradients flow through the kept branch
            with torch.no_grad():
                choose = self._choose(target, y, f_both)
        else:
            choose = self._choose(target, y, f_both)
        if record is not None:
            record.add_rows(self._step, slot, choose, self._row_labels(y.shape[0]))
        out = kept_branch(choose, f_both)
        out = out if out.dtype == y.dtype else out.to(y.dtype)
        if y.dim() == 4:   # a conv output in channels_last keeps its layout (the next layers round by it)
            layout = branches.layout_of(y)
            if layout is not None and not out.is_contiguous(memory_format=layout):
                out = out.contiguous(memory_format=layout)
        return out

    def _choose(self, target: FuseTarget, y: torch.Tensor, f_both: torch.Tensor) -> torch.Tensor:
        """Per row [B, 1, ...]: keep the subject (Eq. 13), from one row or an image's tied cond/uncond rows."""
        scores = branch_scores(self.criterion, y, f_both, channel_dim(target.subject))
        partners = self._partner_rows(y.shape[0], y.device) if self.tie_rows else None
        if partners is not None:   # an image's cond and uncond rows: one choice from their summed scores
            scores = scores + scores.index_select(1, partners)
        return choose_subject(*scores.unbind(0))

    def _blend(self, index: int, target: FuseTarget, y, deltas, f_both) -> torch.Tensor:
        """`blend`: both deltas weighted by their KL divergences (blend.py), per row or per token."""
        with torch.no_grad():
            kl = blend.token_kl(f_both, y, channel_dim(target.subject))
            if not self.per_token:
                kl = blend.row_mean(kl)
            partners = self._partner_rows(y.shape[0], y.device) if self.tie_rows else None
            if partners is not None:
                kl = kl + kl.index_select(1, partners)
            weights = blend.blend_weights(kl, self.sharpness, self._log_ratio)
        slot = self._record_slot.get(index)
        if slot is not None and self.record is not None:   # the subject's share of the weight, per row
            share = weights[0] / weights.sum(0)
            self.record.add_rows(self._step, slot, blend.row_mean(share[None])[0], self._row_labels(y.shape[0]))
        return blend.blended(y, deltas.to(weights.dtype), weights)

    def _plus(self, index: int, form: str, module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the deltas of `form` for input x."""
        return branches.plus_deltas(self._prepared(index, form, module, x), x, module, y)

