"""FLUX on Forge (stand-ins): diffusers-named FLUX LoRAs land in output slices of the fused BFL layers.

Forge maps `transformer.transformer_blocks.N.attn.to_q/k/v` to slices `(0, offset, hidden)` of
`double_blocks.N.img_attn.qkv` and `single_transformer_blocks.N.attn.to_q/k/v`, `.proj_mlp` to slices of
`single_blocks.N.linear1` (comfy utils.py:407-466). Checked: each slice's delta reaches only its channels
(exact against hand references), slices of one layer join into one exact delta, and dynamic / K-LoRA fusion
run through the per-call wrapper at CFG 1 (cond rows only, FLUX's usual setting).
"""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.flux import block_of, join_slices
from lib_dynfuse.hosts import common, forge
from lib_dynfuse.layer_delta import LayerDelta
from tests.test_forge_adapter import _hook_counts, fh  # noqa: F401  (the stand-ins fixture)

H = 16  # TinyFlux hidden size


def _lora(path, layers, rank=2, seed=0, zero=False):
    """Write a diffusers-named FLUX LoRA {stem: out_features}; returns {stem: (down, up)} as written."""
    g = torch.Generator().manual_seed(seed)
    tensors, written = {}, {}
    for stem, out_f in layers.items():
        down = torch.randn(rank, H, generator=g) / H ** 0.5
        up = torch.zeros(out_f, rank) if zero else torch.randn(out_f, rank, generator=g) / rank ** 0.5
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down, up
        written[stem] = (down, up)
    save_file(tensors, str(path))
    return written


QKV = {f"transformer.transformer_blocks.0.attn.to_{n}": H for n in "qkv"}
SINGLE = {**{f"transformer.single_transformer_blocks.1.attn.to_{n}": H for n in "qkv"},
          "transformer.single_transformer_blocks.1.proj_mlp": 4 * H}


def test_join_slices_is_the_sum_of_its_parts():
    g = torch.Generator().manual_seed(0)
    parts = [LayerDelta(down=torch.randn(2, 5, generator=g), up=torch.randn(3, 2, generator=g), scale=0.5, out_slice=(3, 3)),
             LayerDelta(down=torch.randn(1, 5, generator=g), up=torch.randn(4, 1, generator=g), scale=2.0, out_slice=(8, 4))]
    joined = join_slices(parts, out_channels=12)
    ref = torch.zeros(12, 5)
    for d in parts:
        ref[d.out_slice[0]:sum(d.out_slice)] += d.up @ d.down * d.scale
    assert joined.out_slice == (3, 9) and joined.rank == 3
    torch.testing.assert_close(joined.dense_weight(), ref[3:12], rtol=0, atol=1e-6)
    assert block_of("double_blocks.3.img_attn.qkv") == "double_blocks.3" and block_of("img_in") is None


def test_slice_deltas_land_only_in_their_output_channels(fh, tmp_path):
    unet = fh.world.flux_unet_patcher()
    written = _lora(tmp_path / "k_only.safetensors", {"transformer.transformer_blocks.0.attn.to_k": H,
                                                       "transformer.single_transformer_blocks.0.proj_mlp": 4 * H})
    lora = forge.parse_lora(fh.api, "k", fh.api.load_state_dict(str(tmp_path / "k_only.safetensors")), unet.model, None)
    qkv, lin1 = lora.layers["double_blocks.0.img_attn.qkv"], lora.layers["single_blocks.0.linear1"]
    assert qkv.delta.out_slice == (H, H) and lin1.delta.out_slice == (3 * H, 4 * H)
    assert not isinstance(qkv.module, torch.nn.Linear)
    # hand reference: dW in rows [H, 2H) of qkv, rows [3H, 7H) of linear1; Forge's merge (tuple offsets) agrees
    for layer, stem, (lo, hi) in ((qkv, "transformer.transformer_blocks.0.attn.to_k", (H, 2 * H)),
                                  (lin1, "transformer.single_transformer_blocks.0.proj_mlp", (3 * H, 7 * H))):
        down, up = written[stem]
        full = torch.zeros_like(layer.module.weight)
        full[lo:hi] = up @ down
        merged = fh.lora.merge_lora_to_weight([[1.0, ("lora", (up, down, None, None, None)), 1.0, (0, lo, hi - lo), None]],
                                              torch.zeros_like(layer.module.weight))
        torch.testing.assert_close(merged, full, rtol=0, atol=0)
        x = torch.randn(2, 5, H)
        with _only(layer):
            y = layer.module(x)
        base = layer.module(x)
        assert torch.equal(y[..., :lo], base[..., :lo]) and torch.equal(y[..., hi:], base[..., hi:])
        assert torch.equal(y[..., lo:hi], base[..., lo:hi] + F.linear(F.linear(x, down), up))


def _only(layer):
    from lib_dynfuse.layer_delta import FuseTarget
    from lib_dynfuse.session import FuseSession
    return FuseSession([FuseTarget(name="t", module=layer.module, subject=layer.delta)])


def test_fused_qkv_and_mlp_slices_join_into_one_exact_delta(fh, tmp_path):
    unet = fh.world.flux_unet_patcher()
    written = _lora(tmp_path / "all.safetensors", {**QKV, **SINGLE}, seed=4)
    lora = forge.parse_lora(fh.api, "all", fh.api.load_state_dict(str(tmp_path / "all.safetensors")), unet.model, None)
    lin1 = lora.layers["single_blocks.1.linear1"]
    assert lin1.delta.out_slice is None and lin1.delta.rank == 8   # q, k, v, mlp cover all 7H outputs
    ref = torch.cat([written[s][1] @ written[s][0] for s in SINGLE])
    torch.testing.assert_close(lin1.delta.dense_weight(), ref, rtol=0, atol=1e-6)
    qkv = lora.layers["double_blocks.0.img_attn.qkv"].delta
    torch.testing.assert_close(qkv.dense_weight(), torch.cat([written[s][1] @ written[s][0] for s in QKV]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["dynamic", "klora"])
def test_flux_fusion_through_the_wrapper_at_cfg_1(fh, tmp_path, method):
    _lora(tmp_path / "subject.safetensors", {**QKV, **SINGLE}, seed=1)
    _lora(tmp_path / "style.safetensors", {**QKV, "transformer.transformer_blocks.1.attn.to_out.0": H}, seed=2)
    for name in ("subject", "style"):
        fh.networks.register(name, str(tmp_path / f"{name}.safetensors"))
    unet = fh.world.flux_unet_patcher()
    p = fh.world.make_p(unet, None, steps=2)
    p.sd_model = type("Flux", (), {"forge_objects": p.sd_model.forge_objects})()
    fh.shared.sd_model = p.sd_model
    host = forge.ForgeHost(fh.api)
    assert host.model_base() == "flux"
    run = common.FuseRun(host, ui_args=FuseArgs(enabled=True, subject="subject", style="style", method=method))
    hooks = host.before_sampling(p, run)
    names = [t.name for t in run.prepare(p)]
    assert "double_blocks.0.img_attn.qkv" in names and "single_blocks.1.linear1" in names
    x, ctx = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 8)
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    plain = unet.model.apply_model(x, torch.full((1,), 500.0), c_crossattn=ctx)
    outs = []
    for _ in range(2):
        cond, _ = fh.sampling.calc_cond_uncond_batch(unet.model, ctx, None, x, torch.full((1,), 500.0),
                                                     p.sd_model.forge_objects.unet.model_options)
        p.sampler.model_wrap_cfg.step += 1
        outs.append(cond)
        assert _hook_counts(unet.model) == 0
    assert hooks.calls == 2
    rec = hooks.session.record
    assert rec.layer_names == ["double_blocks.0.img_attn.qkv"]          # the one layer both LoRAs touch
    assert not torch.isnan(rec.cond).any() and torch.isnan(rec.uncond).all()
    assert not torch.equal(outs[0], plain)
    assert all(torch.equal(v, before[k]) for k, v in unet.model.state_dict().items())
    assert torch.equal(unet.model.apply_model(x, torch.full((1,), 500.0), c_crossattn=ctx), plain)
