"""Denoising progress through the full schedule from the hosts' own counters, and cond/uncond row labels.

Plain arithmetic on host counters: no tensor is read. Nothing here imports a WebUI module.
"""
from __future__ import annotations

from typing import Any, List, Tuple


def img2img_schedule(pass_steps: int, requested_steps: int, strength: float, steps_given: bool) -> Tuple[int, int]:
    """(skipped, full): a pass that starts from a noised image (img2img, hires fix) runs the last `pass_steps`
    sampler steps of a schedule of `full` steps, so the first `skipped` = full - pass_steps are not run.

    The hosts' `setup_img2img_steps` (A1111 and Forge sd_samplers_common.py:22-31): with the steps given (hires:
    the hires steps; img2img with img2img_fix_steps: p.steps) full = int(steps / min(strength, 0.999)) and the
    pass has steps = t_enc + 1 steps; otherwise full = p.steps and the pass has int(min(strength, 0.999) * full) + 1.
    Either way the pass's first sampler step is step `skipped` of `full` (kdiffusion :137-138, timesteps :98-102).
    """
    if steps_given:
        full = int(pass_steps / min(strength, 0.999)) if strength > 0 else 0
    else:
        full = int(requested_steps)
    full = max(full, pass_steps)
    return full - pass_steps, full


def schedule_progress(call: int, calls: int, pass_steps: int, skipped: int, full: int) -> Tuple[int, int]:
    """(step, total) for `set_step` so that step / total is the progress through the full schedule: call `call` of
    `calls` expected denoiser calls of a pass that skips the first `skipped` of `full` steps (K-LoRA Eq. 7 counts
    t_now in the whole backward process). Second-order samplers make calls = 2 x steps: both count double."""
    per_step = max(1, int(calls) // max(1, int(pass_steps)))
    return int(skipped) * per_step + int(call), int(full) * per_step



def pass_progress(denoiser: Any, img2img_fix_steps: bool = False) -> Tuple[int, int]:
    """(step, total) of the denoiser's next call through the full schedule, for `set_step`.

    The CFG denoiser (the same fields in AUTOMATIC1111 and Forge, sd_samplers_cfg_denoiser.py:41-54 and :42-53) counts its
    calls in `step` and expects `total_steps`; `launch_sampling` sets `steps`, the pass's sampler steps
    (sd_samplers_common.py:265-269). A pass that starts from a noised image has `init_latent` set by its sampler
    (sd_samplers_kdiffusion.py:174, sd_samplers_timesteps.py:125) and runs the tail of a longer schedule
    (`img2img_schedule`; hires passes give their steps, `p.is_hr_pass`). Plain arithmetic on host counters: no
    tensor is read, so no device sync.
    """
    call = int(getattr(denoiser, "step", 0) or 0)
    calls = int(getattr(denoiser, "total_steps", 0) or 0)
    pass_steps = int(getattr(denoiser, "steps", 0) or 0)
    p = getattr(denoiser, "p", None)
    if getattr(denoiser, "init_latent", None) is None or pass_steps < 1 or calls < 1 or p is None:
        return call, max(calls, call + 1)
    given = bool(getattr(p, "is_hr_pass", False)) or bool(img2img_fix_steps)
    skipped, full = img2img_schedule(pass_steps, int(getattr(p, "steps", pass_steps) or pass_steps),
                                     float(getattr(p, "denoising_strength", 1.0) or 0.0), given)
    return schedule_progress(call, calls, pass_steps, skipped, full)

class RowCursor:
    """Labels the rows of successive UNet calls within one denoiser call (batched or chunked cond/uncond).

    The denoiser's input is [cond rows..., uncond rows] (A1111 sd_samplers_cfg_denoiser.py:203); when the host
    splits it into several UNet calls it does so in row order, so each call takes the next `n` labels.
    """

    def __init__(self):
        self.labels: List[str] = []
        self.offset = 0

    def reset(self, n_cond: int, n_uncond: int) -> None:
        self.labels = ["cond"] * n_cond + ["uncond"] * n_uncond
        self.offset = 0

    def take(self, n: int) -> List[str]:
        if self.offset + n > len(self.labels):
            self.offset = 0
        out = self.labels[self.offset:self.offset + n]
        self.offset += n
        return out if len(out) == n else ["cond"] * n

