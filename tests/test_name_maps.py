"""name_maps: kohya diffusers-style, compvis (SD1.5 and SDXL) and text-encoder keys -> the right modules."""
import pytest
import torch

from lib_dynfuse import LayerKey, load_lora
from lib_dynfuse.name_maps import (ModuleNameMap, NameMap, as_name_map, compvis_to_diffusers,
                                   diffusers_to_compvis_paths)
from tests.fixtures.lora_files import compvis_path, write_kohya_lora
from tests.fixtures.models import weight_shapes

# Facts of the ldm layout (input_blocks / middle_block / output_blocks numbering), checked by hand.
SDXL_KNOWN = {
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks_8_1_transformer_blocks_2_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.2.ff.net.2",
    "middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_in_layers_2": "up_blocks.2.resnets.2.conv1",
    "label_emb_0_0": "add_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
}
SD15_KNOWN = {
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_2_1_transformer_blocks_0_attn1_to_v": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_9_0_op": "down_blocks.2.downsamplers.0.conv",
    "input_blocks_11_0_emb_layers_1": "down_blocks.3.resnets.1.time_emb_proj",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_1_proj_out": "up_blocks.1.attentions.0.proj_out",
    "output_blocks_8_2_conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks_11_1_transformer_blocks_0_ff_net_0_proj": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
}


def _fits(module, written):
    out_dim, in_dim = written.up.shape[0], written.down.shape[1]
    return module.weight.shape[:2] == (out_dim, in_dim)


@pytest.mark.parametrize("known,fixture", [(SDXL_KNOWN, "sdxl_unet"), (SD15_KNOWN, "sd15_unet")])
def test_known_compvis_names(known, fixture, request):
    unet = request.getfixturevalue(fixture)
    names = ModuleNameMap({"unet": unet})
    assert {k: names.resolve(LayerKey("unet", k)) for k in known} == known


def test_kohya_diffusers_style_keys_resolve_onto_sd15(tmp_path, sd15_unet, sd15_text_encoder):
    written = write_kohya_lora(sd15_unet, tmp_path / "k.safetensors", include_conv=True, cp=True,
                               te_layers={"lora_te": sd15_text_encoder})
    lora = load_lora(tmp_path / "k.safetensors")
    names = ModuleNameMap({"unet": sd15_unet, "te1": sd15_text_encoder})
    by_stem = {w.stem.split("_", 2)[2]: w for w in written}
    for key in lora.layers:
        w = by_stem[key.name]
        expected = w.module if w.group == "unet" else f"te1:{w.module}"
        assert names.resolve(key) == expected
        assert _fits(names.module(expected), w)
    assert names.module("te1:text_model.encoder.layers.1.mlp.fc2") is sd15_text_encoder.text_model.encoder.layers[1].mlp.fc2


@pytest.mark.parametrize("fixture", ["sdxl_unet", "sd15_unet"])
def test_every_compvis_key_resolves_to_the_module_with_its_shape(tmp_path, fixture, request):
    unet = request.getfixturevalue(fixture)
    written = write_kohya_lora(unet, tmp_path / "c.safetensors", style="compvis", include_conv=True,
                               targets=lambda n: True)          # every Linear/Conv2d of the UNet
    lora = load_lora(tmp_path / "c.safetensors")
    names = ModuleNameMap({"unet": unet})
    assert len(lora.layers) == len(written) == len(weight_shapes(unet))
    for w in written:
        key = LayerKey("unet", w.stem[len("lora_unet_"):])
        assert names.resolve(key) == w.module, key
        assert _fits(unet.get_submodule(w.module), w)


@pytest.mark.parametrize("fixture", ["sdxl_unet", "sd15_unet"])
def test_compvis_paths_cover_every_layer_once(fixture, request):
    unet = request.getfixturevalue(fixture)
    shapes = weight_shapes(unet)
    ldm = diffusers_to_compvis_paths(unet.config, shapes)
    assert set(ldm) == set(shapes) and len(set(ldm.values())) == len(ldm)
    assert ldm == {p: compvis_path(p, unet.config) for p in shapes}   # the fixture's independent converter


def test_layout_table_follows_the_config():
    class Cfg:
        down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
        up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
        layers_per_block = 1
        mid_block_type = "UNetMidBlock2DCrossAttn"
    table = compvis_to_diffusers(Cfg)
    assert table["input_blocks.1.1"] == "down_blocks.0.attentions.0"
    assert table["input_blocks.2.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert table["input_blocks.3.0"] == "down_blocks.1.resnets.0" and "input_blocks.3.1" not in table
    assert table["output_blocks.1.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["output_blocks.2.1"] == "up_blocks.1.attentions.0" and "output_blocks.3.2.conv" not in table
    assert "label_emb.0.0" not in table


def test_text_encoder_groups(sdxl_text_encoders):
    te1, te2 = sdxl_text_encoders
    names = ModuleNameMap({"te1": te1, "te2": te2})
    assert names.resolve(LayerKey("te2", "text_model_encoder_layers_0_self_attn_q_proj")) == \
        "te2:text_model.encoder.layers.0.self_attn.q_proj"
    assert names.module("te2:text_model.encoder.layers.0.self_attn.q_proj") is te2.text_model.encoder.layers[0].self_attn.q_proj
    assert names.resolve(LayerKey("te1", "text_model_encoder_layers_9_mlp_fc1")) is None
    assert names.resolve(LayerKey("unet", "down_blocks_0_attentions_0_proj_in")) is None
    bare = ModuleNameMap({"te1": te1.text_model})       # a CLIPTextTransformer without the text_model wrapper
    assert bare.resolve(LayerKey("te1", "text_model_encoder_layers_1_mlp_fc2")) == "te1:encoder.layers.1.mlp.fc2"


def test_underscore_collisions_are_ambiguous_not_guessed():
    root = torch.nn.Module()
    root.a_b = torch.nn.Module()
    root.a_b.c = torch.nn.Linear(2, 2)
    root.a = torch.nn.Module()
    root.a.b_c = torch.nn.Linear(2, 2)
    root.d = torch.nn.Linear(2, 2)
    names = ModuleNameMap({"unet": root})
    assert names.resolve(LayerKey("unet", "a_b_c")) is None
    assert sorted(names.ambiguous[LayerKey("unet", "a_b_c")]) == ["a.b_c", "a_b.c"]
    assert names.resolve(LayerKey("unet", "d")) == "d"


def test_plain_callables_are_name_maps():
    table = {LayerKey("unet", "x"): "blocks.0"}
    name_map = as_name_map(table.get)
    assert isinstance(name_map, NameMap) and name_map.resolve(LayerKey("unet", "x")) == "blocks.0"
    assert as_name_map(None) is None
    with pytest.raises(TypeError):
        as_name_map(3)
