"""targets: two LoRAs -> FuseTargets on real tiny UNets; unmatched / partial / shape / text-encoder reports."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_dynfuse import LayerKey, LoraMatchError, LoraMatchWarning, LoraShapeError, load_lora, resolve_targets
from tests.fixtures.lora_files import write_kohya_lora, write_peft_lora

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def attn_only(n):
    return ".attn" in n


def ff_only(n):
    return ".ff." in n or ".attn1." in n


def test_union_of_two_loras_on_sd15(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "c.safetensors", targets=attn_only, seed=1)
    write_peft_lora(sd15_unet, tmp_path / "s.safetensors", targets=ff_only, seed=2)
    subject, style = load_lora(tmp_path / "c.safetensors"), load_lora(tmp_path / "s.safetensors", 0.5)
    result = resolve_targets(sd15_unet, subject, style)
    by_name = {t.name: t for t in result.targets}
    modules = dict(sd15_unet.named_modules())
    sub_names = {n for n in modules if attn_only(n) and isinstance(modules[n], torch.nn.Linear)}
    sty_names = {n for n in modules if ff_only(n) and isinstance(modules[n], torch.nn.Linear)}
    assert set(by_name) == sub_names | sty_names
    for name, target in by_name.items():
        key = LayerKey("unet", name.replace(".", "_"))
        assert target.module is modules[name] and target.group == "unet"
        assert (target.subject is subject.layers[key]) if name in sub_names else target.subject is None
        assert (target.style is style.layers[key]) if name in sty_names else target.style is None
        assert target.is_shared == (name in sub_names and name in sty_names)
    order = {n: i for i, n in enumerate(modules)}
    assert [t.name for t in result.targets] == sorted(by_name, key=order.get)     # model order
    assert result.reports["subject"].matched == len(sub_names) and result.reports["style"].matched == len(sty_names)
    assert result.warnings == [] and result.reports["subject"].unmatched == []


def test_compvis_and_diffusers_spellings_of_one_sdxl_lora_give_the_same_targets(tmp_path, sdxl_unet):
    for style in ("compvis", "diffusers"):
        write_kohya_lora(sdxl_unet, tmp_path / f"{style}.safetensors", style=style, include_conv=True, cp=True, seed=4)
    compvis, diffusers = load_lora(tmp_path / "compvis.safetensors"), load_lora(tmp_path / "diffusers.safetensors")
    a = resolve_targets(sdxl_unet, compvis, None).targets
    b = resolve_targets(sdxl_unet, None, diffusers).targets
    assert [t.name for t in a] == [t.name for t in b] and len(a) == len(compvis.layers)
    for ta, tb in zip(a, b):
        assert ta.module is tb.module and ta.style is None and tb.subject is None
        assert torch.equal(ta.subject.dense_weight(), tb.style.dense_weight())
        assert ta.subject.dense_weight().shape == ta.module.weight.shape


def test_sdxl_lora_on_sd15_unet_is_refused_naming_keys(tmp_path, sd15_unet, sdxl_unet):
    write_kohya_lora(sdxl_unet, tmp_path / "xl.safetensors", style="compvis")
    write_kohya_lora(sd15_unet, tmp_path / "ok.safetensors")
    xl, ok = load_lora(tmp_path / "xl.safetensors"), load_lora(tmp_path / "ok.safetensors")
    with pytest.raises(LoraShapeError, match=r"style LoRA 'xl'.*input_blocks_4_1_transformer_blocks_0_attn2_to_k"):
        resolve_targets(sd15_unet, ok, xl)
    # only the deeper SDXL transformer blocks: no name exists on SD1.5 at all
    write_kohya_lora(sdxl_unet, tmp_path / "deep.safetensors", style="compvis",
                     targets=lambda n: "transformer_blocks.1." in n)
    deep = load_lora(tmp_path / "deep.safetensors")
    with pytest.raises(LoraMatchError, match="subject LoRA 'deep' matches no layer") as err:
        resolve_targets(sd15_unet, deep, ok)
    shown = str(err.value).split("first unmatched keys: ")[1].split(", ")
    assert shown == [str(k) for k in deep.layers][:5]


def test_partial_match_is_reported(tmp_path, sd15_unet):
    path = tmp_path / "p.safetensors"
    written = write_kohya_lora(sd15_unet, path, targets=attn_only)
    tensors = load_file(str(path))
    extra = [f"lora_unet_down_blocks_9_attentions_{i}_proj_in" for i in range(7)]
    for stem in extra:
        tensors[f"{stem}.lora_down.weight"] = torch.ones(2, 8)
        tensors[f"{stem}.lora_up.weight"] = torch.ones(8, 2)
    save_file(tensors, str(path))
    with pytest.warns(LoraMatchWarning, match="7 of"):
        result = resolve_targets(sd15_unet, load_lora(path), None)
    report = result.reports["subject"]
    assert report.matched == len(written) == len(result.targets)
    assert sorted(report.unmatched) == sorted(f"unet:{s[10:]}" for s in extra)
    assert len(result.warnings) == 1 and f"7 of {len(written) + 7} layers match no module" in result.warnings[0]


def test_text_encoder_keys_skipped_without_encoder_and_targeted_with_it(tmp_path, sdxl_unet, sdxl_text_encoders):
    te1, te2 = sdxl_text_encoders
    write_kohya_lora(sdxl_unet, tmp_path / "t.safetensors", style="compvis", targets=attn_only,
                     te_layers={"lora_te1": te1, "lora_te2": te2})
    lora = load_lora(tmp_path / "t.safetensors")
    with pytest.warns(LoraMatchWarning, match="24 text-encoder layers skipped"):
        unet_only = resolve_targets(sdxl_unet, lora, None)
    assert {t.group for t in unet_only.targets} == {"unet"}
    assert len(unet_only.reports["subject"].skipped) == 24 and unet_only.reports["subject"].unmatched == []
    assert "24 text-encoder layers skipped" in unet_only.warnings[0]
    with pytest.warns(LoraMatchWarning, match="12 text-encoder layers skipped"):
        with_te1 = resolve_targets(sdxl_unet, lora, None, text_encoders=[te1])
    te_targets = [t for t in with_te1.targets if t.group == "te"]
    assert len(te_targets) == 12 and len(with_te1.reports["subject"].skipped) == 12
    assert all(t.name.startswith("te1:text_model.encoder.layers.") for t in te_targets)
    q = next(t for t in te_targets if t.name == "te1:text_model.encoder.layers.0.self_attn.q_proj")
    assert q.module is te1.text_model.encoder.layers[0].self_attn.q_proj
    both = resolve_targets(sdxl_unet, lora, None, text_encoders={"te1": te1, "te2": te2})
    assert sum(t.group == "te" for t in both.targets) == 24 and both.warnings == []


def test_text_encoder_only_lora_without_encoder_has_nothing_to_apply(tmp_path, sd15_unet, sd15_text_encoder):
    write_kohya_lora(None, tmp_path / "te.safetensors", te_layers={"lora_te": sd15_text_encoder})
    lora = load_lora(tmp_path / "te.safetensors")
    with pytest.raises(LoraMatchError, match="only text-encoder keys"):
        resolve_targets(sd15_unet, lora, None)
    assert len(resolve_targets(sd15_unet, lora, None, text_encoders=sd15_text_encoder).targets) == 12


def test_a_delta_that_does_not_fit_its_module_is_an_error(tmp_path, sd15_unet):
    path = tmp_path / "bad.safetensors"
    write_kohya_lora(sd15_unet, path, targets=attn_only)
    tensors = load_file(str(path))
    stem = "lora_unet_" + ATTN.replace(".", "_")
    tensors[f"{stem}.lora_down.weight"] = torch.ones(4, 65)          # to_q takes 64 inputs
    save_file(tensors, str(path))
    with pytest.raises(LoraShapeError, match=rf"unet:{ATTN.replace('.', '_')} -> {ATTN}: delta \(64, 65\) vs weight \(64, 64\)"):
        resolve_targets(sd15_unet, load_lora(path), None)


def test_conv_kernel_mismatch_is_an_error(tmp_path, sd15_unet):
    tensors = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 32, 1, 1),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(32, 2, 1, 1)}
    save_file(tensors, str(tmp_path / "k.safetensors"))
    with pytest.raises(LoraShapeError, match=r"delta \(32, 32, 1, 1\) vs weight \(32, 32, 3, 3\)"):
        resolve_targets(sd15_unet, load_lora(tmp_path / "k.safetensors"), None)


def test_linear_and_1x1_conv_deltas_are_reshaped_to_the_module(tmp_path, sd15_unet, sdxl_unet):
    # SD1.5 proj_in is a 1x1 Conv2d, SDXL's a Linear: a LoRA may store either form.
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, str(tmp_path / "lin.safetensors"))
    target = resolve_targets(sd15_unet, load_lora(tmp_path / "lin.safetensors"), None).targets[0]
    assert isinstance(target.module, torch.nn.Conv2d) and target.subject.down.shape == (2, 32, 1, 1)
    assert torch.equal(target.subject.dense_weight(), (up @ down)[:, :, None, None])
    stem = "lora_unet_input_blocks_4_1_proj_in"
    down, up = torch.randn(2, 64, 1, 1, generator=g), torch.randn(64, 2, 1, 1, generator=g)
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, str(tmp_path / "conv.safetensors"))
    target = resolve_targets(sdxl_unet, load_lora(tmp_path / "conv.safetensors"), None).targets[0]
    assert isinstance(target.module, torch.nn.Linear) and target.subject.up.shape == (64, 2)
    assert torch.equal(target.subject.dense_weight(), up.flatten(1) @ down.flatten(1))


def test_two_spellings_of_one_module_keep_the_first(tmp_path, sd15_unet):
    path = tmp_path / "dup.safetensors"
    write_kohya_lora(sd15_unet, path, targets=[ATTN])
    tensors = load_file(str(path))
    for k in list(tensors):
        tensors[k.replace("down_blocks_1_attentions_0", "input_blocks_4_1")] = tensors[k] * 2
    save_file(tensors, str(path))
    with pytest.warns(LoraMatchWarning, match="already matched"):
        result = resolve_targets(sd15_unet, load_lora(path), None)
    assert len(result.targets) == 1 and result.reports["subject"].duplicates
    assert "already matched" in result.warnings[0]


def test_all_zero_lora_is_valid(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "z.safetensors", zero=True)
    result = resolve_targets(sd15_unet, load_lora(tmp_path / "z.safetensors"), None)
    assert result.targets and all(not t.subject.dense_weight().any() for t in result.targets)


def test_host_name_maps(tmp_path, sd15_unet):
    write_kohya_lora(sd15_unet, tmp_path / "c.safetensors", targets=[ATTN, "conv_in"])
    lora = load_lora(tmp_path / "c.safetensors")
    host_names = {LayerKey("unet", ATTN.replace(".", "_")): "diffusion_model.x"}
    marker = torch.nn.Linear(64, 64)

    class HostMap:                     # host-style: its own names and its own module lookup
        def resolve(self, key):
            return host_names.get(key)

        def module(self, name):
            return marker

    with pytest.warns(LoraMatchWarning, match="1 of 2 layers match no module"):
        result = resolve_targets(sd15_unet, lora, None, name_map=HostMap())
    assert [(t.name, t.module) for t in result.targets] == [("diffusion_model.x", marker)]
    assert result.reports["subject"].unmatched == ["unet:conv_in"]
    conv_in_only = lambda key: "conv_in" if key.name == "conv_in" else None   # noqa: E731
    with pytest.warns(LoraMatchWarning, match="1 of 2 layers match no module"):
        plain = resolve_targets(sd15_unet, lora, None, name_map=conv_in_only)
    assert [(t.name, t.module) for t in plain.targets] == [("conv_in", sd15_unet.conv_in)]   # model.get_submodule
    assert plain.reports["subject"].unmatched == [f"unet:{ATTN.replace('.', '_')}"]


def test_lora_with_only_unsupported_layers_has_nothing_to_apply(tmp_path, sd15_unet):
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 32, 1, 1), f"{stem}.lora_up.weight": torch.ones(32, 2, 1, 1),
               f"{stem}.dora_scale": torch.ones(32, 1, 1, 1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoraMatchError, match="nothing to apply.*DoRA"):
        resolve_targets(sd15_unet, load_lora(tmp_path / "dora.safetensors"), None)
