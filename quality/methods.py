"""The method table: a configuration is a name, keyword arguments for `lib_dynfuse.fuse` and, for latent
refinement, keyword arguments for `LatentRefiner` (None: no refinement). A new rule is one line in RULES.

A row whose keywords the installed engine does not accept is skipped with a printed note (see `usable`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

CRITERIA = ("kl", "js", "cosine", "dot")
# cond and uncond rows of one image choosing together (FuseSession's keyword)
TIED_ROWS: Dict[str, object] = {"tie_rows": True}

# the papers' rules and the baseline: each runs without refinement, with `+llr-x0` and with `+llr-xt`
RULES: List[Tuple[str, Dict[str, object]]] = (
    [("merge", dict(method="merge"))]
    + [(f"dynamic-{c}", dict(method="dynamic", criterion=c)) for c in CRITERIA]
    + [("klora-linear", dict(method="klora", klora_scale="linear")),
       ("klora-star", dict(method="klora", klora_scale="star"))]
)
REFINEMENTS: List[Tuple[str, Optional[Dict[str, object]]]] = [
    ("", None),
    ("+llr-x0", dict(grad="x0")),     # m: the guidance API's default (10) unless --llr-scale
    ("+llr-xt", dict(grad="xt")),
]
# rules beside the papers', measured without refinement: an image's cond and uncond rows choosing together;
# soft selection (`blend`: balance, sharpness, per token); step windows (the style from a fraction of the
# denoising on); and merge's balance control over its range
CANDIDATES: List[Tuple[str, Dict[str, object]]] = (
    [(f"dynamic-{c}-tied", dict(method="dynamic", criterion=c, **TIED_ROWS)) for c in CRITERIA]
    + [("blend", dict(method="blend")), ("blend-tied", dict(method="blend", **TIED_ROWS))]
    + [(f"blend-b{b}", dict(method="blend", balance=b)) for b in (0.2, 0.3, 0.4)]
    + [(f"blend-k{k}", dict(method="blend", sharpness=k)) for k in (0.5, 2.0)]
    + [("blend-token", dict(method="blend", per_token=True))]
    + [(f"merge-style{s}", dict(method="merge", style_window=(s, 1.0))) for s in (0.2, 0.5)]
    + [(f"merge-b{b}", dict(method="merge", balance=b)) for b in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9)]
)


@dataclass(frozen=True)
class Method:
    name: str
    fuse: Dict[str, object]
    refine: Optional[Dict[str, object]] = None
    baseline: bool = field(default=False)


def table(llr_scale: Optional[float] = None) -> List[Method]:
    """Every rule with and without refinement (x0 and xt), merge first."""
    out = []
    for suffix, refine in REFINEMENTS:
        for name, kw in RULES:
            r = None if refine is None else dict(refine, **({"scale": llr_scale} if llr_scale is not None else {}))
            out.append(Method(name + suffix, dict(kw), r, baseline=(name == "merge" and refine is None)))
    out += [Method(name, dict(kw)) for name, kw in CANDIDATES]
    return out


def quick_names() -> List[str]:
    """--quick: no xt refinement (the slowest), everything else."""
    return [m.name for m in table() if not m.name.endswith("+llr-xt")]


def select(methods: Sequence[Method], patterns: Optional[Sequence[str]]) -> List[Method]:
    """Methods named in `patterns` (exact names or a trailing '*' prefix match), merge always included."""
    if not patterns:
        return list(methods)
    chosen = [m for m in methods if m.baseline or any(
        m.name == p or (p.endswith("*") and m.name.startswith(p[:-1])) for p in patterns)]
    unknown = [p for p in patterns if not any(m.name == p or (p.endswith("*") and m.name.startswith(p[:-1]))
                                              for m in methods)]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(m.name for m in methods)}")
    return chosen


def usable(method: Method) -> Optional[str]:
    """None when the engine accepts the method's keywords, else the reason it is skipped."""
    from lib_dynfuse import FuseSession, LatentRefiner
    fuse_params = inspect.signature(FuseSession.__init__).parameters
    missing = [k for k in method.fuse if k not in fuse_params and k not in ("method", "criterion")]
    if method.refine is not None:
        ref_params = inspect.signature(LatentRefiner.__init__).parameters
        missing += [k for k in method.refine if k not in ref_params]
    if missing:
        return f"skipped {method.name}: this engine's fuse/LatentRefiner has no keyword {', '.join(missing)}"
    return None
