"""Stand-in of extensions-builtin/Lora/network.py (v1.10.1).

NetworkOnDisk(name, filename) (:24-90): `metadata` (safetensors header, JSON values parsed), `alias` (ss_output_name), `hash`/`shorthash`,
`sd_version` from ss_base_model_version / ss_v2 (:61-69), `read_hash()`.
Network(name, network_on_disk) (:93-106): `te_multiplier`, `unet_multiplier`, `dyn_dim`, `modules`.
NetworkModule (:111-227): `sd_module`, `alpha`, `scale`, `bias`, `dora_scale`, `multiplier()` (:161, 'transformer' in
the first 20 chars of sd_key = text encoder), `calc_scale()` (:167), `finalize_updown` (:196-216).
"""
import enum
import hashlib
import json
import os
import struct

import torch


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


def read_metadata(filename):
    """sd_models.read_metadata_from_safetensors (sd_models.py:284-309): values that look like JSON objects are parsed."""
    with open(filename, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata(filename)
            except Exception:
                self.metadata = {}
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get("sshs_model_hash") or "")
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            return SdVersion.SDXL
        if str(self.metadata.get("ss_v2", "")) == "True":
            return SdVersion.SD2
        if len(self.metadata):
            return SdVersion.SD1
        return SdVersion.Unknown

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]

    def read_hash(self):
        if not self.hash:
            with open(self.filename, "rb") as f:
                self.set_hash(hashlib.sha256(f.read()).hexdigest())


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.mtime = None


class NetworkModule:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        self.shape = self.sd_module.weight.shape
        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        self.dora_scale = weights.w.get("dora_scale", None)

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        return updown * self.calc_scale() * self.multiplier(), ex_bias

    def calc_updown(self, target):
        raise NotImplementedError()
