"""Renaming published weights to timm's key names.

Three layouts are recognised and converted; anything else is taken as timm's own:

* **timm** (and torchvision's ResNets, whose names timm's ResNets share: ``conv1``,
  ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``): unchanged, but for Meta's
  own DINOv2 names (``register_tokens`` -> ``reg_token``, SwiGLU ``mlp.w12``/``w3`` -> ``fc1``/``fc2``).
* **Hugging Face ViT / DINOv2** (``transformers``' ``ViTModel``, ``Dinov2Model`` and their
  ``*ForImageClassification`` wrappers): ``embeddings.patch_embeddings.projection`` ->
  ``patch_embed.proj``, ``encoder.layer.N.attention.attention.{query,key,value}`` ->
  one fused ``blocks.N.attn.qkv``, ``layer_scale1.lambda1`` -> ``ls1.gamma``,
  ``layernorm_before``/``intermediate``/``output`` (ViT) -> ``norm1``/``mlp.fc1``/``mlp.fc2``, ...
* **torchvision ViT** (``vit_b_16``...): ``conv_proj``, ``encoder.layers.encoder_layer_N``,
  ``self_attention.in_proj_weight`` -> ``blocks.N.attn.qkv``, ...

Then a common key prefix (``module.``, ``backbone.``, ``model.``, ``teacher.backbone.``...)
is removed: the prefix whose removal matches the most keys of the target model.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch

_HF_VIT = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(?:norm1|layernorm_before)\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:norm2|layernorm_after)\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"encoder\.layer\.(\d+)\.(?:mlp\.fc1|mlp\.weights_in|intermediate\.dense)\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:mlp\.fc2|mlp\.weights_out|output\.dense)\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(\w+)", r"norm.\1"),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)")

#: Meta's own DINOv2 checkpoints, otherwise timm's names: registers, and the SwiGLU MLP of ViT-g
_META_DINOV2 = [
    (r"register_tokens", "reg_token"),
    (r"blocks\.(\d+)\.mlp\.w12\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
]

_TV_VIT = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(\w+)", r"norm.\1"),
]


def detect_layout(keys: Iterable[str]) -> str:
    """``"hf-vit"``, ``"torchvision-vit"`` or ``"timm"`` (also torchvision ResNets)."""
    keys = list(keys)
    if any("embeddings.patch_embeddings.projection." in k for k in keys):
        return "hf-vit"
    if any("encoder.layers.encoder_layer_" in k for k in keys) and any(k.endswith("conv_proj.weight") for k in keys):
        return "torchvision-vit"
    return "timm"


def to_timm(state: dict[str, torch.Tensor], target_keys: Iterable[str]) -> tuple[dict[str, torch.Tensor], str, str]:
    """``state`` renamed to timm's names and stripped of its prefix: ``(state, layout, prefix)``."""
    layout = detect_layout(state)
    if layout == "hf-vit":
        prefix = _prefix_before(state, "embeddings.patch_embeddings.projection.weight")
        state = _convert_hf_vit(_strip(state, prefix))
    elif layout == "torchvision-vit":
        prefix = _prefix_before(state, "conv_proj.weight")
        state = _rename(_strip(state, prefix), _TV_VIT)
    else:
        prefix = best_prefix(state, set(target_keys))
        state = _rename(_strip(state, prefix), _META_DINOV2)
    return state, layout, prefix


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys that have it; other keys stay as they are (reported unused)."""
    return {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in state.items()}


def best_prefix(state: dict[str, torch.Tensor], target: set[str]) -> str:
    """The key prefix whose removal makes the most keys of ``state`` names of ``target``."""
    counts: Counter[str] = Counter()
    for key in state:
        for t in (key[i:] for i in range(len(key)) if i == 0 or key[i - 1] == "."):
            if t in target:
                counts[key[: len(key) - len(t)]] += 1
                break
    if not counts:
        return ""
    return max(counts, key=lambda p: (counts[p], -len(p)))


def _prefix_before(state: dict[str, torch.Tensor], suffix: str) -> str:
    key = min((k for k in state if k.endswith(suffix)), key=len)
    return key[: len(key) - len(suffix)]


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in table:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _convert_hf_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT / DINOv2 names -> timm's; separate q, k, v projections fused to ``qkv``."""
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        m = _HF_QKV.fullmatch(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            rest[key] = value
    out = _rename(rest, _HF_VIT)
    for (block, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:  # incomplete: keep the pieces under their own names (reported as unexpected)
            out.update({f"encoder.layer.{block}.attention.attention.{p}.{kind}": v for p, v in parts.items()})
    if "mask_token" in out and out["mask_token"].ndim == 2:  # HF (1, D); timm (1, 1, D) where it has one
        out["mask_token"] = out["mask_token"][:, None]
    return out
