"""Latent decoders for scoring: diffusers AutoencoderKL / AutoencoderTiny, ldm-style first stages, raw TAESD."""
import pytest
import torch

from lib_dynfuse.guidance import LatentDecoder, make_private_copy, taesd_decoder, vae_decoder
from tests.test_guidance_encoders import tiny_taesd


def tiny_autoencoder_kl(seed=0):
    """diffusers AutoencoderKL (the SD VAE class) at 8/16 channels: 4x8x8 latent -> 3x16x16 image."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, scaling_factor=0.13025)
    return vae.eval().requires_grad_(False)


class LdmFirstStage(torch.nn.Module):
    """Shape of an ldm/sgm/Forge first stage: decode(z) -> image in [-1,1], no diffusers config."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)
        self.seen = []

    def decode(self, z):
        self.seen.append(z)
        return torch.tanh(self.conv(z))


def test_diffusers_vae_uses_its_scaling_factor_and_maps_to_unit_range():
    vae = tiny_autoencoder_kl()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = vae_decoder(vae)(z)
        want = (vae.decode(z / 0.13025).sample + 1) / 2
    assert got.shape == (2, 3, 16, 16)
    assert torch.equal(got, want)


def test_autoencoder_tiny_is_decoded_unscaled():
    vae = tiny_taesd(0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae_decoder(vae)(z), (vae.decode(z).sample + 1) / 2)
        # the raw decoder network maps latents to [0,1] before AutoencoderTiny rescales: the WebUI's TAESD form
        raw = taesd_decoder(vae.decoder.layers)(torch.tanh(z / 3) * 3)
        torch.testing.assert_close(raw, vae_decoder(vae)(z), rtol=1e-6, atol=1e-6)


def test_ldm_first_stage_needs_and_applies_scale_and_shift():
    stage = LdmFirstStage()
    with pytest.raises(ValueError, match="scaling factor"):
        vae_decoder(stage)
    dec = vae_decoder(stage, scaling_factor=0.3611, shift_factor=0.1159)      # FLUX's factors
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = dec(z)
    assert torch.equal(stage.seen[-1], z / 0.3611 + 0.1159)
    assert torch.equal(out, (torch.tanh(stage.conv(stage.seen[-1])) + 1) / 2)


def test_decoder_casts_latents_to_its_dtype_and_copies_whole():
    stage = LdmFirstStage().double()
    dec = vae_decoder(stage, scaling_factor=0.18215)
    with torch.no_grad():
        assert dec(torch.randn(1, 4, 2, 2)).dtype == torch.float64
    private = make_private_copy(dec)
    assert isinstance(private, LatentDecoder) and private.module is not stage
    assert torch.equal(private.module.conv.weight, stage.conv.weight)


def test_max_latent_side_decodes_a_shrunk_latent():
    vae = tiny_taesd(0)
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        small = vae_decoder(vae, max_latent_side=8)(z)
        full = vae_decoder(vae)(z)
        want = (vae.decode(torch.nn.functional.interpolate(z, size=(8, 6), mode="bilinear", align_corners=False,
                                                           antialias=True)).sample + 1) / 2
    assert full.shape == (1, 3, 64, 48) and small.shape == (1, 3, 32, 24)
    assert torch.equal(small, want)
    with torch.no_grad():
        assert torch.equal(vae_decoder(vae, max_latent_side=16)(z), full)   # within the limit: untouched
