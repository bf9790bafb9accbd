"""Forge glue for step windows (a windowed LoRA's UNet deltas stay in the hooks, where the step is known, instead of
going to Forge's own weight merge; the patch sets' names follow the windows) and the heat-map (layers in the
model's order; `merge`, all of it Forge's weight merge, still answers with a note).

Stand-ins and fixtures as in test_forge_adapter.py (tests/standins_forge).
"""
import dataclasses
import itertools

import torch

from lib_dynfuse.hosts import forge
from tests.test_forge_adapter import _host_and_p, _inputs, _sample_step, fh, sd15_files  # noqa: F401  (fixtures)


def _lone_subject_layers(run, p, count=3):
    """Make the first `count` UNet targets subject-only (the style LoRA leaves them alone)."""
    targets = run.prepare(p)
    unet = [i for i, t in enumerate(targets) if t.group == "unet"]
    for i in unet[:count]:
        targets[i] = dataclasses.replace(targets[i], style=None)
    return targets, {targets[i].name for i in unet[:count]}


def test_forge_keeps_a_windowed_loras_unet_deltas_out_of_its_patch_sets(fh, sd15_files):
    # without a window the subject-only layers go to Forge's merge
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style")
    targets, lone = _lone_subject_layers(run, p)
    host.before_sampling(p, run)
    assert run.host_applied["unet"] == lone
    # a window on the subject: they stay in the hooks, where the step is known; no patch set for the UNet
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", subject_end=0.5)
    targets, lone = _lone_subject_layers(run, p)
    hooks = host.before_sampling(p, run)
    assert run.host_applied["unet"] == set() and p.sd_model.forge_objects.unet.lora_patches == {}
    _sample_step(fh, p, *_inputs())
    assert lone <= {t.name for t in hooks.session.targets}
    assert hooks.session.windows == {"subject": (0.0, 0.5), "style": (0.0, 1.0)}
    # a window on the style only leaves the subject's lone layers to Forge
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", style_start=0.5)
    targets, lone = _lone_subject_layers(run, p)
    host.before_sampling(p, run)
    assert run.host_applied["unet"] == lone


def test_forge_merge_with_a_style_window_switches_the_style_on_at_its_step(fh, sd15_files):
    """`merge`, style window (0.5, 1) over 2 steps: step 0 is the subject alone, step 1 both (hooks, not Forge's
    merge, since the deltas change with the step); the model is untouched afterwards."""
    host, run, p, unet = _host_and_p(fh, sd15_files, method="merge", subject="subject", style="style",
                                     style_start=0.5, steps=2)
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    hooks = host.before_sampling(p, run)
    assert hooks is not None and run.host_applied["unet"] == set()
    x, ctx = _inputs()
    got = [torch.cat(_sample_step(fh, p, x, ctx)) for _ in range(2)]
    assert all(torch.equal(v, before[k]) for k, v in unet.model.state_dict().items())
    targets = [t for t in run.prepare(p) if t.group == "unet"]
    p.sd_model.forge_objects.unet = unet
    from lib_dynfuse.session import FuseSession
    alone = [dataclasses.replace(t, style=None) for t in targets]
    references = []
    for step, chosen in enumerate((alone, targets)):
        p.sampler.model_wrap_cfg.step = step
        with FuseSession(chosen, method="merge"):
            references.append(torch.cat(_sample_step(fh, p, x, ctx)))
    for g, r in zip(got, references):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(references[0], references[1], rtol=1e-3, atol=1e-4)


def test_forge_patch_set_names_change_with_the_windows():
    from lib_dynfuse.args import FuseArgs
    from lib_dynfuse.hosts import common

    def names(**kw):
        run = common.FuseRun(None, ui_args=FuseArgs(enabled=True, subject="a", style="b", **kw))
        run.hashes = {"subject": "h1", "style": "h2"}
        run.identities = {"subject": "h1@1", "style": "h2@2"}
        return forge.patch_identities(run)
    base = names(method="merge")
    assert names(method="merge", style_start=0.5) != base
    assert names(method="merge", style_start=0.5) != names(method="merge", style_start=0.25)
    assert names(method="merge", subject_start=0.0, subject_end=1.0) == base    # the full window is no window


def test_layers_follow_the_models_order(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style")
    lora = host.read_lora("subject")
    rank = {id(m): i for i, m in enumerate(itertools.chain(unet.model.modules(),
                                                            p.sd_model.forge_objects.clip.cond_stage_model.modules()))}
    ranks = [rank[id(layer.module)] for layer in lora.layers.values()]
    assert ranks == sorted(ranks) and {layer.group for layer in lora.layers.values()} == {"unet", "te"}


def test_merge_heatmap_is_a_note_though_forge_merges_every_layer(fh, sd15_files):
    from lib_dynfuse.heatmap import render_note
    from lib_dynfuse.hosts import common
    host, run, p, unet = _host_and_p(fh, sd15_files, method="merge", subject="subject", style="style", heatmap=True)
    assert host.before_sampling(p, run) is None
    assert not [t for t in run.forward_targets(run.prepare(p)) if t.group == "unet"]   # all Forge's merge
    note = run.heatmap()
    assert note is not None
    assert note.tobytes() == render_note("DynFuse merge: subject vs style", common.MERGE_NOTE).tobytes()
