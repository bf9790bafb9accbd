"""Smoke test of the quality lab (quality/): a tiny world with two LoRA pairs built from scratch, and the
evaluation run end to end through the public API on two seeds. Checks real properties, not quality numbers."""
import json

import pytest
import torch

from quality import build as lab_build
from quality import methods, run, stats, world
from quality.config import TINY


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    return lab_build.build(TINY, str(root), workers=1, log=lambda s: None), str(root)


def test_judges_beat_chance_on_ground_truth(tiny_world):
    w, _ = tiny_world
    acc = w.judge_accuracy
    assert acc["subject_clean"] > 3 / len(world.SUBJECT_NAMES)
    assert acc["style_clean"] > 3 / len(world.STYLE_NAMES)


def test_lora_file_round_trips_through_load_lora(tiny_world):
    from safetensors.torch import load_file

    from lib_dynfuse import fuse, load_lora
    w, _ = tiny_world
    path = w.lora_path("subject", 0)
    raw = load_file(path)
    lora = load_lora(path)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in raw}
    assert all(s.startswith("lora_unet_") for s in stems)
    assert len(lora.layers) == len(stems)
    key = next(k for k in lora.layers if "attn2_to_k" in str(k))
    d = lora.layers[key]
    stem = "lora_unet_" + str(key).split(":", 1)[-1].replace(".", "_")
    assert torch.equal(d.down, raw[stem + ".lora_down.weight"]) and torch.equal(d.up, raw[stem + ".lora_up.weight"])
    assert d.scale == pytest.approx(float(raw[stem + ".alpha"]) / d.down.shape[0])
    # both LoRAs resolve onto the lab's UNet and touch the same layers (so that fusion has shared layers)
    session = fuse(w.unet, lora, load_lora(w.lora_path("style", 0)), method="merge")
    assert session.targets and all(t.is_shared for t in session.targets)


def test_stats_wilson_and_paired_difference():
    lo, hi = stats.wilson(5, 10)
    assert 0.23 < lo < 0.24 and 0.76 < hi < 0.77     # textbook Wilson interval of 5/10
    a = [torch.tensor([True] * 8 + [False] * 8)]
    assert stats.paired_difference(a, a) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    d = stats.paired_difference([torch.ones(16, dtype=torch.bool)], [torch.zeros(16, dtype=torch.bool)])
    assert d["diff"] == 1.0 and d["lo"] == 1.0


def test_method_table_skips_keywords_the_engine_lacks():
    row = methods.Method("x", dict(method="dynamic", criterion="kl", no_such_keyword=1))
    assert "no_such_keyword" in methods.usable(row)
    assert methods.usable(methods.Method("merge", dict(method="merge"))) is None


def test_run_prints_tables_and_a_json_line_last(tiny_world, capsys):
    _, root = tiny_world
    run.main(["--tiny", "--cache", root, "--seeds", "2", "--steps", "3", "--workers", "1",
              "--methods", "dynamic-kl", "klora-linear", "dynamic-kl+llr-x0"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result["methods"]) == {"merge", "dynamic-kl", "klora-linear", "dynamic-kl+llr-x0"}
    for name, entry in result["methods"].items():
        assert set(entry["pairs"]) == {"0", "1"}
        for metric in ("subject", "style", "both"):
            r = entry["pooled"][metric]
            assert r["n"] == 4 and 0.0 <= r["lo"] <= r["rate"] <= r["hi"] <= 1.0
        if name != "merge":
            assert "diff_both_vs_merge" in entry["pooled"]
    sel = result["methods"]["dynamic-kl"]["selection"]
    assert 0.0 <= sel["subject_share"] <= 1.0 and len(sel["by_step"]) == 3
    assert "llr_similarities" in result["methods"]["dynamic-kl+llr-x0"]
    assert any(line.startswith("pooled over pairs") for line in lines)
