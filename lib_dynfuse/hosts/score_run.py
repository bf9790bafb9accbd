"""Scores in a WebUI: each image's CLIP score, Style Sim and DINO score in its infotext, and POST /dynfuse/v1/score.

The metric math is lib_dynfuse/score.py's. What the hosts add:
- `score_image(host, p, pp)` (Script.postprocess_image_after_composite, once per image and before the host
  writes that image's infotext: A1111 processing.py:1079-1087, Forge :1086-1094): with the `score` field on,
  the image is scored against the generation's references (the rendered ones when the latent refinement ran, else the given
  `subject_image` / `style_image`) and `DynFuse scores` is set in extra_generation_params for that image;
- `api_score(host, body)`: the endpoint's answer (status, JSON body) for base64 images and references; a missing
  weight file is 503, bad input 400, with a message, never a 500;
- the encoders: the score settings (Settings > DynFuse), each empty one meaning the guidance setting. Scores from
  the encoders that also guided the image flatter it (the refinement climbed these cosines): set other encoders
  there to compare guided and unguided images fairly.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from ..guidance import EncoderStore, GuidanceUnavailable, ReferenceImageError, decode_image_arg
from ..score import METRICS, TITLES, ReferenceSet, ScoreUnavailable, score_images, score_message
from . import common, guidance_run

log = logging.getLogger("dynfuse")

SCORES_KEY = "DynFuse scores"
SCORES_ATTR = "dynfuse_scores"
SCORE_ENCODERS = EncoderStore()     # the scoring pair when it differs from the guidance pair
NO_REFERENCES = ("DynFuse scores need references: turn on the latent refinement (its rendered subject and style "
                 "references are scored against) or give a subject and a style reference image")


def encoders(ghost: Any) -> Tuple[Any, Any]:
    """(clip, dino) for scoring: the guidance store's pair when the settings are the same, else a second pair."""
    settings = ghost.score_encoder_settings()
    store = guidance_run.ENCODERS if settings == ghost.encoder_settings() else SCORE_ENCODERS
    try:
        return store.get(**settings)
    except GuidanceUnavailable as e:
        raise ScoreUnavailable(score_message(e)) from e


def format_scores(values: Dict[str, float], clip: str, dino: str) -> str:
    """One infotext value without ',' or ':' (left unquoted by the host): `CLIP score 0.8123; Style Sim ...`."""
    parts = [f"{TITLES[k]} {values[k]:.4f}" for k in METRICS]
    names = " + ".join(n.split(":", 1)[-1] for n in (clip, dino))
    return "; ".join(parts) + f"; encoders {names}"


class GenerationScores:
    """One generation's references embedded once; every image scored against them."""

    def __init__(self, clip: Any, dino: Any, references: ReferenceSet):
        self.clip, self.dino, self.references = clip, dino, references
        self.values: List[Dict[str, float]] = []

    def score(self, image: Any) -> Dict[str, float]:
        got = self.references.scores(self.clip, self.dino, [image])
        values = {k: float(got[k][0]) for k in METRICS}
        self.values.append(values)
        return values


def references(p: Any, run: "common.FuseRun") -> Tuple[Any, Any]:
    """(subject, style) images: the latent refinement's references of this generation, else the given images."""
    grun = getattr(p, guidance_run.GUIDANCE_ATTR, None)
    images = getattr(grun, "images", None) or {}
    if "subject" in images and "style" in images:
        return images["subject"], images["style"]
    given = [run.args.subject_image, run.args.style_image]
    if any(g is None or (isinstance(g, str) and not g.strip()) for g in given):
        raise ScoreUnavailable(NO_REFERENCES)
    return decode_image_arg(given[0]), decode_image_arg(given[1])


def _start(host: Any, p: Any, run: "common.FuseRun") -> Optional[GenerationScores]:
    """The generation's scorer, or None with a message (shown once) when scores cannot be computed."""
    try:
        subject, style = references(p, run)
        clip, dino = encoders(guidance_run.glue(host))
        return GenerationScores(clip, dino, ReferenceSet.from_images(clip, dino, subject, style))
    except (ScoreUnavailable, GuidanceUnavailable, ReferenceImageError) as e:
        message = str(e) if isinstance(e, ScoreUnavailable) else score_message(e)
        run.note(f"{message}\n(the images have no scores)", p)
    return None


def score_image(host: Any, p: Any, pp: Any) -> Optional[Dict[str, float]]:
    """Script.postprocess_image_after_composite: this image's scores into its infotext (when `score` is on)."""
    run = getattr(p, common.RUN_ATTR, None)
    if run is None or not run.enabled or not run.args.score or getattr(pp, "image", None) is None:
        return None
    state = getattr(p, SCORES_ATTR, False)
    if state is False:
        state = _start(host, p, run)
        setattr(p, SCORES_ATTR, state)
    if state is None:
        return None
    try:
        values = state.score(pp.image)
    except Exception as e:   # the image is saved and shown anyway; the reason goes with it
        log.exception("DynFuse: scoring failed")
        run.note(f"DynFuse scores: scoring failed ({type(e).__name__}: {e})", p)
        setattr(p, SCORES_ATTR, None)
        p.extra_generation_params.pop(SCORES_KEY, None)      # not the previous image's scores on this one
        return None
    p.extra_generation_params[SCORES_KEY] = format_scores(values, state.clip.name, state.dino.name)
    return values


# ----------------------------------------------------------------------------- POST /dynfuse/v1/score
def _image_list(body: Dict[str, Any], key: str) -> List[Any]:
    value = body.get(key)
    items = value if isinstance(value, list) else [value] if isinstance(value, str) and value.strip() else []
    if not items:
        raise ReferenceImageError(f"DynFuse scores: '{key}' must be a base64 image or a non-empty list of them")
    decoded = []
    for i, item in enumerate(items):
        try:
            decoded.append(decode_image_arg(item))
        except ReferenceImageError as e:
            raise ReferenceImageError(score_message(e).replace("DynFuse scores: ", f"DynFuse scores: {key}[{i}]: ")) from e
    return decoded


def api_score(host: Any, body: Any) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, JSON) for {"images": [...], "subject_refs": [...], "style_refs": [...]} (base64 each; a
    single string works too): 200 with the means, the encoders and per-image rows; 400 for bad input, 503 when
    weights are missing, each with {"error": message}."""
    if not isinstance(body, dict):
        return 400, {"error": "DynFuse scores: the body must be a JSON object with images, subject_refs, style_refs"}
    unknown = sorted(set(body) - {"images", "subject_refs", "style_refs", "names"})
    if unknown:
        return 400, {"error": f"DynFuse scores: unknown field(s) {', '.join(unknown)}; "
                              "known: images, subject_refs, style_refs, names"}
    try:
        images = _image_list(body, "images")
        subject, style = _image_list(body, "subject_refs"), _image_list(body, "style_refs")
        names = body.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != len(images)):
            raise ReferenceImageError(f"DynFuse scores: 'names' must be a list of {len(images)} names")
    except ReferenceImageError as e:
        return 400, {"error": str(e)}
    try:
        clip, dino = encoders(guidance_run.glue(host))
        scores = score_images(images, subject, style, clip, dino,
                              names=[str(n) for n in names] if names is not None else None)
    except ScoreUnavailable as e:
        return 503, {"error": str(e)}
    except Exception as e:   # never a 500: the caller gets the reason
        log.exception("DynFuse: scoring failed")
        return 503, {"error": f"DynFuse scores: scoring failed ({type(e).__name__}: {e})"}
    return 200, {**scores.as_dict(), "subject_refs": len(subject), "style_refs": len(style)}
