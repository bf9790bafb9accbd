"""The papers' Table 1 metrics of generated images: CLIP score, Style Sim, DINO score (K-LoRA Sec. 4.2).

As K-LoRA (and the dynamic-fusion paper after it) measures them: CLIP image embeddings compared by cosine with
the subject references ("CLIP score", subject similarity) and with the style references ("Style Sim"), and
DINO CLS embeddings compared with the subject references ("DINO score"); CLIP ViT-B/32 and DINO ViT-S/16 by
default. With several references an image's value is the mean of its cosines to each; the reported number is
the mean over images. The encoders and their local-only weights are the guidance package's (nothing is
downloaded); any module mapping images [B,3,H,W] in [0,1] to embeddings works.

Scores from the encoders that also guided the images (latent refinement, paper Sec. 4.2) flatter those images:
the refinement climbed exactly these cosines. Score with other encoders (another CLIP architecture or DINO
model) to compare guided and unguided images fairly.

    python -m lib_dynfuse.score --images out/ --subject-refs refs/dog/ --style-refs refs/watercolor/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .guidance.encoders import load_clip_encoder, load_dino_encoder
from .guidance.references import ReferenceImageError
from .guidance.score import cosine_rows, embed_images
from .guidance.weights import GuidanceUnavailable

METRICS = ("clip_score", "style_sim", "dino_score")
TITLES = {"clip_score": "CLIP score", "style_sim": "Style Sim", "dino_score": "DINO score"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CLIP, DEFAULT_DINO = "ViT-B-32", "dino-vits16"   # K-LoRA's CLIP ViT-B/32 and DINO ViT-S/16


class ScoreUnavailable(RuntimeError):
    """Scores cannot be computed (weights, references or images missing); the message says what to do."""


def mean_cosine(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per image, the mean of Sim_cos to each reference embedding (K-LoRA Table 1): [B,D] x [N,D] -> [B]."""
    return torch.stack([cosine_rows(embeddings, r.unsqueeze(0)) for r in references], dim=1).mean(dim=1)


@dataclass
class ReferenceSet:
    """The references embedded once: CLIP of the subject and style images, DINO of the subject images."""
    clip_subject: torch.Tensor
    clip_style: torch.Tensor
    dino_subject: torch.Tensor

    @classmethod
    def from_images(cls, clip: torch.nn.Module, dino: torch.nn.Module, subject_refs: Any,
                    style_refs: Any) -> "ReferenceSet":
        """Embed the subject and style reference images (PIL, numpy, base64, tensors in [0,1]; one or a list)."""
        subject, style = _as_list(subject_refs, "subject references"), _as_list(style_refs, "style references")
        return cls(embed_images(clip, subject), embed_images(clip, style), embed_images(dino, subject))

    def scores(self, clip: torch.nn.Module, dino: torch.nn.Module, images: Any) -> Dict[str, torch.Tensor]:
        """{metric: [B] float32 on the CPU} of the images, no grad."""
        images = _as_list(images, "images")
        clip_emb, dino_emb = embed_images(clip, images), embed_images(dino, images)
        out = {"clip_score": mean_cosine(clip_emb, self.clip_subject.to(clip_emb)),
               "style_sim": mean_cosine(clip_emb, self.clip_style.to(clip_emb)),
               "dino_score": mean_cosine(dino_emb, self.dino_subject.to(dino_emb))}
        return {k: v.float().cpu() for k, v in out.items()}


@dataclass
class ImageScores:
    """Per image and mean CLIP score, Style Sim and DINO score, with the encoders that measured them."""
    per_image: Dict[str, torch.Tensor]      # metric -> [B]
    names: List[str]
    clip: str = ""
    dino: str = ""

    @property
    def means(self) -> Dict[str, float]:
        return {k: float(self.per_image[k].mean()) for k in METRICS}

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per image: its name and its three values."""
        return [{"image": name, **{k: float(self.per_image[k][i]) for k in METRICS}}
                for i, name in enumerate(self.names)]

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready: the means, the counts, the encoders and the per-image rows."""
        return {**self.means, "images": len(self.names), "clip": self.clip, "dino": self.dino,
                "per_image": self.rows()}


def score_images(images: Any, subject_refs: Any, style_refs: Any, clip: torch.nn.Module, dino: torch.nn.Module,
                 names: Optional[Sequence[str]] = None) -> ImageScores:
    """CLIP score, Style Sim and DINO score of `images` against the references; `.means` are Table 1's values.

    images, subject_refs, style_refs: one image or a list (PIL, numpy, base64, [3,H,W]/[N,3,H,W] tensors in [0,1]).
    clip, dino: image encoders, e.g. `load_clip_encoder("ViT-B-32")`, `load_dino_encoder("dino-vits16")`.
    """
    images = _as_list(images, "images")
    refs = ReferenceSet.from_images(clip, dino, subject_refs, style_refs)
    per_image = refs.scores(clip, dino, images)
    count = next(iter(per_image.values())).shape[0]
    names = list(names) if names is not None else [str(i) for i in range(count)]
    if len(names) != count:
        raise ValueError(f"DynFuse scores: {len(names)} names for {count} images")
    return ImageScores(per_image, names, getattr(clip, "name", type(clip).__name__),
                       getattr(dino, "name", type(dino).__name__))


def load_score_encoders(clip_arch: str = DEFAULT_CLIP, clip_weights: Optional[str] = None,
                        dino_model: str = DEFAULT_DINO, dino_weights: Optional[str] = None,
                        search_dirs: Sequence[str] = (), device="cpu",
                        dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(clip, dino) through the guidance loaders (local files only); ScoreUnavailable says which file is missing."""
    try:
        clip = load_clip_encoder(clip_arch, clip_weights or None, search_dirs, device=device, dtype=dtype)
        dino = load_dino_encoder(dino_model, dino_weights or None, search_dirs, device=device, dtype=dtype)
    except GuidanceUnavailable as e:
        raise ScoreUnavailable(score_message(e)) from e
    return clip, dino


def score_message(error: Exception) -> str:
    """A loader's or reader's message told as the scores' (they share the guidance encoders' weights)."""
    text = str(error)
    for prefix in ("DynFuse guidance is off: ", "DynFuse guidance: ", "DynFuse: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return f"DynFuse scores: {text}"


def read_image_folder(folder: str) -> Tuple[List[str], List[Any]]:
    """(file names, RGB PIL images) of the png/jpg/webp files directly in `folder`, sorted by name."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise ScoreUnavailable(f"DynFuse scores: {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ScoreUnavailable(f"DynFuse scores: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} image in {folder!r}")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for unreadable files
            raise ScoreUnavailable(f"DynFuse scores: cannot read {os.path.join(folder, name)!r} "
                                   f"({type(e).__name__}: {e})") from e
    return names, images


def format_table(scores: ImageScores) -> str:
    """Per-image rows and the mean, aligned (what the command line prints above its JSON line)."""
    width = max([len("image")] + [len(n) for n in scores.names] + [len(f"mean of {len(scores.names)}")])
    head = "  ".join([f"{'image':<{width}}"] + [f"{TITLES[k]:>10}" for k in METRICS])
    lines = [head]
    for row in scores.rows():
        lines.append("  ".join([f"{row['image']:<{width}}"] + [f"{row[k]:>10.4f}" for k in METRICS]))
    means = scores.means
    lines.append("  ".join([f"{f'mean of {len(scores.names)}':<{width}}"] + [f"{means[k]:>10.4f}" for k in METRICS]))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lib_dynfuse.score",
        description="CLIP score and Style Sim (CLIP image cosine to the subject / style references) and DINO score "
                    "(DINO CLS cosine to the subject references), as K-LoRA's Table 1 measures them. Weights are "
                    "read from local files only. Scoring guided images with the encoders that guided them "
                    "flatters them: pass other encoders to compare fairly.")
    parser.add_argument("--images", required=True, help="folder of the images to score (png/jpg/webp)")
    parser.add_argument("--subject-refs", required=True, help="folder of the subject reference images")
    parser.add_argument("--style-refs", required=True, help="folder of the style reference images")
    parser.add_argument("--clip-arch", default=DEFAULT_CLIP, help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--clip-weights", default=None, help="open_clip weights file or folder")
    parser.add_argument("--dino-model", default=DEFAULT_DINO,
                        help="dino-vits16 (default), dino-vitb16, dinov2-small, dinov2-base")
    parser.add_argument("--dino-weights", default=None, help="DINO weights file or folder (+ config.json)")
    parser.add_argument("--models-dir", action="append", default=[],
                        help="a folder to look for weights in, as the WebUI's models/dynfuse (repeatable); "
                             "then the Hugging Face cache")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print per-image rows, the means and, last, one JSON line; exit 2 with a message (and a JSON error line)."""
    args = parse_args(argv)
    try:
        names, images = read_image_folder(args.images)
        _, subject = read_image_folder(args.subject_refs)
        _, style = read_image_folder(args.style_refs)
        clip, dino = load_score_encoders(args.clip_arch, args.clip_weights, args.dino_model, args.dino_weights,
                                         args.models_dir, device=args.device)
        scores = score_images(images, subject, style, clip, dino, names=names)
    except (ScoreUnavailable, ReferenceImageError) as e:
        message = str(e)
        if isinstance(e.__cause__, GuidanceUnavailable):
            message += "\n  (here: --clip-weights FILE, --dino-weights FILE or FOLDER, or --models-dir DIR)"
        print(message, file=sys.stderr)
        print(json.dumps({"error": message}))
        return 2
    print(format_table(scores))
    print(json.dumps({**scores.as_dict(), "subject_refs": len(subject), "style_refs": len(style)}))
    return 0


def _as_list(images: Any, what: str) -> List[Any]:
    """One image or several -> a non-empty list (a [N,3,H,W] tensor stays one item: embed_images takes it whole)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ScoreUnavailable(f"DynFuse scores: no {what} given")
    return items


if __name__ == "__main__":
    sys.exit(main())
