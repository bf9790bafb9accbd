"""The Forge stand-ins (tests/standins_forge) as module fixtures, tiny SD1.5 LoRA files, and the steps the Forge
adapter tests share: a host and its `p`, one denoiser call as Forge batches it, a subject-only reference."""
import importlib
import os
import sys
import types

import pytest
import torch

from lib_dynfuse.args import FuseArgs
from lib_dynfuse.hosts import common
from lib_dynfuse.hosts import forge
from lib_dynfuse.layer_delta import LayerDelta
from lib_dynfuse.lowrank import delta_output
from tests.fixtures import lora_files, models

STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins_forge")
HOST_MODULES = ("backend", "networks", "modules", "tests.standins_forge.world")


def _purge():
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in HOST_MODULES):
            del sys.modules[name]


@pytest.fixture(scope="module")
def fh():
    """The Forge stand-ins on sys.path for this module: `fh.world`, `fh.networks`, `fh.shared`, `fh.api`."""
    assert importlib.util.find_spec("backend") is None, "a real `backend` package would shadow the stand-ins"
    sys.path.insert(0, STANDINS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: extra threads only contend on a shared 2-core box
    try:
        world = importlib.import_module("tests.standins_forge.world")
        ns = types.SimpleNamespace(world=world, networks=importlib.import_module("networks"),
                                   shared=importlib.import_module("modules.shared"), api=forge.forge_lora(),
                                   lora=importlib.import_module("backend.patcher.lora"),
                                   sampling=importlib.import_module("backend.sampling.sampling_function"))
        yield ns
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(STANDINS)
        _purge()


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    """A subject LoRA (random), a zero style LoRA and a random style LoRA for the tiny SD1.5 UNet (+ TE)."""
    d = tmp_path_factory.mktemp("forge_loras")
    unet = models.tiny_sd15_unet(0)
    te = models.tiny_sd15_text_encoder(0)
    files = {}
    files["subject"] = (d / "subject.safetensors", lora_files.write_kohya_lora(
        unet, d / "subject.safetensors", rank=2, alpha=1.0, seed=1, te_layers={"lora_te": te}))
    files["zero"] = (d / "zero.safetensors", lora_files.write_kohya_lora(
        unet, d / "zero.safetensors", rank=2, seed=2, zero=True, te_layers={"lora_te": te}))
    files["style"] = (d / "style.safetensors", lora_files.write_kohya_lora(
        unet, d / "style.safetensors", rank=3, seed=3, alpha=1.5))
    return files


def _register(fh, files):
    for name, (path, _) in files.items():
        fh.networks.register(name, str(path))


def _inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 7, 32, generator=g)


def _hook_counts(root):
    return sum(len(m._forward_hooks) for m in root.modules())


def _run(p, host, args):
    run = common.FuseRun(host, ui_args=args)
    setattr(p, common.RUN_ATTR, run)
    return run


def _sample_step(fh, p, x, ctx, cfg=True):
    """One denoiser call as Forge batches it (sampling_function.py:154-289, stand-in), then step += 1."""
    unet = p.sd_model.forge_objects.unet
    sigma = torch.full((x.shape[0],), 500.0)
    out = fh.sampling.calc_cond_uncond_batch(unet.model, ctx, ctx.flip(1) if cfg else None, x, sigma, unet.model_options)
    p.sampler.model_wrap_cfg.step += 1
    return out


def _host_and_p(fh, sd15_files, method="dynamic", steps=3, **kw):
    _register(fh, sd15_files)
    unet, clip = fh.world.sd15_unet_patcher(), fh.world.sd15_clip()
    p = fh.world.make_p(unet, clip, steps=steps)
    fh.shared.sd_model = p.sd_model
    host = forge.ForgeHost(fh.api)
    args = FuseArgs(enabled=True, subject=kw.pop("subject", "subject"), style=kw.pop("style", "zero"),
                    method=method, **kw)
    run = _run(p, host, args)
    return host, run, p, unet


def _reference_subject_only(unet_model, written, x, ctx, uncond_ctx=None):
    """Reference: the base model plus x -> down -> up * alpha/r on every subject layer (own hooks, one LoRA, no selection)."""
    handles = []
    for w in (w for w in written if w.group == "unet"):
        m = unet_model.get_submodule("diffusion_model." + w.module)

        def hook(mod, args, out, w=w):   # the engine's low-rank op order (bits are compared)
            x_in = args[0]
            return out + delta_output(LayerDelta(down=w.down.to(x_in), up=w.up.to(x_in), scale=w.scale), x_in, mod)
        handles.append(m.register_forward_hook(hook))
    try:
        xs = torch.cat([x, x]) if uncond_ctx is not None else x
        cs = torch.cat([uncond_ctx, ctx]) if uncond_ctx is not None else ctx
        return unet_model.apply_model(xs, torch.full((xs.shape[0],), 500.0), c_crossattn=cs)
    finally:
        for h in handles:
            h.remove()
