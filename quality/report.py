"""Tables and the JSON line of an evaluation: pooled and per pair, Wilson intervals, paired differences vs merge,
the layer decisions of the selecting methods, and the calibration checks."""
from __future__ import annotations

import json
import re
from typing import Callable, Dict, List, Optional

import torch

from .stats import paired_difference, rate

BASELINE = "merge"
STEP_PARTS = (("early", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("late", 2 / 3, 1.0))


def layer_group(name: str) -> str:
    """'down/mid/up' + layer kind (self-attn, cross-attn, ff, proj, conv) of a module path."""
    block = "down" if "down_blocks" in name else "mid" if "mid_block" in name else "up"
    for kind, pattern in (("self", r"attn1\."), ("cross", r"attn2\."), ("ff", r"\.ff\."), ("proj", r"proj_(in|out)"),
                          ("conv", r"resnets")):
        if re.search(pattern, name):
            return f"{block}.{kind}"
    return f"{block}.other"


def _share(chosen: torch.Tensor, rows: torch.Tensor) -> Optional[float]:
    total = rows.sum().item()
    return None if total == 0 else chosen.sum().item() / total


def selection_summary(outcomes: Dict[int, object]) -> Optional[Dict]:
    """Share of layer decisions that kept the subject, pooled over pairs: all, cond, uncond, by step third, by
    layer group, and per step."""
    outs = [o for o in outcomes.values() if o.chosen is not None]
    if not outs:
        return None
    chosen = sum(o.chosen for o in outs)
    rows = sum(o.rows for o in outs)
    steps = chosen.shape[0]
    names = outs[0].layer_names
    out = {"subject_share": _share(chosen, rows), "cond": _share(chosen[..., 0], rows[..., 0]),
           "uncond": _share(chosen[..., 1], rows[..., 1])}
    for part, lo, hi in STEP_PARTS:
        idx = [i for i in range(steps) if lo <= i / steps < hi]
        out[f"steps_{part}"] = _share(chosen[idx], rows[idx])
    groups: Dict[str, List[int]] = {}
    for j, n in enumerate(names):
        groups.setdefault(layer_group(n), []).append(j)
    out["by_layer_group"] = {g: _share(chosen[:, idx], rows[:, idx]) for g, idx in sorted(groups.items())}
    out["by_step"] = [_share(chosen[i], rows[i]) for i in range(steps)]
    # rows where cond and uncond of one seed disagreed cannot be read from counts; the cond-uncond gap says how far
    return out


def summarise(result: Dict, methods_order: List[str]) -> Dict:
    """All numbers of the report as one dict (the JSON line)."""
    pairs = result["pairs"]
    summary = {"methods": {}, "skipped": result["skipped"]}
    base = result["outcomes"].get(BASELINE)
    for name in methods_order:
        outs = result["outcomes"].get(name)
        if not outs or any(k not in outs for k in pairs):
            continue
        entry = {"pooled": {}, "pairs": {}}
        for metric in ("subject", "style", "both"):
            entry["pooled"][metric] = rate(torch.cat([getattr(outs[k], metric) for k in pairs]))
        for k in pairs:
            entry["pairs"][str(k)] = {m: rate(getattr(outs[k], m)) for m in ("subject", "style", "both")}
        if base is not None and name != BASELINE:
            entry["pooled"]["diff_both_vs_merge"] = paired_difference([outs[k].both for k in pairs],
                                                                      [base[k].both for k in pairs])
            for k in pairs:
                entry["pairs"][str(k)]["diff_both_vs_merge"] = paired_difference([outs[k].both], [base[k].both])
        entry["selection"] = selection_summary(outs)
        sims = [o.similarities for o in outs.values() if o.similarities]
        if sims:
            entry["llr_similarities"] = {t: [sum(s[t][i] for s in sims) / len(sims) for i in (0, 1)] for t in sims[0]}
        entry["seconds"] = sum(o.seconds for o in outs.values())
        summary["methods"][name] = entry
    summary["calibration"] = calibration(result, summary)
    return summary


def calibration(result: Dict, summary: Dict) -> Dict:
    """The world's sanity checks, as facts with the thresholds they are held to."""
    pairs = result["pairs"]
    alone = result["alone"]
    subj_alone = {str(k): alone[k]["subject"]["subject"].float().mean().item() for k in pairs}
    style_alone = {str(k): alone[k]["style"]["style"].float().mean().item() for k in pairs}
    cross = {str(k): {"subject_lora_style": alone[k]["subject"]["style"].float().mean().item(),
                      "style_lora_subject": alone[k]["style"]["subject"].float().mean().item()} for k in pairs}
    merge = summary["methods"].get(BASELINE)
    merge_pairs = {k: v["both"]["rate"] for k, v in merge["pairs"].items()} if merge else {}
    checks = {
        "base_known_concepts>=0.8": min(result["base"]["subject"], result["base"]["style"]) >= 0.8,
        "subject_lora_alone_keeps_subject>=0.7": all(v >= 0.7 for v in subj_alone.values()),
        "style_lora_alone_keeps_style>=0.7": all(v >= 0.7 for v in style_alone.values()),
    }
    if merge:
        pooled = merge["pooled"]["both"]["rate"]
        checks["merge_both_in_[0.1,0.9]"] = 0.1 <= pooled <= 0.9
        if len(merge_pairs) > 1:
            checks["pairs_differ(merge_range>=0.1)"] = max(merge_pairs.values()) - min(merge_pairs.values()) >= 0.1
    return {"base": result["base"], "subject_lora_alone": subj_alone, "style_lora_alone": style_alone,
            "alone_cross": cross, "merge_both_by_pair": merge_pairs, "checks": checks}


def _ci(r: Dict) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f},{r['hi']:.2f}]"


def _diff(d: Optional[Dict]) -> str:
    return f"{d['diff']:+.2f} [{d['lo']:+.2f},{d['hi']:+.2f}]" if d else ""


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def print_report(summary: Dict, header: Dict, out: Callable[[str], None] = print) -> None:
    """Human-readable tables, then (last) the JSON line."""
    out("")
    out("== quality lab: " + ", ".join(f"{k} {v}" for k, v in header.items() if k != "judges"))
    if "judges" in header:
        out("judges on fresh renders: " + ", ".join(f"{k} {v:.3f}" for k, v in header["judges"].items()))
    cal = summary["calibration"]
    out(f"calibration: base model on known concepts: subject {cal['base']['subject']:.2f}, style {cal['base']['style']:.2f}")
    out("  subject LoRA alone keeps the subject: " + ", ".join(f"pair {k} {v:.2f}" for k, v in cal["subject_lora_alone"].items()))
    out("  style LoRA alone keeps the style:     " + ", ".join(f"pair {k} {v:.2f}" for k, v in cal["style_lora_alone"].items()))
    out("  merge keeps both:                     " + ", ".join(f"pair {k} {v:.2f}" for k, v in cal["merge_both_by_pair"].items()))
    out("  checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in cal["checks"].items()))
    for reason in summary["skipped"].values():
        out("  " + reason)
    methods = summary["methods"]
    head = f"{'method':<26} {'subject':>17} {'style':>17} {'both':>17} {'both - merge (95% CI)':>23} {'subj.share c/u':>15} {'s':>6}"
    out("")
    out("pooled over pairs (Wilson 95% CI; difference: stratified bootstrap over seeds, paired)")
    out(head)
    for name, e in methods.items():
        p, sel = e["pooled"], e["selection"]
        share = f"{_pct(sel['cond'])}/{_pct(sel['uncond'])}" if sel else ""
        out(f"{name:<26} {_ci(p['subject']):>17} {_ci(p['style']):>17} {_ci(p['both']):>17} "
            f"{_diff(p.get('diff_both_vs_merge')):>23} {share:>15} {e['seconds']:>6.0f}")
    pair_ids = next(iter(methods.values()))["pairs"].keys() if methods else []
    for k in pair_ids:
        out("")
        out(f"pair {k}")
        out(head[:-23])
        for name, e in methods.items():
            p = e["pairs"][k]
            out(f"{name:<26} {_ci(p['subject']):>17} {_ci(p['style']):>17} {_ci(p['both']):>17} "
                f"{_diff(p.get('diff_both_vs_merge')):>23}")
    sel_methods = {n: e["selection"] for n, e in methods.items() if e["selection"]}
    if sel_methods:
        groups = sorted({g for s in sel_methods.values() for g in s["by_layer_group"]})
        out("")
        out("share of layer decisions that kept the subject (pooled): by step third, by layer group")
        out(f"{'method':<26} {'early':>6} {'mid':>6} {'late':>6} " + " ".join(f"{g:>11}" for g in groups))
        for n, s in sel_methods.items():
            out(f"{n:<26} {_pct(s['steps_early']):>6} {_pct(s['steps_mid']):>6} {_pct(s['steps_late']):>6} "
                + " ".join(f"{_pct(s['by_layer_group'].get(g)):>11}" for g in groups))
    llr = {n: e["llr_similarities"] for n, e in methods.items() if "llr_similarities" in e}
    if llr:
        out("")
        out("refinement: mean similarity at the first -> last corrected step")
        for n, sims in llr.items():
            out(f"{n:<26} " + ", ".join(f"{t} {a:.2f}->{b:.2f}" for t, (a, b) in sims.items()))
    out(json.dumps(dict(header, **summary), separators=(",", ":"), default=float))
