"""Table 1 metrics (lib_dynfuse/score.py): CLIP score, Style Sim, DINO score of image folders, library and CLI.

Random-weight CLIP (open_clip) and DINO (transformers ViT) files written by the guidance encoder tests' builders
and read through the real loaders; images are small random PNGs in temporary folders. The expected values are
computed here from the encoders' raw embeddings with normalised dot products (not with the module's cosine).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lib_dynfuse.score import ScoreUnavailable, load_score_encoders, main, read_image_folder, score_images
from tests.test_guidance_encoders import TINY_CLIP, register_tiny_clip, save_clip, save_dino_folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    register_tiny_clip()
    save_clip(str(folder), seed=3)
    save_dino_folder(str(folder / "dino-vits16"), seed=4)
    return str(folder)


@pytest.fixture(scope="module")
def encoders(models_dir):
    return load_score_encoders(TINY_CLIP, search_dirs=[models_dir])


def _pngs(folder, seeds, size=(40, 32)):
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for i, seed in enumerate(seeds):
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:02d}.png"))
        arrays.append(arr)
    return arrays


def _tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _expected(encoder, images, refs):
    """Mean over references of the cosine, from raw embeddings, by hand."""
    with torch.no_grad():
        a = torch.nn.functional.normalize(encoder(_tensor(images)).double(), dim=-1)
        b = torch.nn.functional.normalize(encoder(_tensor(refs)).double(), dim=-1)
    return (a @ b.T).mean(dim=1)


def test_scores_are_mean_cosines_to_each_reference(encoders, tmp_path):
    clip, dino = encoders
    images = _pngs(tmp_path / "img", [1, 2, 3])
    subject = _pngs(tmp_path / "subj", [4, 5])
    style = _pngs(tmp_path / "sty", [6])
    got = score_images([Image.fromarray(a) for a in images], [Image.fromarray(a) for a in subject],
                       Image.fromarray(style[0]), clip, dino)
    want = {"clip_score": _expected(clip, images, subject), "style_sim": _expected(clip, images, style),
            "dino_score": _expected(dino, images, subject)}
    for key, value in want.items():
        torch.testing.assert_close(got.per_image[key].double(), value, rtol=1e-5, atol=1e-6)
        assert got.means[key] == pytest.approx(float(value.mean()), abs=1e-6)
    assert len({round(v, 6) for v in got.means.values()}) == 3      # three different numbers
    assert got.clip == f"clip:{TINY_CLIP}" and got.dino == "dino:dino-vits16"
    assert [r["image"] for r in got.rows()] == ["0", "1", "2"]


def test_an_image_equal_to_its_only_reference_scores_one(encoders):
    clip, dino = encoders
    g = torch.Generator().manual_seed(0)
    ref, other = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    got = score_images([ref, other], ref, other, clip, dino, names=["same", "other"])
    assert got.rows()[0]["clip_score"] == pytest.approx(1.0, abs=1e-6)
    assert got.rows()[0]["dino_score"] == pytest.approx(1.0, abs=1e-6)
    assert got.rows()[1]["style_sim"] == pytest.approx(1.0, abs=1e-6)
    assert got.rows()[1]["clip_score"] < 0.9999


def test_cli_prints_rows_means_and_a_json_last_line(models_dir, encoders, tmp_path, capsys):
    images = _pngs(tmp_path / "img", [1, 2])
    subject = _pngs(tmp_path / "subj", [4])
    style = _pngs(tmp_path / "sty", [6, 7], size=(24, 48))        # references of another size work too
    code = main(["--images", str(tmp_path / "img"), "--subject-refs", str(tmp_path / "subj"),
                 "--style-refs", str(tmp_path / "sty"), "--clip-arch", TINY_CLIP, "--models-dir", models_dir])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    result = json.loads(out[-1])
    clip, dino = encoders
    want = score_images([Image.fromarray(a) for a in images], [Image.fromarray(a) for a in subject],
                        [Image.fromarray(a) for a in style], clip, dino)
    for key in ("clip_score", "style_sim", "dino_score"):
        assert result[key] == pytest.approx(want.means[key], abs=1e-7)
    assert (result["images"], result["subject_refs"], result["style_refs"]) == (2, 1, 2)
    assert [r["image"] for r in result["per_image"]] == ["00.png", "01.png"]
    assert out[0].split() == ["image", "CLIP", "score", "Style", "Sim", "DINO", "score"]
    assert out[1].startswith("00.png") and out[3].startswith("mean of 2")
    assert float(out[3].split()[-1]) == pytest.approx(want.means["dino_score"], abs=1e-4)


def test_cli_scores_with_other_encoders_when_given(models_dir, tmp_path, capsys):
    """--clip-weights picks another CLIP file (e.g. not the one that guided): CLIP values change, DINO's not."""
    _pngs(tmp_path / "img", [1, 2])
    _pngs(tmp_path / "subj", [4])
    _pngs(tmp_path / "sty", [6])
    _, other_clip = save_clip(str(tmp_path / "other"), seed=9)
    common = ["--images", str(tmp_path / "img"), "--subject-refs", str(tmp_path / "subj"),
              "--style-refs", str(tmp_path / "sty"), "--clip-arch", TINY_CLIP, "--models-dir", models_dir]
    assert main(common) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--clip-weights", other_clip]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["clip_score"] != pytest.approx(first["clip_score"], abs=1e-6)
    assert second["dino_score"] == first["dino_score"]


def test_cli_without_weights_says_which_file_to_put_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, seeds in (("img", [1]), ("subj", [2]), ("sty", [3])):
        _pngs(tmp_path / name, seeds)
    empty = tmp_path / "models"
    empty.mkdir()
    code = main(["--images", str(tmp_path / "img"), "--subject-refs", str(tmp_path / "subj"),
                 "--style-refs", str(tmp_path / "sty"), "--models-dir", str(empty)])
    captured = capsys.readouterr()
    error = json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert code == 2 and error.startswith("DynFuse scores: no CLIP ViT-B-32")
    assert os.path.join(str(empty), "ViT-B-32.safetensors") in error and "nothing is downloaded" in error
    assert "DynFuse scores" in captured.err


def test_folders_without_images_and_unreadable_files_give_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ScoreUnavailable, match="no png/jpg/jpeg/webp image"):
        read_image_folder(str(tmp_path / "empty"))
    with pytest.raises(ScoreUnavailable, match="is not a folder"):
        read_image_folder(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ScoreUnavailable, match="cannot read"):
        read_image_folder(str(tmp_path / "bad"))
