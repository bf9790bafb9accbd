"""Heat-map of a selection record: steps x layers, colour = share of rows that kept the subject.

Like Fig. 5 of the dynamic-fusion paper and Fig. 6 of K-LoRA (steps down the vertical axis, layers along the
horizontal one). One panel for cond rows, one for uncond rows, a colour legend and axis labels, drawn with
PIL only (no plotting library is a dependency of the extension).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

SUBJECT_COLOUR = (230, 120, 30)    # orange: the subject branch
STYLE_COLOUR = (40, 110, 200)      # blue: the style branch
NOT_RUN_COLOUR = (215, 215, 215)   # the layer did not run for these rows at this step
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)

Colour = Tuple[int, int, int]


def share_colour(share: float) -> Colour:
    """Linear blend: 0 = style colour, 1 = subject colour, NaN = not-run grey."""
    if share is None or math.isnan(share):
        return NOT_RUN_COLOUR
    s = min(1.0, max(0.0, float(share)))
    return tuple(int(round(st + s * (su - st))) for su, st in zip(SUBJECT_COLOUR, STYLE_COLOUR))


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel geometry: two panels (cond above uncond), each steps x layers cells, then the legend."""

    steps: int
    layers: int
    cell_w: int
    cell_h: int
    left: int = 48
    top: int = 40
    right: int = 16
    panel_gap: int = 40
    legend_h: int = 56

    @property
    def panel_w(self) -> int:
        return self.layers * self.cell_w

    @property
    def panel_h(self) -> int:
        return self.steps * self.cell_h

    def panel_origin(self, panel: int) -> Tuple[int, int]:
        return self.left, self.top + panel * (self.panel_h + self.panel_gap)

    def cell_box(self, panel: int, step: int, layer: int) -> Tuple[int, int, int, int]:
        """(x0, y0, x1, y1) inclusive of the cell of (step, layer) in panel 0 (cond) or 1 (uncond)."""
        x, y = self.panel_origin(panel)
        x0, y0 = x + layer * self.cell_w, y + step * self.cell_h
        return x0, y0, x0 + self.cell_w - 1, y0 + self.cell_h - 1

    @property
    def size(self) -> Tuple[int, int]:
        width = self.left + max(self.panel_w, 260) + self.right
        height = self.top + 2 * self.panel_h + self.panel_gap + 42 + self.legend_h
        return width, height


def heatmap_layout(steps: int, layers: int, max_width: int = 900, max_height: int = 320) -> HeatmapLayout:
    """Cells as large as fit (1..16 px wide, 2..16 px high) in about max_width x max_height per panel."""
    cell_w = max(1, min(16, max_width // max(1, layers)))
    cell_h = max(2, min(16, max_height // max(1, steps)))
    return HeatmapLayout(steps=max(1, steps), layers=max(1, layers), cell_w=cell_w, cell_h=cell_h)


def _width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
    return x1 - x0


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor_right: bool = False) -> None:
    if anchor_right:
        xy = (xy[0] - _width(draw, text, font), xy[1])
    draw.text(xy, text, fill=TEXT, font=font)


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, or as much of its start and end as fits in `width` pixels with "..." between them."""
    if _width(draw, text, font) <= width:
        return text
    keep = len(text)
    while keep > 0:
        keep -= 1
        short = text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2:]
        if _width(draw, short, font) <= width:
            return short
    return ""


def layer_axis_label(layer_names: Optional[Sequence[str]], layers: int) -> str:
    """The layer axis' caption: how many layers, in the model's order, and the first and the last one."""
    if not layer_names or not layers:
        return f"layer, in the model's order ({layers} layers)"
    if layers == 1:
        return f"layer: {layer_names[0]}"
    return f"layer, in the model's order ({layers}: {layer_names[0]} ... {layer_names[-1]})"


def render_note(title: str, lines: Sequence[str], width: int = 420) -> Image.Image:
    """A heat-map's place when there is nothing to draw: the title and why (e.g. `merge` makes no choice)."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, 24 + 16 * (len(lines) + 1)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _text(draw, (8, 6), fit_text(draw, title, font, width - 16), font)
    for i, line in enumerate(lines):
        _text(draw, (8, 28 + 16 * i), fit_text(draw, line, font, width - 16), font)
    return image


def render_heatmap(cond: torch.Tensor, uncond: torch.Tensor, title: str = "DynFuse selection",
                   layer_names: Optional[Sequence[str]] = None) -> Image.Image:
    """RGB image of two [steps, layers] share tables (NaN = not run): cond panel, uncond panel, legend."""
    cond = torch.as_tensor(cond, dtype=torch.float64)
    uncond = torch.as_tensor(uncond, dtype=torch.float64)
    if cond.dim() != 2 or uncond.shape != cond.shape:
        raise ValueError(f"DynFuse: heat-map tables must both be [steps, layers], got {tuple(cond.shape)} "
                         f"and {tuple(uncond.shape)}")
    steps, layers = cond.shape
    if not (torch.isfinite(cond).any() or torch.isfinite(uncond).any()):
        return render_note(title, ["No layer made a choice in this generation: no layer both LoRAs",
                                   "touch ran with both of them active (step windows, or none shared)."])
    lay = heatmap_layout(steps, layers)
    image = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    room = lay.size[0] - lay.left - lay.right
    _text(draw, (lay.left, 4), fit_text(draw, title, font, room), font)

    for panel, (name, table) in enumerate((("cond rows", cond), ("uncond rows", uncond))):
        px, py = lay.panel_origin(panel)
        _text(draw, (px, py - 16), name, font)
        values = table.tolist()
        for step in range(steps):
            for layer in range(layers):
                draw.rectangle(lay.cell_box(panel, step, layer), fill=share_colour(values[step][layer]))
        # y axis: the step numbers of the first and the last row
        _text(draw, (px - 4, py), "0", font, anchor_right=True)
        if steps > 1:
            _text(draw, (px - 4, py + lay.panel_h - 11), str(steps - 1), font, anchor_right=True)
        _text(draw, (2, py + lay.panel_h // 2 - 6), "step", font)

    # x axis under the second panel: the first and last layer index, then the caption on a line of its own
    px, py = lay.panel_origin(1)
    axis_y = py + lay.panel_h + 3
    _text(draw, (px, axis_y), "0", font)
    if layers > 1:
        _text(draw, (px + lay.panel_w, axis_y), str(layers - 1), font, anchor_right=True)
    _text(draw, (px, axis_y + 14), fit_text(draw, layer_axis_label(layer_names, layers), font, room), font)

    # legend: a style -> subject gradient bar and the not-run swatch
    ly = axis_y + 38
    _text(draw, (px, ly), "style", font)
    bar_x, bar_w = px + 40, 120
    for i in range(bar_w):
        draw.line([(bar_x + i, ly), (bar_x + i, ly + 10)], fill=share_colour(i / (bar_w - 1)))
    _text(draw, (bar_x + bar_w + 6, ly), "subject  (share of rows)", font)
    draw.rectangle((px, ly + 20, px + 10, ly + 30), fill=NOT_RUN_COLOUR)
    _text(draw, (px + 16, ly + 20), "not run", font)
    return image
