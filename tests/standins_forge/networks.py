"""Stand-in of extensions-builtin/sd_forge_lora/networks.py (imported as top-level `networks`, as Forge does).

`available_networks` / `available_network_aliases`: name -> NetworkOnDisk (:130-167); `list_available_networks()`
rescans; `load_lora_state_dict(filename)` is the lru-cached `load_torch_file(filename, safe_load=True)` (:56-58).
Tests fill the dicts with `register(name, filename)`.
"""
import enum
import functools
import hashlib

from backend.utils import load_torch_file

available_networks = {}
available_network_aliases = {}
loaded_networks = []


class SdVersion(enum.Enum):
    """network.py:9-15."""
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4
    Flux = 5


class NetworkOnDisk:
    """network.py NetworkOnDisk (:16-81): name, filename, alias, sd_version; `hash`/`shorthash` set by `set_hash`,
    and `read_hash()` hashes the file only while no hash is set (:78-80), so an entry keeps its first hash."""

    def __init__(self, name, filename, sd_version=SdVersion.Unknown):
        self.name, self.filename, self.alias = name, filename, name
        self.sd_version = sd_version
        self.hash, self.shorthash = None, None
        self.set_hash("")

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]

    def read_hash(self):
        if not self.hash:
            with open(self.filename, "rb") as f:
                self.set_hash(hashlib.sha256(f.read()).hexdigest())


def register(name, filename, sd_version=SdVersion.Unknown):
    available_networks[name] = available_network_aliases[name] = NetworkOnDisk(name, filename, sd_version)


def list_available_networks():
    pass


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_torch_file(filename, safe_load=True)
