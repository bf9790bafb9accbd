"""Stand-in of backend/utils.py `load_torch_file(ckpt, safe_load=False, device=None)` (safetensors only here)."""
import safetensors.torch


def load_torch_file(ckpt, safe_load=False, device=None):
    return safetensors.torch.load_file(ckpt, device="cpu" if device is None else str(device))
