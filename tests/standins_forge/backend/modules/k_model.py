"""Stand-in of backend/modules/k_model.py `KModel` (:7-46): `diffusion_model`, `config.huggingface_repo`,
`apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs)`.

The prediction wrapper is the identity here (x0 = model output); the diffusion model is any module called as
`diffusion_model(x, t, context=..., transformer_options=..., **extra)`.
"""
import types

import torch


class KModel(torch.nn.Module):
    def __init__(self, model, huggingface_repo="runwayml/stable-diffusion-v1-5"):
        super().__init__()
        self.config = types.SimpleNamespace(huggingface_repo=huggingface_repo)
        self.diffusion_model = model
        self.storage_dtype = self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs).float()
