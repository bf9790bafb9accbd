"""Stand-in of extensions-builtin/Lora/network_lora.py (v1.10.1): NetworkModuleLora keeps `up_model`, `down_model`,
`mid_model` as bias-free nn.Linear / nn.Conv2d on the CPU in devices.dtype (:24-67), `dim` = rank (:31), and
`calc_updown` rebuilds up @ down (CP: up x mid x down) then `finalize_updown` (:69-86). `lora_A/lora_B` are
renamed to down/up (:14-19).
"""
import torch

import network
from modules import devices


class ModuleTypeLora:
    def create_module(self, net, weights):
        if all(k in weights.w for k in ("lora_up.weight", "lora_down.weight")):
            return NetworkModuleLora(net, weights)
        if all(k in weights.w for k in ("lora_A.weight", "lora_B.weight")):
            w = dict(weights.w)
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self._layer(weights.w["lora_up.weight"], "up")
        self.down_model = self._layer(weights.w["lora_down.weight"], "down")
        mid = weights.w.get("lora_mid.weight")
        self.mid_model = self._layer(mid, "mid") if mid is not None else None
        self.dim = weights.w["lora_down.weight"].shape[0]

    def _layer(self, weight, role):
        conv = isinstance(self.sd_module, torch.nn.Conv2d)
        if not conv:
            weight = weight.reshape(weight.shape[0], -1)
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        else:
            if weight.dim() == 2:
                weight = weight.reshape(*weight.shape, 1, 1)
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.to(device=devices.cpu, dtype=devices.dtype)
        layer.weight.requires_grad_(False)
        return layer

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device).flatten(1)
        down = self.down_model.weight.to(orig_weight.device)
        if self.mid_model is not None:
            updown = torch.einsum("oa,abhw,bi->oihw", up, self.mid_model.weight.to(orig_weight.device),
                                  down.flatten(1))
        else:
            updown = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return self.finalize_updown(updown, orig_weight, list(orig_weight.shape))
