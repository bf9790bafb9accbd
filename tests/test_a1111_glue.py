"""scripts/dynfuse.py + lib_dynfuse/hosts/a1111.py in a stand-in AUTOMATIC1111 process (tests/standins).

A tiny SD1.5-layout UNet and CLIP text encoder with kohya LoRA files go through the host's order of calls
(process -> activate -> setup_conds -> sample -> postprocess). References are the builtin Lora stand-in's own
weight merge: fusion with an all-zero style must equal `<lora:subject:1>`, `merge` must equal both `<lora>`s.
"""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_dynfuse.args import FuseArgs
from tests.fixtures import lora_files, models
from tests.standins.env import HostEnv, hooks_left, images_equal

PROMPT = "a photo of a cat"
ATOL = 2e-4      # weight merge vs output deltas: the same math, summed in another order


def close(a, b, rel=1e-4):
    """Equal up to float rounding, relative to the tensor's range (random-weight UNets amplify rounding)."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet, te = models.tiny_sd15_unet(0), models.tiny_sd15_text_encoder(0)
    sd1 = {"ss_base_model_version": "sd_v1"}
    lora_files.write_kohya_lora(unet, folder / "subj.safetensors", te_layers={"lora_te": te}, seed=1, alpha=2,
                                metadata=sd1)
    lora_files.write_kohya_lora(unet, folder / "sty.safetensors", te_layers={"lora_te": te}, seed=2, metadata=sd1)
    lora_files.write_kohya_lora(unet, folder / "zero.safetensors", te_layers={"lora_te": te}, seed=2, zero=True)
    lora_files.write_kohya_lora(unet, folder / "other.safetensors", seed=3, include_conv=True)
    lora_files.write_kohya_lora(unet, folder / "xl.safetensors", seed=4,
                                metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    lora_files.write_kohya_lora(models.tiny_sdxl_unet(0), folder / "misfit.safetensors", seed=5)
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)
    for name, key in (("nan", "lora_up.weight"), ("nanalpha", "alpha")):   # read by the builtin loader as they are
        lora_files.write_kohya_lora(unet, folder / f"{name}.safetensors", seed=6, metadata=sd1)
        tensors = load_file(str(folder / f"{name}.safetensors"))
        tensors[sorted(k for k in tensors if k.endswith(key))[0]].fill_(float("nan"))
        save_file(tensors, str(folder / f"{name}.safetensors"))
    with HostEnv(str(folder)) as e:
        yield e


def run(env, prompt=PROMPT, steps=2, **fields):
    args = env.ui_values(**fields) if fields else env.ui_values()
    return env.txt2img(args, prompt=prompt, steps=steps)


@pytest.fixture(scope="module")
def plain(env):
    return run(env)


def fused(**kw):
    """Fusion on, by the hooked `dynamic` rule unless `method` says otherwise (the default method is merge)."""
    return {"enabled": True, "subject": "subj", "style": "sty", "method": "dynamic", **kw}


def test_off_means_untouched(env, plain):
    p, res = plain
    from modules import processing
    q = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT, steps=2)   # no scripts at all
    res_q = processing.process_images(q)
    assert "sample" not in p.__dict__ and "DynFuse" not in p.extra_generation_params
    assert torch.equal(p.samples[0], q.samples[0]) and images_equal(res.images, res_q.images)


def test_zero_style_dynamic_equals_builtin_subject_lora(env, plain):
    p, _ = run(env, **fused(style="zero"))
    ref, _ = run(env, prompt=PROMPT + " <lora:subj:1>")
    assert torch.allclose(p.c, ref.c, atol=ATOL) and not torch.allclose(p.c, plain[0].c, atol=1e-3)
    assert close(p.samples[0], ref.samples[0])
    assert not close(p.samples[0], plain[0].samples[0], rel=1e-2)


def test_hires_pass_conds_are_fused_and_a_duplicate_lora_stays_out(env):
    hires = dict(steps=2, enable_hr=True, hr_second_pass_steps=2)
    args = env.ui_values(**fused(style="zero"))
    p, _ = env.txt2img(args, prompt=PROMPT, **hires)
    dup, _ = env.txt2img(args, prompt=PROMPT + " <lora:subj:1>", **hires)
    ref, _ = env.txt2img(env.ui_values(), prompt=PROMPT + " <lora:subj:1>", **hires)
    assert torch.allclose(p.hr_c, ref.hr_c, atol=ATOL) and close(p.samples[0], ref.samples[0])
    assert torch.equal(dup.hr_c, p.hr_c) and torch.equal(dup.samples[0], p.samples[0])


def test_merge_equals_builtin_merge_of_both(env):
    p, _ = run(env, **fused(method="merge", text_encoder="merge", subject_weight=0.5, style_weight=1.5))
    ref, _ = run(env, prompt=PROMPT + " <lora:subj:0.5> <lora:sty:1.5>")
    assert torch.allclose(p.c, ref.c, atol=ATOL)
    assert close(p.samples[0], ref.samples[0])


def _spy_builtin(env):
    """Record, at every denoiser call, which networks the builtin has loaded (its merge set)."""
    seen = []
    env.callbacks.on_cfg_denoiser(lambda params: seen.append([n.name for n in env.networks.loaded_networks]))
    return seen


def test_fused_loras_stay_out_of_the_builtin_and_other_loras_still_merge(env):
    seen = _spy_builtin(env)
    try:
        p_other, _ = run(env, prompt=PROMPT + " <lora:other:1>", **fused())
        assert seen and all(names == ["other"] for names in seen)
        seen.clear()
        p_dup, _ = run(env, prompt=PROMPT + " <lora:subj:0.7>", **fused())
        assert seen and all(names == [] for names in seen)
        seen.clear()
        env.txt2img(env.ui_values(**fused()), prompt=PROMPT + " <lora:subj:0.7>", steps=2, enable_hr=True,
                    hr_second_pass_steps=2)   # the hires pass activates the builtin's <lora>s again
        assert len(seen) == 4 and all(names == [] for names in seen)
    finally:
        env.callbacks.callbacks["cfg_denoiser"].pop()
    p_alone, _ = run(env, **fused())
    assert not torch.allclose(p_other.samples[0], p_alone.samples[0], atol=1e-3)   # <lora:other> did apply
    assert torch.equal(p_dup.samples[0], p_alone.samples[0])                       # <lora:subj> did not
    assert any("<lora:subj> is also fused by DynFuse" in c for c in p_dup.comments)
    assert "applied once" in p_dup.extra_generation_params["DynFuse message"]


def test_text_encoder_off_keeps_plain_conds_and_select_changes_them(env, plain):
    off, _ = run(env, **fused(text_encoder="off"))
    sel, _ = run(env, **fused())
    assert torch.equal(off.c, plain[0].c) and torch.equal(off.uc, plain[0].uc)
    assert not torch.allclose(sel.c, plain[0].c, atol=1e-3)
    assert not torch.allclose(off.samples[0], plain[0].samples[0], atol=1e-2)   # the UNet is still fused


def test_cond_cache_never_mixes_fused_and_plain_conds(env, plain):
    fused_p, _ = run(env, **fused())
    again, res = run(env)
    assert not torch.equal(fused_p.c, plain[0].c)
    assert torch.equal(again.c, plain[0].c) and images_equal(res.images, plain[1].images)


def test_prompt_tag_equals_ui_settings_and_works_without_scripts(env):
    ui, _ = run(env, **fused(method="merge"))
    tagged, _ = run(env, prompt=PROMPT + " <dynlora:subj:sty:method=merge>")
    from modules import processing
    bare = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT + " <dynlora:subj:sty:m=merge>", steps=2)
    processing.process_images(bare)
    assert torch.equal(tagged.samples[0], ui.samples[0]) and torch.equal(bare.samples[0], ui.samples[0])
    assert tagged.extra_generation_params["DynFuse"].startswith("subject: subj, style: sty, method: merge, hash_subject: ")


def _progress_log(env):
    """(run step, run total, fusion progress, sigma) at every UNet call, read after our own callback."""
    log, denoiser = [], {}
    env.callbacks.on_cfg_denoiser(lambda params: denoiser.update(d=params.denoiser))
    run_of = lambda: denoiser["d"].p.dynfuse_run  # noqa: E731

    def after_unet(module, args, output):
        run_ = run_of()
        log.append(run_.step + (run_.active_sessions[0].progress, float(args[1][0]) / 100))   # t = 100 sigma
    handle = env.unet.register_forward_hook(after_unet)
    return log, handle


@pytest.mark.parametrize("sampler, extra, want", [
    ("Euler", {}, [(0, 3), (1, 3), (2, 3)]),
    ("Heun", {}, [(0, 6), (1, 6), (2, 6), (3, 6), (4, 6)]),                       # second order: 2 calls/step
    ("Euler", {"n_iter": 2}, [(0, 3), (1, 3), (2, 3)] * 2),                         # batch count
    # hires, 2 steps at strength 0.5: the tail of a 4-step schedule (setup_img2img_steps), not a new start
    ("Euler", {"enable_hr": True, "hr_second_pass_steps": 2}, [(0, 3), (1, 3), (2, 3), (2, 4), (3, 4)]),
    ("Heun", {"enable_hr": True, "hr_second_pass_steps": 2}, [(0, 6), (1, 6), (2, 6), (3, 6), (4, 6),
                                                               (4, 8), (5, 8), (6, 8)]),
])
def test_step_and_total_come_from_the_denoiser(env, sampler, extra, want):
    log, handle = _progress_log(env)
    try:
        env.txt2img(env.ui_values(**fused(method="klora")), prompt=PROMPT, steps=3, sampler_name=sampler, **extra)
    finally:
        handle.remove()
        env.callbacks.callbacks["cfg_denoiser"].pop()
    assert [(s, t) for s, t, _, _ in log] == want
    assert [progress for _, _, progress, _ in log] == [s / t for s, t in want]


def test_img2img_schedule_follows_setup_img2img_steps():
    from lib_dynfuse.hosts.common import img2img_schedule, schedule_progress
    assert img2img_schedule(11, 20, 0.5, steps_given=False) == (9, 20)    # 20 steps at 0.5: t_enc 10, from 9 of 20
    assert img2img_schedule(10, 20, 0.5, steps_given=True) == (10, 20)    # hires 10 steps at 0.5: 10..19 of 20
    assert img2img_schedule(7, 20, 0.3, steps_given=True) == (16, 23)     # int(7 / 0.3) = 23
    assert img2img_schedule(4, 20, 0.0, steps_given=True) == (0, 4)       # nothing to skip
    assert schedule_progress(3, 22, 11, 9, 20) == (21, 40)                # Heun: two calls a step
    assert schedule_progress(0, 11, 11, 9, 20) == (9, 20)


@pytest.mark.parametrize("strength, fix_steps, want", [
    (0.5, False, [(1, 4), (2, 4), (3, 4)]),          # t_enc = 2: 3 steps from step 1 of 4
    (0.5, True, [(4, 8), (5, 8), (6, 8), (7, 8)]),   # img2img_fix_steps: 4 steps, the last 4 of 8
    (1.0, False, [(0, 4), (1, 4), (2, 4), (3, 4)]),  # t_enc = 3 (0.999 x 4): the whole schedule
])
def test_img2img_progress_starts_where_the_pass_enters_the_schedule(env, strength, fix_steps, want):
    """K-LoRA's S = alpha * p + beta in img2img: p of the first call is that of the same sigma in a txt2img run
    of the full schedule (sd_samplers_kdiffusion.py:134-138), not 0."""
    from modules import processing
    log, handle = _progress_log(env)
    env.shared.opts.img2img_fix_steps = fix_steps
    try:
        init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        env.img2img(env.ui_values(**fused(method="klora")), init_latent=init, prompt=PROMPT, steps=4,
                    denoising_strength=strength)
    finally:
        env.shared.opts.img2img_fix_steps = False
        handle.remove()
        env.callbacks.callbacks["cfg_denoiser"].pop()
    assert [(s, t) for s, t, _, _ in log] == want
    for s, t, _, sigma in log:
        assert sigma == pytest.approx(float(processing.sigma_schedule(t)[s]), rel=1e-6)


@pytest.mark.parametrize("batched, want", [
    (True, [["cond", "cond", "uncond", "uncond"]]),
    (False, [["cond", "cond"], ["uncond", "uncond"]]),
])
def test_rows_are_labelled_per_unet_call(env, batched, want):
    labels, hooked = [], {}

    def wrap_rows(params):
        run_ = params.denoiser.p.dynfuse_run
        if "done" not in hooked:
            original = run_.set_rows
            run_.set_rows = lambda rows: (labels.append(list(rows)), original(rows))
            hooked["done"] = True
    env.callbacks.on_cfg_denoiser(wrap_rows)
    env.shared.opts.batch_cond_uncond = batched
    try:
        env.txt2img(env.ui_values(**fused()), prompt=PROMPT, steps=1, batch_size=2)
    finally:
        env.shared.opts.batch_cond_uncond = True
        env.callbacks.callbacks["cfg_denoiser"].pop()
    assert labels == want


@pytest.mark.parametrize("values, message", [
    (dict(enabled=True, subject="nope", style="sty"), "unknown LoRA 'nope'"),
    (dict(enabled=True, subject="subj", style="xl"), "'xl' is for SDXL, but the loaded model is SD1"),
    (dict(enabled=True, subject="misfit", style="sty"), "'misfit' does not fit the loaded model"),
    (dict(enabled=True, subject="subj", style="broken"), "could not read LoRA 'broken'"),
    (dict(enabled=True, subject="subj", style="nan"), "LoRA 'nan' holds NaN or Inf values in layer"),
    (dict(enabled=True, subject="nanalpha", style="sty"), "LoRA 'nanalpha' holds NaN or Inf values in layer"),
    (dict(enabled=True, subject="subj", style="subj"), "subject and style are the same LoRA"),
    ({"prompt": PROMPT + " <dynlora:subj>"}, "two LoRA names (got 1: 'subj')"),
    ({"api": {"subject": "subj", "style": "sty", "method": "best"}}, "method must be one of dynamic, klora, merge"),
])
def test_bad_input_gives_a_message_and_the_plain_image(env, plain, values, message):
    values = dict(values)
    prompt = values.pop("prompt", PROMPT)
    api = values.pop("api", None)
    args = [api] + env.ui_values()[1:] if api is not None else env.ui_values(**values)
    p, res = env.txt2img(args, prompt=prompt, steps=2)
    assert "DynFuse" not in p.extra_generation_params
    shown = p.extra_generation_params["DynFuse message"]
    assert message in shown and "generated without fusion" in shown
    assert any(message in c for c in p.comments) and any(message in c for c in res.infotexts)
    assert torch.equal(p.samples[0], plain[0].samples[0]) and images_equal(res.images, plain[1].images)


def test_model_is_bit_identical_after_an_exception_and_an_interrupt(env, plain):
    before, hooks = env.state_snapshot(), hooks_left(env.model)
    calls = []

    def fail_on_second_call(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
    handle = env.unet.mid_block.register_forward_hook(fail_on_second_call)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(env, **fused())
    finally:
        handle.remove()
    assert hooks_left(env.model) == hooks

    def interrupt(params):
        if params.denoiser.step == 1:
            env.shared.state.interrupted = True
    env.callbacks.on_cfg_denoiser(interrupt)
    try:
        run(env, steps=3, **fused(method="klora"))
    finally:
        env.callbacks.callbacks["cfg_denoiser"].pop()
        env.shared.state.interrupted = False
    assert hooks_left(env.model) == hooks
    after = env.state_snapshot()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    p, res = run(env)
    assert torch.equal(p.samples[0], plain[0].samples[0]) and images_equal(res.images, plain[1].images)


def test_heatmap_is_appended_only_when_asked(env):
    _, without = run(env, **fused())
    _, with_map = run(env, **fused(heatmap=True))
    assert len(without.images) == 1 and len(with_map.images) == 2
    assert len(with_map.infotexts) == 2 and "heat-map" in with_map.infotexts[1]
    assert with_map.images[1].size != with_map.images[0].size


def test_infotext_pastes_back_into_the_controls(env):
    import gradio  # the stand-in (tests/standins/gradio.py)
    with gradio.Blocks():
        controls = env.script.ui(False)
    values = fused(method="klora", style_weight=0.8, klora_scale="star", text_encoder="merge", criterion="js",
                   subject_end=0.75, style_start=0.25)
    _, res = run(env, **values)
    from modules import infotext_utils
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    index = {id(c): i for i, c in enumerate(controls)}
    pasted = {index[id(c)]: getter(params) for c, getter in env.script.infotext_fields}
    want = env.ui_values(**values)
    assert set(pasted) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 23, 24, 25, 26, 27, 28}
    assert {i: pasted[i] for i in pasted} == {i: want[i] for i in pasted}
    assert pasted[0] is True
    assert [g({"Prompt": "x"}) for c, g in env.script.infotext_fields][0] is False


def test_merge_balance_is_the_style_weight_tilted_and_in_the_infotext(env):
    """balance 0.3 under merge scales the style's delta by 0.6: the image of style weight 0.6, the same bits; the
    infotext names the balance, and other methods ignore it (the UI keeps it while another method is picked)."""
    p_bal, res_bal = run(env, **fused(method="merge", balance=0.3))
    p_ws, _ = run(env, **fused(method="merge", style_weight=0.6))
    p_merge, _ = run(env, **fused(method="merge"))
    assert torch.equal(p_bal.samples[0], p_ws.samples[0]) and not torch.equal(p_bal.samples[0], p_merge.samples[0])
    assert "balance: 0.3" in res_bal.infotexts[0] and "DynFuse message" not in p_bal.extra_generation_params
    p_dyn, _ = run(env, **fused(balance=0.3))
    p_dyn_plain, _ = run(env, **fused())
    assert torch.equal(p_dyn.samples[0], p_dyn_plain.samples[0])


def test_api_dict_equals_positional_and_info_route(env):
    p_pos, _ = run(env, **fused(method="merge"))
    p_dict, _ = env.txt2img([{"subject": "subj", "style": "sty", "method": "merge"}] + env.ui_values()[1:],
                            prompt=PROMPT, steps=2)
    assert torch.equal(p_pos.samples[0], p_dict.samples[0])
    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods=None, **kw):
            routes[path] = (endpoint, methods)
    env.callbacks.app_started_callback(None, App())
    endpoint, methods = routes["/dynfuse/v1/info"]
    info = endpoint()
    assert methods == ["GET"] and info["methods"] == ["dynamic", "klora", "merge"]
    assert info["criteria"] == ["kl", "js", "cosine", "dot"] and info["defaults"]["method"] == "merge"
    assert info["host"] == "a1111" and {"subj", "sty", "zero"} <= set(info["loras"])
    assert [f["name"] for f in info["fields"]][:3] == ["enabled", "subject", "style"]


def test_layers_a_hook_cannot_reach_are_named_not_hooked():
    from lib_dynfuse.hosts.a1111 import unfusable
    mha = torch.nn.MultiheadAttention(8, 2)
    assert unfusable(mha) == "MultiheadAttention q/k/v"
    assert unfusable(mha.out_proj) == "MultiheadAttention out_proj"
    assert unfusable(torch.nn.LayerNorm(8)) == "LayerNorm"
    assert unfusable(torch.nn.Linear(2, 2)) == "" and unfusable(torch.nn.Conv2d(2, 2, 3)) == ""


def test_host_is_detected_by_its_modules(env):
    from lib_dynfuse.hosts import adapter, detect
    assert detect() == "a1111" and adapter().name == "a1111"
    assert type(env.script_module.HOST).__name__ == "A1111Host"


def test_functional_mode_fuses_on_clean_weights_after_a_merge_mode_lora_job(tmp_path):
    """A merge-mode `<lora>` job leaves its weights merged; in functional mode the host restores them only
    while some `<lora>` is active (networks.py:551). Fusion must still run on the clean base weights."""
    unet, te = models.tiny_sd15_unet(0), models.tiny_sd15_text_encoder(0)
    lora_files.write_kohya_lora(unet, tmp_path / "subj.safetensors", te_layers={"lora_te": te}, seed=1)
    lora_files.write_kohya_lora(unet, tmp_path / "sty.safetensors", te_layers={"lora_te": te}, seed=2)
    lora_files.write_kohya_lora(unet, tmp_path / "other.safetensors", te_layers={"lora_te": te}, seed=3)
    with HostEnv(str(tmp_path)) as e:
        from modules import shared
        p_clean, _ = e.txt2img(e.ui_values(**fused()), prompt=PROMPT, steps=2)
        e.txt2img(e.ui_values(), prompt=PROMPT + " <lora:other:1>", steps=2)     # leaves `other` merged
        shared.opts.lora_functional = True
        try:
            p_after, _ = e.txt2img(e.ui_values(**fused()), prompt=PROMPT, steps=2)
        finally:
            shared.opts.lora_functional = False
    assert torch.equal(p_after.c, p_clean.c) and torch.equal(p_after.samples[0], p_clean.samples[0])


@pytest.mark.parametrize("method", ["merge", "klora"])
def test_merge_and_klora_are_baked_into_the_weights_on_top_of_other_loras(env, plain, method):
    """merge/klora bake their deltas after the builtin merged `<lora:other>` (its state synced first), so no
    hook runs during sampling; the result equals the forward-time hooks of functional mode; afterwards the
    weights are exactly what the builtin's own `<lora:other>` job leaves, and later jobs are unchanged."""
    from modules import shared
    p_other, _ = run(env, prompt=PROMPT + " <lora:other:1>", steps=3)
    other_state = env.state_snapshot()
    hooked_layers = []
    env.callbacks.on_cfg_denoiser(lambda params: hooked_layers.append(
        sum(1 for m in env.unet.modules() if getattr(m, "network_layer_name", None) and m._forward_hooks)))
    try:
        p_baked, _ = run(env, prompt=PROMPT + " <lora:other:1>", steps=3, **fused(method=method))
        assert hooked_layers and all(n == 0 for n in hooked_layers)      # weights, not hooks
        after_baked = env.state_snapshot()
        hooked_layers.clear()
        shared.opts.lora_functional = True
        try:
            p_hooked, _ = run(env, prompt=PROMPT + " <lora:other:1>", steps=3, **fused(method=method))
        finally:
            shared.opts.lora_functional = False
        assert hooked_layers and all(n > 0 for n in hooked_layers)         # functional mode: forward-time hooks
    finally:
        env.callbacks.callbacks["cfg_denoiser"].pop()
    assert close(p_baked.samples[0], p_hooked.samples[0])
    assert not close(p_baked.samples[0], p_other.samples[0])
    assert other_state.keys() == after_baked.keys()
    assert all(torch.equal(other_state[k], after_baked[k]) for k in other_state)
    p_other_again, _ = run(env, prompt=PROMPT + " <lora:other:1>", steps=3)
    assert torch.equal(p_other.samples[0], p_other_again.samples[0])
    p_plain, _ = run(env)
    assert torch.equal(p_plain.samples[0], plain[0].samples[0])


def test_the_accordion_starts_with_the_method_the_ui_config_gives_it(env, tmp_path):
    """modules/ui_loadsave.py sets the Method radio from ui-config.json (cmd_args.py --ui-config-file) after ui()
    returns: ui() reads the same key, so a saved `dynamic` shows the criterion and hides merge's balance."""
    import gradio  # the stand-in (tests/standins/gradio.py)
    config = tmp_path / "ui-config.json"
    config.write_text('{"customscript/dynfuse.py/txt2img/Method/value": "dynamic"}')
    env.shared.cmd_opts.ui_config_file = str(config)
    try:
        with gradio.Blocks():
            controls = dict(zip(FuseArgs.field_names(), env.script.ui(False)))
    finally:
        del env.shared.cmd_opts.ui_config_file
    assert controls["criterion"].kwargs.get("visible", True) is not False
    assert controls["balance"].kwargs.get("visible") is False
