"""Peak memory per configuration, measured in a child process (`python -m bench.memory SPEC_JSON`).

CPU: torch allocates outside tracemalloc's view, so the child reads the kernel's resident-set high-water mark
(VmHWM, what getrusage's ru_maxrss reports) and resets it before every configuration (`/proc/self/clear_refs`
5); glibc is told to hand every block of 64 KiB or more straight back to the kernel (MALLOC_MMAP_THRESHOLD_),
so a freed tensor of one configuration leaves nothing resident that would hide the next one's. `isolate`
runs one child per configuration instead (slower: the UNet is rebuilt each time).
GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, in the same child.

The child keeps the UNet and both LoRA files loaded throughout (a WebUI keeps them too); configurations run
in the order given: "none" and the fused ones on the original weights, then "merged" (both LoRAs added into
the weights in place), then the guidance steps "step_*" (their models are loaded first) on the merged UNet.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Dict, List

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """before / peak bytes around one configuration, on the CPU (RSS) or a CUDA device (allocator)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if not reset_hwm():
            raise OSError("cannot reset VmHWM")
        return rss_bytes()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return hwm_bytes()


def child(spec: Dict) -> Dict[str, Dict[str, int]]:
    """Run spec["configs"] in order in this process; bytes before and at the peak of each."""
    from safetensors import safe_open

    from lib_dynfuse import fuse, load_lora

    from . import guidance_cases, models
    from .loras import dense_delta
    from .unet_cases import STEPS, unet_call
    from tests.fixtures.lora_files import WrittenLayer

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    unet = models.unet(spec["kind"], device=device, dtype=dtype, tiny=spec.get("tiny", False))
    inputs = models.unet_inputs(unet, spec["latent"], device=device, dtype=dtype)
    loras = (load_lora(spec["subject"]), load_lora(spec["style"]))
    meter = Meter(device)
    results: Dict[str, Dict[str, int]] = {}
    refine = gm = None
    merged = False
    for name in spec["configs"]:
        if name.startswith("step_") and refine is None:
            gm = guidance_cases.build_models(spec["clip"], device, dtype)
            refine = guidance_cases.refiners(gm, spec["latent"] * 8, device)
        if name == "merged" or name.startswith("step_"):
            if not merged:
                modules = dict(unet.named_modules())
                with torch.no_grad():
                    for path in (spec["subject"], spec["style"]):
                        with safe_open(path, "pt") as f:
                            for module, stem in spec["layers"]:
                                down, up = f.get_tensor(f"{stem}.lora_down.weight"), f.get_tensor(f"{stem}.lora_up.weight")
                                alpha = float(f.get_tensor(f"{stem}.alpha"))
                                dw = dense_delta(WrittenLayer("unet", module, stem, down, up, None, alpha))
                                modules[module].weight += dw.to(device=device, dtype=dtype)
                merged = True
        elif merged:
            raise ValueError(f"{name}: fused configurations must come before 'merged' and the steps")
        before = meter.start()
        if name in ("none", "merged"):
            unet_call(unet, inputs)
        elif name.startswith("step_"):
            step = guidance_cases.step_cases(unet, inputs, refine, [name[len("step_"):]] if name != "step_off" else [])
            step[-1].call(0)
        else:
            method, _, criterion = name.partition("_")
            baked = criterion == "baked"    # klora_baked, merge_baked: FuseSession(weight_space=True)
            with fuse(unet, loras[0], loras[1], method=method, criterion="kl" if baked else (criterion or "kl"),
                      weight_space=baked) as session:
                session.set_step(STEPS // 2, STEPS)
                unet_call(unet, inputs)
        results[name] = {"before": before, "peak": meter.peak()}
        print(f"  memory {name}: peak {results[name]['peak'] / 2**20:.0f} MiB "
              f"(+{(results[name]['peak'] - before) / 2**20:.0f} over {before / 2**20:.0f})", file=sys.stderr, flush=True)
    return results


def measure(spec: Dict, isolate: bool = False) -> Dict[str, Dict[str, int]]:
    """Peak memory of every configuration in spec["configs"]: one child for all, or one child each."""
    groups: List[List[str]] = [[c] for c in spec["configs"]] if isolate else [list(spec["configs"])]
    out: Dict[str, Dict[str, int]] = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for group in groups:
        if isolate:  # each child replays "merged" for its steps only when it needs the merged weights
            group = (["merged"] if group[0].startswith("step_") else []) + group
        env = dict(os.environ, **MALLOC_ENV)
        env.pop("GLIBC_TUNABLES", None)   # run.py's keep-the-heap setting would hide every freed block here
        proc = subprocess.run([sys.executable, "-m", "bench.memory", json.dumps(dict(spec, configs=group))],
                              cwd=root, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {group} failed (exit {proc.returncode})")
        out.update({k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items() if k in group})
    return out


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
