"""Offline weight discovery and safe state-dict loading for the guidance encoders (never downloads)."""
from __future__ import annotations

import glob
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch


class GuidanceUnavailable(RuntimeError):
    """Guidance cannot run (weights or a library missing); the message says what to put where."""


def hub_cache_dir() -> str:
    """The Hugging Face hub cache the user's other tools fill (same environment variables as huggingface_hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "huggingface", "hub")


def hub_snapshots(repo_id: str, hub_cache: Optional[str] = None) -> List[str]:
    """Snapshot folders of `repo_id` in the hub cache, the one `refs/main` names first."""
    root = os.path.join(hub_cache or hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    found = sorted(glob.glob(os.path.join(root, "snapshots", "*")))
    try:
        with open(os.path.join(root, "refs", "main"), encoding="utf-8") as f:
            main = os.path.join(root, "snapshots", f.read().strip())
    except OSError:
        main = None
    if main in found:
        found.remove(main)
        found.insert(0, main)
    return [d for d in found if os.path.isdir(d)]


def first_existing(folder: str, names: Iterable[str]) -> Optional[str]:
    """The first of `names` that is a file in `folder` (symlinks into the hub's blobs count)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin/.pt/.pth through torch.load(weights_only=True) (no pickled code)."""
    if not os.path.isfile(path):
        raise GuidanceUnavailable(f"DynFuse guidance: weight file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            data = load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, TorchScript archive or pickle with code: all refused the same way
        raise GuidanceUnavailable(f"DynFuse guidance: cannot read {path} as plain tensors ({type(e).__name__}: {e}). "
                                  "Use a .safetensors file (or a .bin/.pth holding only tensors).") from e
    if data is None and not path.endswith(".safetensors"):
        # AUTOMATIC1111 replaces torch.load with its safe unpickler (modules/safe.py:181-194), which answers None
        # for a file it refuses, e.g. any .bin a recent torch saves (zip entries it does not list, safe.py:67-74)
        raise GuidanceUnavailable(f"DynFuse guidance: the WebUI refused to load {path} (its safe unpickler rejected "
                                  "the file; the console says why). Save these weights as .safetensors "
                                  "(safetensors.torch.save_file) and use that file instead.")
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise GuidanceUnavailable(f"DynFuse guidance: {path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in data.items()}


def missing_weights_message(what: str, places: Sequence[str]) -> str:
    """The user-facing text of GuidanceUnavailable: what was looked for, and where to put it."""
    lines = [f"DynFuse guidance is off: no {what} weights found (nothing is downloaded). Put one of these in place:"]
    lines += [f"  - {p}" for p in places]
    return "\n".join(lines)


def joined(problems: Sequence[GuidanceUnavailable]) -> GuidanceUnavailable:
    """One GuidanceUnavailable for several encoders, each named, so one run tells the user everything missing."""
    if len(problems) == 1:
        return problems[0]
    return GuidanceUnavailable("\n".join(str(p) if i == 0 else "and " + str(p).replace("DynFuse guidance is off: ", "")
                                         .replace("DynFuse guidance: ", "", 1) for i, p in enumerate(problems)))
