"""Guidance encoders: torch preprocessing, and offline weight loading of the real architectures.

Also the tiny random-weight builders the other test_guidance_* files share: an open_clip `CLIP` from a
registered tiny config (same classes as ViT-L-14 / ViT-B-32, widths scaled down), a transformers `ViTModel`
with the dino-vits16 layout at small width, and a diffusers `AutoencoderTiny` (TAESD) decoder.
"""
import functools
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lib_dynfuse.guidance import (GuidanceUnavailable, ImageEncoder, find_dino_weights, load_clip_encoder,
                                  load_dino_encoder)
from lib_dynfuse.guidance import encoders as encoders_mod
from lib_dynfuse.guidance.preprocess import center_crop, normalize, preprocess, resize_shorter_side

TINY_CLIP = "DynFuseTiny-ViT-8"
TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 24, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
TINY_DINO_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     patch_size=8, image_size=24, qkv_bias=True)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
    return module.eval()


@functools.lru_cache(maxsize=None)
def register_tiny_clip() -> str:
    """Register the tiny open_clip config once per process (open_clip 2.20 builds models by registered name)."""
    import open_clip
    # open_clip reads the config when it is added and keeps it registered after the folder is gone
    with tempfile.TemporaryDirectory(prefix="dynfuse-openclip-") as folder:
        with open(os.path.join(folder, TINY_CLIP + ".json"), "w") as f:
            json.dump(TINY_CLIP_CFG, f)
        open_clip.add_model_config(folder)
    return TINY_CLIP


def tiny_clip_model(seed=0):
    """Full open_clip CLIP (image + text towers) with random weights, as a checkpoint would hold it."""
    import open_clip
    return _randomise(open_clip.create_model(register_tiny_clip()), seed)


def tiny_dino_model(seed=0):
    """transformers ViTModel with the DINO layout (CLS token, no pooler), hidden 32, 2 layers, 24 px."""
    from transformers import ViTConfig, ViTModel
    return _randomise(ViTModel(ViTConfig(**TINY_DINO_CFG), add_pooling_layer=False), seed)


def tiny_taesd(seed=0):
    """diffusers AutoencoderTiny (TAESD) with 8 channels and 3 blocks: 4x8x8 latent -> 3x32x32 image in [-1,1]."""
    from diffusers import AutoencoderTiny
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                          num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)
    return _randomise(vae, seed).requires_grad_(False)


def save_clip(folder, seed=0, name=None):
    model = tiny_clip_model(seed)
    path = os.path.join(folder, name or f"{TINY_CLIP}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def save_dino_folder(folder, seed=0, with_pooler=False):
    model = tiny_dino_model(seed)
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if with_pooler:  # the hub checkpoints carry a pooler that DINO scoring does not use
        state["pooler.dense.weight"] = torch.zeros(32, 32)
        state["pooler.dense.bias"] = torch.zeros(32)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return model


def tiny_encoders(seed=0, dtype=torch.float32):
    """(clip, dino) ImageEncoders through the real loaders, from files written to a temp folder."""
    with tempfile.TemporaryDirectory(prefix="dynfuse-enc-") as folder:   # the loaders read the files fully
        save_clip(folder, seed)
        save_dino_folder(os.path.join(folder, "dino-vits16"), seed + 1)
        clip = load_clip_encoder(TINY_CLIP, search_dirs=[folder], hub_cache=folder, dtype=dtype)
        dino = load_dino_encoder("dino-vits16", search_dirs=[folder], hub_cache=folder, dtype=dtype)
    return clip, dino


# ---------------------------------------------------------------------------- preprocessing
def test_center_crop_takes_the_middle_window():
    x = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).view(2, 3, 6, 9)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 2:6])  # torchvision rounds (6-4)/2=1, (9-4)/2=2.5 -> 2


def test_resize_shorter_side_and_constant_image():
    x = torch.full((1, 3, 40, 80), 0.25)
    y = resize_shorter_side(x, 20)
    assert y.shape == (1, 3, 20, 40)
    torch.testing.assert_close(y, torch.full_like(y, 0.25), rtol=0, atol=1e-6)
    assert resize_shorter_side(x, 40) is x


def test_preprocess_matches_hand_pipeline():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 64, generator=g)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ref = F.interpolate(x, size=(24, 32), mode="bicubic", align_corners=False, antialias=True)[..., :, 4:28]
    ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(preprocess(x, 24, 24, mean, std), ref)
    assert torch.equal(normalize(x, mean, std)[:, 2], (x[:, 2] - 0.3) / 2.0)


def test_preprocess_passes_gradients():
    x = torch.rand(1, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: preprocess(t, 6, 5, (0.5,) * 3, (0.25,) * 3), (x,))


# ---------------------------------------------------------------------------- CLIP loading
def _clip_reference_embedding(model, images):
    x = preprocess(images, 24, 24, model.visual.image_mean, model.visual.image_std, "bicubic")
    with torch.no_grad():
        return model.encode_image(x)


def test_clip_from_models_folder_matches_open_clip(tmp_path):
    model, _ = save_clip(str(tmp_path), seed=3)
    enc = load_clip_encoder(TINY_CLIP, search_dirs=[str(tmp_path)], hub_cache=str(tmp_path / "nohub"))
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = enc(images)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, _clip_reference_embedding(model, images), rtol=0, atol=0)
    assert not any(p.requires_grad for p in enc.parameters())
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in model.visual.parameters())


def test_clip_from_explicit_folder_and_hub_cache(tmp_path, monkeypatch):
    model, _ = save_clip(str(tmp_path / "explicit"), seed=4, name="open_clip_model.safetensors")
    enc = load_clip_encoder(TINY_CLIP, weights=str(tmp_path / "explicit"), hub_cache=str(tmp_path / "nohub"))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(enc(images), _clip_reference_embedding(model, images), rtol=0, atol=0)

    hub = tmp_path / "hub"
    snap = hub / "models--someone--tiny-clip" / "snapshots" / "0123abc"
    model2, _ = save_clip(str(snap), seed=5, name="open_clip_model.safetensors")
    (hub / "models--someone--tiny-clip" / "refs").mkdir()
    (hub / "models--someone--tiny-clip" / "refs" / "main").write_text("0123abc")
    monkeypatch.setitem(encoders_mod.CLIP_HUB_REPOS, TINY_CLIP, ("someone/tiny-clip",))
    enc2 = load_clip_encoder(TINY_CLIP, hub_cache=str(hub))
    with torch.no_grad():
        torch.testing.assert_close(enc2(images), _clip_reference_embedding(model2, images), rtol=0, atol=0)


def test_clip_missing_weights_says_where(tmp_path):
    with pytest.raises(GuidanceUnavailable) as e:
        load_clip_encoder("ViT-L-14", search_dirs=[str(tmp_path / "models" / "dynfuse")], hub_cache=str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path / "models" / "dynfuse"), "ViT-L-14.safetensors") in msg
    assert "timm/vit_large_patch14_clip_224.openai" in msg and "nothing is downloaded" in msg
    with pytest.raises(GuidanceUnavailable, match="not a file"):
        load_clip_encoder("ViT-L-14", weights=str(tmp_path / "nope.safetensors"))


def test_clip_unknown_architecture_is_refused(tmp_path):
    save_clip(str(tmp_path), seed=0, name="ViT-Q-99.safetensors")
    with pytest.raises(GuidanceUnavailable, match="no architecture 'ViT-Q-99'"):
        load_clip_encoder("ViT-Q-99", search_dirs=[str(tmp_path)], hub_cache=str(tmp_path))


def test_clip_wrong_architecture_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"visual.conv1.weight": torch.zeros(4, 3, 8, 8)}, str(folder / f"{TINY_CLIP}.safetensors"))
    with pytest.raises(GuidanceUnavailable, match="does not fit CLIP"):
        load_clip_encoder(TINY_CLIP, search_dirs=[str(folder)], hub_cache=str(tmp_path))


# ---------------------------------------------------------------------------- DINO loading
def _dino_reference_embedding(model, images):
    x = preprocess(images, 24, 24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0]


def test_dino_from_models_folder_with_pooler_in_file(tmp_path):
    model = save_dino_folder(str(tmp_path / "dino-vits16"), seed=6, with_pooler=True)
    enc = load_dino_encoder(search_dirs=[str(tmp_path)], hub_cache=str(tmp_path / "nohub"))
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = enc(images)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, _dino_reference_embedding(model, images), rtol=0, atol=0)


def test_dino_from_fake_hub_cache_prefers_refs_main(tmp_path):
    root = tmp_path / "hub" / "models--facebook--dino-vits16"
    old = save_dino_folder(str(root / "snapshots" / "aaa-old"), seed=7)
    new = save_dino_folder(str(root / "snapshots" / "bbb-main"), seed=8)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("bbb-main\n")
    path, cfg = find_dino_weights(hub_cache=str(tmp_path / "hub"))
    assert path == str(root / "snapshots" / "bbb-main" / "model.safetensors")
    assert cfg == str(root / "snapshots" / "bbb-main" / "config.json")
    enc = load_dino_encoder(hub_cache=str(tmp_path / "hub"))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(enc(images), _dino_reference_embedding(new, images), rtol=0, atol=0)
        assert not torch.allclose(enc(images), _dino_reference_embedding(old, images))


def test_dino_from_bin_file_with_given_config(tmp_path):
    model = tiny_dino_model(seed=9)
    path = str(tmp_path / "weights.bin")
    torch.save({"state_dict": {"vit." + k: v for k, v in model.state_dict().items()}}, path)
    enc = load_dino_encoder(weights=path, config=TINY_DINO_CFG)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(enc(images), _dino_reference_embedding(model, images), rtol=0, atol=0)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.bin")
    torch.save({"x": _NotATensor()}, path)
    with pytest.raises(GuidanceUnavailable, match="cannot read .* as plain tensors"):
        load_dino_encoder(weights=path, config=TINY_DINO_CFG)


def test_dino_missing_weights_says_where(tmp_path):
    models_dir = str(tmp_path / "models" / "dynfuse")
    with pytest.raises(GuidanceUnavailable) as e:
        load_dino_encoder(search_dirs=[models_dir], hub_cache=str(tmp_path / "hub"), torch_hub=str(tmp_path / "th"))
    msg = str(e.value)
    assert os.path.join(models_dir, "dino-vits16", "model.safetensors") in msg
    assert os.path.join(models_dir, "dino-vits16.safetensors") in msg
    assert "facebook/dino-vits16" in msg
    assert f"dino_deitsmall16_pretrain.pth in {tmp_path / 'th'}" in msg


def hf_vit_to_original_dino(state):
    """The inverse renaming, written out by hand: what facebookresearch/dino's checkpoints look like."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for i in range(TINY_DINO_CFG["num_hidden_layers"]):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{kind}"] = state[f"{hf}layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = state[f"{hf}layernorm_after.{kind}"]
            out[f"blocks.{i}.attn.proj.{kind}"] = state[f"{hf}attention.output.dense.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = state[f"{hf}intermediate.dense.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = state[f"{hf}output.dense.{kind}"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{hf}attention.attention.{n}.{kind}"]
                                                            for n in ("query", "key", "value")])
    return out


def test_original_dino_checkpoint_from_torch_hub_cache(tmp_path):
    model = tiny_dino_model(seed=12)
    th = tmp_path / "torch" / "hub" / "checkpoints"
    th.mkdir(parents=True)
    torch.save(hf_vit_to_original_dino(model.state_dict()), str(th / "dino_deitsmall16_pretrain.pth"))
    enc = load_dino_encoder(hub_cache=str(tmp_path / "nohub"), torch_hub=str(th), config=TINY_DINO_CFG)
    images = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(enc(images), _dino_reference_embedding(model, images), rtol=0, atol=0)


def test_dinov2_is_feature_detected(tmp_path):
    import transformers
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    if hasattr(transformers, "Dinov2Model"):
        with pytest.raises(GuidanceUnavailable, match="does not fit DINO"):
            load_dino_encoder("dinov2-small", weights=str(folder))
    else:
        with pytest.raises(GuidanceUnavailable, match="transformers >= 4.31"):
            load_dino_encoder("dinov2-small", weights=str(folder))


def test_image_encoder_runs_backbone_in_its_dtype_and_returns_float32():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).to(torch.bfloat16)
    enc = ImageEncoder(backbone, 8, 8, (0.5,) * 3, (0.5,) * 3)
    out = enc(torch.rand(2, 3, 16, 16))
    assert out.dtype == torch.float32 and out.shape == (2, 5)


# ---------------------------------------------------------------------------- the hosts' store
def test_encoder_store_reuses_and_reloads(tmp_path):
    from lib_dynfuse.guidance import EncoderStore
    save_clip(str(tmp_path), seed=10)
    save_dino_folder(str(tmp_path / "dino-vits16"), seed=11)
    hub = str(tmp_path / "nohub")
    store = EncoderStore()
    with torch.inference_mode():       # Forge calls from inside inference mode: weights must stay normal tensors
        clip, dino = store.get(TINY_CLIP, search_dirs=[str(tmp_path)], hub_cache=hub)
    assert not any(p.is_inference() for p in list(clip.parameters()) + list(dino.parameters()))
    again = store.get(TINY_CLIP, search_dirs=[str(tmp_path)], hub_cache=hub)
    assert again[0] is clip and again[1] is dino
    other = store.get(TINY_CLIP, search_dirs=[str(tmp_path)], hub_cache=hub, dtype=torch.float64)
    assert other[0] is not clip and next(other[0].parameters()).dtype == torch.float64
    with pytest.raises(GuidanceUnavailable):
        store.get("ViT-B-32", search_dirs=[str(tmp_path)], hub_cache=hub)
    assert store.get(TINY_CLIP, search_dirs=[str(tmp_path)], hub_cache=hub)[0] is not other[0]


def test_importing_guidance_stays_light():
    import subprocess
    import sys
    code = ("import sys, lib_dynfuse, lib_dynfuse.guidance; "
            "print([m for m in ('open_clip', 'transformers', 'diffusers', 'timm') if m in sys.modules])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_encoder_store_names_every_missing_encoder_at_once(tmp_path):
    """No CLIP and no DINO weights: one message names both, so fixing the first does not reveal the second."""
    from lib_dynfuse.guidance import EncoderStore
    models_dir = str(tmp_path / "models" / "dynfuse")
    with pytest.raises(GuidanceUnavailable) as e:
        EncoderStore().get("RN50", dino_kind="dinov2-base", search_dirs=[models_dir], hub_cache=str(tmp_path / "hub"))
    msg = str(e.value)
    assert msg.startswith("DynFuse guidance is off: no CLIP RN50") and "and no DINO dinov2-base" in msg
    assert os.path.join(models_dir, "RN50.safetensors") in msg and os.path.join(models_dir, "dinov2-base") in msg
    save_dino_folder(str(tmp_path / "models" / "dynfuse" / "dino-vits16"), seed=11)
    with pytest.raises(GuidanceUnavailable) as e:                 # only CLIP missing: only CLIP named
        EncoderStore().get("RN50", search_dirs=[models_dir], hub_cache=str(tmp_path / "hub"))
    assert "RN50" in str(e.value) and "DINO" not in str(e.value)


def test_a_file_the_webui_refuses_to_unpickle_is_named_with_the_way_out(tmp_path, monkeypatch):
    """AUTOMATIC1111's torch.load (modules/safe.py:181-194) answers None for a file its safe unpickler refuses,
    e.g. a .bin of plain tensors saved by a recent torch: the message says so and suggests .safetensors."""
    from lib_dynfuse.guidance.weights import load_state_dict_file
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(tiny_dino_model(seed=1).state_dict(), path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    with pytest.raises(GuidanceUnavailable) as e:
        load_dino_encoder(weights=path, config=TINY_DINO_CFG)
    msg = str(e.value)
    assert f"the WebUI refused to load {path}" in msg and ".safetensors" in msg
    assert "does not hold a state dict" not in msg
