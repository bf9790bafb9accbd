"""The two LoRAs of a fusion as the host reads them: the host's LoRA list, file identity, and the checks every
LoRA passes before it is fused (base model, shapes, finite values), then the pairing into FuseTargets.

Nothing here imports a WebUI module.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..layer_delta import FuseTarget, LayerDelta, check_weight, delta_parts, first_nonfinite

log = logging.getLogger("dynfuse")

# the builtin's network.SdVersion names (A1111 extensions-builtin/Lora/network.py:16-20, Forge
# sd_forge_lora/network.py:9-15) -> model families
LORA_BASES = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl", "Flux": "flux"}


class FuseInputError(ValueError):
    """A problem with the LoRAs a user picked (unknown, unreadable, other base model): shown, then no fusion."""


@dataclass
class LoraLayer:
    """One layer one LoRA changes: the live host module, its group ("unet"/"te") and the delta."""

    module: torch.nn.Module
    group: str
    delta: LayerDelta
    part: Optional[str] = None          # q/k/v/out of an nn.MultiheadAttention `module` (FuseTarget.part)


@dataclass
class HostLora:
    """A LoRA as read by the host's own loader (not activated in the host)."""

    name: str
    shorthash: str = ""
    base: str = "unknown"                 # "sd1", "sd2", "sdxl", ... as the file's metadata says
    identity: str = ""                    # the file's identity when read (file_identity): a key part of every cache
    layers: Dict[str, LoraLayer] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)   # layers read but not fusable here (reason in the name)

    def order_as(self, modules: Iterable[torch.nn.Module]) -> None:
        """Put the layers in the order of `modules` (the model's own), whatever order the file or the host's parser
        gave: the targets, the selection record and the heat-map's layer axis follow it, the same on every start."""
        rank: Dict[int, int] = {}
        for i, m in enumerate(modules):
            rank.setdefault(id(m), i)
        self.layers = dict(sorted(self.layers.items(), key=lambda kv: rank.get(id(kv[1].module), len(rank))))


class BuiltinLoraList:
    """The LoRA list of the host's builtin Lora extension: its `networks` module has the same globals in
    AUTOMATIC1111 (extensions-builtin/Lora/networks.py:725-737) and Forge (sd_forge_lora/networks.py:130-167).
    A host adapter provides `networks()`, which returns that module."""

    def networks(self) -> Any:
        raise NotImplementedError

    def lora_names(self) -> List[str]:
        try:
            return sorted(self.networks().available_networks, key=str.lower)
        except Exception as e:  # the builtin Lora extension is disabled
            log.warning("DynFuse: the WebUI's builtin Lora extension is not available: %s", e)
            return []

    def refresh_loras(self) -> List[str]:
        self.networks().list_available_networks()
        return self.lora_names()

    def _on_disk(self, name: str):
        """The list entry of `name`; a name the list does not know makes it rescan once, as the host does for a
        `<lora>` (A1111 networks.py:300-302, Forge networks.py:87-90); a file gone from disk is refused by name."""
        nets = self.networks()

        def lookup():
            return nets.available_networks.get(name) or nets.available_network_aliases.get(name)
        found = lookup()
        if found is None:
            try:
                nets.list_available_networks()
            except Exception as e:  # a folder that cannot be listed: the name stays unknown
                log.info("DynFuse: could not rescan the LoRA list: %s", e)
            found = lookup()
        if found is None:
            raise FuseInputError(f"DynFuse: unknown LoRA {name!r} (not in the LoRA list; refresh it or check the name)")
        if not os.path.isfile(found.filename):
            raise FuseInputError(f"DynFuse: LoRA {name!r} is no longer on disk ({found.filename} was deleted or moved "
                                 "after the LoRA list was read; refresh the list)")
        return found

    def lora_base(self, name: str) -> str:
        """The model family the LoRA's metadata names ("unknown" when it names none), read when the list was."""
        version = getattr(getattr(self._on_disk(name), "sd_version", None), "name", "Unknown")
        return LORA_BASES.get(version, "unknown")

    def _hashed_on_disk(self, name: str) -> Tuple[Any, str]:
        """(list entry, file identity) of `name`, with its short hash read (the infotext names both LoRAs by hash).

        The entry keeps the hash it read first (network.py:70-81 in both hosts), so a file replaced under the same
        name would keep the old file's hash: when the file's identity changed since then the hash is read again.
        A hash that cannot be read is logged and left empty; it never stops the fusion."""
        on_disk = self._on_disk(name)
        identity = file_identity(on_disk.filename)
        seen = self.__dict__.setdefault("_file_identities", {})
        if seen.get(on_disk.filename, identity) != identity and hasattr(on_disk, "set_hash"):
            on_disk.set_hash("")
        if not getattr(on_disk, "shorthash", ""):
            try:
                on_disk.read_hash()
            except Exception as e:
                log.info("DynFuse: no hash for %s: %s", name, e)
        seen[on_disk.filename] = identity
        return on_disk, identity


def file_identity(path: str) -> str:
    """Size, modification time and inode of a file: changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"


class FileCache:
    """The last few files' contents, keyed by path and file identity: a file replaced under the same name is read
    again, never served from the cache."""

    def __init__(self, size: int = 4):
        self.bound = max(1, int(size))
        self._items: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: str, read: Callable[[str], Any]) -> Any:
        key = (os.path.abspath(path), file_identity(path))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            for old in [k for k in self._items if k[0] == key[0]]:   # the same file's older content goes first
                del self._items[old]
        value = read(path)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.bound:
                self._items.popitem(last=False)
        return value


def check_base(name: str, lora_base: str, model_base: str) -> None:
    """Refuse a LoRA whose metadata names another model family than the loaded checkpoint (before it is read)."""
    if lora_base != "unknown" and model_base != "unknown" and lora_base != model_base:
        raise FuseInputError(f"DynFuse: LoRA {name!r} is for {lora_base.upper()}, "
                             f"but the loaded model is {model_base.upper()}")


def is_packed_weight(weight: torch.Tensor) -> bool:
    """Quantized storage (bitsandbytes NF4/FP4, GGUF in Forge) whose tensor shape is not the layer's shape."""
    return bool(getattr(weight, "bnb_quantized", False) or getattr(weight, "gguf_cls", None) is not None
                or weight.dtype in (torch.uint8, torch.int8))


def check_shapes(lora: HostLora) -> None:
    """Refuse a LoRA whose deltas do not fit the layers they matched (a LoRA for another architecture).

    A Linear/1x1-conv spelling of a delta is first reshaped to the layer's own form (some trainers store a
    Linear proj_in as a 1x1 conv); packed quantized weights can't be compared and are not checked."""
    from ..targets import fit_to_weight, shape_problem
    from ..mha import part_weight
    bad = []
    for name, layer in lora.layers.items():
        weight = layer.module.weight if layer.part is None else part_weight(layer.module, layer.part)
        if is_packed_weight(weight):
            continue
        layer.delta = fit_to_weight(layer.delta, weight)
        problem = shape_problem(layer.delta, weight)
        if problem:
            bad.append((name, problem))
    if bad:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} does not fit the loaded model "
                             f"({len(bad)} of {len(lora.layers)} layers have other shapes, e.g. {bad[0][0]}: "
                             f"{bad[0][1]}); is it for another base model?")
    if not lora.layers:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} changes no layer of the loaded model")


def check_finite(lora: HostLora) -> None:
    """Refuse a LoRA whose deltas (or scales, e.g. from a NaN alpha) hold NaN or Inf: every image would be NaN."""
    bad = first_nonfinite((f"{name} ({part})", t) for name, layer in lora.layers.items()
                          for part, t in delta_parts(layer.delta))
    if bad is not None:
        raise FuseInputError(f"DynFuse: LoRA {lora.name!r} holds NaN or Inf values in layer {bad} (a diverged "
                             "training or a damaged file); it would turn every image into NaN")


def pair_targets(subject: HostLora, style: HostLora, subject_weight: float, style_weight: float,
                 text_encoder: str) -> List[FuseTarget]:
    """One FuseTarget per layer either LoRA changes, weights applied; text-encoder layers dropped when 'off'."""
    subject_weight = check_weight(subject_weight, "subject_weight")
    style_weight = check_weight(style_weight, "style_weight")
    names = list(subject.layers) + [n for n in style.layers if n not in subject.layers]
    targets = []
    for name in names:
        c, s = subject.layers.get(name), style.layers.get(name)
        first = c or s
        if first.group == "te" and text_encoder == "off":
            continue
        targets.append(FuseTarget(
            name=name, module=first.module, group=first.group, part=first.part,
            subject=c.delta.with_weight(subject_weight) if c is not None else None,
            style=s.delta.with_weight(style_weight) if s is not None else None))
    return targets
