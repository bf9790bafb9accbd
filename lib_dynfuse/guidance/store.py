"""`EncoderStore`: the hosts keep one and reuse the loaded CLIP and DINO encoders across generations."""
from __future__ import annotations

import threading
from typing import Optional, Sequence, Tuple

import torch

from .encoders import ImageEncoder, find_clip_weights, find_dino_weights, load_clip_encoder, load_dino_encoder
from .weights import GuidanceUnavailable, joined


class EncoderStore:
    """The last (clip, dino) pair loaded, reloaded only when a setting changes; clear() frees it."""

    def __init__(self):
        self._key = None
        self._pair: Optional[Tuple[ImageEncoder, ImageEncoder]] = None
        self._lock = threading.Lock()

    def get(self, clip_arch: str = "ViT-B-32", clip_weights: Optional[str] = None, dino_kind: str = "dino-vits16",
            dino_weights: Optional[str] = None, search_dirs: Sequence[str] = (), hub_cache: Optional[str] = None,
            device="cpu", dtype: torch.dtype = torch.float32) -> Tuple[ImageEncoder, ImageEncoder]:
        """(clip, dino); raises GuidanceUnavailable (with what to put where) when weights are missing, naming every
        encoder that has none (both are looked for before either is loaded)."""
        key = (clip_arch, clip_weights or None, dino_kind, dino_weights or None, tuple(search_dirs), hub_cache,
               str(torch.device(device)), dtype)
        with self._lock:
            if self._key != key:
                self._pair = self._key = None          # free the old pair before loading the new one
                problems = []
                for find in (lambda: find_clip_weights(clip_arch, clip_weights or None, search_dirs, hub_cache),
                             lambda: find_dino_weights(dino_kind, dino_weights or None, search_dirs, hub_cache)):
                    try:
                        find()
                    except GuidanceUnavailable as e:
                        problems.append(e)
                if problems:
                    raise joined(problems)
                clip = load_clip_encoder(clip_arch, clip_weights or None, search_dirs, hub_cache,
                                         device=device, dtype=dtype)
                dino = load_dino_encoder(dino_kind, dino_weights or None, search_dirs, hub_cache,
                                         device=device, dtype=dtype)
                self._pair, self._key = (clip, dino), key
            return self._pair

    @property
    def loaded(self) -> int:
        """How many encoders are held (0 or 2)."""
        return 0 if self._pair is None else len(self._pair)

    def clear(self) -> None:
        with self._lock:
            self._pair = self._key = None
