"""Scores in the WebUI (hosts/score_run.py): per-image infotext scores in the A1111 stand-in process, the
POST /dynfuse/v1/score route, messages instead of failures, other encoders for scoring, and Forge's inference mode.

The expected values come from lib_dynfuse.score.score_images with encoders loaded separately from the same files.
"""
import base64
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.hosts import common, guidance_run, score_run
from lib_dynfuse.score import load_score_encoders, score_images
from tests.standins.env import images_equal
from tests.test_guidance_encoders import TINY_CLIP, save_clip
from tests.test_guidance_hosts import PROMPT, env, generate, guided  # noqa: F401  (env: the stand-in process)


def _b64(seed, size=24):
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), Image.fromarray(arr)


@pytest.fixture(scope="module")
def encoders(env):
    return load_score_encoders(TINY_CLIP, search_dirs=[str(env.models_path / "dynfuse")])


def _scores_of(infotext):
    """{'CLIP score': 0.81, ...} from the `DynFuse scores` entry of an infotext (unquoted: no ',' or ':')."""
    line = infotext.splitlines()[-1]
    value = line.split("DynFuse scores: ", 1)[1].split(", ")[0]
    parts = [p.rsplit(" ", 1) for p in value.split("; ") if not p.startswith("encoders")]
    return {k: float(v) for k, v in parts}, value


def test_each_image_gets_its_own_scores_against_given_references(env, encoders):
    (subj64, subj), (sty64, sty) = _b64(1), _b64(2)
    fused = env.ui_values(enabled=True, subject="subj", style="sty", score=True, subject_image=subj64, style_image=sty64)
    p, res = env.txt2img(fused, prompt=PROMPT, steps=2, seed=7, batch_size=2)
    plain_p, plain = env.txt2img(env.ui_values(enabled=True, subject="subj", style="sty"), prompt=PROMPT, steps=2,
                                 seed=7, batch_size=2)
    assert images_equal(res.images, plain.images)                  # scoring never changes the image
    want = score_images(res.images, subj, sty, *encoders)
    got = [_scores_of(text) for text in res.infotexts]
    for i, (values, raw) in enumerate(got):
        assert values == {"CLIP score": pytest.approx(want.rows()[i]["clip_score"], abs=5e-5),
                          "Style Sim": pytest.approx(want.rows()[i]["style_sim"], abs=5e-5),
                          "DINO score": pytest.approx(want.rows()[i]["dino_score"], abs=5e-5)}
        assert raw.endswith(f"encoders {TINY_CLIP} + dino-vits16")
    assert got[0][0] != got[1][0]
    assert "score: True" in res.infotexts[0] and "DynFuse message" not in p.extra_generation_params
    pasted = common.infotext_field_value({"DynFuse": p.extra_generation_params["DynFuse"]}, "score")
    assert pasted is True


def test_scores_use_the_rendered_references_when_guidance_ran(env, encoders):
    guidance_run.REFERENCES.clear()
    p, res = generate(env, steps=2, guidance=True, score=True)
    refs = guided(p).images
    want = score_images(res.images, refs["subject"], refs["style"], *encoders)
    values, _ = _scores_of(res.infotexts[0])
    assert values["DINO score"] == pytest.approx(want.means["dino_score"], abs=5e-5)
    assert values["Style Sim"] == pytest.approx(want.means["style_sim"], abs=5e-5)


def test_no_references_or_no_weights_give_a_message_and_the_same_image(env, tmp_path, monkeypatch):
    p, res = generate(env, steps=2, score=True)
    plain_p, plain = generate(env, steps=2)
    message = p.extra_generation_params.get("DynFuse message", "")
    assert "DynFuse scores need references" in message and "no scores" in message
    assert "DynFuse scores" not in p.extra_generation_params and images_equal(res.images, plain.images)
    assert "DynFuse" in p.extra_generation_params                  # fusion itself on

    from modules import paths
    monkeypatch.setattr(paths, "models_path", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    guidance_run.ENCODERS.clear()
    (subj64, _), (sty64, _) = _b64(1), _b64(2)
    p, res = generate(env, steps=2, score=True, subject_image=subj64, style_image=sty64)
    message = p.extra_generation_params.get("DynFuse message", "")
    assert message.startswith("DynFuse scores: no CLIP") and os.path.join(str(tmp_path), "dynfuse") in message
    assert "\n" not in message and images_equal(res.images, plain.images)
    guidance_run.ENCODERS.clear()


def test_other_encoders_for_scoring_from_the_settings(env, encoders, tmp_path):
    """dynfuse_score_clip_weights: another CLIP file scores (guidance's stays loaded); DINO still the guidance one."""
    from modules import shared
    _, other = save_clip(str(tmp_path), seed=9)
    (subj64, subj), (sty64, sty) = _b64(1), _b64(2)
    guidance_run.ENCODERS.clear()
    score_run.SCORE_ENCODERS.clear()
    _, res = generate(env, steps=2, score=True, subject_image=subj64, style_image=sty64)
    same, _ = _scores_of(res.infotexts[0])
    assert score_run.SCORE_ENCODERS._pair is None                  # same settings: the guidance store's pair
    shared.opts.dynfuse_score_clip_weights = other
    try:
        _, res2 = generate(env, steps=2, score=True, subject_image=subj64, style_image=sty64)
    finally:
        shared.opts.dynfuse_score_clip_weights = ""
    changed, _ = _scores_of(res2.infotexts[0])
    clip_other, _ = load_score_encoders(TINY_CLIP, other, search_dirs=[str(env.models_path / "dynfuse")])
    want = score_images(res2.images, subj, sty, clip_other, encoders[1])
    assert changed["CLIP score"] == pytest.approx(want.means["clip_score"], abs=5e-5)
    assert changed["CLIP score"] != same["CLIP score"] and changed["DINO score"] == same["DINO score"]
    assert score_run.SCORE_ENCODERS._pair is not None
    score_run.SCORE_ENCODERS.clear()


def _route(env):
    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods=None, **kw):
            routes[path] = (endpoint, methods)
    env.callbacks.app_started_callback(None, App())
    endpoint, methods = routes["/dynfuse/v1/score"]
    assert methods == ["POST"]

    def post(body):
        response = endpoint(body)
        return response.status_code, json.loads(response.body)
    return post


def test_score_route_answers_scores_or_a_clear_message(env, encoders, tmp_path, monkeypatch):
    post = _route(env)
    (a64, a), (b64, b), (s64, s), (t64, t) = _b64(1), _b64(2), _b64(3), _b64(4, size=32)
    status, body = post({"images": [a64, b64], "subject_refs": s64, "style_refs": [t64], "names": ["a", "b"]})
    want = score_images([a, b], s, t, *encoders, names=["a", "b"])
    assert status == 200 and [r["image"] for r in body["per_image"]] == ["a", "b"]
    for key in ("clip_score", "style_sim", "dino_score"):
        assert body[key] == pytest.approx(want.means[key], abs=1e-6)
    assert (body["images"], body["subject_refs"], body["style_refs"]) == (2, 1, 1)

    bad = [({"images": ["not base64!"], "subject_refs": s64, "style_refs": t64}, "images[0]: the reference image is not valid base64"),
           ({"images": [a64], "style_refs": t64}, "'subject_refs' must be a base64 image"),
           ({"images": [a64], "subject_refs": s64, "style_refs": t64, "prompt": "x"}, "unknown field(s) prompt"),
           ({"images": [a64], "subject_refs": s64, "style_refs": t64, "names": ["a", "b"]}, "'names' must be a list of 1"),
           ([a64], "must be a JSON object")]
    for request, text in bad:
        status, body = post(request)
        assert status == 400 and text in body["error"] and body["error"].startswith("DynFuse scores")

    from modules import paths
    monkeypatch.setattr(paths, "models_path", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    guidance_run.ENCODERS.clear()
    status, body = post({"images": [a64], "subject_refs": s64, "style_refs": t64})
    assert status == 503 and body["error"].startswith("DynFuse scores: no CLIP")
    guidance_run.ENCODERS.clear()


def test_scores_under_inference_mode_as_in_forge(env, encoders):
    """Forge runs the image loop in torch.inference_mode (processing.py:911): the same numbers come out."""
    clip, dino = encoders

    class Glue:
        def encoder_settings(self):
            return dict(clip_arch=TINY_CLIP, search_dirs=(str(env.models_path / "dynfuse"),))

        def score_encoder_settings(self):
            return self.encoder_settings()
    host = SimpleNamespace(name="forge", _dynfuse_guidance_glue=Glue())
    (subj64, subj), (sty64, sty) = _b64(1), _b64(2)
    args = FuseArgs(enabled=True, subject="a", style="b", score=True, subject_image=subj64, style_image=sty64)
    run = common.FuseRun(host, ui_args=args)
    p = SimpleNamespace(extra_generation_params={}, **{common.RUN_ATTR: run})
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with torch.inference_mode():
        values = score_run.score_image(host, p, SimpleNamespace(image=image))
    want = score_images(image, subj, sty, clip, dino)
    assert values == {k: pytest.approx(v, abs=1e-6) for k, v in want.means.items()}
    assert p.extra_generation_params["DynFuse scores"].startswith("CLIP score ")
