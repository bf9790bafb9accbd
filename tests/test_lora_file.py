"""lora_file: every key format parses to the hand-built LayerDelta; pickles are refused, never unpickled."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_dynfuse import LayerDelta, LayerKey, LoraFile, LoraFormatError, load_lora
from lib_dynfuse.lora_file import layer_key
from tests.fixtures.lora_files import write_kohya_lora, write_peft_lora, write_pickle_lora


def reference(written, weight):
    """Hand-built LayerDelta per written layer: same tensors, scale = alpha / rank * weight."""
    return {LayerKey(w.group, w.module.replace(".", "_")):
            LayerDelta(down=w.down, up=w.up, mid=w.mid, scale=w.scale * weight) for w in written}


def assert_same_layers(lora, expected):
    assert set(lora.layers) == set(expected)
    for key, ref in expected.items():
        got = lora.layers[key]
        assert torch.equal(got.down, ref.down) and torch.equal(got.up, ref.up), key
        assert (got.mid is None) == (ref.mid is None) and (got.mid is None or torch.equal(got.mid, ref.mid)), key
        assert got.scale == ref.scale, key
        assert got.dense is None and got.out_slice is None


def test_kohya_diffusers_names_with_locon_and_cp(tmp_path, sd15_unet, sd15_text_encoder):
    path = tmp_path / "subject.safetensors"
    written = write_kohya_lora(sd15_unet, path, rank=4, alpha=2.0, include_conv=True, cp=True, seed=3,
                               te_layers={"lora_te": sd15_text_encoder})
    lora = load_lora(path, weight=0.75)
    expected = reference(written, 0.75)
    assert_same_layers(lora, expected)
    assert lora.layers[LayerKey("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")].scale == 2.0 / 4 * 0.75
    assert any(d.mid is not None for d in lora.layers.values())                       # CP layers present
    assert lora.groups() == {"unet": sum(w.group == "unet" for w in written), "te1": 12}
    assert lora.name == "subject" and lora.weight == 0.75 and lora.unsupported == {}


def test_kohya_locon_without_cp_keeps_full_kernel(tmp_path, sd15_unet):
    written = write_kohya_lora(sd15_unet, tmp_path / "l.safetensors", include_conv=True, cp=False)
    lora = load_lora(tmp_path / "l.safetensors")
    conv = lora.layers[LayerKey("unet", "down_blocks_0_resnets_0_conv1")]
    assert conv.mid is None and conv.down.shape == (4, 32, 3, 3) and conv.up.shape == (32, 4, 1, 1)
    assert_same_layers(lora, reference(written, 1.0))


def test_kohya_compvis_sdxl_with_both_text_encoders(tmp_path, sdxl_unet, sdxl_text_encoders):
    te1, te2 = sdxl_text_encoders
    written = write_kohya_lora(sdxl_unet, tmp_path / "x.safetensors", rank=2, alpha=1.0, style="compvis",
                               te_layers={"lora_te1": te1, "lora_te2": te2})
    lora = load_lora(tmp_path / "x.safetensors", weight=1.5)
    expected = {}
    for w in written:
        stem_name = w.stem.split("_", 2)[2]          # lora_unet_<name> / lora_te1_<name>
        expected[LayerKey(w.group, stem_name)] = LayerDelta(down=w.down, up=w.up, scale=1.0 / 2 * 1.5)
    assert_same_layers(lora, expected)
    assert LayerKey("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_q") in lora.layers
    assert LayerKey("te2", "text_model_encoder_layers_1_self_attn_out_proj") in lora.layers
    assert lora.base_model == "sdxl"                 # te2 keys, no metadata


@pytest.mark.parametrize("suffixes", [("lora_down", "lora_up"), ("lora_A", "lora_B")])
def test_kohya_suffix_spellings(tmp_path, sd15_unet, suffixes):
    written = write_kohya_lora(sd15_unet, tmp_path / "k.safetensors", alpha=8.0, suffixes=suffixes)
    assert_same_layers(load_lora(tmp_path / "k.safetensors", 0.5), reference(written, 0.5))


def test_absent_alpha_means_scale_one(tmp_path, sd15_unet):
    written = write_kohya_lora(sd15_unet, tmp_path / "k.safetensors", write_alpha=False)
    lora = load_lora(tmp_path / "k.safetensors", 0.3)
    assert {d.scale for d in lora.layers.values()} == {0.3}
    assert_same_layers(lora, reference(written, 0.3))


@pytest.mark.parametrize("prefix,form", [("unet", "lora_A"), ("", "lora_A"), ("unet", "lora.down"),
                                         ("unet", "lora_linear_layer"), ("", "processor"), ("unet", "processor")])
def test_peft_and_diffusers_spellings_match_kohya(tmp_path, sdxl_unet, sdxl_text_encoders, prefix, form):
    te1, te2 = sdxl_text_encoders
    written = write_peft_lora(sdxl_unet, tmp_path / "p.safetensors", prefix=prefix, form=form, seed=5,
                              te_layers={"text_encoder": te1, "text_encoder_2": te2})
    lora = load_lora(tmp_path / "p.safetensors", 2.0)
    assert_same_layers(lora, reference(written, 2.0))
    if form == "processor":
        assert LayerKey("unet", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0") in lora.layers


def test_peft_alpha_key_sets_scale(tmp_path, sd15_unet):
    written = write_peft_lora(sd15_unet, tmp_path / "p.safetensors", rank=4, alpha=1.0)
    lora = load_lora(tmp_path / "p.safetensors")
    assert {d.scale for d in lora.layers.values()} == {0.25}
    assert_same_layers(lora, reference(written, 1.0))


def test_same_lora_in_kohya_and_peft_spelling_is_the_same(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "k.safetensors", seed=9)
    write_peft_lora(sd15_unet, tmp_path / "p.safetensors", seed=9, alpha=4.0)
    k, p = load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "p.safetensors")
    assert set(k.layers) == set(p.layers)
    for key in k.layers:
        assert torch.equal(k.layers[key].dense_weight(), p.layers[key].dense_weight())


def test_layer_key_normalisation():
    assert layer_key("lora_te_text_model_encoder_layers_0_mlp_fc1") == ("te1", "text_model_encoder_layers_0_mlp_fc1")
    assert layer_key("lora_te2_text_model_encoder_layers_0_mlp_fc1").group == "te2"
    assert layer_key("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj") == \
        ("te2", "text_model_encoder_layers_3_self_attn_k_proj")
    assert layer_key("base_model.model.down_blocks.0.attentions.1.proj_in") == ("unet", "down_blocks_0_attentions_1_proj_in")
    assert layer_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out") == \
        ("unet", "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0")
    assert layer_key("diffusion_model.input_blocks.4.1.proj_in") == ("unet", "input_blocks_4_1_proj_in")
    assert layer_key("unet.unet.conv_in") == ("unet", "conv_in")


def test_dense_weight_of_locon_and_cp_matches_loop_reference(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "cp.safetensors", include_conv=True, cp=True, alpha=3.0, seed=1)
    write_kohya_lora(sd15_unet, tmp_path / "locon.safetensors", include_conv=True, alpha=3.0, seed=1)
    cp = load_lora(tmp_path / "cp.safetensors", 0.5).layers[LayerKey("unet", "up_blocks_1_resnets_2_conv2")]
    locon = load_lora(tmp_path / "locon.safetensors", 0.5).layers[LayerKey("unet", "up_blocks_1_resnets_2_conv2")]
    assert cp.mid is not None and locon.mid is None and cp.scale == locon.scale == 3.0 / 4 * 0.5
    # CP: dW[o, i, h, w] = sum_a sum_b up[o, a] mid[a, b, h, w] down[b, i], one rank pair at a time
    up, mid, down = cp.up[:, :, 0, 0], cp.mid, cp.down[:, :, 0, 0]
    ref = torch.zeros(up.shape[0], down.shape[1], *mid.shape[2:])
    for a in range(mid.shape[0]):
        for b in range(mid.shape[1]):
            ref += up[:, a, None, None, None] * down[b][None, :, None, None] * mid[a, b][None, None]
    torch.testing.assert_close(cp.dense_weight(), ref * cp.scale, rtol=1e-5, atol=1e-7)
    # LoCon: dW[o, i, h, w] = sum_a up[o, a] down[a, i, h, w]
    ref = sum(locon.up[:, a, 0, 0][:, None, None, None] * locon.down[a][None] for a in range(locon.rank))
    torch.testing.assert_close(locon.dense_weight(), ref * locon.scale, rtol=1e-5, atol=1e-7)


def test_sha256_and_shorthash_match_hashlib(tmp_path, sd15_unet):
    path = tmp_path / "h.safetensors"
    write_kohya_lora(sd15_unet, path)
    lora = load_lora(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lora.sha256 == digest and lora.shorthash == digest[:12]


def test_metadata_and_base_model_guess(tmp_path, sd15_unet):
    cases = [({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"), ({"ss_v2": "True"}, "sd2"),
             ({"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "sd15"),
             ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"), ({}, "unknown")]
    for i, (meta, base) in enumerate(cases):
        path = tmp_path / f"m{i}.safetensors"
        write_kohya_lora(sd15_unet, path, metadata=meta)
        lora = load_lora(path)
        assert lora.base_model == base, meta
        assert all(lora.metadata[k] == v for k, v in meta.items())
        assert lora.metadata["ss_network_module"] == "networks.lora"


def test_base_model_from_context_width(tmp_path):
    tensors = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(2, 768),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(640, 2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert load_lora(tmp_path / "w.safetensors").base_model == "sd15"


def test_two_spellings_of_one_layer_in_one_file_keep_the_first(tmp_path):
    kohya = "lora_unet_conv_in"
    tensors = {f"{kohya}.lora_down.weight": torch.ones(2, 4, 3, 3), f"{kohya}.lora_up.weight": torch.ones(32, 2, 1, 1),
               "unet.conv_in.lora_A.weight": torch.zeros(3, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 3, 1, 1)}
    save_file(tensors, str(tmp_path / "two.safetensors"))
    lora = load_lora(tmp_path / "two.safetensors")
    first = sorted(["lora_unet_conv_in", "unet.conv_in"])[0]
    assert lora.layers[LayerKey("unet", "conv_in")].rank == (2 if first == kohya else 3)
    assert lora.duplicates == [sorted(["lora_unet_conv_in", "unet.conv_in"])[1]]


def test_with_weight_is_absolute_and_shares_tensors(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "w.safetensors", alpha=2.0)
    lora = load_lora(tmp_path / "w.safetensors", 0.5)
    again = lora.with_weight(0.0).with_weight(3.0)
    key = next(iter(lora.layers))
    assert again.weight == 3.0 and again.layers[key].scale == 2.0 / 4 * 3.0
    assert again.layers[key].down is lora.layers[key].down
    assert lora.layers[key].scale == 2.0 / 4 * 0.5 and again.sha256 == lora.sha256
    assert all(d.scale == 0.0 for d in lora.with_weight(0.0).layers.values())


def test_dora_and_lycoris_layers_are_recorded_unsupported(tmp_path, sd15_unet):
    path = tmp_path / "d.safetensors"
    write_kohya_lora(sd15_unet, path)
    tensors = load_file(str(path))
    dora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors[f"{dora}.dora_scale"] = torch.ones(1, 32)
    peft_dora = "unet.down_blocks.3.resnets.0.conv1"
    tensors[f"{peft_dora}.lora_A.weight"] = torch.ones(2, 64, 3, 3)
    tensors[f"{peft_dora}.lora_B.weight"] = torch.ones(64, 2, 1, 1)
    tensors[f"{peft_dora}.lora_magnitude_vector"] = torch.ones(64)
    loha = "lora_unet_up_blocks_3_attentions_2_proj_out"
    for k in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors.pop(f"{loha}.{k}")
    for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"):
        tensors[f"{loha}.{k}"] = torch.ones(2, 2)
    save_file(tensors, str(path))
    lora = load_lora(path)
    assert "DoRA" in lora.unsupported[LayerKey("unet", dora[10:])]
    assert "LoHa" in lora.unsupported[LayerKey("unet", loha[10:])]
    assert "DoRA" in lora.unsupported[LayerKey("unet", "down_blocks_3_resnets_0_conv1")]
    assert LayerKey("unet", dora[10:]) not in lora.layers and LayerKey("unet", loha[10:]) not in lora.layers
    assert len(lora.layers) == len({k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_")}) - 2


def test_pickles_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "was_unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    import pickle
    raw = pickle.dumps({"lora_unet_conv_in.lora_down.weight": Payload()}, protocol=2)
    for name in ("evil.safetensors", "evil.pt", "evil.ckpt", "evil.bin"):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(LoraFormatError, match="refused"):
            load_lora(tmp_path / name)
    write_pickle_lora(tmp_path / "zip.pt")
    os.replace(tmp_path / "zip.pt", tmp_path / "zip.safetensors")
    with pytest.raises(LoraFormatError, match="pickle .*refused"):
        load_lora(tmp_path / "zip.safetensors")
    write_pickle_lora(tmp_path / "plain.pt", zipped=False)
    with pytest.raises(LoraFormatError, match=r"\.pt/\.ckpt/\.bin\) are refused"):
        load_lora(tmp_path / "plain.pt")
    assert not marker.exists()


def test_not_safetensors_and_missing_and_empty(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraFormatError, match="not found"):
        load_lora(tmp_path / "absent.safetensors")
    save_file({"model.weight": torch.ones(2)}, str(tmp_path / "nolora.safetensors"))
    lora = load_lora(tmp_path / "nolora.safetensors")      # a stray key is recorded, not parsed
    assert lora.layers == {} and len(lora.unsupported) == 1
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoraFormatError, match="no LoRA keys"):
        load_lora(tmp_path / "empty.safetensors")


def test_fp16_tensors_keep_their_dtype(tmp_path, sd15_unet):
    written = write_kohya_lora(sd15_unet, tmp_path / "h.safetensors", dtype=torch.float16, alpha=2.0)
    lora = load_lora(tmp_path / "h.safetensors")
    assert {d.down.dtype for d in lora.layers.values()} == {torch.float16}
    assert_same_layers(lora, reference(written, 1.0))


def test_lorafile_built_by_a_host_at_a_weight(tmp_path):
    delta = LayerDelta(down=torch.ones(1, 2), up=torch.ones(3, 1), scale=0.5)
    lora = LoraFile(name="h", path="", sha256="0" * 64, metadata={}, layers={LayerKey("unet", "a"): delta}, weight=0.5)
    assert lora.with_weight(2.0).layers[LayerKey("unet", "a")].scale == 2.0


def test_header_length_bytes_that_look_like_pickle_opcodes_still_load(tmp_path):
    # the u64 header length may start with 0x80 (pickle's PROTO opcode): only the structure decides
    tensors = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1)}
    path = tmp_path / "h80.safetensors"
    for pad in range(256):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_lora(path).layers[LayerKey("unet", "conv_in")].rank == 2


def test_truncated_file_is_a_clear_error(tmp_path, sd15_unet):
    path = tmp_path / "t.safetensors"
    write_kohya_lora(sd15_unet, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFormatError, match="not a readable safetensors file"):
        load_lora(path)
