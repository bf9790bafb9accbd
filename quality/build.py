"""Build the lab's world (or what is missing of it): text encoder, base UNet, judges, guide encoders, LoRA pairs.

    python -m quality.build [--tiny] [--cache DIR] [--force] [--workers N]

Every artifact is deterministic from the config's seeds (each job single-threaded, seeded on its own) and cached
under quality/.cache/world-<size>px-<hash>/. Independent jobs run in parallel worker processes (default 2).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

from . import encoders, judges, lora_train, world
from .config import CACHE_ROOT, FULL, TINY, WorldConfig
from .models import TextEncoder, build_unet

THREADS = 1   # per process: on a shared 2-core machine OpenMP spin-waits made two threads 1.3-4x slower than one


def artifact(cfg: WorldConfig, folder: str, name: str) -> str:
    """The path of one artifact; its file name carries the key of exactly the settings it depends on."""
    if name == "text":
        return os.path.join(folder, cfg.file("text", (), "pt"))
    if name == "base":
        return os.path.join(folder, cfg.file("base_unet", ("base_",), "safetensors"))
    if name.startswith("judge_"):
        return os.path.join(folder, cfg.file(name, ("judge_",), "pt"))
    if name.startswith("encoder_"):
        return os.path.join(folder, cfg.file(name, ("encoder_",), "pt"))
    if name.startswith("pair"):   # pair<k>_<role>: a LoRA depends on the base and the LoRA settings
        return os.path.join(folder, cfg.file(name, ("base_", "lora_"), "safetensors"))
    raise KeyError(name)


class World:
    """The built artifacts of one config, loaded: text encoder, base UNet, judges, encoders, LoRA paths."""

    def __init__(self, cfg: WorldConfig, folder: str):
        self.cfg, self.folder = cfg, folder
        self.text = load_text(cfg, folder)
        self.unet = load_base(cfg, folder).eval().requires_grad_(False)
        self.subject_judge = _load(artifact(cfg, folder, "judge_subject"))
        self.style_judge = _load(artifact(cfg, folder, "judge_style"))
        self.clip = _load(artifact(cfg, folder, "encoder_clip"))
        self.dino = _load(artifact(cfg, folder, "encoder_dino"))
        with open(os.path.join(folder, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.judge_accuracy = self.manifest["judges"][os.path.basename(artifact(cfg, folder, "judge_subject"))]

    def lora_path(self, role: str, k: int) -> str:
        return artifact(self.cfg, self.folder, f"pair{k}_{role}")


def _load(path: str):
    return torch.load(path, weights_only=False).eval().requires_grad_(False)


def load_text(cfg: WorldConfig, folder: str) -> TextEncoder:
    text = TextEncoder(cfg.seed)
    text.load_state_dict(torch.load(artifact(cfg, folder, "text")))
    return text


def load_base(cfg: WorldConfig, folder: str):
    from safetensors.torch import load_file
    unet = build_unet(cfg.size, cfg.seed)
    unet.load_state_dict(load_file(artifact(cfg, folder, "base")))
    return unet.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------- jobs: (name, output file, function of cfg, folder)
def _make_text(cfg: WorldConfig, folder: str, log) -> None:
    torch.save(TextEncoder(cfg.seed).state_dict(), artifact(cfg, folder, "text"))


def _make_base(cfg: WorldConfig, folder: str, log) -> None:
    from safetensors.torch import save_file
    from .train_base import train_base
    unet = train_base(cfg.size, cfg.base_steps, cfg.base_batch, cfg.base_pool, cfg.seed, load_text(cfg, folder),
                      cfg.base_lr, log, cfg.base_min_snr)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, artifact(cfg, folder, "base"))


def _make_judge(kind: str):
    def make(cfg: WorldConfig, folder: str, log) -> None:
        steps = cfg.judge_steps if kind == "subject" else max(1, cfg.judge_steps // 3)   # style is learnt fast
        net = judges.train_judge(kind, cfg.size, steps, cfg.judge_batch, cfg.judge_pool,
                                 cfg.seed + 11 + (kind == "style"), log=log)
        torch.save(net, artifact(cfg, folder, f"judge_{kind}"))
    return make


def _make_encoder(role: str):
    def make(cfg: WorldConfig, folder: str, log) -> None:
        enc = encoders.train_encoder(role, cfg.size, cfg.encoder_steps, cfg.encoder_batch, cfg.encoder_pool,
                                     cfg.seed + 21 + (role == "dino"), log=log)
        torch.save(enc, artifact(cfg, folder, f"encoder_{role}"))
    return make


def _make_lora(k: int, role: str):
    def make(cfg: WorldConfig, folder: str, log) -> None:
        from safetensors.torch import save_file
        seed = cfg.pair_seed(k)
        if role == "subject":
            spec = lora_train.subject_spec(world.NEW_SUBJECTS[k % len(world.NEW_SUBJECTS)], cfg.lora_shots, seed)
        else:
            spec = lora_train.style_spec(world.NEW_STYLES[k % len(world.NEW_STYLES)], cfg.lora_shots, seed)
        tensors = lora_train.train_lora(load_base(cfg, folder), load_text(cfg, folder), spec, cfg.size,
                                        cfg.lora_steps, cfg.lora_rank, cfg.lora_lr, seed + (role == "style"),
                                        cfg.lora_conv, log=log, name=f"pair {k} {role} lora")
        save_file(tensors, artifact(cfg, folder, f"pair{k}_{role}"),
                  metadata={"ss_network_dim": str(cfg.lora_rank), "lab_role": role, "lab_pair": str(k)})
    return make


def jobs(cfg: WorldConfig) -> List[Tuple[str, str, Callable, Tuple[str, ...]]]:
    """(name, artifact, make, names it needs) for every artifact, in a good order to start them."""
    out = [("text encoder", "text", _make_text, ()),
           ("base unet", "base", _make_base, ("text encoder",))]
    out += [(f"{kind} judge", f"judge_{kind}", _make_judge(kind), ()) for kind in ("subject", "style")]
    out += [(f"{role} encoder", f"encoder_{role}", _make_encoder(role), ()) for role in encoders.ROLES]
    out += [(f"pair {k} {role} lora", f"pair{k}_{role}", _make_lora(k, role), ("base unet",))
            for k in range(cfg.pairs) for role in ("subject", "style")]
    return out


def _print(s: str) -> None:
    print(s, flush=True)


def _run_job(cfg: WorldConfig, folder: str, name: str, log: Callable[[str], None] = _print) -> Dict[str, float]:
    """One job (a worker's entry point), single-threaded; returns its wall and CPU seconds."""
    torch.set_num_threads(THREADS)
    make = next(j[2] for j in jobs(cfg) if j[0] == name)
    wall, cpu = time.time(), time.process_time()
    make(cfg, folder, log)
    return {"wall_s": round(time.time() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def build(cfg: WorldConfig, root: str = CACHE_ROOT, force: bool = False, workers: int = 2,
          log: Callable[[str], None] = print) -> World:
    """Build every missing artifact of `cfg` (all of them with force) and return the loaded World."""
    torch.set_num_threads(THREADS)
    folder = cfg.folder(root)
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest: Dict = {}
    if os.path.exists(manifest_path) and not force:
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest.setdefault("stages", {})
    manifest["config"] = cfg.__dict__
    path = {j[0]: artifact(cfg, folder, j[1]) for j in jobs(cfg)}
    todo = [j for j in jobs(cfg) if force or not os.path.exists(path[j[0]])]
    if todo:
        start = time.time()
        done = {j[0] for j in jobs(cfg)} - {j[0] for j in todo}
        pending = list(todo)

        def finish(name: str, times: Dict[str, float]) -> None:
            manifest["stages"][os.path.basename(path[name])] = dict(times, job=name)
            done.add(name)
            log(f"[build] {name}: {times['wall_s']} s wall, {times['cpu_s']} s CPU")
            with open(manifest_path, "w") as f:
                json.dump(manifest, f, indent=1)

        if workers <= 1:   # in this process, in order (the smoke test)
            for j in pending:
                finish(j[0], _run_job(cfg, folder, j[0], log))
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                running: Dict[cf.Future, str] = {}
                while pending or running:
                    for j in [j for j in pending if set(j[3]) <= done][:workers - len(running)]:
                        pending.remove(j)
                        running[pool.submit(_run_job, cfg, folder, j[0])] = j[0]
                    if not running:
                        raise RuntimeError(f"build: cannot start {[j[0] for j in pending]} (a needed artifact is missing)")
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        finish(running.pop(fut), fut.result())
        manifest["build_wall_s"] = round(time.time() - start, 1)
        log(f"[build] built {len(todo)} artifacts in {manifest['build_wall_s']} s wall ({workers} workers)")
    judge_key = os.path.basename(path["subject judge"])
    manifest.setdefault("judges", {})
    if judge_key not in manifest["judges"] or todo:
        acc = judges.judge_accuracy(_load(path["subject judge"]), _load(path["style judge"]), cfg.size, 2000,
                                    cfg.seed + 777)
        manifest["judges"][judge_key] = acc
        log("[build] judges on fresh renders: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return World(cfg, folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the smoke test's tiny world")
    p.add_argument("--cache", default=CACHE_ROOT, help="artifact folder (default quality/.cache)")
    p.add_argument("--force", action="store_true", help="rebuild every artifact")
    p.add_argument("--workers", type=int, default=2, help="parallel build processes (default 2; 1: in this process)")
    a = p.parse_args(argv)
    build(TINY if a.tiny else FULL, a.cache, a.force, a.workers, log=_print)


if __name__ == "__main__":
    main(sys.argv[1:])
