"""fuse_pipeline on tiny random-weight diffusers pipelines (tests/fixtures/pipelines.py): steps, rows, text
encoders, partial schedules, the latent refinement, and the models bit-identical afterwards.

The reference for the step wiring is the same pipeline call fused with `fuse` and a hand-written
`callback_on_step_end` that sets the next step (step 0 set before the call): the images must be bit-identical.
"""
import pytest
import torch

from lib_dynfuse import fuse, fuse_pipeline, load_lora
from lib_dynfuse.guidance import LatentRefiner, paper_scorer, residual_grad_x0, vae_decoder
from lib_dynfuse.selection import klora_schedule
from tests.fixtures.lora_files import write_kohya_lora
from tests.fixtures.pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from tests.test_fuse_unet import one_thread  # noqa: F401  (autouse: tiny layers run fastest on one thread)
from tests.test_guidance_encoders import tiny_encoders

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tiny_sd_pipeline(0)
    folder = tmp_path_factory.mktemp("sd-loras")
    te = {"lora_te": pipe.text_encoder}
    write_kohya_lora(pipe.unet, folder / "subject.safetensors", te_layers=te, seed=1)
    write_kohya_lora(pipe.unet, folder / "style.safetensors", te_layers=te, seed=2)
    return pipe, load_lora(str(folder / "subject.safetensors")), load_lora(str(folder / "style.safetensors"))


def _run(pipe, steps=3, seed=0, **kw):
    kw.setdefault("guidance_scale", 5.0)
    return pipe(PROMPT, num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


def _snapshot(pipe):
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, name, None) is not None for k, v in getattr(pipe, name).state_dict().items()}


def _assert_untouched(pipe, before):
    after = _snapshot(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_klora_steps_follow_the_loop_and_match_a_hand_wired_callback(sd):
    pipe, subject, style = sd
    before = _snapshot(pipe)
    plain = _run(pipe)
    with fuse_pipeline(pipe, subject, style, method="klora") as session:
        fused = _run(pipe)
    assert session.steps == [(0, 3), (1, 3), (2, 3)]
    schedule = klora_schedule(session.klora_sums.top_c, session.klora_sums.top_s, session.klora_sums.gamma, 3,
                              session.klora_alpha, session.klora_beta, session.klora_scale).double()
    assert not torch.equal(schedule[0], schedule[2])          # the pick switches in 3 steps: the test can fail
    slots = [session.klora_sums.names.index(n) for n in session.layer_names]
    torch.testing.assert_close(session.selection, schedule[:, slots], rtol=0, atol=0)
    chosen, rows = session.record.counts()
    assert rows.shape[0] == 3 and torch.all(rows[..., 0] == 1) and torch.all(rows[..., 1] == 1)   # cond, uncond

    by_hand = fuse(pipe.unet, subject, style, method="klora", text_encoders=pipe.text_encoder)

    def next_step(p, i, t, kwargs):
        if i + 1 < p.num_timesteps:   # the callback also runs after the last step, when no step follows
            by_hand.set_step(i + 1, p.num_timesteps)
        return {}
    with by_hand:
        by_hand.set_step(0, 3)
        reference = _run(pipe, callback_on_step_end=next_step)
    assert torch.equal(fused, reference) and not torch.equal(fused, plain)
    with fuse(pipe.unet, subject, style, method="klora", text_encoders=pipe.text_encoder):
        stuck = _run(pipe)                                     # no set_step: every step is step 0
    assert not torch.equal(stuck, fused)
    _assert_untouched(pipe, before)
    assert torch.equal(_run(pipe), plain)


def test_dynamic_rows_are_uncond_then_cond_and_all_cond_without_cfg(sd):
    pipe, subject, style = sd
    with fuse_pipeline(pipe, subject, style, method="dynamic") as session:
        _run(pipe, steps=2, num_images_per_prompt=2)
        _, rows = session.record.counts()
        assert rows.shape[0] == 2 and torch.all(rows[..., 0] == 2) and torch.all(rows[..., 1] == 2)
        _run(pipe, steps=2, guidance_scale=1.0)                # no CFG: one row, cond
    assert session.steps == [(0, 2), (1, 2), (0, 2), (1, 2)]   # a second call starts at step 0 again
    _, rows = session.record.counts()
    assert torch.all(rows[..., 0] == 3) and torch.all(rows[..., 1] == 2)


def test_img2img_runs_the_tail_its_strength_leaves(sd):
    """Strength 0.5 of 4 steps runs steps 2 and 3 of the schedule (get_timesteps): K-LoRA's progress starts there,
    where a txt2img run of 4 steps has the same noise level, not at 0."""
    from diffusers import StableDiffusionImg2ImgPipeline
    pipe, subject, style = sd
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with fuse_pipeline(img2img, subject, style, method="klora") as session:
        img2img(PROMPT, image=image, strength=0.5, num_inference_steps=4, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    assert session.steps == [(2, 4), (3, 4)]
    assert session.record.counts()[1][2:].sum() > 0 and session.record.counts()[1][:2].sum() == 0
    from lib_dynfuse.pipeline import schedule_progress
    assert schedule_progress(0, 2, 4) == (2, 4) and schedule_progress(1, 3, 3) == (1, 3)
    assert schedule_progress(1, 8, 10, denoising_end=0.8) == (1, 10)      # SDXL base: the head of 10 steps


def test_the_model_is_bit_identical_after_an_exception_inside(sd):
    pipe, subject, style = sd
    before = _snapshot(pipe)
    plain = _run(pipe)
    with pytest.raises(RuntimeError, match="stop here"):
        with fuse_pipeline(pipe, subject, style, method="klora", weight_space=True):
            _run(pipe)
            raise RuntimeError("stop here")
    _assert_untouched(pipe, before)

    def stop(p, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return {}
    for weight_space in (False, True):
        with pytest.raises(KeyboardInterrupt):
            with fuse_pipeline(pipe, subject, style, method="merge", weight_space=weight_space):
                _run(pipe, callback_on_step_end=stop)              # interrupted inside the pipeline's loop
        _assert_untouched(pipe, before)
    assert torch.equal(_run(pipe), plain)


def test_sdxl_steps_rows_and_both_text_encoders(tmp_path):
    pipe = tiny_sdxl_pipeline(0)
    te = {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    write_kohya_lora(pipe.unet, tmp_path / "s.safetensors", te_layers=te, seed=1, style="compvis")
    write_kohya_lora(pipe.unet, tmp_path / "t.safetensors", te_layers=te, seed=2, style="compvis")
    subject, style = load_lora(str(tmp_path / "s.safetensors")), load_lora(str(tmp_path / "t.safetensors"))
    before = _snapshot(pipe)
    with fuse_pipeline(pipe, subject, style, method="klora") as session:
        fused = _run(pipe)
    te_modules = {id(m) for enc in (pipe.text_encoder, pipe.text_encoder_2) for m in enc.modules()}
    in_te = [t for t in session.targets if t.group == "te"]
    assert {id(t.module) in te_modules for t in in_te} == {True}
    assert any(any(m is t.module for m in pipe.text_encoder_2.modules()) for t in in_te)
    assert session.steps == [(0, 3), (1, 3), (2, 3)]
    _, rows = session.record.counts()
    assert torch.all(rows[..., 0] == 1) and torch.all(rows[..., 1] == 1)
    with fuse_pipeline(pipe, subject, style, method="klora", te_mode="off"):
        without_te = _run(pipe)
    assert not torch.equal(fused, without_te)
    _assert_untouched(pipe, before)


def test_fuse_on_a_pipeline_and_unsupported_pipelines_are_type_errors(sd):
    pipe, subject, style = sd
    with pytest.raises(TypeError, match=r"fuse_pipeline\(pipe, \.\.\.\).*fuse\(pipe\.unet"):
        fuse(pipe, subject, style)

    class OtherPipeline:
        unet = pipe.unet
    with pytest.raises(TypeError, match="fuse_pipeline takes a diffusers StableDiffusionPipeline"):
        fuse_pipeline(OtherPipeline(), subject, style)


# ----------------------------------------------------------------------------- latent refinement
@pytest.fixture(scope="module")
def refiner_parts(sd):
    pipe = sd[0]
    clip, dino = tiny_encoders(3)
    g = torch.Generator().manual_seed(11)
    scorer = paper_scorer(clip, dino, torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g))
    return vae_decoder(pipe.vae), scorer


M = 2000.0    # the tiny random encoders' gradient is ~1e-5 per latent element


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_refinement_moves_x_t_minus_1_by_m_grad(sd, refiner_parts, scheduler, monkeypatch):
    """Eq. 20 in the paper's x_t units: one step to the end, the scheduler's result x_{t-1} (here its x0 prediction)
    moves by -m grad_{x_t} R = -m grad_{x0-hat} R / sqrt(alpha-bar), whatever the scheduler; the UNet's prediction
    stays the model's. DDIM reads alphas_cumprod[t]; Euler scales its input by its sigma (its latents are
    sigma-scaled, 1 at the end); DPM-Solver sets its step index only in its first step()."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from lib_dynfuse import pipeline
    pipe, subject, style = sd
    saved = pipe.scheduler
    if scheduler != "ddim":
        cls = EulerDiscreteScheduler if scheduler == "euler" else DPMSolverMultistepScheduler
        pipe.scheduler = cls.from_config(saved.config)
    decoder, scorer = refiner_parts
    alphas = []
    real_alpha = pipeline.step_alpha_cumprod
    monkeypatch.setattr(pipeline, "step_alpha_cumprod", lambda *a: alphas.append(real_alpha(*a)) or alphas[-1])
    try:
        with fuse_pipeline(pipe, subject, style, method="merge"):
            plain = _run(pipe, steps=1)
        refiner = LatentRefiner(decoder, scorer, scale=M, grad="x0")
        with fuse_pipeline(pipe, subject, style, method="merge", guidance=refiner) as session:
            guided = _run(pipe, steps=1)
        assert "step" not in pipe.scheduler.__dict__                # the scheduler's own step again
    finally:
        pipe.scheduler = saved
    _, grad = residual_grad_x0(plain, decoder, scorer, decoder.image_range)
    assert len(alphas) == 1 and float(alphas[0]) < 0.1           # the first step: x0 gain 1 / sqrt(alpha-bar) > 3
    moved = (guided - plain).abs().max()
    assert moved > 1e-2                           # m grad R is far above the tolerance below
    torch.testing.assert_close(guided, plain - M * grad / alphas[0].sqrt(), rtol=1e-4, atol=2e-5)
    assert [(g.step, g.total) for g in session.guidance_log] == [(0, 1)] and session.skipped_steps() == []


def test_refinement_move_lands_on_the_sigma_scaled_latents_of_euler(sd, refiner_parts):
    """Mid-schedule, Euler's latents are x_t sqrt(sigma^2 + 1): the move of step 0 reaches the latents after step 0
    as move * sqrt(sigma_1^2 + 1), and nothing before it."""
    from diffusers import EulerDiscreteScheduler
    pipe, subject, style = sd
    saved = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(saved.config)
    decoder, scorer = refiner_parts
    refiner = LatentRefiner(decoder, scorer, scale=M, grad="x0", end=1 / 3)   # step 0 of 3
    moves, after_step = [], {}
    move_eps = refiner.move_eps

    def recorded(*a):
        move, info = move_eps(*a)
        moves.append(move)
        return move, info
    refiner.move_eps = recorded

    def keep(run):
        def callback(pipe_, i, t, kwargs):
            after_step.setdefault(run, []).append(kwargs["latents"].clone())
            return {}
        return callback
    try:
        with fuse_pipeline(pipe, subject, style, method="merge"):
            _run(pipe, callback_on_step_end=keep("plain"))
        with fuse_pipeline(pipe, subject, style, method="merge", guidance=refiner):
            _run(pipe, callback_on_step_end=keep("guided"))
        sigma_1 = pipe.scheduler.sigmas[1]
    finally:
        pipe.scheduler = saved
    assert len(moves) == 1 and moves[0].abs().max() > 1e-3
    torch.testing.assert_close(after_step["guided"][0] - after_step["plain"][0],
                               moves[0] * (sigma_1 ** 2 + 1).sqrt(), rtol=1e-4, atol=1e-6)


def test_refinement_refuses_what_it_cannot_do_and_leaves_the_model(sd, refiner_parts):
    pipe, subject, style = sd
    decoder, scorer = refiner_parts
    before = _snapshot(pipe)
    with pytest.raises(ValueError, match="guidance_rescale"):
        with fuse_pipeline(pipe, subject, style, guidance=LatentRefiner(decoder, scorer)):
            _run(pipe, steps=1, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="x0 gradient only"):
        with fuse_pipeline(pipe, subject, style, guidance=LatentRefiner(decoder, scorer, grad="xt")):
            _run(pipe, steps=1)
    _assert_untouched(pipe, before)
