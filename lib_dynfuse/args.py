"""`FuseArgs`: the one arguments object that drives the UI, the HTTP API, the prompt tag and the infotext.

Each field carries its own UI label, tooltip, choices/range, infotext key and prompt-tag aliases in
`field(metadata=...)`, so the hosts build their controls, parse API payloads and write infotext from
this one table. Field order is the order of the UI controls and of the positional API args.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

METHODS = ("dynamic", "klora", "merge")
CRITERIA = ("kl", "js", "cosine", "dot")
KLORA_SCALES = ("linear", "star")        # Eq. 7 S = a*p + b, and the supplement's S* = (a'*p + b') % a
TEXT_ENCODER_MODES = ("select", "merge", "off")
GUIDANCE_GRADS = ("x0", "xt")            # gradient w.r.t. x0-hat (cheap) or x_t through the UNet (paper)
GUIDANCE_DECODERS = ("auto", "taesd", "full")


class ArgsError(ValueError):
    """A user-facing problem with the arguments: the message is shown in the UI, log and API info."""


def _meta(label: str, tip: str, infotext: Optional[str] = None, aliases: Sequence[str] = (),
          choices: Sequence[str] = (), minimum: Optional[float] = None, maximum: Optional[float] = None,
          step: Optional[float] = None, ui: str = "", api_only: bool = False, methods: Sequence[str] = (),
          section: str = "", axis: str = "") -> Dict[str, Any]:
    """`methods`: the methods the field matters for (empty: all; the UI shows it only for those); `section`: the
    UI group it sits in ("": main, "windows", "guidance"); `axis`: a short name for the X/Y/Z plot (else `label`)."""
    return dict(label=label, tip=tip, infotext=infotext, aliases=tuple(aliases), choices=tuple(choices),
                minimum=minimum, maximum=maximum, step=step, ui=ui, api_only=api_only, methods=tuple(methods),
                section=section, axis=axis)


def _f(default, **meta):
    return field(default=default, metadata=_meta(**meta))


def _window_bound(role: str, which: str):
    """A step-window bound: the fraction of the denoising from / until which a LoRA acts in the UNet."""
    letter, start = ("c" if role == "subject" else "s"), which == "start"
    tip = (f"The {role} LoRA acts in the UNet from this fraction of the denoising steps on (the text encoder "
           "ignores windows: the prompt is encoded before the first step)." if start else
           f"The {role} LoRA acts in the UNet until this fraction of the denoising steps (1 = to the end).")
    return _f(0.0 if start else 1.0, label=f"{role.capitalize()} {'from' if start else 'until'}", tip=tip,
              infotext=f"{letter}_{which}", aliases=(f"{letter}{which[0]}", f"{letter}_{which}", f"{role}_{which}"),
              minimum=0.0, maximum=1.0, step=0.01, section="windows")


@dataclass
class FuseArgs:
    enabled: bool = _f(False, label="DynFuse", tip="Fuse a subject LoRA and a style LoRA for this generation.",
                       ui="accordion")
    subject: str = _f("", label="Subject LoRA", tip="The LoRA that carries the subject (identity, object).",
                      infotext="subject", aliases=("subject", "c"), ui="lora")
    style: str = _f("", label="Style LoRA", tip="The LoRA that carries the style (colours, strokes, texture).",
                    infotext="style", aliases=("style", "s"), ui="lora")
    subject_weight: float = _f(1.0, label="Subject weight", tip="Strength of the subject LoRA (its alpha/rank scale is applied too).",
                               infotext="wc", aliases=("wc", "subject_weight"), minimum=-2.0, maximum=3.0, step=0.05)
    style_weight: float = _f(1.0, label="Style weight", tip="Strength of the style LoRA (its alpha/rank scale is applied too).",
                             infotext="ws", aliases=("ws", "style_weight"), minimum=-2.0, maximum=3.0, step=0.05)
    method: str = _f("merge", label="Method",
                     tip="merge: both LoRAs summed, tilted by Balance (kept both most often in the quality lab); "
                         "dynamic: per layer and step keep the branch whose features change more (KL); "
                         "klora: K-LoRA top-K weight selection with a step schedule.",
                     infotext="method", aliases=("method", "m"), choices=METHODS)
    criterion: str = _f("kl", label="Criterion", tip="How 'feature change' is measured for the dynamic method (paper Table 4).",
                        infotext="criterion", aliases=("criterion", "crit"), choices=CRITERIA, methods=("dynamic",))
    klora_alpha: float = _f(1.5, label="K-LoRA alpha", tip="Slope of the style scale S = alpha*progress + beta (K-LoRA Eq. 7).",
                            infotext="alpha", aliases=("alpha",), minimum=0.0, maximum=5.0, step=0.05, methods=("klora",))
    klora_beta: float = _f(0.5, label="K-LoRA beta", tip="Offset of the style scale S = alpha*progress + beta (K-LoRA Eq. 7).",
                           infotext="beta", aliases=("beta",), minimum=0.0, maximum=5.0, step=0.05, methods=("klora",))
    klora_scale: str = _f("linear", label="K-LoRA scale",
                          tip="linear: S = alpha*p + beta (paper); star: S* = (1.5p + 1.3) mod alpha (supplement D), more style early.",
                          infotext="scale", aliases=("scale", "pattern"), choices=KLORA_SCALES, methods=("klora",))
    text_encoder: str = _f("select", label="Text encoder",
                           tip="What the LoRAs' text-encoder weights do: select (same rule, per prompt), merge both, or off.",
                           infotext="te", aliases=("te", "text_encoder"), choices=TEXT_ENCODER_MODES)
    heatmap: bool = _f(False, label="Show selection heat-map",
                       tip="Add an image of which LoRA every layer chose at every step to the gallery.",
                       infotext=None, aliases=("heatmap",))
    # --- metric-guided latent refinement (paper Sec. 4.2) ---
    guidance: bool = _f(False, label="Refine each step toward the references", axis="guidance (on/off)",
                        tip="Render a subject and a style reference, then nudge every step toward both (paper Eq. 14-20). Slower.",
                        infotext="guidance", aliases=("guidance", "g"), section="guidance")
    guidance_scale: float = _f(10.0, label="Guidance strength m",
                               tip="Step size m of x_{t-1} <- x_{t-1} - m * grad R, in the paper's x_t units whatever "
                                   "the sampler (paper: 10).",
                               infotext="m", aliases=("gm", "guidance_scale"), minimum=0.0, maximum=100.0, step=0.5, section="guidance")
    guidance_start: float = _f(0.0, label="Guidance from", tip="First step of the refinement, as a fraction of all steps.",
                               infotext="g_start", aliases=("gstart",), minimum=0.0, maximum=1.0, step=0.01, section="guidance")
    guidance_end: float = _f(1.0, label="Guidance until", tip="Last step of the refinement, as a fraction of all steps.",
                             infotext="g_end", aliases=("gend",), minimum=0.0, maximum=1.0, step=0.01, section="guidance")
    guidance_grad: str = _f("x0", label="Gradient",
                            tip="x0: gradient w.r.t. the predicted image (cheap); xt: through the UNet as in the paper (about 2-3x a step).",
                            infotext="g_grad", aliases=("ggrad",), choices=GUIDANCE_GRADS, section="guidance")
    guidance_decoder: str = _f("auto", label="Decoder", tip="VAE used to decode x0 for scoring: TAESD when the host has it (fast), or the full VAE.",
                               infotext="g_dec", aliases=("gdec",), choices=GUIDANCE_DECODERS, section="guidance")
    subject_prompt: str = _f("", label="Subject reference prompt",
                             tip="Prompt l_c for the subject reference (subject LoRA alone); empty = the main prompt "
                                 "without the style LoRA's trigger words, where its metadata names them.",
                             infotext="l_c", aliases=(), section="guidance")
    style_prompt: str = _f("", label="Style reference prompt",
                           tip="Prompt l_s for the style reference (style LoRA alone); empty = the main prompt "
                               "without the subject LoRA's trigger words, where its metadata names them.",
                           infotext="l_s", aliases=(), section="guidance")
    reference_steps: int = _f(0, label="Reference steps", tip="Sampling steps for the reference renders; 0 = the same as the image.",
                              infotext="ref_steps", aliases=("refsteps",), minimum=0, maximum=150, step=1, section="guidance")
    subject_image: Any = _f(None, label="Subject reference image", tip="A photo of the subject used instead of the rendered reference.",
                            infotext=None, ui="image", section="guidance")
    style_image: Any = _f(None, label="Style reference image", tip="A style image used instead of the rendered reference.",
                          infotext=None, ui="image", section="guidance")
    score: bool = _f(False, label="Score against references",
                     tip="Add each image's CLIP score, Style Sim and DINO score (K-LoRA Table 1) to its infotext, against the "
                         "rendered references of the latent refinement, or the given reference images.",
                     infotext="score", aliases=("score",), section="guidance")

    # --- step windows (added last: the positional API order of the fields above stays) ---
    subject_start: float = _window_bound("subject", "start")
    subject_end: float = _window_bound("subject", "end")
    style_start: float = _window_bound("style", "start")
    style_end: float = _window_bound("style", "end")
    balance: float = _f(0.5, label="Balance (subject <-> style)",
                        tip="0.5: both LoRAs at their weights. Lower keeps more of the subject (the style's strength "
                            "falls to 0 at 0), higher more of the style (the subject's falls to 0 at 1).",
                        infotext="balance", aliases=("balance", "b"), minimum=0.0, maximum=1.0, step=0.05,
                        methods=("merge",))

    # ------------------------------------------------------------------ validation
    def validate(self) -> "FuseArgs":
        """Check every value; raise ArgsError with a message a user can act on."""
        for f in fields(self):
            m = f.metadata
            v = getattr(self, f.name)
            if m["choices"] and v not in m["choices"]:
                raise ArgsError(f"DynFuse: {f.name} must be one of {', '.join(m['choices'])}, got {v!r}")
            if m["minimum"] is not None and not (m["minimum"] <= v <= m["maximum"]):
                raise ArgsError(f"DynFuse: {f.name} must be between {m['minimum']} and {m['maximum']}, got {v!r}")
        if self.enabled:
            if not self.subject or not self.style:
                raise ArgsError("DynFuse needs two LoRAs, a subject and a style "
                                f"(got subject={self.subject!r}, style={self.style!r})")
        for first, last in (("guidance_start", "guidance_end"), ("subject_start", "subject_end"),
                            ("style_start", "style_end")):
            if getattr(self, first) > getattr(self, last):
                raise ArgsError(f"DynFuse: {first} must not be after {last} "
                                f"({getattr(self, first)} > {getattr(self, last)})")
        return self

    def window(self, role: str) -> Tuple[float, float]:
        """(start, end): the fraction of denoising in which the "subject" or "style" LoRA acts in the UNet."""
        return getattr(self, f"{role}_start"), getattr(self, f"{role}_end")

    def lora_weights(self) -> Tuple[float, float]:
        """(subject, style) strengths the LoRAs are applied at: their weights, tilted by `balance` for merge."""
        if self.method != "merge":
            return self.subject_weight, self.style_weight
        from .blend import merge_scales
        c, s = merge_scales(self.balance)
        return self.subject_weight * c, self.style_weight * s

    def windowed(self) -> Tuple[str, ...]:
        """The LoRAs ("subject", "style") whose window leaves out part of the denoising."""
        return tuple(role for role in ("subject", "style") if self.window(role) != (0.0, 1.0))

    # ------------------------------------------------------------------ construction from the outside
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> "FuseArgs":
        """From the host's positional script args (UI order), or one dict of named fields (API).

        The host fills the script's arg slots the request leaves out with the UI defaults (api.py:335-361), so a
        dict arrives first, followed by those defaults: the dict wins, the rest fill in. A dict without
        "enabled" turns fusion on (sending the settings is asking for fusion). `None` means "not given".
        """
        names = cls.field_names()
        values = list(values)
        named: Dict[str, Any] = {}
        if values and isinstance(values[0], dict):
            named = dict(values[0])
            named.setdefault("enabled", True)
            values = [None] + values[1:]
        if len(values) > len(names):
            raise ArgsError(f"DynFuse: expected at most {len(names)} values ({', '.join(names)}), got {len(values)}")
        data = {k: v for k, v in zip(names, values) if v is not None}
        data.update(named)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "FuseArgs":
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ArgsError(f"DynFuse: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        kwargs = {k: _coerce(known[k], v) for k, v in data.items()}
        return cls(**kwargs)

    def with_changes(self, changes: Dict[str, Any]) -> "FuseArgs":
        """These settings with some fields changed by name, each value read as that field's type (X/Y/Z plot)."""
        known = {f.name: f for f in fields(self)}
        unknown = [k for k in changes if k not in known]
        if unknown:
            raise ArgsError(f"DynFuse: unknown field(s) {', '.join(map(repr, unknown))}")
        return dataclasses.replace(self, **{k: _coerce(known[k], v) for k, v in changes.items()})

    def with_tag(self, positional: Sequence[str], named: Dict[str, str]) -> "FuseArgs":
        """Apply a `<dynlora:subject:style:key=value...>` tag on top of these (UI) settings; enables fusion."""
        if len(positional) != 2:
            raise ArgsError("DynFuse: the tag is <dynlora:subject:style>, with two LoRA names "
                            f"(got {len(positional)}: {':'.join(positional)!r})")
        alias = _alias_table()
        changes: Dict[str, Any] = {"enabled": True, "subject": positional[0].strip(), "style": positional[1].strip()}
        for key, value in named.items():
            name = alias.get(key.strip().lower())
            if name is None:
                raise ArgsError(f"DynFuse: unknown tag item {key!r}; known: {', '.join(sorted(alias))}")
            changes[name] = _coerce(_field(name), value)
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ infotext
    def infotext(self, hashes: Optional[Dict[str, str]] = None) -> str:
        """The value of the `DynFuse:` infotext entry, e.g. `subject: a, style: b, method: dynamic, ...`."""
        parts = []
        for f in fields(self):
            key = f.metadata["infotext"]
            if key is None:
                continue
            v = getattr(self, f.name)
            if f.default == v and f.name not in ("subject", "style", "method"):
                continue  # keep the line short: defaults are implied
            parts.append(f"{key}: {_quote(v)}")
        for name, h in (hashes or {}).items():
            parts.append(f"hash_{name}: {h}")
        return ", ".join(parts)

    @classmethod
    def from_infotext(cls, text: str) -> "FuseArgs":
        """Inverse of `infotext` (hashes are ignored): restores an enabled FuseArgs."""
        by_key = {f.metadata["infotext"]: f for f in fields(cls) if f.metadata["infotext"]}
        values: Dict[str, Any] = {"enabled": True}
        for key, raw in _split_infotext(text):
            f = by_key.get(key)
            if f is not None:
                values[f.name] = _coerce(f, raw)
        return cls.from_dict(values)


# ---------------------------------------------------------------------------- helpers
def _field(name: str) -> dataclasses.Field:
    return next(f for f in fields(FuseArgs) if f.name == name)


def _alias_table() -> Dict[str, str]:
    table = {}
    for f in fields(FuseArgs):
        for a in f.metadata["aliases"]:
            table[a] = f.name
    return table


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if t == "bool":
            if isinstance(v, str):
                s = v.strip().lower()
                if s in ("1", "true", "yes", "on"):
                    return True
                if s in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(v)
            return bool(v)
        if t == "float":
            return float(v)
        if t == "int":
            fv = float(v)
            if fv != int(fv):
                raise ValueError(v)
            return int(fv)
        if t == "str":
            if v is None:
                return ""
            if not isinstance(v, str):
                raise ValueError(v)
            return v.strip() if f.metadata["choices"] else v
    except (TypeError, ValueError):
        raise ArgsError(f"DynFuse: {f.name} must be a {t}, got {v!r}") from None
    return v


def _quote(v: Any) -> str:
    s = str(v)
    if any(c in s for c in ',:"') or s != s.strip():
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def _split_infotext(text: str) -> List[Tuple[str, str]]:
    """Parse `k: v, k: "quoted, v"` pairs."""
    out, i, n = [], 0, len(text)
    while i < n:
        j = text.find(":", i)
        if j < 0:
            break
        key = text[i:j].strip().strip(",").strip()
        i = j + 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            val = "".join(buf)
            i += 1
            k = text.find(",", i)
            i = n if k < 0 else k + 1
        else:
            k = text.find(",", i)
            val = (text[i:] if k < 0 else text[i:k]).strip()
            i = n if k < 0 else k + 1
        out.append((key, val))
    return out
