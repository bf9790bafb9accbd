"""Real-size random-weight models for the benchmarks: SD1.5 / SDXL UNets, TAESD, the SD VAE, CLIP and DINO towers.

Every model is a real architecture (diffusers, open_clip, transformers) at its real widths, built on the meta
device and then filled from a seeded generator: no pretrained weights exist on the benchmark machines, and
filling is much faster than the libraries' own initialisers at 0.9B (SD1.5) / 2.6B (SDXL) parameters. Costs
(FLOPs, memory) depend on the shapes only, never on the values, so random weights measure what real ones would.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False,
)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, norm_num_groups=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

UNET_CONFIGS: Dict[str, Dict] = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}

# diffusers' AutoencoderKL with the SD1.x/SDXL first-stage layout (kl-f8, 4 latent channels).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)


POOL = (1 << 22) + 7919  # seeded normals re-used at shifting offsets: a copy, not an RNG call, per element


def pool_fill_(t: torch.Tensor, pool: torch.Tensor, std: float, salt: int) -> None:
    """Fill t with std * slices of `pool` taken at pseudo-random offsets (fast for 10^9 elements)."""
    flat = t.view(-1)
    n, half, i, k = flat.numel(), pool.numel() // 2, 0, salt
    while i < n:
        k = (k * 1103515245 + 12345) % (1 << 31)
        off = k % half
        m = min(n - i, pool.numel() - off)
        torch.mul(pool[off:off + m], std, out=flat[i:i + m])
        i += m


def seeded_fill(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from one seeded pool: fan-in scaled normals for weights, 1 for norm gains,
    small normals for biases (a zero layer would hide a wrong hook or delta)."""
    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for salt, (name, p) in enumerate(model.named_parameters()):
            if p.dim() > 1:
                pool_fill_(p, pool, p[0].numel() ** -0.5, salt)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                pool_fill_(p, pool, 0.02, salt)
    return model


def on_meta_then_filled(build: Callable[[], torch.nn.Module], seed: int, device="cpu",
                        dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Construct on the meta device (no initialiser runs), allocate on `device`, fill from `seed`."""
    with torch.device("meta"):
        model = build()
    buffers = {n: b for n, b in model.named_buffers()}
    model = model.to_empty(device="cpu")
    if buffers:  # real buffers (position ids ...) are deterministic: rebuild them on the CPU
        with torch.device("cpu"):
            fresh = dict(build().named_buffers())
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(fresh[n])
    seeded_fill(model, seed)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unet(kind: str = "sd15", seed: int = 0, device="cpu", dtype=torch.float32, tiny: bool = False):
    """A diffusers UNet2DConditionModel with the real SD1.5 or SDXL layout and widths, random weights
    (tiny: the test fixtures' scaled-down widths, for code checks of the benchmark itself)."""
    from diffusers import UNet2DConditionModel
    if tiny:
        from tests.fixtures import models as fixtures
        config = {"sd15": fixtures.sd15_unet_config, "sdxl": fixtures.sdxl_unet_config}[kind]()
    else:
        config = UNET_CONFIGS[kind]
    return on_meta_then_filled(lambda: UNet2DConditionModel(**config), seed, device, dtype)


def unet_inputs(model, latent: int, batch: int = 2, seed: int = 0, tokens: int = 77, device="cpu",
                dtype=torch.float32) -> Dict:
    """Keyword arguments of one UNet call: [batch, 4, latent, latent] (cond + uncond rows), context, SDXL extras."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kw = dict(sample=torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
              timestep=torch.tensor(500),
              encoder_hidden_states=torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = float(latent * 8)
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=g),
                                       time_ids=torch.tensor([[side, side, 0.0, 0.0, side, side]]).repeat(batch, 1))
    return _to(kw, device, dtype)


def _to(value, device, dtype):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() and value.dim() else value.dtype)
    return value


def taesd(seed: int = 1, device="cpu", dtype=torch.float32):
    """diffusers AutoencoderTiny with its default (TAESD for SD1.x) layout, random weights."""
    from diffusers import AutoencoderTiny
    return on_meta_then_filled(lambda: AutoencoderTiny(), seed, device, dtype)


def sd_vae(seed: int = 2, device="cpu", dtype=torch.float32):
    """diffusers AutoencoderKL with the SD first-stage layout (kl-f8), random weights."""
    from diffusers import AutoencoderKL
    return on_meta_then_filled(lambda: AutoencoderKL(**SD_VAE), seed, device, dtype)


def clip_image_encoder(arch: str = "ViT-B-32", seed: int = 3, device="cpu", dtype=torch.float32):
    """open_clip's image tower for `arch` wrapped like lib_dynfuse.guidance.load_clip_encoder does."""
    import open_clip
    from lib_dynfuse.guidance import ImageEncoder, identity_head
    from lib_dynfuse.guidance.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    build = lambda: open_clip.create_model(arch, pretrained=None, device=torch.device("meta")).visual  # noqa: E731
    visual = on_meta_then_filled(build, seed, device, dtype)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return ImageEncoder(visual, size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", identity_head,
                        name=f"clip:{arch}")


def dino_image_encoder(kind: str = "dino-vits16", seed: int = 4, device="cpu", dtype=torch.float32):
    """transformers ViTModel with the DINO ViT-S/16 config wrapped like load_dino_encoder does (CLS token)."""
    from transformers import ViTConfig, ViTModel
    from lib_dynfuse.guidance import ImageEncoder, cls_token_head
    from lib_dynfuse.guidance.encoders import DINO_KINDS
    from lib_dynfuse.guidance.preprocess import IMAGENET_MEAN, IMAGENET_STD

    spec = DINO_KINDS[kind]
    model = on_meta_then_filled(lambda: ViTModel(ViTConfig(**spec["config"]), add_pooling_layer=False),
                                seed, device, dtype)
    size = int(model.config.image_size)
    return ImageEncoder(model, size, size, IMAGENET_MEAN, IMAGENET_STD, spec["mode"], cls_token_head,
                        name=f"dino:{kind}")
