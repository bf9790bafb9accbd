"""A stand-in AUTOMATIC1111 process for tests: the stand-in host modules on sys.path, a tiny SD1.5-layout model,
LoRA files in a folder, the builtin Lora's start-up (lora_script.py:19-31) and our script imported as the host
imports extension scripts (scripts.py:509-523). Everything is undone on exit (sys.modules, sys.path).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from typing import List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOST_MODULES = ("modules", "networks", "network", "network_lora", "network_full", "extra_networks_lora", "gradio",
                "fastapi")


def _is_host_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in HOST_MODULES)


def tokens(prompt: str, length: int = 8, vocab: int = 64) -> List[int]:
    """A deterministic word -> id map standing in for the CLIP tokenizer (ids 2..vocab-1, pad 1)."""
    ids = [2 + sum(map(ord, w)) % (vocab - 2) for w in prompt.lower().split()][:length]
    return ids + [1] * (length - len(ids))


class StandInSdModel(torch.nn.Module):
    """The parts of an SD1 LatentDiffusion the host and the extension touch: `model.diffusion_model` (the UNet),
    `cond_stage_model.wrapped.transformer` (CLIPTextModel, FrozenCLIPEmbedder's layout), is_sd1/is_sdxl
    (sd_models.py:379-402), conditioning and one k-diffusion-style denoising call (eps -> x0)."""

    is_sd1, is_sd2, is_sdxl = True, False, False

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.wrapped = torch.nn.Module()
        self.cond_stage_model.wrapped.transformer = text_encoder

    def get_learned_conditioning(self, prompts):
        import networks
        networks.merge_into(self.cond_stage_model)
        ids = torch.tensor([tokens(p) for p in prompts])
        return self.cond_stage_model.wrapped.transformer(input_ids=ids).last_hidden_state

    def denoise(self, x_in, sigma_in, cond):
        import networks
        networks.merge_into(self.model)
        c_in = 1.0 / torch.sqrt(sigma_in ** 2 + 1)
        t = (sigma_in * 100).clamp(0, 999)
        eps = self.model.diffusion_model(x_in * c_in[:, None, None, None], t, encoder_hidden_states=cond).sample
        return x_in - sigma_in[:, None, None, None] * eps


class HostEnv:
    def __init__(self, lora_dir: str, unet_seed: int = 0):
        self.lora_dir = lora_dir
        self.unet_seed = unet_seed

    def __enter__(self) -> "HostEnv":
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)   # tiny models: threads only add contention on the 2-core CI machines
        self._saved_path = list(sys.path)
        self._saved_modules = {k: v for k, v in sys.modules.items() if _is_host_module(k)}
        for k in self._saved_modules:
            del sys.modules[k]
        sys.path.insert(0, HERE)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        from tests.fixtures import models
        from modules import shared, script_callbacks, scripts, extra_networks
        shared.cmd_opts.lora_dir = self.lora_dir
        self.shared, self.callbacks, self.extra_networks = shared, script_callbacks, extra_networks
        self.unet = models.tiny_sd15_unet(self.unet_seed)
        self.text_encoder = models.tiny_sd15_text_encoder(self.unet_seed)
        shared.sd_model = self.model = StandInSdModel(self.unet, self.text_encoder)
        import networks
        import extra_networks_lora
        self.networks = networks
        networks.list_available_networks()
        networks.assign_network_names_to_compvis_modules(self.model)
        # the builtin Lora registers its extra network before the UI (lora_script.py:19-24, :31)
        script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora()))
        spec = importlib.util.spec_from_file_location("dynfuse_script", os.path.join(ROOT, "scripts", "dynfuse.py"))
        self.script_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.script_module)
        extra_networks.initialize()              # the host clears the registry after loading scripts (initialize.py:111-167)
        script_callbacks.before_ui_callback()
        self.script = self.script_module.Script()
        self.runner = scripts.ScriptRunner([self.script])

    def __exit__(self, *exc):
        for k in [k for k in sys.modules if _is_host_module(k)]:
            del sys.modules[k]
        sys.modules.update(self._saved_modules)
        sys.path[:] = self._saved_path
        torch.set_num_threads(self._saved_threads)

    # ------------------------------------------------------------------ helpers for tests
    def ui_values(self, **fields):
        """Positional script args in UI order: FuseArgs defaults with `fields` changed."""
        from dataclasses import fields as dc_fields
        from lib_dynfuse.args import FuseArgs
        values = FuseArgs(**fields)
        return [getattr(values, f.name) for f in dc_fields(FuseArgs)]

    def txt2img(self, args=None, **kwargs):
        """One request as the API makes it: state.begin(), then process_images (api.py:475-486)."""
        from modules import processing, shared
        script_args = list(args) if args is not None else self.ui_values()
        self.script.args_from, self.script.args_to = 0, len(script_args)
        p = processing.StableDiffusionProcessingTxt2Img(scripts=self.runner, script_args=script_args, **kwargs)
        shared.state.begin()
        shared.total_tqdm.clear()
        return p, processing.process_images(p)

    def img2img(self, args=None, init_latent=None, **kwargs):
        """One img2img request (api.py:520-540 -> process_images) from `init_latent` [1, 4, h, w]."""
        from modules import processing, shared
        script_args = list(args) if args is not None else self.ui_values()
        self.script.args_from, self.script.args_to = 0, len(script_args)
        p = processing.StableDiffusionProcessingImg2Img(init_latent=init_latent, scripts=self.runner,
                                                        script_args=script_args, **kwargs)
        shared.state.begin()
        shared.total_tqdm.clear()
        return p, processing.process_images(p)

    def state_snapshot(self):
        """Every parameter and buffer of the model, cloned (for bit-identity checks)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def images_equal(a, b) -> bool:
    import numpy as np
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


__all__ = ["HostEnv", "hooks_left", "images_equal", "tokens", "math"]
