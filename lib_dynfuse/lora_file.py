"""Read a LoRA `.safetensors` file (never a pickle) and normalise every key format into `LayerDelta`s.

Layer keys are normalised to `LayerKey(group, name)`: group "unet", "te1" or "te2" (SD1.5's single text
encoder is "te1"), name the module path with "_" for "." as kohya spells it, e.g.
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
both -> LayerKey("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"), and
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (compvis) -> LayerKey("unet", "input_blocks_4_1_...").
Which module a name means is `name_maps`' job, not this file's.

Formats: kohya `.lora_down/.lora_up/.alpha` (+ LoCon 4-D convs, CP `.lora_mid`), `.lora_A/.lora_B`,
diffusers/PEFT dotted keys (`unet.`, `text_encoder.`, `text_encoder_2.`, `base_model.model.`, no prefix;
`.lora_A/.lora_B`, `.lora.down/.lora.up`, `.lora_linear_layer.down/up`, old `.processor.to_q_lora.down`).
An absent `.alpha`, or alpha 0, means alpha = rank (scale 1), as kohya's trainers read it. DoRA (`dora_scale`),
LoHa, LoKr, OFT, full `diff` ... need the base weight or have no low-rank form: those layers go to
`LoraFile.unsupported` with a reason (the hosts' own loaders read those formats and hand us dense deltas).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field, replace
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .layer_delta import LayerDelta, check_weight, first_nonfinite

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
SHORTHASH_LEN = 12


class LoraFormatError(ValueError):
    """The file is not a LoRA we may read (a pickle, not safetensors, no LoRA keys): message for the user."""


class LayerKey(NamedTuple):
    """A LoRA layer, format-independent: group "unet" | "te1" | "te2", module path with "_" for "."."""

    group: str
    name: str

    def __str__(self) -> str:
        return f"{self.group}:{self.name}"


# (suffix, role), longest first. Roles: down, up, mid, alpha, dora. Dotted and kohya spellings alike.
SUFFIXES: Tuple[Tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),      # old attention-processor form
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".dora_scale", "dora"), (".lora_magnitude_vector.weight", "dora"), (".lora_magnitude_vector", "dora"),
    (".alpha", "alpha"),
)
# Last key segment of formats without a low-rank form (LyCORIS and others) -> the name shown to the user.
OTHER_FORMATS: Tuple[Tuple[str, str], ...] = (
    ("hada_", "LoHa"), ("lokr_", "LoKr"), ("oft_", "OFT"), ("diff", "full diff"), ("w_norm", "norm"),
    ("b_norm", "norm"), ("bias_indices", "bias"), ("on_input", "IA3"), ("weight", "IA3/other"),
)
KOHYA_PREFIX = re.compile(r"^lora_(unet|te\d?)_(.+)$")
DOTTED_PREFIXES = (("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
                   ("diffusion_model.", "unet"), ("model.diffusion_model.", "unet"))


@dataclass
class LoraFile:
    """One LoRA file, parsed once: its layers as `LayerDelta`s at user weight `weight`.

    `layers`: LayerKey -> LayerDelta with scale = alpha / rank * weight. `unsupported`: LayerKey -> reason.
    `unit_layers`: the same at weight 1 (what `with_weight` scales). `duplicates`: ignored second spellings.
    `sha256` is the whole file's hex digest; `shorthash` its first 12 characters (A1111's convention).
    `base_model`: "sd15", "sd2", "sdxl" or "unknown", guessed from metadata, then from keys and shapes.
    """

    name: str
    path: str
    sha256: str
    metadata: Dict[str, str]
    layers: Dict[LayerKey, LayerDelta]
    unsupported: Dict[LayerKey, str] = field(default_factory=dict)
    base_model: str = "unknown"
    weight: float = 1.0
    unit_layers: Dict[LayerKey, LayerDelta] = field(default_factory=dict, repr=False)
    duplicates: List[str] = field(default_factory=list)   # second spellings of a layer, ignored

    def __post_init__(self):
        self.weight = check_weight(self.weight)
        if not self.unit_layers:
            if self.weight == 0.0 and self.layers:
                raise ValueError("LoraFile built at weight 0 needs unit_layers (the weight-1 deltas)")
            self.unit_layers = (self.layers if self.weight == 1.0 else
                                {k: d.with_weight(1.0 / self.weight) for k, d in self.layers.items()})

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORTHASH_LEN]

    def with_weight(self, weight: float) -> "LoraFile":
        """The same LoRA at user weight `weight` (absolute, not multiplied; tensors are shared)."""
        weight = check_weight(weight)
        layers = {k: d.with_weight(weight) for k, d in self.unit_layers.items()}
        return replace(self, layers=layers, weight=float(weight))

    def groups(self) -> Dict[str, int]:
        """Layer count per group ("unet", "te1", "te2")."""
        counts: Dict[str, int] = {}
        for key in self.layers:
            counts[key.group] = counts.get(key.group, 0) + 1
        return counts


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the whole file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_safetensors(path: str) -> None:
    """Refuse anything that is not a safetensors file (by extension and by its first bytes), never unpickling it."""
    name = os.path.basename(path)
    if name.lower().endswith(PICKLE_EXTENSIONS):
        raise LoraFormatError(f"{name}: pickle-based LoRA files (.pt/.ckpt/.bin) are refused because loading them "
                              f"can run arbitrary code; convert it to .safetensors")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and struct.unpack("<Q", head[:8])[0] + 8 <= size and head[8:9] == b"{":
        return                                     # u64 header length, then the JSON header
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise LoraFormatError(f"{name}: this is a pickle (torch.save) file, not safetensors; it is refused because "
                              f"loading it can run arbitrary code; convert it to .safetensors")
    raise LoraFormatError(f"{name}: not a safetensors file")


def _split_suffix(key: str) -> Tuple[str, str]:
    """key -> (layer stem, role); role "other:<format>" for keys of formats without a low-rank form."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    stem, _, last = key.rpartition(".")
    for start, fmt in OTHER_FORMATS:
        if stem and last.startswith(start):
            return stem, f"other:{fmt}"
    return key, "other:unknown"


def layer_key(stem: str) -> LayerKey:
    """Normalise a kohya (`lora_unet_...`) or dotted (`unet.a.b.0.c`) layer stem to a LayerKey."""
    m = KOHYA_PREFIX.match(stem)
    if m:
        group = {"unet": "unet", "te": "te1"}.get(m.group(1), m.group(1))
        return LayerKey(group, m.group(2))
    group = "unet"
    if stem.startswith("base_model.model."):       # PEFT's own save format
        stem = stem[len("base_model.model."):]
    for prefix, g in DOTTED_PREFIXES:
        if stem.startswith(prefix):
            group, stem = g, stem[len(prefix):]
            break
    while group == "unet" and stem.startswith("unet."):  # some trainers save "unet.unet."
        stem = stem[len("unet."):]
    if ".processor." in stem:                      # attn1.processor.to_q -> attn1.to_q, to_out -> to_out.0
        stem = stem.replace(".processor.", ".")
        if stem.endswith(".to_out"):
            stem += ".0"
    return LayerKey(group, stem.replace(".", "_"))


def _delta(parts: Dict[str, torch.Tensor], keys: Dict[str, str], weight: float) -> LayerDelta:
    """LayerDelta from one layer's down/up(/mid/alpha) tensors: scale = alpha / rank * weight (alpha 0 = rank, as
    kohya's trainers read it); a rank-0 layer or factors of different ranks are a LoraFormatError naming the key."""
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    rank = down.shape[0] if down.dim() else 0
    if rank == 0:
        raise LoraFormatError(f"{keys['down']} has rank 0 (shape {tuple(down.shape)}): an empty LoRA layer")
    misfit = "up" if tuple(up.shape[1:2]) != (rank,) else \
        "mid" if mid is not None and tuple(mid.shape[:2]) != (rank, rank) else None
    if misfit:
        raise LoraFormatError(f"{keys[misfit]} has shape {tuple(parts[misfit].shape)}, which does not fit the rank "
                              f"{rank} of {keys['down']} {tuple(down.shape)}")
    alpha = parts.get("alpha")
    alpha = float(alpha.float().item()) if alpha is not None else 0.0
    scale = (alpha or rank) / rank
    return LayerDelta(down=down, up=up, mid=mid, scale=scale * weight)


def parse_state_dict(tensors: Dict[str, torch.Tensor]):
    """Group tensors by layer -> (layers at weight 1, unsupported reasons, duplicate stems ignored).

    Two spellings of one layer in one file (kohya and PEFT stems naming the same module) are never mixed:
    the first stem in key order wins, the others are listed as duplicates. A malformed low-rank layer (rank 0,
    factors of different ranks) is a LoraFormatError naming its key.
    """
    by_stem: Dict[str, Dict[str, torch.Tensor]] = {}
    keys: Dict[str, Dict[str, str]] = {}
    other: Dict[str, str] = {}
    for key in sorted(tensors):
        stem, role = _split_suffix(key)
        if role.startswith("other:"):
            other.setdefault(stem, f"{role[6:]} keys ({key}) have no low-rank form; the host's own loader handles them")
        else:
            by_stem.setdefault(stem, {})[role] = tensors[key]
            keys.setdefault(stem, {})[role] = key
    layers: Dict[LayerKey, LayerDelta] = {}
    unsupported: Dict[LayerKey, str] = {}
    duplicates: List[str] = []
    owner: Dict[LayerKey, str] = {}
    for stem in sorted(set(by_stem) | set(other)):
        lk = layer_key(stem)
        if owner.setdefault(lk, stem) != stem:
            duplicates.append(stem)
            continue
        parts = by_stem.get(stem, {})
        if stem in other:
            unsupported[lk] = other[stem]
        elif "dora" in parts:
            unsupported[lk] = "DoRA (dora_scale) needs the base weight; the host's own loader handles it"
        elif "down" not in parts or "up" not in parts:
            unsupported[lk] = f"incomplete LoRA layer (has {sorted(parts)}, needs down and up)"
        else:
            layers[lk] = _delta(parts, keys[stem], 1.0)
    return layers, unsupported, duplicates


def guess_base_model(metadata: Dict[str, str], layers: Dict[LayerKey, LayerDelta]) -> str:
    """"sdxl" | "sd2" | "sd15" | "unknown", from sd-scripts/modelspec metadata, then from keys and widths."""
    version = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    if "xl" in version:
        return "sdxl"
    if "v2" in version or "sd_2" in version or metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    if "v1" in version or metadata.get("ss_v2", "").lower() == "false":
        return "sd15"
    if any(k.group == "te2" for k in layers):
        return "sdxl"
    context = {d.down.shape[1] for k, d in layers.items()
               if k.group == "unet" and k.name.endswith(("attn2_to_k", "attn2_to_v")) and d.down is not None}
    for width, model in ((2048, "sdxl"), (1024, "sd2"), (768, "sd15")):
        if width in context:
            return model
    return "unknown"


def load_lora(path: str, weight: float = 1.0, name: Optional[str] = None) -> LoraFile:
    """Read a LoRA .safetensors into a LoraFile at user weight `weight` (pickles are refused, never loaded).

    Refused with a LoraFormatError naming the file and the key: a tensor holding NaN or Inf (a NaN alpha
    too), a rank-0 layer, factors of different ranks. The weight is checked by `check_weight`.
    """
    from safetensors.torch import load_file

    weight = check_weight(weight)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise LoraFormatError(f"{path} is a directory; give the path of a LoRA .safetensors file in it")
    if not os.path.isfile(path):
        raise LoraFormatError(f"LoRA file not found: {path}")
    check_safetensors(path)
    file = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        tensors = load_file(path, device="cpu")
    except Exception as err:                       # a damaged or truncated file: say so, never half-load it
        raise LoraFormatError(f"{file}: not a readable safetensors file ({err})") from err
    bad = first_nonfinite((k, tensors[k]) for k in sorted(tensors))
    if bad is not None:
        raise LoraFormatError(f"{file}: {bad} holds NaN or Inf values (a diverged training or a damaged file); "
                              f"it would turn every image into NaN, so the file is refused")
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    try:
        unit, unsupported, duplicates = parse_state_dict(tensors)
    except LoraFormatError as err:
        raise LoraFormatError(f"{file}: {err}") from None
    label = name or os.path.splitext(file)[0]
    if not unit and not unsupported:
        raise LoraFormatError(f"{label}: no LoRA keys found in {file}")
    lora = LoraFile(name=label, path=path, sha256=file_sha256(path), metadata=metadata, layers=unit,
                    unsupported=unsupported, base_model=guess_base_model(metadata, unit), weight=1.0,
                    unit_layers=unit, duplicates=duplicates)
    return lora if weight == 1.0 else lora.with_weight(weight)
