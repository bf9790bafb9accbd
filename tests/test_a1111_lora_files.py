"""AUTOMATIC1111 glue with LoRA files that change on disk, the base-model check before any file is read, and the
info route's diagnostics, in the stand-in process (tests/standins: network.py follows network.py:24-90, whose
entry keeps the hash it read first; networks.py:158-270 reads the file on every load_network).
"""
import os
import shutil

import pytest
import torch

from tests.fixtures import lora_files, models
from tests.standins.env import HostEnv

PROMPT = "a photo of a cat"
SD1 = {"ss_base_model_version": "sd_v1"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras_on_disk")
    unet, te = models.tiny_sd15_unet(0), models.tiny_sd15_text_encoder(0)
    store = tmp_path_factory.mktemp("sources")   # outside the Lora folder: what the tests copy in
    lora_files.write_kohya_lora(unet, store / "subj.safetensors", te_layers={"lora_te": te}, seed=1, alpha=2,
                                metadata=SD1)
    lora_files.write_kohya_lora(unet, store / "zero.safetensors", te_layers={"lora_te": te}, seed=1, zero=True,
                                metadata=SD1)
    lora_files.write_kohya_lora(unet, store / "sty.safetensors", te_layers={"lora_te": te}, seed=2, metadata=SD1)
    lora_files.write_kohya_lora(unet, store / "sty2.safetensors", te_layers={"lora_te": te}, seed=3, alpha=4,
                                metadata=SD1)
    for name in ("subj", "zero", "sty", "sty2"):
        shutil.copyfile(store / f"{name}.safetensors", folder / f"{name}.safetensors")
    xl = folder / "xlcut.safetensors"   # SDXL metadata, a header that parses, the tensors cut off
    lora_files.write_kohya_lora(models.tiny_sdxl_unet(0), xl, seed=4, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    xl.write_bytes(xl.read_bytes()[:-64])
    with HostEnv(str(folder)) as e:
        e.store, e.folder = store, folder
        yield e


def put(env, source, name):
    """The Lora folder's `name` replaced by a copy of a stored file in one rename (new inode, new mtime)."""
    tmp = env.folder / f"{name}.tmp"
    shutil.copyfile(env.store / f"{source}.safetensors", tmp)
    os.replace(tmp, env.folder / f"{name}.safetensors")


def fused_run(env, subject, method="klora", style="sty", **fields):
    values = env.ui_values(enabled=True, subject=subject, style=style, method=method, **fields)
    return env.txt2img(values, prompt=PROMPT, steps=2)


@pytest.mark.parametrize("method", ["klora", "merge"])
def test_a_file_replaced_under_its_name_is_read_again(env, method):
    """klora's top-K sums are cached by what the file is and merge is baked from the deltas: after the file is
    replaced the fusion is the new file's, and the infotext names its hash."""
    name = f"swap_{method}"
    put(env, "subj", name)
    env.networks.list_available_networks()
    want_subj, _ = fused_run(env, "subj", method)
    want_zero, _ = fused_run(env, "zero", method)
    first, _ = fused_run(env, name, method)
    assert torch.equal(first.samples[0], want_subj.samples[0])
    put(env, "zero", name)
    second, _ = fused_run(env, name, method)
    assert "DynFuse message" not in second.extra_generation_params
    assert torch.equal(second.samples[0], want_zero.samples[0])
    assert second.extra_generation_params["DynFuse"] != first.extra_generation_params["DynFuse"]


def test_a_deleted_file_gives_a_message_naming_it(env):
    put(env, "subj", "doomed")
    env.networks.list_available_networks()
    plain, _ = env.txt2img(env.ui_values(), prompt=PROMPT, steps=2)
    os.remove(env.folder / "doomed.safetensors")
    p, res = fused_run(env, "doomed")
    shown = p.extra_generation_params["DynFuse message"]
    assert "LoRA 'doomed' is no longer on disk" in shown and "without fusion" in shown
    assert torch.equal(p.samples[0], plain.samples[0])


def test_a_file_added_after_the_list_was_read_is_found(env):
    put(env, "subj", "newcomer")            # no refresh: the glue rescans once for a name it does not know
    p, _ = fused_run(env, "newcomer")
    assert "DynFuse message" not in p.extra_generation_params and "DynFuse" in p.extra_generation_params


def test_the_base_model_is_checked_before_the_file_is_read(env):
    """An SDXL LoRA whose tensors do not even load: the message is the base model's, naming the LoRA."""
    p, _ = fused_run(env, "xlcut")
    shown = p.extra_generation_params["DynFuse message"]
    assert shown.startswith("DynFuse: LoRA 'xlcut' is for SDXL, but the loaded model is SD1"), shown


def test_info_route_diagnostics_count_what_outlives_a_job(env):
    from tests.standins.env import hooks_left
    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods=None, **kw):
            routes[path] = endpoint
    env.callbacks.app_started_callback(None, App())
    fused_run(env, "subj", "klora")
    info = routes["/dynfuse/v1/info"]()
    assert "diagnostics" not in info
    counts = routes["/dynfuse/v1/info"](diagnostics=True)["diagnostics"]
    assert counts["hooks"] == 0 == hooks_left(env.model) and counts["sessions_open"] == 0
    assert counts["runs_alive"] <= 1 and counts["patch_sets"] == 0
    for cache in ("reference_cache", "klora_cache", "lora_file_cache"):
        assert counts[cache]["entries"] <= counts[cache]["bound"]
    assert counts["klora_cache"]["entries"] >= 1 and counts["rss_bytes"] > 0


def test_a_replaced_file_whose_hash_the_host_keeps_is_still_read_again(env, monkeypatch):
    """A1111's hash cache answers the old hash for a file whose mtime is not newer (hashes.py:22-38, e.g. an
    older file moved in place): the caches key on the file's identity too, so K-LoRA's sums are the new file's."""
    import network
    put(env, "sty", "stale")
    env.networks.list_available_networks()
    first, _ = fused_run(env, "subj", style="stale")
    want, _ = fused_run(env, "subj", style="sty2")
    old_hash, read_hash = env.networks.available_networks["stale"].hash, network.NetworkOnDisk.read_hash
    monkeypatch.setattr(network.NetworkOnDisk, "read_hash",
                        lambda self: self.set_hash(old_hash) if self.name == "stale" else read_hash(self))
    put(env, "sty2", "stale")
    past = os.stat(env.folder / "sty.safetensors").st_mtime - 3600
    os.utime(env.folder / "stale.safetensors", (past, past))
    second, _ = fused_run(env, "subj", style="stale")
    assert second.extra_generation_params["DynFuse"] == first.extra_generation_params["DynFuse"]   # the host's hash
    assert torch.equal(second.samples[0], want.samples[0])
    sums = [getattr(p, "dynfuse_run")._last_unet.klora_sums for p in (first, second, want)]
    assert not torch.equal(sums[0].abs_s, sums[2].abs_s)
    assert torch.equal(sums[1].abs_s, sums[2].abs_s), "K-LoRA's sums of the old file were served from the cache"
