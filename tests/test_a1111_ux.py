"""AUTOMATIC1111 glue for step windows (FuseArgs subject/style start and end reach the sessions, which bake per
step) and the heat-map (layers in the model's order, a note for `merge`, saved beside the saved image).

Stand-ins and fixtures as in test_a1111_glue.py (tests/standins).
"""
import os

import numpy as np
import pytest
import torch

from lib_dynfuse.heatmap import STYLE_COLOUR, SUBJECT_COLOUR, render_note
from lib_dynfuse.hosts import common

from tests.test_a1111_glue import PROMPT, close, env, fused, run  # noqa: F401  (fixture)


def _sessions(p):
    return list(p.dynfuse_run._session_cache.values())


def test_a1111_windows_reach_the_sessions_and_change_the_image(env):
    p_full, _ = run(env, steps=4, **fused())
    p_late, _ = run(env, steps=4, **fused(style_start=0.5))
    p_late2, _ = run(env, steps=4, **fused(style_start=0.5))
    unet = [s for s in _sessions(p_late) if s.record is not None]
    assert unet and all(s.windows == {"subject": (0.0, 1.0), "style": (0.5, 1.0)} for s in _sessions(p_late))
    assert all(s.windows == {"subject": (0.0, 1.0), "style": (0.0, 1.0)} for s in _sessions(p_full))
    assert not close(p_late.samples[0], p_full.samples[0], rel=1e-3)
    assert torch.equal(p_late.samples[0], p_late2.samples[0])
    # steps 0 and 1 of 4 (p < 0.5) record the subject alone in every shared layer, the later ones choose
    chosen = unet[0].record.both
    assert torch.all(chosen[:2] == 1.0) and chosen[2:].isfinite().all()
    assert "s_start: 0.5" in p_late.extra_generation_params["DynFuse"]


@pytest.mark.parametrize("method", ["dynamic", "merge", "klora"])
def test_a1111_an_empty_style_window_is_the_subject_alone(env, method):
    """style window (0, 0): the style LoRA never acts in the UNet; with the text encoder off that is the subject
    alone, the same as a style LoRA of zeros (whose every choice is the subject, Eq. 13 ties)."""
    p_empty, _ = run(env, **fused(method=method, style_start=0.0, style_end=0.0, text_encoder="off"))
    p_zero, _ = run(env, **fused(style="zero", text_encoder="off"))
    p_full, _ = run(env, **fused(text_encoder="off"))
    assert close(p_empty.samples[0], p_zero.samples[0])
    assert not close(p_full.samples[0], p_zero.samples[0], rel=1e-3)


def test_a1111_model_is_bit_identical_after_windowed_runs(env):
    before = env.state_snapshot()
    run(env, **fused(method="merge", subject_end=0.5, style_start=0.5))
    run(env, **fused(method="klora", style_start=0.25))
    assert all(torch.equal(v, before[k]) for k, v in env.state_snapshot().items())


# ---------------------------------------------------------------------------- heat-map
def test_recorded_layers_follow_the_models_order(env):
    """The builtin reads a file's keys in their stored (sorted) order, where proj_out comes before
    transformer_blocks; the targets, the record and the heat-map's layer axis follow the model instead."""
    p, _ = run(env, **fused(heatmap=True))
    rank = {id(m): i for i, m in enumerate(env.model.modules())}
    targets = p.dynfuse_run.prepare(p)
    for group in ("unet", "te"):
        ranks = [rank[id(t.module)] for t in targets if t.group == group]
        assert ranks == sorted(ranks) and len(ranks) > 3, group
    session = p.dynfuse_run._last_unet
    by_name = {t.name: rank[id(t.module)] for t in targets}
    recorded = [by_name[n] for n in session.record.layer_names]
    assert recorded == sorted(recorded)


def _colours(image):
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3)}


def test_merge_heatmap_says_that_merge_makes_no_choice(env):
    _, res = run(env, **fused(method="merge", heatmap=True))
    note = res.images[1]
    assert "heat-map" in res.infotexts[1]
    assert np.array_equal(np.asarray(note), np.asarray(render_note("DynFuse merge: subj vs sty", common.MERGE_NOTE)))
    assert not _colours(note) & {SUBJECT_COLOUR, STYLE_COLOUR}   # no (empty) panels and no legend: text only
    _, tilted = run(env, **fused(method="merge", heatmap=True, balance=0.3))   # the note names merge's balance
    lines = common.MERGE_NOTE + ("balance 0.3: the subject at 1x, the style at 0.6x their weights.",)
    assert np.array_equal(np.asarray(tilted.images[1]), np.asarray(render_note("DynFuse merge: subj vs sty", lines)))
    _, dynamic = run(env, **fused(heatmap=True))
    assert _colours(dynamic.images[1]) & {SUBJECT_COLOUR, STYLE_COLOUR} and note.size != dynamic.images[1].size


def test_heatmap_is_saved_beside_the_image_when_the_host_saves_images(env, tmp_path):
    from modules import images
    _, res = env.txt2img(env.ui_values(**fused(heatmap=True)), prompt=PROMPT, steps=2, outpath_samples=str(tmp_path))
    first = res.images[0].already_saved_as
    stem, ext = os.path.splitext(first)
    beside = stem + common.HEATMAP_SUFFIX + ext
    assert images.saved[-2:] == [first, beside] and os.path.isfile(beside)
    from PIL import Image
    with Image.open(beside) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(res.images[1]))
        assert "heat-map" in saved.text["parameters"]
    count = len(images.saved)
    run(env, **fused(heatmap=True))                       # the host saves nothing: nor does DynFuse
    assert len(images.saved) == count


@pytest.mark.parametrize("img2img", [False, True])
def test_a_baked_klora_records_the_steps_that_ran_with_both_rows(env, img2img):
    """K-LoRA is baked into the weights in AUTOMATIC1111: its record holds the steps the pass ran, cond and uncond
    rows alike, and not the bake made when the session opened (seen in the real WebUI as a step 0 in an img2img
    heat-map that starts at step 4, and as no uncond row at step 0)."""
    env.shared.opts.img2img_fix_steps = True
    try:
        fields = env.ui_values(**fused(method="klora"))
        if img2img:
            init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            p, _ = env.img2img(fields, init_latent=init, prompt=PROMPT, steps=4, denoising_strength=0.5)
        else:
            p, _ = env.txt2img(fields, prompt=PROMPT, steps=4)
    finally:
        env.shared.opts.img2img_fix_steps = False
    session = next(s for s in _sessions(p) if s.record is not None)
    assert session.weight_space
    first = 4 if img2img else 0                      # img2img_fix_steps: 4 steps at 0.5 are steps 4-7 of 8
    for rows in (session.record.cond, session.record.uncond):
        ran = rows.isfinite().all(dim=1)
        assert ran.tolist() == [i >= first for i in range(first + 4)], rows
