"""Forge renames a LoRA it fails to load to `<file>.corrupted` (modules_forge/patch_basic.py:27-57), so the Forge
adapter refuses a broken file by a header read before Forge's loader ever sees it."""
import os

import pytest
import torch
from safetensors.torch import save_file

from lib_dynfuse.hosts.forge import check_lora_file
from lib_dynfuse.lora_file import LoraFormatError


def _good(path):
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 2)},
              str(path))


def test_a_whole_safetensors_file_passes(tmp_path):
    _good(tmp_path / "ok.safetensors")
    check_lora_file(str(tmp_path / "ok.safetensors"))


def test_a_truncated_file_with_a_valid_header_is_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    _good(path)
    data = path.read_bytes()
    path.write_bytes(data[:-16])                  # the header still says where the tensors end
    with pytest.raises(Exception):
        check_lora_file(str(path))
    assert path.exists()


@pytest.mark.parametrize("content", [b"\xff" * 64, b"PK\x03\x04" + b"\x00" * 60, b"\x80\x02}q\x00."])
def test_garbage_and_pickles_are_refused_without_loading(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraFormatError):
        check_lora_file(str(path))
    assert os.path.exists(path)
