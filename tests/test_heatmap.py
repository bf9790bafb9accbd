"""heatmap.py: every cell has the colour of its share, panels are cond then uncond, legend and size as laid out."""
import math

import numpy as np
import pytest
import torch

from lib_dynfuse.heatmap import (NOT_RUN_COLOUR, STYLE_COLOUR, SUBJECT_COLOUR, fit_text, heatmap_layout,
                                 layer_axis_label, render_heatmap, share_colour)


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


def _dark_columns(image, top, bottom):
    """x of every pixel darker than the cells' colours in rows [top, bottom) (text)."""
    pixels = image.load()
    return [x for x in range(image.size[0]) for y in range(top, bottom) if sum(pixels[x, y]) < 250]


def test_the_layer_caption_has_its_own_line_and_stays_inside_the_image():
    names = [f"diffusion_model_input_blocks_{i}_1_transformer_blocks_0_attn1_to_q" for i in range(30)]
    table = torch.rand(2, 30)
    with_names, without = render_heatmap(table, table, layer_names=names), render_heatmap(table, table)
    layout = heatmap_layout(2, 30)
    axis_y = layout.panel_origin(1)[1] + layout.panel_h + 3
    # the tick row holds only the first and last index, whatever the caption says
    ticks = _dark_columns(with_names, axis_y, axis_y + 12)
    assert ticks == _dark_columns(without, axis_y, axis_y + 12)
    assert max(ticks) <= layout.left + layout.panel_w and min(ticks) >= layout.left
    caption = _dark_columns(with_names, axis_y + 14, axis_y + 28)
    assert caption and max(caption) < with_names.size[0] - layout.right // 2
    assert layer_axis_label(names, 30).startswith("layer, in the model's order (30: diffusion_model_input_blocks_0")


def test_fit_text_keeps_both_ends():
    from PIL import Image, ImageDraw, ImageFont
    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default()
    text = "start-" + "x" * 200 + "-end"
    short = fit_text(draw, text, font, 120)
    assert short.startswith("start") and short.endswith("end") and "..." in short
    assert draw.textbbox((0, 0), short, font=font)[2] <= 120
    assert fit_text(draw, "short", font, 120) == "short"


def test_a_record_without_any_choice_gives_a_note_not_empty_panels():
    empty = torch.full((3, 4), math.nan)
    image = render_heatmap(empty, empty, title="DynFuse dynamic: a vs b")
    colours = {tuple(int(v) for v in c) for c in np.asarray(image).reshape(-1, 3)}
    assert image.size != heatmap_layout(3, 4).size
    assert SUBJECT_COLOUR not in colours and STYLE_COLOUR not in colours


def test_host_loras_take_the_models_order_and_keep_parts_together():
    from lib_dynfuse.hosts.common import HostLora, LoraLayer
    from lib_dynfuse.layer_delta import LayerDelta
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.MultiheadAttention(4, 1), torch.nn.Linear(2, 2))
    delta = LayerDelta(dense=torch.zeros(2, 2))
    lora = HostLora(name="x")
    for name, module, part in (("last", model[2], None), ("attn_q", model[1], "q"), ("attn_k", model[1], "k"),
                               ("first", model[0], None), ("elsewhere", torch.nn.Linear(2, 2), None)):
        lora.layers[name] = LoraLayer(module=module, group="unet", delta=delta, part=part)
    lora.order_as(model.modules())
    assert list(lora.layers) == ["first", "attn_q", "attn_k", "last", "elsewhere"]
