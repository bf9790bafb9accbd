"""A tiny FLUX-shaped transformer with BFL module names, as Forge's backend/nn/flux.py (:142-349) names them.

Only the names and shapes matter to the adapter: `double_blocks.N.{img_attn,txt_attn}.{qkv [3h, h], proj}`,
`double_blocks.N.{img_mlp,txt_mlp}.{0,2}`, `double_blocks.N.{img_mod,txt_mod}.lin`, `single_blocks.N.linear1`
[3h + mlp, h] (q, k, v and the MLP input fused), `single_blocks.N.linear2`, `img_in`, `txt_in`, `final_layer.linear`.
The forward is a plain joint-attention stack (no RoPE, no QK-norm) so that every fused slice reaches the output.
"""
import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, n):
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(h, 6), Modulation(h, 6)
        self.img_attn, self.txt_attn = SelfAttention(h), SelfAttention(h)
        self.img_mlp = nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h))
        self.txt_mlp = nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h))

    def forward(self, img, txt, vec):
        shift_i = self.img_mod.lin(vec)[:, None, :img.shape[-1]]
        shift_t = self.txt_mod.lin(vec)[:, None, :txt.shape[-1]]
        qkv = torch.cat([self.txt_attn.qkv(txt + shift_t), self.img_attn.qkv(img + shift_i)], dim=1)
        q, k, v = qkv.chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        n_txt = txt.shape[1]
        txt = txt + self.txt_attn.proj(a[:, :n_txt])
        img = img + self.img_attn.proj(a[:, n_txt:])
        return img + self.img_mlp(img), txt + self.txt_mlp(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        self.h, self.mlp = h, mlp
        self.linear1 = nn.Linear(h, 3 * h + mlp)
        self.linear2 = nn.Linear(h + mlp, h)
        self.modulation = Modulation(h, 3)

    def forward(self, x, vec):
        x_mod = x + self.modulation.lin(vec)[:, None, :self.h]
        q, k, v, mlp = torch.split(self.linear1(x_mod), [self.h, self.h, self.h, self.mlp], dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.linear2(torch.cat([a, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.linear = nn.Linear(h, out)


class TinyFlux(nn.Module):
    """Latent [B, C, H, W] and context [B, T, ctx] -> [B, C, H, W]; `config` as Forge's flux config keys."""

    def __init__(self, channels=4, hidden=16, context=8, depth=2, depth_single=2):
        super().__init__()
        self.config = {"depth": depth, "depth_single_blocks": depth_single, "hidden_size": hidden}
        self.img_in = nn.Linear(channels, hidden)
        self.txt_in = nn.Linear(context, hidden)
        self.time_in = nn.Linear(1, hidden)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden, 4 * hidden) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden, 4 * hidden) for _ in range(depth_single)])
        self.final_layer = LastLayer(hidden, channels)

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        b, c, hh, ww = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt = self.txt_in(context)
        vec = self.time_in(timesteps.reshape(-1, 1).to(img.dtype) / 1000.0)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x_all = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x_all = block(x_all, vec)
        out = self.final_layer.linear(x_all[:, txt.shape[1]:])
        return out.transpose(1, 2).reshape(b, c, hh, ww)
