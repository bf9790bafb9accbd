"""Evaluation: every method on every pair, through the public API (`load_lora`, `fuse`, `LatentRefiner`).

Per pair: both LoRAs are loaded from their kohya files; the references (each LoRA alone, the other at weight 0,
via `fuse(..., method="merge")`) are rendered for the same seeds; then each method samples one batch of all seeds
(cond and uncond rows in one UNet call) and the judges say, per seed, whether the subject and the style were kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import world as W
from .judges import classify
from .methods import Method, usable
from .models import STYLE_TRIGGER, SUBJECT_TRIGGER
from .sampling import sample

FUSION_PROMPT = f"{SUBJECT_TRIGGER} {STYLE_TRIGGER}"
OWN_PROMPTS = {"subject": SUBJECT_TRIGGER, "style": STYLE_TRIGGER}   # the paper's l_c, l_s


@dataclass
class Settings:
    seeds: List[int]
    steps: int = 20
    cfg: float = 1.5
    ref_prompts: str = "fusion"          # "fusion": both references with the fusion prompt; "own": l_c, l_s
    pairs: Optional[List[int]] = None


@dataclass
class Outcome:
    """One method on one pair: per-seed verdicts, the selection counts, LLR similarities, time."""
    subject: torch.Tensor
    style: torch.Tensor
    chosen: Optional[torch.Tensor] = None   # [steps, layers, 2] (cond, uncond) rows that kept the subject
    rows: Optional[torch.Tensor] = None
    layer_names: List[str] = field(default_factory=list)
    similarities: Dict[str, List[float]] = field(default_factory=dict)   # term -> [first step, last step]
    seconds: float = 0.0

    @property
    def both(self) -> torch.Tensor:
        return self.subject & self.style


def lab_decoder() -> nn.Module:
    """Pixel-space diffusion: the 'latent' is the image in [-1, 1]; the decoder is a fixed rescale to [0, 1]."""
    from lib_dynfuse.guidance import LatentDecoder
    return LatentDecoder(nn.Identity(), 1.0, 0.0, (-1.0, 1.0), use_decode_method=False)


def verdicts(world, images: torch.Tensor, k: int):
    """(subject kept, style kept) per image for pair k."""
    subject = classify(world.subject_judge, images) == W.NEW_SUBJECTS[k % len(W.NEW_SUBJECTS)]
    style = classify(world.style_judge, images) == W.NEW_STYLES[k % len(W.NEW_STYLES)]
    return subject, style


def render_alone(world, k: int, role: str, prompt: str, s: Settings) -> torch.Tensor:
    """The images of one LoRA alone (the other loaded at weight 0) for every seed."""
    from lib_dynfuse import fuse, load_lora
    subject = load_lora(world.lora_path("subject", k), weight=1.0 if role == "subject" else 0.0)
    style = load_lora(world.lora_path("style", k), weight=1.0 if role == "style" else 0.0)
    with fuse(world.unet, subject, style, method="merge", record=False) as session:
        return sample(world.unet, world.text, [prompt] * len(s.seeds), s.seeds, world.cfg.size, s.steps, s.cfg,
                      session=session)


def base_accuracy(world, s: Settings, n: int = 64) -> Dict[str, float]:
    """The base model on known concepts: judged subject and style accuracy of '<subject> <style>' prompts."""
    subs, stys = W.random_pairs(W.KNOWN_SUBJECTS, W.KNOWN_STYLES, n, 4242)
    prompts = [f"{W.SUBJECT_NAMES[a]} {W.STYLE_NAMES[b]}" for a, b in zip(subs, stys)]
    images = sample(world.unet, world.text, prompts, list(range(50_000, 50_000 + n)), world.cfg.size, s.steps, s.cfg)
    ps, pt = classify(world.subject_judge, images), classify(world.style_judge, images)
    return {"subject": (ps == torch.tensor(subs)).float().mean().item(),
            "style": (pt == torch.tensor(stys)).float().mean().item(), "n": n}


def run_method(world, k: int, method: Method, subject, style, refs: Dict[str, torch.Tensor], s: Settings) -> Outcome:
    """One method on pair k: one batch of all seeds."""
    from lib_dynfuse import LatentRefiner, fuse, paper_scorer
    refiner = None
    if method.refine is not None:
        scorer = paper_scorer(world.clip, world.dino, content=refs["subject"], style=refs["style"])
        refiner = LatentRefiner(lab_decoder(), scorer, **method.refine)
    start = time.time()
    infos: list = []
    session = fuse(world.unet, subject, style, **method.fuse)
    with session:
        images = sample(world.unet, world.text, [FUSION_PROMPT] * len(s.seeds), s.seeds, world.cfg.size, s.steps,
                        s.cfg, session=session, refiner=refiner, log_info=infos)
    subj, sty = verdicts(world, images, k)
    out = Outcome(subj, sty, seconds=time.time() - start)
    if session.record is not None and session.record.layer_names:
        out.chosen, out.rows = session.record.counts(s.steps)
        out.layer_names = list(session.record.layer_names)
    if infos:
        out.similarities = {name: [infos[0].similarities[name].mean().item(), infos[-1].similarities[name].mean().item()]
                            for name in infos[0].similarities}
    return out


def evaluate_pair(world, k: int, methods: Sequence[Method], s: Settings, log: Callable[[str], None] = print) -> Dict:
    """Pair k: the LoRAs alone (calibration and references), then every method; skipped ones are named."""
    from lib_dynfuse import load_lora
    refs, alone = {}, {}
    for role in ("subject", "style"):
        images = render_alone(world, k, role, FUSION_PROMPT, s)
        alone[role] = verdicts(world, images, k)
        own = OWN_PROMPTS[role] if s.ref_prompts == "own" else FUSION_PROMPT
        refs[role] = images if own == FUSION_PROMPT else render_alone(world, k, role, own, s)
    log(f"[run] pair {k}: subject LoRA alone keeps the subject {alone['subject'][0].float().mean():.2f}, "
        f"style LoRA alone keeps the style {alone['style'][1].float().mean():.2f}")
    subject = load_lora(world.lora_path("subject", k))
    style = load_lora(world.lora_path("style", k))
    outcomes, skipped = {}, {}
    for m in methods:
        try:
            out = run_method(world, k, m, subject, style, refs, s)
        except (TypeError, ValueError) as e:   # a keyword or value this engine does not take
            skipped[m.name] = f"skipped {m.name}: {e}"
            log(skipped[m.name])
            continue
        outcomes[m.name] = out
        log(f"[run] pair {k} {m.name:<26} subject {out.subject.float().mean():.2f} style "
            f"{out.style.float().mean():.2f} both {out.both.float().mean():.2f} ({out.seconds:.0f} s)")
    return {"alone": {role: {"subject": v[0], "style": v[1]} for role, v in alone.items()},
            "outcomes": outcomes, "skipped": skipped}


def _pair_job(cfg, folder: str, k: int, methods: Sequence[Method], s: Settings, threads: int) -> Dict:
    """Worker entry point: load the world and evaluate one pair."""
    from .build import World
    torch.set_num_threads(threads)
    return evaluate_pair(World(cfg, folder), k, methods, s, lambda line: print(line, flush=True))


def evaluate(world, methods: Sequence[Method], s: Settings, log: Callable[[str], None] = print, workers: int = 1,
             threads: int = 1) -> Dict:
    """Calibration and every usable method on every pair (pairs spread over `workers` processes); returns the
    raw outcomes for the report."""
    import concurrent.futures as cf
    import multiprocessing
    pairs = s.pairs if s.pairs is not None else list(range(world.cfg.pairs))
    skipped = {}
    for m in methods:
        reason = usable(m)
        if reason:
            skipped[m.name] = reason
            log(reason)
    todo = [m for m in methods if m.name not in skipped]
    if workers > 1 and len(pairs) > 1:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(pairs)),
                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {k: pool.submit(_pair_job, world.cfg, world.folder, k, todo, s, threads) for k in pairs}
            base = base_accuracy(world, s)
            per_pair = {k: f.result() for k, f in futures.items()}
    else:
        base = base_accuracy(world, s)
        per_pair = {k: evaluate_pair(world, k, todo, s, log) for k in pairs}
    log(f"[run] base model on known concepts: subject {base['subject']:.2f}, style {base['style']:.2f}")
    for r in per_pair.values():
        skipped.update(r["skipped"])
    names = [m.name for m in todo if m.name not in skipped]
    return {"base": base, "pairs": pairs, "skipped": skipped,
            "alone": {k: r["alone"] for k, r in per_pair.items()},
            "outcomes": {n: {k: per_pair[k]["outcomes"][n] for k in pairs} for n in names}}
