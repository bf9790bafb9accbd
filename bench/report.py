"""The benchmark's outputs: a markdown table per shape, the JSON of every ratio by name, and the targets' verdicts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

MIB = 2 ** 20

# Issue 6: ratios to the floor of the same run.
TARGETS: Dict[str, float] = {
    "dynamic_kl_r64_vs_merged": 1.20,
    "klora_r64_vs_merged": 1.05,
    "merge_r64_vs_merged": 1.05,
    "klora_baked_r64_vs_merged": 1.05,
    "merge_baked_r64_vs_merged": 1.05,
    "guided_x0_taesd_vs_unguided": 1.50,
    "mem_dynamic_kl_r64_vs_merged": 1.10,
    "mem_klora_r64_vs_merged": 1.10,
    "mem_merge_r64_vs_merged": 1.10,
}


@dataclass
class Row:
    group: str                 # "unet" or "guidance"
    name: str
    seconds: float             # median over rounds
    ratio: Optional[float]     # median of per-round ratios to `floor`
    floor: Optional[str]
    spread: float              # (max - min) / median of the rounds
    flops: Optional[float] = None   # matmul/conv FLOPs of one call / the floor's (None = not counted)
    cpu_ratio: Optional[float] = None   # median per-round ratio of process CPU seconds
    fastest: Optional[float] = None     # fastest round / the floor's fastest round


def ratio_name(row: Row) -> str:
    if row.group == "guidance":
        return f"guided_{row.name[len('step_'):]}_vs_unguided"
    return f"{row.name}_vs_merged"


def memory_key(row_name: str, main_rank: int) -> str:
    """The memory configuration measured for a timing row (memory runs at the main rank only)."""
    if row_name.startswith("step_"):
        return row_name
    if row_name == "none":
        return "none"
    stem, _, rank = row_name.rpartition("_r")
    if rank != str(main_rank):
        return ""
    return "merged" if stem == "merged" else stem


def memory_ratio_name(config: str, main_rank: int) -> str:
    if config.startswith("step_"):
        return f"mem_{config}_vs_unguided"
    return f"mem_{config}_r{main_rank}_vs_merged" if config not in ("none", "merged") else f"mem_{config}_vs_merged"


def memory_floor(config: str) -> str:
    return "step_off" if config.startswith("step_") else "merged"


def json_ratios(results: Dict[str, Dict]) -> Dict[str, float]:
    """Every ratio by name; the first shape's names are bare, later shapes' are prefixed with the shape."""
    out: Dict[str, float] = {}
    for i, (shape, res) in enumerate(results.items()):
        prefix = "" if i == 0 else f"{shape}_"
        main_rank, mem = res["main_rank"], res["memory"]
        for row in res["rows"]:
            if row.ratio is not None:
                out[prefix + ratio_name(row)] = round(row.ratio, 3)
            if row.cpu_ratio is not None:
                out[prefix + "cpu_" + ratio_name(row)] = round(row.cpu_ratio, 3)
            if row.fastest is not None:
                out[prefix + "fastest_" + ratio_name(row)] = round(row.fastest, 3)
            if row.flops is not None and row.floor is not None:
                out[prefix + "flops_" + ratio_name(row)] = round(row.flops, 3)
        for config, m in mem.items():
            floor = mem.get(memory_floor(config))
            if floor and config != memory_floor(config):
                out[prefix + memory_ratio_name(config, main_rank)] = round(m["peak"] / floor["peak"], 3)
        extra = res["extra"]
        if "references_first_s" in extra and extra["references_first_s"] > 0:
            out[prefix + "references_cached_vs_first"] = round(extra["references_cached_s"] / extra["references_first_s"], 4)
        floor_row = next((r for r in res["rows"] if r.name == f"merged_r{main_rank}"), None)
        if floor_row is not None:
            for key in ("setup_klora_first", "setup_klora_again", "setup_dynamic_first", "setup_klora_baked_again",
                        "setup_merge_baked_again"):
                sec = extra.get(f"{key}_r{main_rank}_s")
                if sec is not None:
                    out[prefix + f"{key}_r{main_rank}_vs_merged_call"] = round(sec / floor_row.seconds, 3)
    return out


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def markdown_table(results: Dict[str, Dict], header: str) -> str:
    lines = [f"Measured {header}", ""]
    for shape, res in results.items():
        main_rank, mem = res["main_rank"], res["memory"]
        lines += [f"**{shape}** (batch 2 = cond + uncond; floor = both LoRAs merged into the weights)", "",
                  "| case | s per call (median) | ratio to floor | CPU-time ratio | fastest-round ratio | FLOP ratio | spread | peak MiB | peak ratio | working MiB | target |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in res["rows"]:
            mkey = memory_key(row.name, main_rank)
            m = mem.get(mkey)
            floor = mem.get(memory_floor(mkey)) if mkey else None
            peak_ratio = m["peak"] / floor["peak"] if (m and floor and mkey != memory_floor(mkey)) else None
            name = ratio_name(row)
            verdicts = []
            for key, value in ((name, row.ratio), (memory_ratio_name(mkey, main_rank) if mkey else "", peak_ratio)):
                if key in TARGETS and value is not None:
                    verdicts.append(f"{'ok' if value <= TARGETS[key] else 'MISSED'} (<= {TARGETS[key]:.2f})")
            floor_label = "" if row.floor is None else f" / {row.floor}"
            flops = _fmt(row.flops) if row.floor is not None else ""
            lines.append(f"| {row.name}{floor_label} | {row.seconds:.3f} | {_fmt(row.ratio)} | {_fmt(row.cpu_ratio)} | "
                         f"{_fmt(row.fastest)} | {flops} | {row.spread:.0%} | "
                         f"{_fmt(m['peak'] / MIB if m else None, 0)} | {_fmt(peak_ratio)} | "
                         f"{_fmt((m['peak'] - m['before']) / MIB if m else None, 0)} | {'; '.join(verdicts)} |")
        extra = res["extra"]
        if extra:
            lines += ["", "Setup and references (seconds): " + ", ".join(
                f"{k.replace('_s', '') if k.endswith('_s') else k} {v:.2f}" for k, v in extra.items())]
        lines.append("")
    return "\n".join(lines)


def targets_summary(ratios: Dict[str, float]) -> str:
    parts = []
    for key, limit in TARGETS.items():
        if key in ratios:
            parts.append(f"{key} {ratios[key]:.3f} {'ok' if ratios[key] <= limit else 'MISSED'} (<= {limit})")
    return "Targets: " + ("; ".join(parts) if parts else "none measured")
