"""The synthetic world: procedural RGB images of a subject (a shape's identity) drawn in a style (palette + texture).

A subject is a shape given as an inside-test on coordinates in [-1, 1]^2 (y up), drawn with position, scale and
rotation jitter; a style is a global look: background, secondary and foreground colours and a texture that
covers the whole image (stripes, checks, dots, gradient, grain, outline, patterned fill). Images are rendered
4x supersampled and area-averaged (anti-aliased), as tensors [B, 3, S, S] in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SUPERSAMPLE = 4


def _box(x, y, cx, cy, hw, hh):
    return ((x - cx).abs() <= hw) & ((y - cy).abs() <= hh)


def _disc(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rot(x, y, deg):
    a = math.radians(deg)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _triangle(x, y):
    return (y >= -0.7) & (x.abs() <= 0.9 * (0.8 - y) / 1.5)


def _plus(x, y):
    return _box(x, y, 0, 0, 0.24, 0.85) | _box(x, y, 0, 0, 0.85, 0.24)


def _heart(x, y):
    u, v = x / 0.85, (y + 0.12) / 0.85
    return (u * u + v * v - 0.8) ** 3 - u * u * v ** 3 <= 0


def _star(x, y):
    r, th = torch.sqrt(x * x + y * y), torch.atan2(y, x) - math.pi / 2
    return r <= 0.42 + 0.45 * torch.cos(5 * th).clamp(min=0) ** 2


SHAPES: Dict[str, Shape] = {
    "disc": lambda x, y: _disc(x, y, 0, 0, 0.8),
    "ring": lambda x, y: _disc(x, y, 0, 0, 0.85) & ~_disc(x, y, 0, 0, 0.45),
    "square": lambda x, y: _box(x, y, 0, 0, 0.7, 0.7),
    "diamond": lambda x, y: x.abs() + y.abs() <= 0.95,
    "triangle": _triangle,
    "tri_down": lambda x, y: _triangle(x, -y),
    "plus": _plus,
    "xcross": lambda x, y: _plus(*_rot(x, y, 45)),
    "tee": lambda x, y: _box(x, y, 0, 0.6, 0.85, 0.22) | _box(x, y, 0, -0.1, 0.22, 0.75),
    "ell": lambda x, y: _box(x, y, -0.55, 0, 0.22, 0.85) | _box(x, y, 0, -0.63, 0.77, 0.22),
    "hourglass": lambda x, y: (x.abs() <= y.abs() * 0.95 + 0.05) & (y.abs() <= 0.8),
    "bars": lambda x, y: _box(x, y, 0, 0.45, 0.8, 0.2) | _box(x, y, 0, -0.45, 0.8, 0.2),
    "frame": lambda x, y: _box(x, y, 0, 0, 0.8, 0.8) & ~_box(x, y, 0, 0, 0.42, 0.42),
    "cup": lambda x, y: (_disc(x, y, 0, 0, 0.85) & ~_disc(x, y, 0, 0, 0.42) & (y <= 0.1))
    | _box(x, y, -0.635, 0.4, 0.215, 0.4) | _box(x, y, 0.635, 0.4, 0.215, 0.4),
    "half": lambda x, y: _disc(x, y, 0, -0.35, 0.9) & (y >= -0.35),
    # the held-out subjects (new concepts of the subject LoRAs)
    "heart": _heart,
    "star": _star,
    "crescent": lambda x, y: _disc(x, y, 0, 0, 0.85) & ~_disc(x, y, 0.38, 0.2, 0.66),
    "aitch": lambda x, y: _box(x, y, -0.58, 0, 0.22, 0.85) | _box(x, y, 0.58, 0, 0.22, 0.85) | _box(x, y, 0, 0, 0.6, 0.18),
    "arrow": lambda x, y: ((y >= 0.0) & (x.abs() <= 0.9 * (0.9 - y) / 0.9)) | _box(x, y, 0, -0.45, 0.22, 0.45),
}
HELD_OUT_SUBJECTS = ("heart", "star", "crescent", "aitch", "arrow")


@dataclass(frozen=True)
class Style:
    """A global look: background, secondary (texture) and foreground colours, and a texture kind."""
    name: str
    bg: Tuple[float, float, float]
    bg2: Tuple[float, float, float]
    fg: Tuple[float, float, float]
    texture: str


def _c(hexcode: str) -> Tuple[float, float, float]:
    return tuple(int(hexcode[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


STYLES: List[Style] = [
    Style("mint_solid", _c("d8f3dc"), _c("d8f3dc"), _c("1b4332"), "solid"),
    Style("navy_hstripe", _c("14213d"), _c("2b4c8c"), _c("fca311"), "hstripes"),
    Style("sand_vstripe", _c("f4e3c1"), _c("d9b77e"), _c("6f1d1b"), "vstripes"),
    Style("slate_checks", _c("4a5759"), _c("778da9"), _c("f1faee"), "checks"),
    Style("cream_dots", _c("fff8e7"), _c("e07a5f"), _c("3d405b"), "dots"),
    Style("sky_gradient", _c("caf0f8"), _c("0077b6"), _c("fb8500"), "gradient"),
    Style("olive_grain", _c("606c38"), _c("283618"), _c("fefae0"), "grain"),
    Style("black_outline", _c("101010"), _c("101010"), _c("80ed99"), "outline"),
    Style("rose_fillstripe", _c("ffe5ec"), _c("f9a03f"), _c("8b2635"), "fillstripes"),
    Style("brick_diag", _c("9c2c1c"), _c("c05a3c"), _c("f8f4e3"), "diag"),
    Style("lilac_solid", _c("cdb4db"), _c("cdb4db"), _c("2a9d8f"), "solid"),
    Style("grey_filldots", _c("adb5bd"), _c("ffd166"), _c("212529"), "filldots"),
    # the held-out styles (new concepts of the style LoRAs)
    Style("plum_diag", _c("3c096c"), _c("7b2cbf"), _c("ffd60a"), "diag"),
    Style("teal_dots", _c("005f73"), _c("0a9396"), _c("ee9b00"), "dots"),
    Style("paper_outline", _c("f8f9fa"), _c("f8f9fa"), _c("d00000"), "outline"),
    Style("ink_grain", _c("0b090a"), _c("3a3a3a"), _c("4cc9f0"), "grain"),
    Style("peach_checks", _c("ffcdb2"), _c("e5989b"), _c("386641"), "checks"),
]
HELD_OUT_STYLES = ("plum_diag", "teal_dots", "paper_outline", "ink_grain", "peach_checks")

SUBJECT_NAMES: Tuple[str, ...] = tuple(SHAPES)
STYLE_NAMES: Tuple[str, ...] = tuple(s.name for s in STYLES)
KNOWN_SUBJECTS = tuple(i for i, n in enumerate(SUBJECT_NAMES) if n not in HELD_OUT_SUBJECTS)
KNOWN_STYLES = tuple(i for i, n in enumerate(STYLE_NAMES) if n not in HELD_OUT_STYLES)
NEW_SUBJECTS = tuple(SUBJECT_NAMES.index(n) for n in HELD_OUT_SUBJECTS)
NEW_STYLES = tuple(STYLE_NAMES.index(n) for n in HELD_OUT_STYLES)


def _grid(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Supersampled pixel-centre coordinates in [-1, 1] (x right, y up), each [N, N]."""
    n = size * SUPERSAMPLE
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    y, x = torch.meshgrid(-c, c, indexing="ij")
    return x, y


def _texture(kind: str, x, y, phase: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Secondary-colour coverage of one texture over whole images, [B, N, N] in [0, 1] (phase [B, 2])."""
    period = 0.5                 # four texture periods across the image at any size, in [-1, 1] units
    u = (x + 1) / period + phase[:, 0, None, None]
    v = (y + 1) / period + phase[:, 1, None, None]
    if kind in ("solid", "outline"):
        return torch.zeros_like(u)
    if kind in ("hstripes", "fillstripes"):
        return (torch.frac(v) < 0.5).float()
    if kind == "vstripes":
        return (torch.frac(u) < 0.5).float()
    if kind == "diag":
        return (torch.frac((u + v) * 0.75) < 0.5).float()
    if kind == "checks":
        return ((torch.floor(u) + torch.floor(v)) % 2).float()
    if kind in ("dots", "filldots"):
        du, dv = torch.frac(u) - 0.5, torch.frac(v) - 0.5
        return (du * du + dv * dv <= 0.08).float()
    if kind == "gradient":
        return ((1 - y) / 2).clamp(0, 1).expand_as(u)
    if kind == "grain":
        cells = torch.rand((phase.shape[0], size, size), generator=g)
        return cells.repeat_interleave(SUPERSAMPLE, 1).repeat_interleave(SUPERSAMPLE, 2) * 0.8
    raise ValueError(f"unknown texture {kind!r}")


def render(subjects: Sequence[int], styles: Sequence[int], size: int, seed: int) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1] of subjects[i] in styles[i], jitter drawn from `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    subjects, styles = torch.as_tensor(list(subjects)), torch.as_tensor(list(styles))
    b = len(subjects)
    x, y = _grid(size)
    j = torch.rand(b, 6, generator=g)
    tint = (torch.rand(b, 3, generator=g) - 0.5) * 0.08
    scale = (0.62 + 0.16 * j[:, 0]).view(b, 1, 1)
    dx, dy = ((j[:, 1] - 0.5) * 0.4).view(b, 1, 1), ((j[:, 2] - 0.5) * 0.4).view(b, 1, 1)
    angle = torch.deg2rad((j[:, 3] - 0.5) * 24).view(b, 1, 1)
    u, v = (x - dx) / scale, (y - dy) / scale
    xs, ys = u * torch.cos(angle) + v * torch.sin(angle), -u * torch.sin(angle) + v * torch.cos(angle)
    mask = torch.zeros(b, *x.shape)
    shapes = list(SHAPES.values())
    outline = torch.tensor([STYLES[int(t)].texture == "outline" for t in styles])
    for subj in subjects.unique().tolist():
        rows = (subjects == subj).nonzero().flatten()
        m = shapes[subj](xs[rows], ys[rows]).float()
        thin = outline[rows]
        if thin.any():   # outline styles: only the shape's edge is drawn
            r = rows[thin]
            m[thin] = (m[thin] - shapes[subj](xs[r] / 0.72, ys[r] / 0.72).float()).clamp(min=0)
        mask[rows] = m
    tex = torch.zeros(b, *x.shape)
    for sty in styles.unique().tolist():
        rows = (styles == sty).nonzero().flatten()
        tex[rows] = _texture(STYLES[sty].texture, x, y, j[rows, 4:6], g, size)
    palette = torch.tensor([[STYLES[int(t)].bg, STYLES[int(t)].bg2, STYLES[int(t)].fg] for t in styles])
    bg, bg2, fg = (palette[:, k] + tint for k in range(3))
    fill_only = torch.tensor([STYLES[int(t)].texture in ("fillstripes", "filldots") for t in styles]).view(b, 1, 1)
    # fill textures pattern the shape, the others the ground
    tex_back, tex_front = torch.where(fill_only, 0.0, tex), torch.where(fill_only, tex, 0.0)
    col = lambda c: c.view(b, 3, 1, 1)
    back = col(bg) * (1 - tex_back[:, None]) + col(bg2) * tex_back[:, None]
    front = col(fg) * (1 - tex_front[:, None]) + col(bg2) * tex_front[:, None]
    out = back * (1 - mask[:, None]) + front * mask[:, None]
    return torch.nn.functional.avg_pool2d(out, SUPERSAMPLE).clamp(0, 1)


def random_pairs(subject_pool: Sequence[int], style_pool: Sequence[int], n: int, seed: int) -> Tuple[List[int], List[int]]:
    """n (subject, style) draws, uniform over both pools, from `seed`."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    si = torch.randint(len(subject_pool), (n,), generator=g).tolist()
    ti = torch.randint(len(style_pool), (n,), generator=g).tolist()
    return [subject_pool[i] for i in si], [style_pool[i] for i in ti]
