"""heatmap.py: every cell has the colour of its share, panels are cond then uncond, legend and size as laid out."""
import math

import pytest
import torch

from lib_dynfuse.heatmap import (NOT_RUN_COLOUR, STYLE_COLOUR, SUBJECT_COLOUR, heatmap_layout, render_heatmap,
                                 share_colour)


def test_share_colour_blends_style_to_subject():
    assert share_colour(1.0) == SUBJECT_COLOUR
    assert share_colour(0.0) == STYLE_COLOUR
    assert share_colour(math.nan) == NOT_RUN_COLOUR
    assert share_colour(0.5) == tuple(int(round((a + b) / 2)) for a, b in zip(SUBJECT_COLOUR, STYLE_COLOUR))
    assert share_colour(2.0) == SUBJECT_COLOUR and share_colour(-1.0) == STYLE_COLOUR


def test_cells_have_the_colour_of_their_share():
    nan = math.nan
    cond = torch.tensor([[1.0, 0.0, 0.5, nan], [0.0, 1.0, 0.25, 1.0], [0.75, nan, 0.0, 1.0]])
    uncond = torch.tensor([[0.0, 1.0, nan, 0.5], [nan, nan, nan, nan], [1.0, 1.0, 0.0, 0.0]])
    image = render_heatmap(cond, uncond, layer_names=["a", "b", "c", "d"])
    layout = heatmap_layout(3, 4)
    assert image.size == layout.size and image.mode == "RGB"
    for panel, table in enumerate((cond, uncond)):
        for step in range(3):
            for layer in range(4):
                x0, y0, x1, y1 = layout.cell_box(panel, step, layer)
                want = share_colour(table[step, layer].item())
                for x, y in ((x0, y0), (x1, y1), ((x0 + x1) // 2, (y0 + y1) // 2)):
                    assert image.getpixel((x, y)) == want, (panel, step, layer)


def test_legend_and_labels_are_drawn():
    table = torch.full((4, 5), 0.5)
    image = render_heatmap(table, table)
    layout = heatmap_layout(4, 5)
    pixels = image.load()
    w, h = image.size
    # text and legend pixels: dark text exists outside the panels, and the legend bar shows both end colours
    panel_bottom = layout.panel_origin(1)[1] + layout.panel_h
    below = {pixels[x, y] for x in range(w) for y in range(panel_bottom + 1, h)}
    assert STYLE_COLOUR in below and SUBJECT_COLOUR in below and NOT_RUN_COLOUR in below
    left_margin = {pixels[x, y] for x in range(layout.left - 2) for y in range(h)}
    assert any(sum(c) < 200 for c in left_margin)   # "step" and step numbers


def test_large_tables_fit_and_bad_shapes_are_refused():
    layout = heatmap_layout(50, 700)
    assert layout.cell_w >= 1 and layout.cell_h >= 2
    assert layout.size[0] <= 700 * 1 + 200
    image = render_heatmap(torch.rand(50, 700), torch.rand(50, 700))
    assert image.size == layout.size
    with pytest.raises(ValueError, match="steps, layers"):
        render_heatmap(torch.rand(3, 4), torch.rand(3, 5))
