"""Stand-in of modules/devices.py: `device`, `dtype`, `cpu`, `autocast()` (devices.py:111-135, 226-247)."""
import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32


def autocast(disable=False):
    """The host returns a no-op context on CPU/float32 (devices.py:226-238)."""
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()
