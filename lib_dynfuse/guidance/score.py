"""The guidance score R (paper Eq. 16-19): cosine similarities of image embeddings to reference embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from torch import nn


def cosine_rows(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sim_cos per batch row (Eq. 16-18); `reference` is [1,D] (shared) or [B,D] (one per row)."""
    if reference.shape[0] not in (1, embeddings.shape[0]):
        raise ValueError(f"DynFuse guidance: {reference.shape[0]} reference embeddings for a batch of "
                         f"{embeddings.shape[0]}; give 1 or one per row")
    return torch.nn.functional.cosine_similarity(embeddings, reference.expand_as(embeddings), dim=-1)


def residual(similarities: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = 1 - mean of the similarities, per row (Eq. 19; Eq. 1 with a single similarity)."""
    return 1.0 - torch.stack(list(similarities), dim=0).mean(dim=0)


@dataclass
class ScoreTerm:
    """One similarity of R: `encoder` applied to the image, compared with `reference` ([1,D] or [B,D])."""
    name: str
    encoder: nn.Module
    reference: torch.Tensor


@dataclass
class ScoreResult:
    residual: torch.Tensor                  # [B], R of every row (Eq. 19)
    similarities: Dict[str, torch.Tensor]   # term name -> [B]


class MetricScorer:
    """R(image) from any set of (encoder, reference embedding) terms, evenly weighted (Eq. 19).

    Each distinct encoder runs once per call even when several terms use it (CLIP serves content and style).
    """

    def __init__(self, terms: Sequence[ScoreTerm]):
        if not terms:
            raise ValueError("DynFuse guidance: a scorer needs at least one term")
        self.terms = [ScoreTerm(t.name, t.encoder, _plain(t.reference).detach()) for t in terms]

    @property
    def encoders(self) -> List[nn.Module]:
        """The distinct encoder modules, in term order."""
        out: List[nn.Module] = []
        for t in self.terms:
            if all(t.encoder is not e for e in out):
                out.append(t.encoder)
        return out

    def __call__(self, images: torch.Tensor) -> ScoreResult:
        """images [B,3,H,W] in [0,1] -> R per row, differentiable w.r.t. the images."""
        embedded = {id(e): e(images) for e in self.encoders}
        sims = {}
        for t in self.terms:
            emb = embedded[id(t.encoder)]
            # encoders may sit on different devices (low-VRAM hosts): gather the similarities on the image's
            sims[t.name] = cosine_rows(emb, t.reference.to(device=emb.device, dtype=emb.dtype)).to(images.device)
        return ScoreResult(residual(list(sims.values())), sims)


def embed_images(encoder: nn.Module, images: Any) -> torch.Tensor:
    """Embeddings [N,D] of reference images (PIL, numpy, base64, tensors in [0,1]), no grad, computed once."""
    from .references import images_to_tensor
    if isinstance(images, (list, tuple)) and len(images) > 1:  # sizes may differ; the encoder resizes each
        return torch.cat([embed_images(encoder, im) for im in images], dim=0)
    batch = images_to_tensor(images)
    param = next(encoder.parameters(), None)
    if param is not None:
        batch = batch.to(param.device)
    with torch.inference_mode(False), torch.no_grad():
        # outside inference mode, so that the embedding can be saved for the backward of the cosine later
        return encoder(_plain(batch)).detach()


@dataclass
class ReferenceEmbeddings:
    """E_CLIP(I_c_ref), E_CLIP(I_s_ref), E_DINO(I_s_ref) of Eq. 16-18, each [1,D] or [B,D]."""
    clip_content: torch.Tensor
    clip_style: torch.Tensor
    dino_style: torch.Tensor

    @classmethod
    def from_images(cls, clip: nn.Module, dino: nn.Module, content: Any, style: Any) -> "ReferenceEmbeddings":
        """Embed the subject reference (content) and the style reference once."""
        return cls(embed_images(clip, content), embed_images(clip, style), embed_images(dino, style))

    def scorer(self, clip: nn.Module, dino: nn.Module) -> MetricScorer:
        """The paper's R (Eq. 19): CLIP content, CLIP style, DINO style, evenly weighted."""
        return MetricScorer([ScoreTerm("clip_content", clip, self.clip_content),
                             ScoreTerm("clip_style", clip, self.clip_style),
                             ScoreTerm("dino_style", dino, self.dino_style)])


def paper_scorer(clip: nn.Module, dino: nn.Module, content: Any, style: Any) -> MetricScorer:
    """Eq. 16-19 from two reference images (subject I_c_ref, style I_s_ref) and the two encoders."""
    return ReferenceEmbeddings.from_images(clip, dino, content, style).scorer(clip, dino)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from a possibly inference-mode one (inference tensors cannot be saved for backward)."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t
