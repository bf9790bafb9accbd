"""Stand-in of Forge's LoRA parser: backend/patcher/lora.py (+ the comfy collection it dispatches to).

Signatures and outputs as in Forge @ dfdcbab6, behaviour written from the host facts (not from Forge's code):
- `load_lora(lora, to_load) -> (patch_dict, remaining_dict)` (lora.py:19-21; comfy lora.py:32-212). Plain LoRA
  gives `patch_dict[to_load[x]] = ("lora", (up, down, alpha, mid, dora_scale))`; v[0] is *up*. Also LoHa
  ("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)) and full diffs ("diff", (w,)). Spellings:
  `x.lora_up/lora_down(.lora_mid)`, `x.lora_B/lora_A`, `x.lora.up/down`, `x_lora.up/down`.
- `model_lora_keys_unet(model, key_map={})` / `model_lora_keys_clip(model, key_map={})` (lora.py:28-48): note
  the shared mutable default, as in Forge; they return the key map. For FLUX (`'flux' in huggingface_repo`)
  diffusers names map to tuples `(model_key, (0, offset, size))` of the fused qkv / linear1 (comfy utils.py:407-466).
- `merge_lora_to_weight(patches, weight, key, computation_dtype)` (lora.py:84-322), runs under inference mode;
  patches are `[strength, value, strength_model, offset, function]` (base.py:113).
- `LoraLoader(model).refresh(lora_patches, offload_device, force_refresh)` (lora.py:344-447): nothing when the
  names of the patch sets (`str(list(lora_patches.keys()))`) are those last merged; else the saved parameters
  are put back, then every patched weight is merged (float32) into a *new* Parameter, the old one kept as the
  backup. Offline mode only here (no NF4/GGUF, no online LoRA).
"""
import torch

CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}
SPELLINGS = (("{}.lora_up.weight", "{}.lora_down.weight", "{}.lora_mid.weight"),
             ("{}_lora.up.weight", "{}_lora.down.weight", None),
             ("{}.lora_B.weight", "{}.lora_A.weight", None),
             ("{}.lora.up.weight", "{}.lora.down.weight", None))


def load_lora(lora, to_load):
    patch_dict, used = {}, set()
    for x, target in to_load.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            used.add(f"{x}.alpha")
        dora = lora.get(f"{x}.dora_scale")
        if dora is not None:
            used.add(f"{x}.dora_scale")
        for up_f, down_f, mid_f in SPELLINGS:
            up_k, down_k = up_f.format(x), down_f.format(x)
            if up_k in lora:
                mid = None
                if mid_f is not None and mid_f.format(x) in lora:
                    mid = lora[mid_f.format(x)]
                    used.add(mid_f.format(x))
                patch_dict[target] = ("lora", (lora[up_k], lora[down_k], alpha, mid, dora))
                used.update((up_k, down_k))
                break
        if f"{x}.hada_w1_a" in lora:
            names = [f"{x}.hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b")]
            w1a, w1b, w2a, w2b = (lora[n] for n in names)
            patch_dict[target] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, dora))
            used.update(names)
        if f"{x}.diff" in lora:
            patch_dict[target] = ("diff", (lora[f"{x}.diff"],))
            used.add(f"{x}.diff")
        if f"{x}.diff_b" in lora and isinstance(target, str):
            patch_dict[target[:-len(".weight")] + ".bias"] = ("diff", (lora[f"{x}.diff_b"],))
            used.add(f"{x}.diff_b")
    return patch_dict, {k: v for k, v in lora.items() if k not in used}


def model_lora_keys_unet(model, key_map={}):
    for k in model.state_dict().keys():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
    if "flux" in model.config.huggingface_repo.lower():
        cfg = model.diffusion_model.config
        h = cfg["hidden_size"]
        for i in range(cfg["depth"]):
            src, dst = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
            for j, n in enumerate("qkv"):
                key_map[f"transformer.{src}.attn.to_{n}"] = (f"{dst}.img_attn.qkv.weight", (0, j * h, h))
                key_map[f"transformer.{src}.attn.add_{n}_proj"] = (f"{dst}.txt_attn.qkv.weight", (0, j * h, h))
            key_map[f"transformer.{src}.attn.to_out.0"] = f"{dst}.img_attn.proj.weight"
            key_map[f"transformer.{src}.attn.to_add_out"] = f"{dst}.txt_attn.proj.weight"
        for i in range(cfg["depth_single_blocks"]):
            src, dst = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}.linear1.weight"
            for j, n in enumerate("qkv"):
                key_map[f"transformer.{src}.attn.to_{n}"] = (dst, (0, j * h, h))
            key_map[f"transformer.{src}.proj_mlp"] = (dst, (0, 3 * h, 4 * h))
            key_map[f"transformer.{src}.proj_out"] = f"diffusion_model.single_blocks.{i}.linear2.weight"
    return key_map


def model_lora_keys_clip(model, key_map={}):
    sdk = model.state_dict().keys()
    for b in range(32):
        for part, flat in CLIP_PARTS.items():
            for enc, prefixes in (("clip_l", ("lora_te", "lora_te1")), ("clip_g", ("lora_te2",))):
                k = f"{enc}.transformer.text_model.encoder.layers.{b}.{part}.weight"
                if k in sdk:
                    for prefix in prefixes:
                        key_map[f"{prefix}_text_model_encoder_layers_{b}_{flat}"] = k
    return key_map


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight = weight.to(computation_dtype).clone()
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        full = weight
        if offset is not None:
            weight = weight.narrow(offset[0], offset[1], offset[2])
        kind, v = v
        if kind == "diff":
            weight += strength * v[0].to(weight)
        elif kind == "set":
            weight.copy_(v[0])
        else:
            if kind == "lora":
                up, down, alpha, mid, dora = v
                scale = 1.0 if alpha is None else alpha / down.shape[0]
                if mid is not None:  # CP: fold the core into down, [r, in, kh, kw]
                    down = torch.einsum("abhw,bi->aihw", mid.to(weight), down.flatten(1).to(weight))
                diff = (up.flatten(1).to(weight) @ down.flatten(1).to(weight)).reshape(weight.shape)
            else:  # loha: Hadamard product of two low-rank products
                w1a, w1b, alpha, w2a, w2b, _, _, dora = v
                scale = 1.0 if alpha is None else alpha / w1b.shape[0]
                diff = ((w1a.to(weight) @ w1b.to(weight)) * (w2a.to(weight) @ w2b.to(weight))).reshape(weight.shape)
            if dora is None:
                weight += function(strength * scale * diff)
            else:  # DoRA: direction W + dW, magnitude dora_scale (per output channel here)
                calc = weight + function(scale * diff)
                norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
                calc = calc * (dora.to(weight).reshape(-1, *[1] * (weight.dim() - 1)) / (norm + torch.finfo(weight.dtype).eps))
                weight += strength * (calc - weight)
        if offset is not None:
            weight = full
    return weight



def _parent_and_name(model, key):
    *path, name = key.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    return parent, name


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[key] = all_patches.get(key, []) + current
        for key, w in self.backup.items():                       # restore
            parent, name = _parent_and_name(self.model, key)
            setattr(parent, name, w)
        self.backup = {}
        for key, current in all_patches.items():                 # patch
            parent, name = _parent_and_name(self.model, key)
            weight = getattr(parent, name)
            assert isinstance(weight, torch.nn.Parameter), key
            self.backup.setdefault(key, weight.to(device=offload_device))
            merged = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32).to(weight.dtype)
            setattr(parent, name, torch.nn.Parameter(merged, requires_grad=False))
        self.loaded_hash = hashes
