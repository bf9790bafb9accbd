"""`fuse`: two LoRA files resolved onto a torch model (targets.py) as one FuseSession (session.py)."""
from __future__ import annotations

import torch

from .session import FuseSession


def fuse(model: torch.nn.Module, subject, style, method: str = "merge", criterion: str = "kl", name_map=None,
         text_encoders=None, **session_kwargs) -> FuseSession:
    """Resolve two `LoraFile`s (or paths, read at weight 1) onto `model` (targets.py) and return an unopened
    FuseSession (use it with `with`).

    method: "merge" (default: it kept both subject and style most often in the quality lab, see quality/README.md),
    "dynamic" (Eq. 9-13 with `criterion`), "klora" or "blend".
    session_kwargs: balance (merge and blend), sharpness and per_token (blend), klora_alpha, klora_beta, klora_scale,
    te_mode, record, tie_rows, subject_window, style_window,
    weight_space (while open, every delta
    that does not depend on the input is baked into the weights: merge, K-LoRA's pick, layers one LoRA touches;
    see baked.py), backup_device. K-LoRA's weight statistics are
    cached by the files' sha256 and weights. The resolve report is kept as `session.resolved` (its
    `warnings` list partial matches; they are also logged and issued as `LoraMatchWarning`s).
    """
    if not isinstance(model, torch.nn.Module):
        hint = ("for a diffusers pipeline use fuse_pipeline(pipe, ...) (steps and cond/uncond rows wired) or "
                "fuse(pipe.unet, ...)") if hasattr(model, "unet") else "give the torch model whose layers the LoRAs change"
        raise TypeError(f"DynFuse: fuse() takes a torch.nn.Module, got a {type(model).__name__}; {hint}")
    from .targets import as_lora_file, resolve_targets
    subject, style = as_lora_file(subject, "subject"), as_lora_file(style, "style")
    resolved = resolve_targets(model, subject, style, name_map=name_map, text_encoders=text_encoders)
    key = None
    if getattr(subject, "sha256", None) and getattr(style, "sha256", None):
        key = (subject.sha256, float(getattr(subject, "weight", 1.0)), style.sha256, float(getattr(style, "weight", 1.0)))
    session_kwargs.setdefault("klora_key", key)
    session = FuseSession(resolved.targets, method=method, criterion=criterion, **session_kwargs)
    session.resolved = resolved
    return session
