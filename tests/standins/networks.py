"""Stand-in of extensions-builtin/Lora/networks.py (v1.10.1): the module globals (:725-737), the layer names
(`assign_network_names_to_compvis_modules` :122-147), `load_network` (:158-270: reads a file into Network.modules
without activating it; kohya `lora_unet_*` -> `diffusion_model_*` as in :213-215, `lora_te_text_model_*` ->
`transformer_text_model_*` as in :56-119 for SD1), `load_networks` (:281-366: replaces `loaded_networks`),
`network_apply_weights` (:411-542: back up once, restore on a change of the wanted set, merge with copy_ under
no_grad) and `list_available_networks` (:679).

The host runs `network_apply_weights` inside the patched Linear/Conv2d forward (lora_patches.py:8-18); this
stand-in does not patch torch classes: the stand-in processing calls `merge_into(model)` right before it runs
the text encoder or the UNet, which is when the host's forward-time merge takes effect.
"""
import logging
import os
from collections import namedtuple

import torch
from safetensors.torch import load_file

import network
import network_full
import network_lora
from modules import shared

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])
module_types = [network_lora.ModuleTypeLora(), network_full.ModuleTypeFull()]

available_networks = {}
available_network_aliases = {}
loaded_networks = []
errors = {}


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    for fn in sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else []:
        stem, ext = os.path.splitext(fn)
        if ext.lower() not in (".safetensors", ".pt", ".ckpt"):
            continue
        entry = network.NetworkOnDisk(stem, os.path.join(folder, fn))
        available_networks[stem] = entry
        available_network_aliases[stem] = entry
        available_network_aliases[entry.alias] = entry


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    for root in (cond, sd_model.model):
        for name, module in root.named_modules():
            key = name.replace(".", "_")
            mapping[key] = module
            module.network_layer_name = key
    sd_model.network_layer_mapping = mapping


def _module_key(stem):
    if stem.startswith("lora_unet_"):
        return "diffusion_model_" + stem[len("lora_unet_"):]
    if stem.startswith("lora_te_text_model_"):
        return "transformer_text_model_" + stem[len("lora_te_text_model_"):]
    return stem


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = load_file(network_on_disk.filename)   # the host: sd_models.read_state_dict (raises on a bad file)
    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)
    matched, failed = {}, {}
    for key, weight in sd.items():
        stem, _, part = key.partition(".")
        sd_key = _module_key(stem)
        sd_module = shared.sd_model.network_layer_mapping.get(sd_key)
        if sd_module is None:
            failed[key] = sd_key
            continue
        matched.setdefault(sd_key, NetworkWeights(key, sd_key, {}, sd_module)).w[part] = weight
    for sd_key, weights in matched.items():
        for kind in module_types:
            module = kind.create_module(net, weights)
            if module is not None:
                break
        else:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[sd_key] = module
    if failed:
        logging.debug("Network %s didn't match keys: %s", network_on_disk.filename, failed)
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = load_network(on_disk.name, on_disk)
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        loaded_networks.append(net)


def network_apply_weights(self):
    layer = getattr(self, "network_layer_name", None)
    if layer is None or not hasattr(self, "weight"):
        return
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    current = getattr(self, "network_current_names", ())
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        self.network_weights_backup = self.weight.detach().to("cpu", copy=True)
    if current == wanted:
        return
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        self.weight.copy_(backup)      # the host restores outside no_grad (networks.py:385-402)
    with torch.no_grad():
        for net in loaded_networks:
            module = net.modules.get(layer)
            if module is None:
                continue
            updown, _ = module.calc_updown(self.weight)
            self.weight.copy_(self.weight + updown.to(self.weight.dtype))
    self.network_current_names = wanted


def merge_into(root):
    """What the patched forwards do before each layer runs (see the module docstring).

    With `opts.lora_functional` and no `<lora>` loaded, `network_forward` calls the original forward at once
    (networks.py:551-552): weights a merge-mode job left merged stay as they are. With `<lora>`s loaded it
    restores the backup and adds the deltas (:556-567), which is the same math as the merge below."""
    if getattr(shared.opts, "lora_functional", False) and not loaded_networks:
        return
    for m in root.modules():
        if getattr(m, "network_layer_name", None) is not None and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            network_apply_weights(m)
