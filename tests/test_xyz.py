"""X/Y/Z plot axes (lib_dynfuse/hosts/xyz.py) against a stand-in of the plot script (tests/standins/xyz_grid.py)
in the stand-in AUTOMATIC1111 process of test_a1111_glue.py: axes from the FuseArgs metadata, registration in
either start-up order, one generation per cell with the axis values over the UI settings and the tag.
"""
import importlib.util
import os

import numpy as np
import pytest

from lib_dynfuse.args import CRITERIA, METHODS, FuseArgs
from lib_dynfuse.hosts import common, xyz
from tests.fixtures.grown_args import GrownArgs
from tests.test_a1111_glue import PROMPT, env, fused, run  # noqa: F401  (fixture)

PLOT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "xyz_grid.py")


@pytest.fixture()
def plot_module(env):
    """The plot script loaded as the host loads scripts (module named after its file, script_loading.py:10-13) and
    listed in scripts_data (scripts.py:503); taken out again afterwards."""
    from modules import scripts
    spec = importlib.util.spec_from_file_location("xyz_grid.py", PLOT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = scripts.ScriptClassData(module.Script, PLOT_FILE, os.path.dirname(PLOT_FILE), module)
    scripts.scripts_data.append(entry)
    try:
        yield module
    finally:
        scripts.scripts_data.remove(entry)
        scripts.scripts_txt2img = scripts.scripts_img2img = None


def labels(options):
    return [o.label for o in options if o.label.startswith(xyz.LABEL_PREFIX)]


def plot(module, is_img2img=False):
    script = module.Script()
    script.ui(is_img2img)
    return script


def index(script, label):
    return [o.label for o in script.current_axis_options].index(label)


# ----------------------------------------------------------------------------- axes from the metadata
def test_axes_follow_the_field_metadata():
    specs = {s.label: s for s in xyz.axis_specs()}
    assert specs["DynFuse Method"].choices() == list(METHODS)
    assert specs["DynFuse Criterion"].choices() == list(CRITERIA)
    assert specs["DynFuse guidance (on/off)"].choices() == ["True", "False"]
    for label in ("DynFuse Subject weight", "DynFuse Style weight", "DynFuse Guidance strength m",
                  "DynFuse Subject from", "DynFuse Style until"):
        assert specs[label].type is float and specs[label].choices is None
    assert list(specs)[-1] == xyz.PAIR_LABEL
    assert specs[xyz.PAIR_LABEL].values("a|b") == {"subject": "a", "style": "b"}
    assert specs["DynFuse Style weight"].values(0.5) == {"style_weight": 0.5}
    assert not any("balance" in label.lower() for label in specs) or "balance" in FuseArgs.field_names()


def test_a_balance_field_and_a_new_method_get_axes_without_a_code_change(monkeypatch):
    monkeypatch.setattr(xyz, "FuseArgs", GrownArgs)
    specs = {s.label: s for s in xyz.axis_specs()}
    assert specs["DynFuse Method"].choices()[-1] == "blend"
    assert specs["DynFuse Balance"].type is float and specs["DynFuse Balance"].values(0.3) == {"balance": 0.3}


# ----------------------------------------------------------------------------- registration
def test_axes_reach_plots_built_before_and_after_and_are_added_once(env, plot_module):
    from modules import scripts
    early = plot(plot_module)                       # --nowebui: the API builds the UI before on_before_ui
    scripts.scripts_txt2img = scripts.ScriptRunner([early])
    assert labels(early.current_axis_options) == []
    env.callbacks.before_ui_callback()              # our on_before_ui callback
    env.callbacks.before_ui_callback()              # a UI reload runs it again
    want = [s.label for s in xyz.axis_specs()]
    assert labels(plot_module.axis_options) == want and labels(early.current_axis_options) == want
    assert labels(plot(plot_module, is_img2img=True).current_axis_options) == want
    assert [o.label for o in early.current_axis_options][:4] == ["Nothing", "Seed", "Hires steps"] + want[:1]


def test_axes_are_registered_when_the_script_is_imported(env, plot_module):
    """The plot is a WebUI script, loaded before the extensions: importing our script registers the axes."""
    saved = {k: list(v) for k, v in env.callbacks.callbacks.items()}
    try:
        spec = importlib.util.spec_from_file_location("dynfuse_again", os.path.join(
            os.path.dirname(os.path.dirname(PLOT_FILE)), "..", "scripts", "dynfuse.py"))
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        for k, v in saved.items():
            env.callbacks.callbacks[k][:] = v
    assert labels(plot_module.axis_options) == [s.label for s in xyz.axis_specs()]


def test_no_plot_no_change(env):
    assert xyz.register_axes() == 0


# ----------------------------------------------------------------------------- cells
def plot_p(env, values, prompt=PROMPT):
    from modules import processing
    args = env.ui_values(**values)
    env.script.args_from, env.script.args_to = 0, len(args)
    return processing.StableDiffusionProcessingTxt2Img(prompt=prompt, steps=2, scripts=env.runner, script_args=args)


def image(res):
    return np.asarray(res.images[0])


def test_a_2x2_plot_gives_four_different_images_with_each_cells_settings(env, plot_module):
    xyz.register_axes()
    script = plot(plot_module)
    p = plot_p(env, fused(method="klora"), prompt=PROMPT + " <dynlora:subj:sty:m=klora:ws=0.8>")
    cells = script.run(p, index(script, "DynFuse Method"), "", ["dynamic", "merge"],
                       index(script, "DynFuse Style weight"), "0.5, 1.0", [])
    assert len(cells) == 4 and not hasattr(p, common.OVERRIDES_ATTR)
    got = [(pc.dynfuse_run.args.method, pc.dynfuse_run.args.style_weight) for pc, _ in cells]
    assert got == [("dynamic", 0.5), ("merge", 0.5), ("dynamic", 1.0), ("merge", 1.0)]   # the axes win over the tag
    images = [image(res) for _, res in cells]
    assert all(not np.array_equal(images[i], images[j]) for i in range(4) for j in range(i + 1, 4))
    assert "method: merge" in cells[1][1].infotexts[0] and "ws: 0.5" in cells[1][1].infotexts[0]
    alone, res = run(env, prompt=PROMPT + " <dynlora:subj:sty:m=merge:ws=0.5>")   # the same cell, by the tag
    assert np.array_equal(images[1], image(res))


def test_a_lora_pair_axis_turns_fusion_on_and_keeps_each_cells_message(env, plot_module):
    xyz.register_axes()
    script = plot(plot_module)
    p = plot_p(env, {})                                       # DynFuse off in the UI
    cells = script.run(p, index(script, xyz.PAIR_LABEL), "subj|missing, subj|sty, subj|zero", [], 0, "", [])
    (p_bad, bad), (p_sty, sty), (p_zero, zero) = cells
    assert "DynFuse message" in bad.extra_generation_params and "'missing'" in bad.extra_generation_params["DynFuse message"]
    assert "DynFuse message" not in sty.extra_generation_params and "style: sty" in sty.infotexts[0]
    assert "style: zero" in zero.infotexts[0] and not np.array_equal(image(sty), image(zero))
    assert "DynFuse" not in p.extra_generation_params         # the plot's own p is left as it was


def test_a_malformed_pair_stops_the_plot_before_the_first_image(env, plot_module):
    xyz.register_axes()
    script = plot(plot_module)
    with pytest.raises(RuntimeError, match=r"subject\|style.*'subj'"):
        script.run(plot_p(env, {}), index(script, xyz.PAIR_LABEL), "subj|sty, subj", [], 0, "", [])
