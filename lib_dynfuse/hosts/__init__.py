"""WebUI adapters. Which host runs us is found by feature (importable modules and attributes), never by version tag.

`detect()` -> "forge", "a1111" or None; `adapter()` -> the `HostAdapter` for it (see common.py).
Host modules are imported lazily, inside functions, so this package imports anywhere.
"""
from __future__ import annotations

import importlib.util
from typing import Optional


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect() -> Optional[str]:
    """Forge ships `modules_forge` and the `backend` package; AUTOMATIC1111 has `modules.processing` without them."""
    if not _has("modules") or not _has("modules.processing"):
        return None
    if _has("modules_forge") or _has("backend.patcher"):
        return "forge"
    return "a1111"


def adapter(kind: Optional[str] = None):
    """The HostAdapter of the running WebUI (`kind` overrides detection)."""
    kind = kind or detect()
    if kind == "forge":
        from .forge import ForgeHost
        return ForgeHost()
    if kind == "a1111":
        from .a1111 import A1111Host
        return A1111Host()
    raise RuntimeError("DynFuse: no supported WebUI found (neither AUTOMATIC1111 nor Forge modules are importable)")
