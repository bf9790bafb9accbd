"""Test helpers (not Forge mirrors): Forge-shaped models, patchers and a `p` built from the stand-ins.

Import only after tests/standins_forge is on sys.path (the `forge_host` fixture): it imports `backend.*`.
"""
import copy
import functools
import types

import torch

from backend.modules.k_model import KModel
from backend.operations import forgeify
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from tests.fixtures import models
from tests.standins_forge.flux_model import TinyFlux

FLUX_REPO = "black-forest-labs/FLUX.1-dev"


def _ldm_call(unet_cls):
    class ForgeCallUNet(unet_cls):
        """A diffusers UNet called the way KModel.apply_model calls Forge's UNet (k_model.py:45)."""

        def forward(self, x, timesteps=None, context=None, transformer_options={}, **kwargs):
            return super().forward(x, timesteps, encoder_hidden_states=context).sample
    return ForgeCallUNet


@functools.lru_cache(maxsize=None)
def _sd15(seed):
    from diffusers import UNet2DConditionModel
    return forgeify(models._seeded(lambda: _ldm_call(UNet2DConditionModel)(**models.sd15_unet_config()), seed))


def sd15_unet_patcher(seed=0):
    """UnetPatcher over a KModel whose diffusion_model is the tiny SD1.5 UNet with Forge ops Linears (a private
    copy: same weights as tests.fixtures.models.tiny_sd15_unet(seed))."""
    return UnetPatcher(KModel(copy.deepcopy(_sd15(seed))), load_device=torch.device("cpu"),
                       offload_device=torch.device("cpu"))


def flux_unet_patcher(seed=0, **kw):
    flux = models._seeded(lambda: TinyFlux(**kw), seed)
    return UnetPatcher(KModel(forgeify(flux), huggingface_repo=FLUX_REPO), load_device=torch.device("cpu"),
                       offload_device=torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def _sd15_te(seed):
    holder = torch.nn.Module()
    holder.transformer = models.tiny_sd15_text_encoder(seed)
    return forgeify(holder)


def sd15_clip(seed=0):
    """CLIP with cond_stage_model {'clip_l': <module with .transformer = CLIPTextModel>} (Forge's key layout)."""
    return CLIP(model_dict={"clip_l": copy.deepcopy(_sd15_te(seed))})


class Denoiser:
    """The CFG denoiser's counters (modules/sd_samplers_cfg_denoiser.py:47-54): `steps`/`total_steps` as
    launch_sampling sets them (sd_samplers_common.py:274-276), `init_latent` as sample_img2img sets it
    (sd_samplers_kdiffusion.py:178; None from noise) and `p` (initialize)."""

    def __init__(self, total_steps, steps=None, init_latent=None, p=None):
        self.step, self.total_steps = 0, total_steps
        self.steps, self.init_latent, self.p = steps or total_steps, init_latent, p


def make_p(unet, clip=None, steps=3):
    """A processing object as far as the adapter looks: sd_model.forge_objects, sampler.model_wrap_cfg,
    extra_generation_params, comment(), cond caches (processing.py:175-176)."""
    objects = types.SimpleNamespace(unet=unet, clip=clip)
    sd_model = types.SimpleNamespace(forge_objects=objects, is_sd1=True)
    p = types.SimpleNamespace(sd_model=sd_model, extra_generation_params={}, comments=[],
                              sampler=types.SimpleNamespace(model_wrap_cfg=Denoiser(steps)),
                              cached_c=[None, None, None], cached_uc=[None, None, None],
                              extra_network_data={})
    p.comment = p.comments.append
    return p
