"""The correction step (paper Eq. 16-20): R against hand cosines, gradients against finite differences,
grad-mode / inference-mode hygiene, and a real-architecture denoising loop where guidance lowers R."""
import copy

import pytest
import torch

from lib_dynfuse.guidance import (LatentRefiner, ReferenceEmbeddings, apply_move, eps_to_x0, make_private_copy,
                                  paper_scorer, residual_grad_x0, residual_grad_xt, taesd_decoder, vae_decoder)
from tests.test_guidance_encoders import tiny_encoders, tiny_taesd


def tiny_unet(seed=0):
    """diffusers UNet2DConditionModel (cross-attention down/up blocks, as SD1.5) at 16/32 channels, context 16."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():  # random everywhere (diffusers zero-inits conv_out)
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def parts():
    clip, dino = tiny_encoders(0)
    decoder = vae_decoder(tiny_taesd(0))
    g = torch.Generator().manual_seed(1)
    content, style = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 40, 40, generator=g)
    return dict(clip=clip, dino=dino, decoder=decoder, content=content, style=style,
                scorer=paper_scorer(clip, dino, content, style))


@pytest.fixture(scope="module")
def parts64(parts):
    """The same encoders and decoder in float64, for finite differences."""
    clip, dino = parts["clip"].double(), parts["dino"].double()
    return dict(clip=clip, dino=dino, decoder=vae_decoder(tiny_taesd(0).double()),
                scorer=paper_scorer(clip, dino, parts["content"].double(), parts["style"].double()))


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_residual_is_one_minus_mean_of_three_cosines(parts):
    clip, dino = parts["clip"], parts["dino"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = parts["scorer"](images)
    with torch.no_grad():
        e_clip, e_dino = clip(images), dino(images)
        c_ref, s_ref, d_ref = clip(parts["content"]), clip(parts["style"]), dino(parts["style"])
    sims = [_cos(e_clip, c_ref), _cos(e_clip, s_ref), _cos(e_dino, d_ref)]
    for name, want in zip(("clip_content", "clip_style", "dino_style"), sims):
        torch.testing.assert_close(result.similarities[name].detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.residual.detach(), 1 - (sims[0] + sims[1] + sims[2]) / 3, rtol=1e-5, atol=1e-6)


def test_per_row_references_and_shared_encoder_runs_once(parts):
    calls = []
    clip = parts["clip"]
    handle = clip.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        refs = ReferenceEmbeddings.from_images(clip, parts["dino"], [parts["content"][0], parts["style"][0]],
                                               parts["style"])
        assert refs.clip_content.shape[0] == 2
        calls.clear()
        scorer = refs.scorer(clip, parts["dino"])
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            result = scorer(images)
            assert calls == [2]                       # CLIP ran once for both CLIP terms
            row1 = paper_scorer(clip, parts["dino"], parts["style"], parts["style"])(images[1:])
    finally:
        handle.remove()
    torch.testing.assert_close(result.similarities["clip_content"][1:], row1.similarities["clip_content"])
    with pytest.raises(ValueError, match="give 1 or one per row"):
        scorer(torch.rand(3, 3, 32, 32))


def assert_matches_finite_differences(f, x, grad, direction):
    """<grad, d> equals the central difference of f along d for at least one step h.

    TAESD has ReLUs: a step that crosses a kink of one of its ~10^5 units spoils that h, not the gradient.
    """
    want = float((grad * direction).sum())
    errors = []
    with torch.no_grad():
        for h in (1e-6, 1e-7, 1e-5):
            fd = float((f(x + h * direction) - f(x - h * direction)) / (2 * h))
            errors.append(abs(fd - want) / max(abs(want), 1e-12))
            if errors[-1] < 1e-6:
                return
    raise AssertionError(f"<grad, d> = {want}, relative errors of central differences {errors}")


def test_x0_gradient_matches_finite_differences(parts64):
    decoder, scorer = parts64["decoder"], parts64["scorer"]
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    result, grad = residual_grad_x0(x0, decoder, scorer, image_range=(0.0, 1.0))
    assert grad.dtype == torch.float64 and grad.shape == x0.shape

    def total_r(z):
        return scorer(decoder(z)).residual.sum()

    for _ in range(2):
        assert_matches_finite_differences(total_r, x0, grad, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    # sum over rows: each row's gradient is that row's own R's gradient
    _, grad_row1 = residual_grad_x0(x0[1:], decoder, scorer, image_range=(0.0, 1.0))
    torch.testing.assert_close(grad[1:], grad_row1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(result.residual, scorer(decoder(x0)).residual.detach())


def test_xt_gradient_through_the_unet_matches_finite_differences(parts64):
    decoder, scorer = parts64["decoder"], parts64["scorer"]
    unet = tiny_unet(0).double()
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 7, 16, generator=g, dtype=torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)

    def model_fn(x):
        return eps_to_x0(x, unet(x, 500, ctx).sample, a)

    x_t = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    result, grad, x0 = residual_grad_xt(x_t, model_fn, decoder, scorer, image_range=(0.0, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(x0, model_fn(x_t))
    assert_matches_finite_differences(lambda x: scorer(decoder(model_fn(x))).residual.sum(), x_t, grad,
                                      torch.randn(x_t.shape, generator=g, dtype=torch.float64))


def _assert_plain(t):
    assert not t.requires_grad and t.grad_fn is None and not t.is_inference()


@pytest.mark.parametrize("outer", ["grad", "no_grad", "inference"])
def test_no_graph_survives_and_grad_mode_is_restored(parts, outer):
    decoder, scorer = parts["decoder"], parts["scorer"]
    unet = tiny_unet(1)
    ctx = torch.randn(1, 7, 16)
    refiner = LatentRefiner(decoder, scorer, scale=10.0)
    contexts = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}
    with contexts[outer]():
        x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
        assert x0.is_inference() == (outer == "inference")
        info = refiner.grad_x0(x0)
        move = refiner.move(info)
        eps_out, move_t, info_t = refiner.move_xt(x0, lambda x: unet(x, 500, ctx).sample,
                                                  to_x0=lambda x, eps: eps_to_x0(x, eps, 0.5))
        move_eps, _ = refiner.move_eps(x0, x0 * 0.5, torch.tensor([0.5]))
        moved, ok = apply_move(x0, move)
        assert torch.is_grad_enabled() == (outer == "grad")
        assert torch.is_inference_mode_enabled() == (outer == "inference")
        again = moved * 1.0          # the host keeps computing with the result in its own mode
    for t in (move, move_t, move_eps, eps_out, info.grad, info_t.grad, info_t.x0, info.residual, moved):
        _assert_plain(t)
    assert again.shape == x0.shape and bool(ok.all())
    torch.testing.assert_close(move, -10.0 * info.grad)
    torch.testing.assert_close(moved, x0.clone() - 10.0 * info.grad)
    with torch.no_grad():
        torch.testing.assert_close(eps_out, unet(x0.clone(), 500, ctx).sample)   # the model call's own output
    assert not any(p.grad is not None for p in decoder.parameters())


def test_decoder_parameters_that_require_grad_get_no_grad(parts):
    vae = tiny_taesd(2).requires_grad_(True)   # diffusers modules require grad by default
    refiner = LatentRefiner(vae_decoder(vae), parts["scorer"], scale=1.0)
    refiner.grad_x0(torch.randn(1, 4, 8, 8))
    assert all(p.grad is None for p in vae.parameters())


def test_private_copy_of_inference_weights_allows_backward(parts):
    with torch.inference_mode():
        live = tiny_taesd(3)                      # Forge: weights created / moved inside inference mode
        live = live.to(torch.float32)
    live.decoder.layers[0].weight.is_inference() or pytest.skip("weights not inference tensors")
    refiner = LatentRefiner(vae_decoder(live), parts["scorer"])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        refiner.grad_x0(torch.randn(1, 4, 8, 8))
    private = make_private_copy(live)
    assert not any(t.is_inference() for t in list(private.parameters()) + list(private.buffers()))
    assert not any(p.requires_grad for p in private.parameters())
    for (n, p), (_, q) in zip(live.named_parameters(), private.named_parameters()):
        assert torch.equal(p, q), n
    with torch.inference_mode():
        x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        info = LatentRefiner(vae_decoder(private), parts["scorer"]).grad_x0(x0)
    assert float(info.grad.abs().sum()) > 0


class Overflowing(torch.nn.Module):
    """A first stage whose activations pass 65504 (the float16 maximum) before a norm, as the SDXL VAE's do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.out = torch.nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            self.conv.weight.mul_(4e4)

    def decode(self, z):
        h = torch.nn.functional.interpolate(self.conv(z), scale_factor=4, mode="nearest")
        return torch.tanh(self.out(torch.nn.functional.silu(self.norm(h))))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_decoders_are_differentiated_in_float32(parts64, half):
    """The gradient through a float16/bfloat16 VAE is taken through a float32 copy: finite, and as close to the
    float64 gradient as float32 allows (in half precision float16 overflows to NaN, bfloat16 is off by ~0.5%)."""
    first_stage = Overflowing().to(half)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12)).to(half)
    reference = vae_decoder(copy.deepcopy(first_stage).double(), 0.13025)     # the same (rounded) weights, float64
    want = LatentRefiner(reference, parts64["scorer"]).grad_x0(x0.double()).grad
    decoder = vae_decoder(first_stage, 0.13025)
    refiner = LatentRefiner(decoder, parts64["scorer"])
    assert refiner.decoder is not decoder and refiner.dtype == torch.float32
    assert first_stage.conv.weight.dtype == half                              # the host's module is left alone
    got = refiner.grad_x0(x0).grad
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and want.abs().max() > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():   # what a half-precision backward would have started from
        assert not torch.isfinite(first_stage.decode(x0 / 0.13025)).all() or half == torch.bfloat16


def test_image_range_of_plain_callables(parts):
    vae = tiny_taesd(0)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    wrapped = LatentRefiner(vae_decoder(vae), parts["scorer"]).score(x0).residual
    plain = LatentRefiner(lambda z: vae.decode(z).sample, parts["scorer"]).score(x0).residual   # default (-1, 1)
    raw01 = LatentRefiner(taesd_decoder(vae.decoder), parts["scorer"]).score(x0).residual
    torch.testing.assert_close(plain, wrapped)
    assert not torch.allclose(raw01, wrapped)     # the raw decoder gives [-1,1]: declared [0,1], scored differently


def test_active_range():
    r = LatentRefiner(lambda z: z, None, start=0.2, end=0.6)
    assert [s for s in range(10) if r.active(s, 10)] == [2, 3, 4, 5]
    full = LatentRefiner(lambda z: z, None)
    assert all(full.active(s, 7) for s in range(7))
    assert not LatentRefiner(lambda z: z, None, scale=0.0).active(0, 10)
    with pytest.raises(ValueError):
        LatentRefiner(lambda z: z, None, start=0.7, end=0.2)
    with pytest.raises(ValueError):
        LatentRefiner(lambda z: z, None, grad="x1")


# ---------------------------------------------------------------------------- a real sampling loop
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)   # SD's scaled-linear
TIMESTEPS = (999, 666, 333)


def ddim(unet, ctx, refiner=None, mode="x0", seed=5):
    """Deterministic DDIM (eta 0) on an eps UNet, Eq. 20 added to each step's x_{t-1}: the library's loop."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(TIMESTEPS):
        a = ALPHAS[t]
        a_prev = ALPHAS[TIMESTEPS[i + 1]] if i + 1 < len(TIMESTEPS) else torch.tensor(1.0)
        move = None
        if refiner is not None and mode == "xt":     # the gradient through the step's own UNet call
            eps, move, _ = refiner.move_xt(x, lambda z: unet(z, t, ctx).sample, to_x0=lambda z, e: eps_to_x0(z, e, a))
        else:
            with torch.no_grad():
                eps = unet(x, t, ctx).sample
            if refiner is not None:
                move, _ = refiner.move_eps(x, eps, a)
        x0 = eps_to_x0(x, eps, a)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if move is not None:                          # Eq. 20: x_{t-1} = x_{t-1}^ori - m grad_{x_t} R
            x, _ = apply_move(x, move)
    return x


@pytest.fixture(scope="module")
def unguided(parts):
    """UNet, context and the final R of the unguided run (same seed for every guided run)."""
    unet = tiny_unet(0)
    ctx = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(9))
    plain = LatentRefiner(parts["decoder"], parts["scorer"]).score(ddim(unet, ctx)).residual
    return unet, ctx, plain


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_guidance_lowers_the_final_residual(parts, unguided, mode):
    unet, ctx, plain = unguided
    refiner = LatentRefiner(parts["decoder"], parts["scorer"], scale=10.0, grad=mode)
    guided = refiner.score(ddim(unet, ctx, refiner, mode)).residual
    assert torch.all(guided < plain), (mode, plain.tolist(), guided.tolist())


def test_moves_of_eps_v_flow_and_k_predictions_follow_the_chain_rule(parts):
    """grad_{x_t} R = d x0-hat / d x_t * grad_{x0-hat} R with the model's prediction held fixed: 1/sqrt(a) for eps
    and v models (eps fixed), sqrt(1 + sigma^2) for k-diffusion's denoised at the same noise level, 1 for flow."""
    from lib_dynfuse.guidance import alpha_cumprod_to_sigma, x0_to_v
    refiner = LatentRefiner(parts["decoder"], parts["scorer"], scale=10.0)
    g = torch.Generator().manual_seed(10)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = torch.tensor([0.3, 0.8])
    x0 = eps_to_x0(x_t, eps, a)
    g0 = refiner.grad_x0(x0).grad
    want = -10.0 * g0 / a.sqrt().view(-1, 1, 1, 1)
    move, info = refiner.move_eps(x_t, eps, a)
    torch.testing.assert_close(move, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info.grad, g0 / a.sqrt().view(-1, 1, 1, 1), rtol=1e-5, atol=1e-7)
    move_v, _ = refiner.move_v(x_t, x0_to_v(x_t, x0, a), a)
    torch.testing.assert_close(move_v, want, rtol=1e-4, atol=1e-6)
    move_k, _ = refiner.move_x0(x0, alpha_cumprod_to_sigma(a))
    torch.testing.assert_close(move_k, want, rtol=1e-5, atol=1e-7)
    t = torch.tensor([0.9, 0.2])
    v = (x_t - x0) / t.view(-1, 1, 1, 1)
    move_f, _ = refiner.move_flow_v(x_t, v, t)
    torch.testing.assert_close(move_f, -10.0 * g0, rtol=1e-4, atol=1e-6)
