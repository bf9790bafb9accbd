"""Reference images (paper Eq. 14-15): an in-memory cache of host renders, and decoding of given images."""
from __future__ import annotations

import base64
import binascii
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

ROLES = ("subject", "style")


class ReferenceImageError(ValueError):
    """A given reference image could not be read; the message says what was received."""


@dataclass(frozen=True)
class ReferenceKey:
    """Everything that changes a reference render; equal keys give the same images."""
    role: str                                   # "subject" (Eq. 14, l_c) or "style" (Eq. 15, l_s)
    model_hash: str
    loras: Tuple[Tuple[str, float], ...]        # (LoRA hash, weight) of the LoRA(s) active for this render
    prompt: str
    seed: int
    width: int
    height: int
    sampler: str
    steps: int
    negative_prompt: str = ""
    cfg_scale: float = 0.0
    extra: Tuple = ()                           # anything else the host knows changes the render (scheduler, ...)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"DynFuse: reference role must be one of {ROLES}, got {self.role!r}")


class ReferenceCache:
    """LRU of rendered reference images; the host renders through the callback it passes in."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max(1, int(max_entries))
        self._items: "OrderedDict[ReferenceKey, List[Any]]" = OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.renders = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: ReferenceKey) -> bool:
        return key in self._items

    def get_or_render(self, key: ReferenceKey, render: Callable[[], Sequence[Any]]) -> Tuple[List[Any], bool]:
        """(images, hit): the cached images for `key`, or `render()`'s, stored. An exception stores nothing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return list(self._items[key]), True
            images = render()
            if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
                images = [images]
            if not images:
                raise ValueError(f"DynFuse: the {key.role} reference render returned no image")
            self._items[key] = list(images)
            self.renders += 1
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
            return list(images), False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def decode_image_arg(value: Any):
    """A PIL RGB image from PIL, numpy (HxW, HxWx3/4; uint8 or float in [0,1]) or base64 (with or without data:)."""
    from PIL import Image
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, str)):
        return _decode_base64(value)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None
    if np is not None and isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3]
        elif arr.ndim != 2:
            raise ReferenceImageError(f"DynFuse: a reference image array must be HxW or HxWx3/4, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise ReferenceImageError(f"DynFuse: cannot use a {type(value).__name__} as a reference image "
                              "(give a PIL image, a numpy array or a base64 string)")


def _decode_base64(value) -> Any:
    from PIL import Image
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith("data:"):
        if "," not in text:
            raise ReferenceImageError("DynFuse: a data: URL reference image has no ',' before its base64 data")
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ReferenceImageError(f"DynFuse: the reference image is not valid base64 ({e}); "
                                  f"it starts with {text[:24]!r}") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for unreadable data
        raise ReferenceImageError(f"DynFuse: the base64 reference image ({len(raw)} bytes) is not an image "
                                  f"PIL can read ({type(e).__name__})") from e


def images_to_tensor(images: Any, device: Optional[torch.device] = None) -> torch.Tensor:
    """[N,3,H,W] float32 in [0,1] from one image or a list (PIL, numpy, base64, or [3,H,W]/[N,3,H,W] tensors)."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        return batch.to(device=device) if device is not None else batch
    if not isinstance(images, (list, tuple)):
        images = [images]
    import numpy as np
    tensors = []
    for im in images:
        if isinstance(im, torch.Tensor):
            tensors.append(im if im.dim() == 4 else im.unsqueeze(0))
            continue
        pil = decode_image_arg(im)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0))
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ReferenceImageError(f"DynFuse: reference images of one role must share a size, got {sorted(sizes)}")
    batch = torch.cat([t.float() for t in tensors], dim=0)
    return batch.to(device=device) if device is not None else batch
