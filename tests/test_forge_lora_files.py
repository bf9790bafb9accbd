"""Forge adapter: LoRA files as they are on disk now (replaced or deleted under the same name), the base-model
check before any layer is read, every refusal naming the LoRA, and the diagnostics' counts of Forge's state.

Stand-ins: tests/standins_forge (networks.py follows sd_forge_lora/network.py:16-81, an entry keeps its first
hash; networks.py:56-58, the builtin's state-dict cache is keyed by file name).
"""
import os
import shutil

import torch

from lib_dynfuse.hosts import common, forge
from tests.fixtures import lora_files, models
from tests.test_forge_adapter import _host_and_p, fh, sd15_files  # noqa: F401  (fixtures)


def _copy(source, path):
    """Replace `path` by a copy of `source` with one rename (a new inode), as a user's save does."""
    tmp = str(path) + ".tmp"
    shutil.copyfile(str(source), tmp)
    os.replace(tmp, str(path))


def _unet_deltas(run, p):
    return {t.name: t.subject.up.clone() for t in run.prepare(p) if t.group == "unet" and t.subject is not None}


def test_a_replaced_file_is_read_again_and_renames_its_patch_sets(fh, sd15_files, tmp_path):
    """The builtin's cache by file name and the list entry's first hash would serve the old file: the adapter
    reads by file identity and re-reads the hash, so the deltas, the hash and Forge's patch-set names follow."""
    swap = tmp_path / "swap.safetensors"
    _copy(sd15_files["subject"][0], swap)
    files = dict(sd15_files, swap=(swap, None))
    host, run, p, _ = _host_and_p(fh, files, subject="swap", style="style", method="merge")
    before = _unet_deltas(run, p)
    names_before = forge.patch_identities(run)
    hash_before = run.hashes["subject"]
    _copy(sd15_files["zero"][0], swap)

    later = common.FuseRun(host, ui_args=run.args)           # the next job, same names, same host
    after = _unet_deltas(later, p)
    assert set(after) == set(before)
    assert all(torch.count_nonzero(up) == 0 for up in after.values())
    assert any(torch.count_nonzero(up) > 0 for up in before.values())
    assert later.hashes["subject"] != hash_before
    assert forge.patch_identities(later)[0] != names_before[0] and forge.patch_identities(later)[1] == names_before[1]
    assert len(host.files) <= host.files.bound


def test_a_deleted_file_is_named_and_nothing_is_fused(fh, sd15_files, tmp_path):
    swap = tmp_path / "gone.safetensors"
    _copy(sd15_files["subject"][0], swap)
    host, run, p, unet = _host_and_p(fh, dict(sd15_files, gone=(swap, None)), subject="gone", style="style")
    os.remove(swap)
    assert run.prepare(p) is None
    message = run.messages[-1]
    assert "LoRA 'gone' is no longer on disk" in message and str(swap) in message and "without fusion" in message


def test_the_base_model_is_checked_before_any_layer_is_read(fh, sd15_files, tmp_path):
    """An SDXL LoRA on SD1.5: Forge's list says SDXL (network.py:54-68); its layers do not fit either, but the
    message is the base model's, naming the LoRA (the shape check used to come first, without the name)."""
    path = tmp_path / "xl.safetensors"
    lora_files.write_kohya_lora(models.tiny_sdxl_unet(0), path, seed=4)
    host, run, p, _ = _host_and_p(fh, sd15_files, style="xl")
    fh.networks.register("xl", str(path), fh.networks.SdVersion.SDXL)
    assert run.prepare(p) is None
    assert run.messages[-1].startswith("DynFuse: LoRA 'xl' is for SDXL, but the loaded model is SD1")


def test_a_lora_for_another_model_without_a_base_is_named(fh, sd15_files, tmp_path):
    path = tmp_path / "misfit.safetensors"
    lora_files.write_kohya_lora(models.tiny_sdxl_unet(0), path, seed=5)
    host, run, p, _ = _host_and_p(fh, dict(sd15_files, misfit=(path, None)), style="misfit")
    assert run.prepare(p) is None
    message = run.messages[-1]
    assert "LoRA 'misfit'" in message and ("another base model" in message or "no layer" in message), message


def test_state_counts_see_our_patch_sets_and_wrappers_only_on_the_jobs_patchers(fh, sd15_files):
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", method="merge")
    fh.shared.sd_model.forge_objects_original = type(p.sd_model.forge_objects)(**vars(p.sd_model.forge_objects))
    host.before_sampling(p, run)
    counts = host.state_counts()
    assert counts["patch_sets"] == 2 and counts["unet_wrappers"] == 0 and counts["patch_sets_kept"] == 0
    host, run, p, unet = _host_and_p(fh, sd15_files, subject="subject", style="style", method="dynamic")
    host.before_sampling(p, run)
    assert host.state_counts()["unet_wrappers"] == 1
    assert [type(m).__name__ for m in host.model_roots()][:1] == [type(unet.model).__name__]
