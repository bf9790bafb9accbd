"""Counts of what DynFuse leaves alive between generations, for `GET /dynfuse/v1/info?diagnostics=true`.

Everything is counted on request, from the objects themselves (gc, the model's hook dicts, the caches): nothing
is counted while generating. After a collection, between jobs, a healthy process has no DynFuse hook on the
model, no open session, at most the last job's run, and every cache within its bound.
Nothing here imports a WebUI module; the host adapter names its model's root modules (`model_roots`) and its
own state (`state_counts`).
"""
from __future__ import annotations

import functools
import gc
import os
from typing import Any, Dict, Iterable, Optional

import torch

PACKAGE = __name__.split(".")[0]   # "lib_dynfuse"


def is_ours(fn: Any) -> bool:
    """A hook whose function is defined in this package (through partials and bound methods)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return (getattr(fn, "__module__", None) or "").split(".")[0] == PACKAGE


def hooks_on(roots: Iterable[torch.nn.Module]) -> int:
    """Forward and forward-pre hooks of this package on every module under `roots` (each module once)."""
    seen, count = set(), 0
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                count += sum(1 for h in hooks.values() if is_ours(h))
    return count


def resident_bytes() -> Optional[int]:
    """This process's resident memory (Linux /proc/self/statm), or None where that is not available."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cache_count(cache: Any) -> Dict[str, int]:
    """Entries and bound of one of the LRU caches (FileCache.bound, ReferenceCache.max_entries, SumsCache.size)."""
    if cache is None:
        return {"entries": 0, "bound": 0}
    bound = getattr(cache, "bound", None) or getattr(cache, "max_entries", None) or getattr(cache, "size", 0)
    return {"entries": len(cache), "bound": int(bound)}


def counts(host: Any) -> Dict[str, Any]:
    """The diagnostics body: hooks, live runs and sessions, the host's patch sets and wrappers, caches, memory."""
    from ..klora_cache import SUMS_CACHE
    from ..session import FuseSession
    from .guidance_run import ENCODERS, REFERENCES
    from .run import FuseRun
    gc.collect()
    runs, sessions = [], []
    for obj in gc.get_objects():
        kind = type(obj)   # not isinstance: it reads __class__, which some lazy module proxies warn about
        if issubclass(kind, FuseRun):
            runs.append(obj)
        elif issubclass(kind, FuseSession):
            sessions.append(obj)
    out: Dict[str, Any] = {
        "hooks": 0,
        "runs_alive": len(runs),
        "sessions_alive": len(sessions),
        "sessions_open": sum(1 for s in sessions if s.is_open),
        "patch_sets": 0,
        "unet_wrappers": 0,
        "reference_cache": dict(cache_count(REFERENCES), renders=REFERENCES.renders, hits=REFERENCES.hits),
        "klora_cache": cache_count(SUMS_CACHE),
        "lora_file_cache": cache_count(getattr(host, "files", None)),
        "encoders_loaded": ENCODERS.loaded,
        "rss_bytes": resident_bytes(),
    }
    try:   # the host's model may be unloaded or loading: the counts that need it are left out, with the reason
        out["hooks"] = hooks_on(getattr(host, "model_roots", lambda: [])())
        out.update(getattr(host, "state_counts", lambda: {})())
    except Exception as e:
        out["model_error"] = f"{type(e).__name__}: {e}"
    return out
