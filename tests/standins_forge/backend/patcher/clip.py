"""Stand-in of backend/patcher/clip.py `CLIP` (:10-30): `cond_stage_model` is a ModuleDict {'clip_l': ...}."""
import torch

from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):
        if no_init:
            return
        self.cond_stage_model = torch.nn.ModuleDict(model_dict)   # JointTextEncoder(ModuleDict), clip.py:6-7
        self.tokenizer = tokenizer_dict
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *arg, **kwargs):
        return self.patcher.add_patches(*arg, **kwargs)
