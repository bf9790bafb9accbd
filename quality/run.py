"""Evaluate every fusion method in the lab (building the world first if needed).

    python -m quality.run [--quick] [--methods NAME ...] [--pairs K ...] [--seeds N] [--cfg S] [--steps N]
                          [--ref-prompts fusion|own] [--llr-scale M] [--tiny] [--cache DIR] [--list]

Prints the calibration, pooled and per-pair tables, the layer decisions of the selecting methods, and, last,
one JSON line with every number.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import methods as M
from .build import THREADS, build
from .config import CACHE_ROOT, FULL, TINY
from .report import print_report, summarise
from .runner import Settings, evaluate

SEED_BASE = 10_000   # initial-noise seeds of the evaluation: SEED_BASE + i


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 seeds, no xt refinement")
    p.add_argument("--methods", nargs="+", help="method names (a trailing * matches a prefix); merge is always run")
    p.add_argument("--pairs", nargs="+", type=int, help="pair indices (default: all)")
    p.add_argument("--seeds", type=int, help="seeds per pair (default 64, quick 16)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--ref-prompts", choices=("fusion", "own"), default="fusion",
                   help="references: both with the fusion prompt (default) or each LoRA's own trigger (l_c, l_s)")
    p.add_argument("--llr-scale", type=float, help="refinement strength m (default: the guidance API's, 10)")
    p.add_argument("--tiny", action="store_true", help="the smoke test's tiny world")
    p.add_argument("--cache", default=CACHE_ROOT, help="artifact folder (default quality/.cache)")
    p.add_argument("--workers", type=int, default=2, help="processes the pairs are spread over (default 2)")
    p.add_argument("--list", action="store_true", help="print the method table and exit")
    a = p.parse_args(argv)
    table = M.table(a.llr_scale)
    if a.list:
        for m in table:
            print(f"{m.name:<26} fuse{m.fuse} refine{m.refine or {}}")
        return {}
    chosen = M.select(table, a.methods if a.methods else (M.quick_names() if a.quick else None))
    log = lambda s: print(s, flush=True)   # noqa: E731
    cfg = TINY if a.tiny else FULL
    torch.set_num_threads(THREADS)
    world = build(cfg, a.cache, workers=a.workers, log=log)
    n = a.seeds or (16 if a.quick else 64)
    settings = Settings(seeds=list(range(SEED_BASE, SEED_BASE + n)), steps=a.steps, cfg=a.cfg,
                        ref_prompts=a.ref_prompts, pairs=a.pairs)
    start = time.time()
    result = evaluate(world, chosen, settings, log, workers=a.workers, threads=THREADS)
    summary = summarise(result, [m.name for m in chosen])
    header = {"world": f"{world.folder.rsplit('/', 1)[-1]} ({world.cfg.key()})", "pairs": result["pairs"], "seeds": n, "steps": a.steps,
              "cfg": a.cfg, "ref_prompts": a.ref_prompts, "llr_scale": a.llr_scale or "api default",
              "eval_wall_s": round(time.time() - start), "judges": world.judge_accuracy}
    print_report(summary, header)
    return dict(header, **summary)


if __name__ == "__main__":
    main(sys.argv[1:])
