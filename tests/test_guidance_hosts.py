"""Latent refinement in the A1111 stand-in process (scripts/dynfuse.py -> hosts/guidance_run.py + a1111_guidance.py).

A tiny SD1.5-layout UNet, random-weight CLIP (open_clip) and DINO (transformers ViT) files in the host's
models/dynfuse folder, a diffusers TAESD-architecture first stage: references are nested generations through our
hooks, cached; the correction moves the CFG denoiser's prediction in [start, end]; missing weights leave the
fused image as it is, with a message.
"""
import base64
import io
import json
import os

import numpy as np
import pytest
import torch

from lib_dynfuse.guidance import residual_grad_x0
from lib_dynfuse.hosts import guidance_run
from tests.fixtures import lora_files, models
from tests.standins.env import HostEnv, hooks_left, images_equal
from tests.test_guidance_encoders import TINY_CLIP, save_clip, save_dino_folder, tiny_taesd

PROMPT = "a photo of a cat"


class CheckpointInfo:
    """sd_models.CheckpointInfo.shorthash (sd_models.py:60-115)."""
    shorthash = "abc123"


def nested_txt2img_class(base):
    """The stand-in Txt2Img with the dataclass keywords a nested run passes (processing.py:137-182, :1166-1181)
    and close() (processing.py:404-410)."""

    class Txt2Img(base):
        def __init__(self, sd_model=None, subseed=-1, scheduler=None, do_not_save_samples=False,
                     do_not_save_grid=False, override_settings=None, **kw):
            super().__init__(**kw)
            self.subseed, self.scheduler = subseed, scheduler
            self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
            self.override_settings = dict(override_settings or {})
            self.closed = False

        def close(self):
            self.closed = True

    return Txt2Img


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet, te = models.tiny_sd15_unet(0), models.tiny_sd15_text_encoder(0)
    sd1 = {"ss_base_model_version": "sd_v1"}
    lora_files.write_kohya_lora(unet, folder / "subj.safetensors", te_layers={"lora_te": te}, seed=1, metadata=sd1)
    lora_files.write_kohya_lora(unet, folder / "sty.safetensors", te_layers={"lora_te": te}, seed=2, metadata=sd1)
    models_path = tmp_path_factory.mktemp("models")
    save_clip(str(models_path / "dynfuse"), seed=3)
    save_dino_folder(str(models_path / "dynfuse" / "dino-vits16"), seed=4)
    with HostEnv(str(folder)) as e:
        from modules import paths, processing, shared
        paths.models_path = str(models_path)       # paths_internal.py:31 (re-exported by paths.py)
        processing.StableDiffusionProcessingTxt2Img = nested_txt2img_class(processing.StableDiffusionProcessingTxt2Img)
        shared.state.job_no, shared.state.processing_has_refined_job_count = 0, False   # shared_state.py:17-19
        shared.opts.dynfuse_clip_arch = TINY_CLIP
        e.model.first_stage_model = tiny_taesd(5)  # decode(z) -> [-1, 1]; 4x8x8 -> 3x32x32
        e.model.scale_factor = 0.18215
        e.model.sd_checkpoint_info = CheckpointInfo()
        e.models_path = models_path
        guidance_run.REFERENCES.clear()
        guidance_run.ENCODERS.clear()
        yield e
    guidance_run.REFERENCES.clear()
    guidance_run.ENCODERS.clear()


def generate(env, steps=2, seed=7, prompt=PROMPT, **fields):
    if fields.get("guidance"):
        fields.setdefault("reference_steps", 1)       # cheap references (cached across tests: same key)
    fields.setdefault("method", "dynamic")            # hooked, so the record and the private copy are exercised
    args = env.ui_values(enabled=True, subject="subj", style="sty", **fields)
    return env.txt2img(args, prompt=prompt, steps=steps, seed=seed)


def guided(p):
    return getattr(p, guidance_run.GUIDANCE_ATTR)


def test_references_render_once_per_key_and_guidance_changes_the_image(env):
    cache = guidance_run.REFERENCES
    cache.clear()
    before = cache.renders
    plain, res_plain = generate(env)
    p1, res1 = generate(env, guidance=True)
    assert cache.renders - before == 2 and guided(p1).rendered == ["subject", "style"]
    assert [s.step for s in guided(p1).log] == [0, 1]
    assert "DynFuse guidance" in p1.extra_generation_params
    assert not torch.equal(p1.samples[0], plain.samples[0])
    p2, res2 = generate(env, guidance=True)            # same settings: nothing rendered again
    assert cache.renders - before == 2 and guided(p2).rendered == []
    assert p1.extra_generation_params["DynFuse references"] == "subject rendered; style rendered"
    assert p2.extra_generation_params["DynFuse references"] == "subject cached; style cached"
    assert "DynFuse references: subject cached; style cached" in res2.infotexts[0]
    assert torch.equal(p1.samples[0], p2.samples[0]) and images_equal(res1.images, res2.images)
    p3, _ = generate(env, guidance=True, seed=8)       # another seed: two new renders
    assert cache.renders - before == 4 and guided(p3).rendered == ["subject", "style"]


def test_subject_reference_is_the_subject_lora_alone(env):
    """The subject reference = a plain generation with `<lora:subj:1>` (builtin weight merge), same seed/steps."""
    from modules import shared
    guidance_run.REFERENCES.clear()
    shared.opts.dynfuse_show_references = True
    try:
        p, res = generate(env, steps=2, guidance=True, reference_steps=0, guidance_end=0.0)
    finally:
        shared.opts.dynfuse_show_references = False
    only, res_only = env.txt2img(env.ui_values(), prompt=PROMPT + " <lora:subj:1>", steps=2, seed=7)
    assert len(res.images) == 3 and res.infotexts[1:] == ["DynFuse subject reference", "DynFuse style reference"]
    subject, style = (np.asarray(im, dtype=np.int16) for im in res.images[1:])
    assert np.abs(subject - np.asarray(res_only.images[0], dtype=np.int16)).max() <= 1   # same math, other order
    assert np.abs(style - subject).max() > 10


def test_reference_prompts_leave_out_the_other_loras_trigger_words(env):
    """l_c: the prompt without the style LoRA's words (its caption tags, ss_tag_frequency); l_s: without the subject
    LoRA's (the activation text of its user metadata, subj.json beside the file); the infotext says so."""
    guidance_run.REFERENCES.clear()
    style = env.networks.available_networks["sty"]
    saved = dict(style.metadata)
    style.metadata["ss_tag_frequency"] = {"10_wc": {"wc_style": 9, "paper": 2}}
    user_file = os.path.splitext(env.networks.available_networks["subj"].filename)[0] + ".json"
    with open(user_file, "w", encoding="utf8") as f:
        json.dump({"activation text": "sks"}, f)
    try:
        p, _ = generate(env, steps=1, guidance=True, prompt="a photo of sks cat, (wc_style:1.1)")
        own, _ = generate(env, steps=1, guidance=True, prompt="a photo of sks cat, (wc_style:1.1)",
                          subject_prompt="sks cat", style_prompt="a <dynlora:x:y> wc_style")
    finally:
        style.metadata.clear()
        style.metadata.update(saved)
        os.remove(user_file)
    assert guided(p).prompts == {"subject": "a photo of sks cat", "style": "a photo of cat, (wc_style:1.1)"}
    assert {(k.role, k.prompt) for k in guidance_run.REFERENCES._items} >= {
        ("subject", "a photo of sks cat"), ("style", "a photo of cat, (wc_style:1.1)"),
        ("subject", "sks cat"), ("style", "a  wc_style")}
    summary = p.extra_generation_params["DynFuse guidance"]
    assert summary.endswith("; l_c: a photo of sks cat; l_s: a photo of cat, (wc_style:1.1)")
    assert guided(own).prompts == {} and "l_c" not in own.extra_generation_params["DynFuse guidance"]


def _png_base64(seed):
    from PIL import Image
    arr = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), arr


def test_given_images_replace_the_renders(env):
    guidance_run.REFERENCES.clear()
    before = guidance_run.REFERENCES.renders
    (subj64, subj), (sty64, sty) = _png_base64(1), _png_base64(2)
    p, _ = generate(env, steps=2, guidance=True, subject_image=subj64, style_image=sty64)
    g = guided(p)
    assert guidance_run.REFERENCES.renders == before and g.rendered == []
    assert p.extra_generation_params["DynFuse references"] == "subject given; style given"
    assert np.array_equal(np.asarray(g.images["subject"]), subj) and np.array_equal(np.asarray(g.images["style"]), sty)
    assert len(g.log) == 2


def test_correction_only_inside_start_end(env):
    p, _ = generate(env, steps=2, guidance=True, guidance_start=0.5, guidance_end=1.0)
    assert [s.step for s in guided(p).log] == [1]
    empty, _ = generate(env, steps=2, guidance=True, guidance_start=0.5, guidance_end=0.5)
    plain, _ = generate(env, steps=2)
    assert guided(empty).log == [] and torch.equal(empty.samples[0], plain.samples[0])


def test_first_correction_is_the_refiner_step_on_the_denoiser_output(env):
    """One Euler step to sigma 0 returns the denoiser's output x0-hat: the pass's result takes the step's move,
    -m grad_{x_t} R = -m sqrt(1 + sigma^2) grad_{x0-hat} R (Eq. 20, eps held fixed; sigma 8 in the stand-in)."""
    p, _ = generate(env, steps=1, guidance=True, guidance_scale=25.0, reference_steps=1)
    plain, _ = generate(env, steps=1)
    g = guided(p)
    _, grad = residual_grad_x0(plain.samples[0], g.refiner.decoder, g.refiner.scorer, g.refiner.image_range)
    torch.testing.assert_close(p.samples[0], plain.samples[0] - 25.0 * 65 ** 0.5 * grad, rtol=1e-5, atol=1e-5)
    assert grad.abs().max() > 0


def test_xt_gradient_moves_the_sampler_latent_and_everything_is_restored(env):
    snapshot = env.state_snapshot()
    grad_before = torch.is_grad_enabled()
    p_x0, _ = generate(env, steps=2, guidance=True)
    p, _ = generate(env, steps=2, guidance=True, guidance_grad="xt")
    g = guided(p)
    assert g.refiner.grad == "xt" and [s.step for s in g.log] == [0, 1]
    assert not torch.equal(p_x0.samples[0], p.samples[0])
    assert torch.is_grad_enabled() == grad_before
    assert hooks_left(env.model) == 0 and hooks_left(p.sampler.model_wrap_cfg) == 0
    assert "sample" not in p.__dict__ and "forward" not in p.sampler.model_wrap_cfg.__dict__
    assert "sample" not in p.sampler.__dict__ and "sample_img2img" not in p.sampler.__dict__
    after = env.state_snapshot()
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)


def _count_calls(env):
    """(UNet forwards, on_cfg_denoiser callbacks) of the next generation."""
    counts = {"unet": 0, "callback": 0}
    env.callbacks.on_cfg_denoiser(lambda params: counts.update(callback=counts["callback"] + 1))
    handle = env.unet.register_forward_hook(lambda *a: counts.update(unet=counts["unet"] + 1))
    return counts, handle


@pytest.mark.parametrize("grad", ["x0", "xt"])
def test_a_guided_step_is_one_denoiser_call(env, grad):
    """The x_t gradient comes from the step's own call: the UNet runs, other extensions' callbacks fire and the
    selection record counts rows as often as without guidance."""
    fields = dict(heatmap=True)
    counts, handle = _count_calls(env)
    try:
        plain, _ = generate(env, steps=3, **fields)
        plain_counts = dict(counts)
        counts.update(unet=0, callback=0)
        p, _ = generate(env, steps=3, guidance=True, guidance_grad=grad, guidance_end=1.0, **fields)
    finally:
        handle.remove()
        env.callbacks.callbacks["cfg_denoiser"].pop()
    assert counts == plain_counts == {"unet": 3, "callback": 3}
    assert [s.step for s in guided(p).log] == [0, 1, 2] and p.sampler.model_wrap_cfg.step == 3
    rows = p.dynfuse_run._last_unet.record.counts()[1]
    assert torch.equal(rows, plain.dynfuse_run._last_unet.record.counts()[1]) and rows.sum() > 0


def test_missing_weights_give_the_fused_image_and_a_message(env, tmp_path, monkeypatch):
    from modules import paths
    monkeypatch.setattr(paths, "models_path", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    guidance_run.ENCODERS.clear()
    guidance_run.REFERENCES.clear()
    before = guidance_run.REFERENCES.renders
    p, res = generate(env, steps=2, guidance=True)
    plain, res_plain = generate(env, steps=2)
    message = p.extra_generation_params.get("DynFuse message", "")
    assert "DynFuse guidance is off" in message and os.path.join(str(tmp_path), "dynfuse") in message
    assert "without guidance" in message and "\n" not in message                  # one line in the infotext
    assert f"DynFuse message: {json.dumps(message)}" in res.infotexts[0].splitlines()[-1]
    assert any(c.count("\n") >= 2 and "without guidance" in c for c in p.comments)   # whole text in the UI
    assert guidance_run.REFERENCES.renders == before        # weights are checked before anything is rendered
    assert torch.equal(p.samples[0], plain.samples[0]) and images_equal(res.images, res_plain.images)
    assert "DynFuse" in p.extra_generation_params             # fusion itself still on
    guidance_run.ENCODERS.clear()


def test_interrupted_reference_means_no_guidance(env, monkeypatch):
    from modules import processing, shared
    from lib_dynfuse.hosts import a1111_guidance
    guidance_run.REFERENCES.clear()
    real_render, real_process = a1111_guidance.A1111Guidance.render_reference, processing.process_images

    def skipped_process(p2):
        res = real_process(p2)
        shared.state.skipped = True          # the user pressed Skip during the reference (shared_state.py:52-55)
        return res

    def render(self, *a, **kw):
        try:
            return real_render(self, *a, **kw)
        finally:
            shared.state.skipped = False     # the host's batch loop clears it (processing.py:935-936)
    monkeypatch.setattr(processing, "process_images", skipped_process)
    monkeypatch.setattr(a1111_guidance.A1111Guidance, "render_reference", render)
    p, _ = generate(env, steps=2, guidance=True, seed=99)
    assert guided(p).refiner is None and len(guidance_run.REFERENCES) == 0
    assert "interrupted" in p.extra_generation_params.get("DynFuse message", "")


# ----------------------------------------------------------------------------- the prompt tag alone
TAG = "<dynlora:subj:sty:g=1:refsteps=1>"


def test_tag_alone_starts_guidance_exactly_like_the_checkbox(env):
    """`<dynlora:...:g=1>` with the accordion off: references rendered and the latent corrected in Script.process,
    the same bits as the checkbox (the tag is parsed before the guidance decision, not only at activate)."""
    guidance_run.REFERENCES.clear()
    p_box, res_box = generate(env, steps=2, guidance=True, method="merge")   # the tag's method: the default
    guidance_run.REFERENCES.clear()
    p_tag, res_tag = env.txt2img(env.ui_values(), prompt=f"{PROMPT} {TAG}", steps=2, seed=7)
    g = guided(p_tag)
    assert g.rendered == ["subject", "style"] and [s.step for s in g.log] == [0, 1]
    assert torch.equal(p_tag.samples[0], p_box.samples[0]) and images_equal(res_tag.images, res_box.images)
    assert all(np.array_equal(np.asarray(g.images[r]), np.asarray(guided(p_box).images[r])) for r in ("subject", "style"))
    assert p_tag.extra_generation_params["DynFuse guidance"] == p_box.extra_generation_params["DynFuse guidance"]
    again, res_again = env.txt2img(env.ui_values(), prompt=f"{PROMPT} {TAG}", steps=2, seed=7)
    assert guided(again).rendered == [] and images_equal(res_again.images, res_tag.images)


def test_every_guidance_field_of_the_tag_counts(env):
    """Strength, range and reference steps from the tag drive the run that Script.process sets up."""
    guidance_run.REFERENCES.clear()
    p, _ = env.txt2img(env.ui_values(), prompt=f"{PROMPT} <dynlora:subj:sty:g=1:gm=25:gstart=0.5:refsteps=1>",
                       steps=2, seed=7)
    g = guided(p)
    assert (g.refiner.scale, [s.step for s in g.log]) == (25.0, [1])
    assert {k.steps for k in guidance_run.REFERENCES._items} == {1}
    off, _ = env.txt2img(env.ui_values(enabled=True, subject="subj", style="sty", guidance=True, reference_steps=1),
                         prompt=f"{PROMPT} <dynlora:subj:sty:g=0>", steps=2, seed=7)
    assert getattr(off, guidance_run.GUIDANCE_ATTR, None) is None      # the tag switches the checkbox off too


def test_a_tag_in_a_job_without_extra_networks_changes_nothing(env):
    """p.disable_extra_networks: the host never activates the tag (processing.py:959), so guidance stays off."""
    p, _ = env.txt2img(env.ui_values(), prompt=f"{PROMPT} {TAG}", steps=2, seed=7, disable_extra_networks=True)
    assert getattr(p, guidance_run.GUIDANCE_ATTR, None) is None and not getattr(p, "dynfuse_run").enabled


def _progress_log(env):
    """(job_no, job_count, sampling_step, sampling_steps, reference?) at every denoiser call (modules/progress.py:102-108)."""
    from modules import shared
    seen = []

    def record(params):
        s = shared.state
        seen.append((s.job_no, s.job_count, s.sampling_step, s.sampling_steps,
                     bool(getattr(params.denoiser.p, "dynfuse_reference", False))))
    env.callbacks.on_cfg_denoiser(record)
    return seen


def _progress(entry):
    job_no, job_count, step, steps, _ = entry
    return job_no / job_count + (step / steps / job_count if steps else 0.0)


@pytest.mark.parametrize("hires", [False, True])
def test_progress_bar_and_job_count_include_the_reference_renders(env, hires):
    from modules import shared
    guidance_run.REFERENCES.clear()
    seen = _progress_log(env)
    try:
        kw = dict(enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5) if hires else {}
        fields = dict(guidance=True, reference_steps=1, guidance_end=0.0)
        p, _ = env.txt2img(env.ui_values(enabled=True, subject="subj", style="sty", **fields), prompt=PROMPT, steps=3,
                           seed=5, **kw)
        main_jobs, main_steps = (2, 3 + 2) if hires else (1, 3)
        refs = [e for e in seen if e[4]]
        assert len(refs) == 2 and guided(p).rendered == ["subject", "style"]
        assert {e[1] for e in seen} == {main_jobs + 2}                 # one job count for the whole request
        assert [e[0] for e in refs] == [0, 1] and {e[0] for e in seen if not e[4]} == set(range(2, 2 + main_jobs))
        progress = [_progress(e) for e in seen]
        assert progress == sorted(progress) and progress[-1] < 1.0
        assert shared.state.job_no == shared.state.job_count
        assert shared.total_tqdm._tqdm.total == main_steps + 2 * 1 == shared.total_tqdm.updates
        seen.clear()
        cached, _ = env.txt2img(env.ui_values(enabled=True, subject="subj", style="sty", **fields), prompt=PROMPT,
                                steps=3, seed=5, **kw)                 # nothing rendered: the host's own counts
        assert guided(cached).rendered == [] and {e[1] for e in seen} == {main_jobs}
        assert shared.total_tqdm._tqdm.total == main_steps == shared.total_tqdm.updates
    finally:
        env.callbacks.callbacks["cfg_denoiser"].remove(env.callbacks.callbacks["cfg_denoiser"][-1])


def test_main_job_plan_follows_the_host():
    from lib_dynfuse.hosts.a1111_guidance import main_job_plan
    assert main_job_plan(-1, False, 2, 10, hires=False, hr_steps=0, upscale_only=False) == (2, 20, False)
    assert main_job_plan(-1, False, 2, 10, hires=True, hr_steps=4, upscale_only=False) == (4, 28, True)
    assert main_job_plan(-1, False, 2, 10, hires=True, hr_steps=0, upscale_only=True) == (4, 20, True)
    assert main_job_plan(6, False, 2, 10, hires=False, hr_steps=0, upscale_only=False) == (6, None, False)   # x/y/z
    assert main_job_plan(6, True, 2, 10, hires=True, hr_steps=5, upscale_only=False) == (6, None, True)


def test_messages_are_one_line_in_the_infotext_and_whole_in_the_ui():
    from lib_dynfuse.hosts import common
    text = "DynFuse guidance is off: no CLIP weights. Put one of these in place:\n  - /a/b\n  - or set a path\n(x)"
    assert common.one_line(text) == "DynFuse guidance is off: no CLIP weights. Put one of these in place: - /a/b; - or set a path; (x)"

    class P:
        def __init__(self):
            self.extra_generation_params, self.shown = {}, []

        def comment(self, message):
            self.shown.append(message)
    p = P()
    common.report_on_p(p, text)
    common.report_on_p(p, "second\nline")
    assert p.shown == [text, "second\nline"]
    assert p.extra_generation_params[common.MESSAGE_KEY] == common.one_line(text) + "; second; line"


def test_guidance_settings_exist_without_the_settings_ui(env):
    """--nowebui runs before_ui but never ui_settings (webui.py:26-45): the options are registered anyway, so the
    API's /options and override_settings accept them."""
    from modules import shared
    from lib_dynfuse.hosts.a1111_guidance import OPTIONS
    assert set(OPTIONS) <= set(shared.opts.data_labels) and not env.callbacks.errors
    assert shared.opts.data_labels["dynfuse_clip_arch"].default == OPTIONS["dynfuse_clip_arch"][0]
