"""What fusion costs per step, side by side in one run: `python bench/run.py --quick` (or `--full`).

Prints progress to stderr, then a markdown table, then (last line) one JSON object with every ratio by name,
e.g. {"dynamic_kl_r64_vs_merged": 1.12, ...}. Ratios are to the floor of the same run: the UNet with both
LoRAs merged into its weights (what `<lora:a><lora:b>` costs), the unguided step for guidance, the merged
UNet's peak memory for memory. See bench/README section in bench/RESULTS.md for the method.

--quick: SD1.5-shaped UNet (real widths, random weights) at a 32x32 latent, batch 2, rank 64, on the CPU.
--full:  SD1.5 at 64x64 and SDXL at 128x128, ranks 4/16/64/128, on a GPU when torch sees one.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `lib_dynfuse` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# On a shared machine, OpenMP workers that spin-wait for a descheduled peer make every small op of a hook
# cost a time slice (measured: a tiny UNet call 0.2 s -> 5-10 s with 2 threads at load 10); passive waiting
# keeps the comparison about the code under test. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# glibc hands every block over 32 MiB back to the kernel when it is freed, so each UNet call page-faults its
# activations in again (16k faults per 64 MiB, measured; a third of a CPU run's time went to the kernel). GPU
# allocators cache blocks; keeping freed blocks in the heap does the same here, for the floor and the fused
# cases alike. The variable is read when the process starts, hence the re-exec.
_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ and __name__ == "__main__":
    os.environ["GLIBC_TUNABLES"] = _TUNABLES
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

from bench import guidance_cases, layer_overhead, memory, models, op_count  # noqa: E402
from bench.flops import case_flops  # noqa: E402
from bench.loras import MergedWeights, write_pair  # noqa: E402
from bench.report import Row, json_ratios, markdown_table, targets_summary  # noqa: E402
from bench.timing import interleaved  # noqa: E402
from bench.unet_cases import setup_seconds, unet_cases  # noqa: E402

CRITERIA = ("kl", "js", "cosine", "dot")


@dataclass
class Plan:
    shapes: List[Tuple[str, int]]
    ranks: List[int]
    criteria_ranks: List[int]
    main_rank: int
    rounds: int
    heavy_rounds: int
    warmup: int
    reference_steps: int
    memory_configs: List[str]
    guidance_light: List[str] = field(default_factory=lambda: ["x0_taesd"])
    guidance_heavy: List[str] = field(default_factory=lambda: ["x0_vae", "xt_taesd"])


def quick_plan() -> Plan:
    return Plan(shapes=[("sd15", 32)], ranks=[64], criteria_ranks=[64], main_rank=64, rounds=4, heavy_rounds=1,
                warmup=0, reference_steps=1,
                memory_configs=["dynamic_kl", "klora", "merge", "klora_baked", "merge_baked", "merged", "step_off",
                                "step_x0_taesd"])


def full_plan(cuda: bool) -> Plan:
    shapes = [("sd15", 64), ("sdxl", 128)] if cuda else [("sd15", 64)]
    return Plan(shapes=shapes, ranks=[4, 16, 64, 128], criteria_ranks=[64], main_rank=64, rounds=5,
                heavy_rounds=3, warmup=1, reference_steps=4,
                memory_configs=["none", "dynamic_kl", "dynamic_js", "dynamic_cosine", "dynamic_dot", "klora",
                                "merge", "klora_baked", "merge_baked", "merged", "step_off", "step_x0_taesd", "step_x0_vae", "step_xt_taesd"])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_shape(kind: str, latent: int, plan: Plan, args, folder: str) -> Dict:
    """Every measurement for one UNet shape; returns {"rows": [...], "extra": {...}}."""
    device, dtype = args.device, getattr(torch, args.dtype)
    tag = f"{kind} {latent}x{latent}"
    t0 = time.perf_counter()
    unet = models.unet(kind, device=device, dtype=dtype, tiny=args.tiny)
    inputs = models.unet_inputs(unet, latent, device=device, dtype=dtype)
    log(f"[{tag}] UNet built in {time.perf_counter() - t0:.1f} s")
    pairs, merged = {}, {}
    for rank in plan.ranks:
        pairs[rank] = write_pair(unet, folder, rank, convs=args.convs)
        merged[rank] = MergedWeights(unet, pairs[rank])
    main = pairs[plan.main_rank]
    log(f"[{tag}] LoRAs written: " + ", ".join(f"r{r} {p.file_mib():.0f} MiB/pair, {len(p.subject_layers)} layers"
                                              for r, p in pairs.items()))
    extra: Dict[str, float] = {}
    if "unet" in args.parts:
        for name, sec in setup_seconds(unet, main, ("dynamic", "klora", "merge", "klora_baked", "merge_baked")).items():
            extra[f"setup_{name}_r{plan.main_rank}_s"] = sec
    rows: List[Row] = []
    cases: list = []
    if "unet" in args.parts:
        log(f"[{tag}] per UNet call, {plan.rounds} rounds")
        cases = unet_cases(unet, inputs, pairs, merged, CRITERIA, plan.criteria_ranks)
        t = interleaved(cases, plan.rounds, plan.warmup, device, log)
        flops = case_flops(cases)
        for c in cases:
            flop_ratio = flops[c.name] / flops[c.floor] if c.floor else None
            rows.append(Row("unet", c.name, t.median(c.name), t.ratio(c.name), c.floor, t.spread(c.name), flop_ratio,
                            t.cpu_ratio(c.name), t.fastest_ratio(c.name, c.floor)))

    gm = None
    if "guidance" in args.parts or "references" in args.parts:
        t0 = time.perf_counter()
        gm = guidance_cases.build_models(args.clip, device, dtype)
        log(f"[{tag}] TAESD, VAE, CLIP {args.clip}, DINO ViT-S/16 built in {time.perf_counter() - t0:.1f} s")
    if "guidance" in args.parts:
        refine = guidance_cases.refiners(gm, latent * 8, device)
        for names, rounds in ((plan.guidance_light, plan.rounds), (plan.guidance_heavy, plan.heavy_rounds)):
            if not names:
                continue
            log(f"[{tag}] guidance steps {names}, {rounds} rounds")
            cases = guidance_cases.step_cases(unet, inputs, refine, names, merged[plan.main_rank].applied)
            t = interleaved(cases, rounds, 0, device, log)
            for c in cases:
                if c.floor is None and any(r.name == c.name for r in rows):
                    continue
                rows.append(Row("guidance", c.name, t.median(c.name), t.ratio(c.name), c.floor, t.spread(c.name),
                                cpu_ratio=t.cpu_ratio(c.name), fastest=t.fastest_ratio(c.name, c.floor)))
    if "references" in args.parts:
        log(f"[{tag}] reference renders, {plan.reference_steps} steps each")
        ref = guidance_cases.reference_seconds(unet, inputs, main.load(), gm, plan.reference_steps)
        extra["references_first_s"], extra["references_cached_s"] = ref["first"], ref["cached"]
        extra["references_renders"], extra["references_hits"] = ref["renders"], ref["hits"]

    layers = [(w.module, w.stem) for w in main.subject_layers]
    del unet, merged, gm, cases
    gc.collect()
    mem: Dict[str, Dict[str, int]] = {}
    if "memory" in args.parts:
        configs = [c for c in plan.memory_configs
                   if not c.startswith("step_") or "guidance" in args.parts or args.parts == ["memory"]]
        log(f"[{tag}] peak memory: {configs}")
        spec = dict(kind=kind, latent=latent, device=device, dtype=args.dtype, threads=args.threads, clip=args.clip, tiny=args.tiny,
                    subject=main.subject_path, style=main.style_path, layers=layers, configs=configs)
        mem = memory.measure(spec, isolate=args.isolate_memory)
    return {"rows": rows, "extra": extra, "memory": mem, "main_rank": plan.main_rank}


def layers_line(layers: Dict[str, float]) -> str:
    if not layers:
        return ""
    parts = []
    for kind in ("linear", "conv1x1"):
        extra = ", ".join(f"{m} +{layers[f'layer_{kind}_{m}_extra_us']:.0f}" for m in ("dynamic", "klora", "merge")
                          if f"layer_{kind}_{m}_extra_us" in layers)
        parts.append(f"{kind} {layers.get(f'layer_{kind}_plain_us', 0):.0f} us plain, {extra}")
    return ("\nFixed cost of a fused layer call (a tiny layer: op dispatch and Python only; on a GPU, the host-side "
            "cost of each of the 192 fused layers of an SD1.5 UNet call), microseconds on this CPU: "
            + "; ".join(parts) + "\n")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} CPUs{gpu}"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def parse(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="SD1.5 shapes at 32x32, rank 64 (default)")
    mode.add_argument("--full", action="store_true", help="SD1.5 64x64 and SDXL 128x128 (GPU), ranks 4-128")
    p.add_argument("--parts", default="unet,guidance,references,memory,layers,ops",
                   help="comma list of unet, guidance, references, memory, layers (fixed cost per fused layer call), "
                        "ops (ops dispatched per fused layer call)")
    p.add_argument("--rounds", type=int, help="timed rounds per case (quick 4, full 5)")
    p.add_argument("--heavy-rounds", type=int, help="rounds for the full-VAE and x_t guidance steps")
    p.add_argument("--ranks", help="comma list of LoRA ranks (quick 64, full 4,16,64,128)")
    p.add_argument("--latent", type=int, help="latent side for every shape (overrides the plan; code checks)")
    p.add_argument("--sdxl", action="store_true", help="include the SDXL shape with --full on the CPU too")
    p.add_argument("--tiny", action="store_true",
                   help="code check only: the test fixtures' scaled-down UNet widths instead of the real ones")
    p.add_argument("--convs", action="store_true", help="LoCon: the LoRAs also target the resnet/sampler convs")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip image tower for the guidance score (the extension default)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32 (CPU default) or float16 (GPU default)")
    p.add_argument("--isolate-memory", action="store_true", help="one child process per memory configuration")
    p.add_argument("--results", help="also write the table to this markdown file (e.g. bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    args.dtype = args.dtype or ("float16" if torch.device(args.device).type == "cuda" else "float32")
    return args


def make_plan(args) -> Plan:
    cuda = torch.device(args.device).type == "cuda"
    plan = full_plan(cuda) if args.full else quick_plan()
    if args.full and args.sdxl and not cuda:
        plan.shapes.append(("sdxl", 128))
    if args.ranks:
        plan.ranks = [int(r) for r in args.ranks.split(",")]
        plan.main_rank = 64 if 64 in plan.ranks else plan.ranks[-1]
        plan.criteria_ranks = [plan.main_rank]
    plan.rounds = args.rounds or plan.rounds
    plan.heavy_rounds = args.heavy_rounds or plan.heavy_rounds
    if args.latent:
        plan.shapes = [(kind, args.latent) for kind, _ in plan.shapes]
    return plan


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    plan = make_plan(args)
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = load_average()
    log(f"dynfuse bench: {'full' if args.full else 'quick'} on {args.device} ({args.dtype}), "
        f"{args.threads} threads, shapes {plan.shapes}, ranks {plan.ranks}; load average {load_before}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="dynfuse-bench-") as folder:
        for kind, latent in plan.shapes if set(args.parts) - {"layers", "ops"} else []:
            results[f"{kind}{latent}"] = bench_shape(kind, latent, plan, args, folder)
    layers: Dict[str, float] = {}
    if "layers" in args.parts:
        log(f"fused layer fixed cost, {plan.rounds} rounds")
        layers = layer_overhead.extra_microseconds(plan.rounds, log)
    ops: Dict[str, int] = {}
    if "ops" in args.parts:
        ops = op_count.op_counts()
    minutes = (time.perf_counter() - started) / 60
    header = (f"{when}; {machine()}; torch {torch.__version__}, {args.threads} threads, {args.device} {args.dtype}; "
              f"load average before {load_before}, after {load_average()}; {minutes:.1f} min")
    table = markdown_table(results, header) + layers_line(layers) + ("\n" + op_count.ops_table(ops) if ops else "")
    ratios = dict(json_ratios(results), **layers, **ops)
    print(table)
    print(targets_summary(ratios))
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(table + "\n" + targets_summary(ratios) + "\n")
    print(json.dumps(ratios, sort_keys=False))
    return ratios


if __name__ == "__main__":
    main()
