"""Fitting renamed weights to the run's backbone: input channels, patch size, position grid.

Every target tensor is taken from the weights when the shapes agree; otherwise one of
three adaptations applies (timm's own helpers, as ``timm.create_model(pretrained=True)``
uses them), and anything else is a mismatch the caller refuses:

* the **stem** (``first_conv``, ``(O, C, kh, kw)``): ``C`` 3 -> 1 sums the colour filters,
  1 -> 3 repeats the filter and scales it by 1/3 (``timm.models.adapt_input_conv``), so a
  grey image gives the same response either way;
* a ViT's **patch size** (e.g. 14 -> 16): the patch-embedding kernel is resampled
  (``timm.layers.resample_patch_embed``, FlexiViT's pseudo-inverse resize);
* a ViT's **position embeddings** ``(1, P + h*w, D)``: the patch grid is resampled
  bicubically to the run's grid (``timm.layers.resample_abs_pos_embed``); the ``P``
  class/register positions are kept, or, where the backbone embeds no position for its
  prefix tokens (timm's ``no_embed_class``: DINOv2 with registers), added to the class and
  register tokens themselves, which is the same input to the first block (timm's
  ``_convert_dinov2``); dropped only when the backbone has no such token.

A 3D backbone's position embeddings (a ``(d, h, w)`` cube grid) are not resampled: the
weights hold only the number of positions, not the grid they were laid out on, so weights
made at another volume size are refused in one line naming ``--volume-size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from sslkit.errors import UsageError


@dataclass
class Fitted:
    """The tensors to load and what happened to each part of the weights."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)  # target key -> tensor, target shapes
    adapted: list[str] = field(default_factory=list)  # human-readable, one entry per adaptation
    missing: list[str] = field(default_factory=list)  # target keys the weights lack (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # weight keys the backbone has no place for
    mismatched: list[str] = field(default_factory=list)  # "key (weights shape) vs (backbone shape)"


def fit(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], info: dict[str, Any]) -> Fitted:
    """Fit ``weights`` (timm names) to ``target`` (the backbone's state dict).

    ``info``: ``first_conv`` (stem weight key or None), ``pos_embed`` (key or None),
    ``grid`` ``(h, w)`` (a 3D backbone: ``(d, h, w)``) and ``prefix_tokens`` of the target's
    position embeddings. Raises :class:`UsageError` when a 3D grid's position count differs.
    """
    out = Fitted()
    out.unexpected = sorted(set(weights) - set(target))
    dropped: list[torch.Tensor] = []  # prefix positions the target has no slot for, in token order
    for key, want in target.items():
        have = weights.get(key)
        if have is None:
            if not key.endswith("num_batches_tracked"):  # a BatchNorm counter many checkpoints omit
                out.missing.append(key)
            continue
        if tuple(have.shape) != tuple(want.shape):
            if key == info.get("first_conv"):
                have = _stem(have, want, key, out.adapted)
            elif key == info.get("pos_embed"):
                have = _pos_embed(have, want, info, out.adapted, dropped)
            if have is None or tuple(have.shape) != tuple(want.shape):
                out.mismatched.append(f"{key} {tuple(weights[key].shape)} vs {tuple(want.shape)}")
                continue
        out.state[key] = have.to(want.dtype)
    if dropped:
        _fold_prefix_positions(out, dropped[0], int(info.get("prefix_tokens", 0)))
    return out


#: top-level names of classifier and SSL heads: their tensors are "unused", never a sign of another architecture
HEADS = frozenset({"fc", "head", "heads", "classifier", "projection", "projector", "proj_head", "pooler",
                   "predictor", "decoder", "last_linear", "head_dist", "pre_logits"})


def extra_blocks(unexpected: list[str], target: dict[str, torch.Tensor]) -> list[str]:
    """The numbered blocks of ``unexpected`` keys that the target lacks beside its own: ``layer1.2``
    for ``layer1.2.bn1.bias`` where the target's ``layer1`` holds ``0`` and ``1`` (ResNet-34 weights
    for a ResNet-18, a 12-block ViT's for a 6-block one). Keys under a head (:data:`HEADS`) or
    outside any numbered sequence of the target (``mask_token``, ``pooler.*``, a buffer an older
    version kept) are not counted: they stay "unused"."""
    children: dict[str, set[str]] = {}
    for key in target:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            children.setdefault(".".join(parts[:i]), set()).add(parts[i])
    found: dict[str, None] = {}
    for key in unexpected:
        parts = key.split(".")
        if parts[0] in HEADS:
            continue
        for i in range(len(parts) - 1):  # the first module on the key's path that the target lacks
            parent = ".".join(parts[:i])
            if parts[i] in children.get(parent, ()):
                continue
            if parts[i].isdigit() and any(c.isdigit() for c in children.get(parent, ())):
                found[".".join(parts[:i + 1])] = None
            break
    return list(found)


def _fold_prefix_positions(out: Fitted, positions: torch.Tensor, kept: int) -> None:
    """Add the dropped positions ``(1, n, D)`` of prefix tokens ``kept .. kept + n - 1`` (0: the class
    token, then the registers) to those tokens where the weights gave them, so the first block sees
    what it saw in the model the weights come from."""
    folded, lost = [], 0
    for j in range(positions.shape[1]):
        token = kept + j
        key, row = ("cls_token", 0) if token == 0 else ("reg_token", token - 1)
        t = out.state.get(key)
        if t is None or t.ndim != 3 or row >= t.shape[1]:
            lost += 1
            continue
        t = t.clone()
        t[:, row] += positions[:, j].to(t.dtype)
        out.state[key] = t
        folded.append("class" if token == 0 else f"register {row}")
    if folded:
        out.adapted.append(f"pos_embed: {len(folded)} prefix position(s) ({', '.join(folded)}) added to their "
                           "tokens (the backbone embeds none for them)")
    if lost:
        out.adapted.append(f"pos_embed: {lost} prefix position(s) dropped (the backbone has no such token)")


def _stem(w: torch.Tensor, want: torch.Tensor, key: str, notes: list[str]) -> torch.Tensor | None:
    """``(O, C, k, k)`` -> the target's channels and (patch embeddings) kernel size."""
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    if w.ndim != 4 or w.shape[0] != want.shape[0]:
        return None
    if tuple(w.shape[2:]) != tuple(want.shape[2:]):
        if not key.startswith("patch_embed"):
            return None  # a CNN stem of another kernel size (e.g. cifar_stem) has no faithful resize
        old = _hw(w)
        w = resample_patch_embed(w.float(), list(want.shape[2:]))
        notes.append(f"{key}: patch size {old} -> {_hw(w)} (kernel resampled)")
    c_from, c_to = int(w.shape[1]), int(want.shape[1])
    if c_from != c_to:
        if c_to != 1 and c_from != 1:
            return None
        w = adapt_input_conv(c_to, w.float(), base_chans=c_from)
        how = "summed" if c_to == 1 else f"repeated, scaled by 1/{c_to}"
        notes.append(f"{key}: input channels {c_from} -> {c_to} ({how})")
    return w


def _hw(w: torch.Tensor) -> str:
    return "x".join(str(int(s)) for s in w.shape[2:])


def _pos_embed(pe: torch.Tensor, want: torch.Tensor, info: dict[str, Any], notes: list[str],
               dropped: list[torch.Tensor]) -> torch.Tensor | None:
    """``(1, P' + h'*w', D)`` -> ``(1, P + h*w, D)`` on the target grid; the ``P' - P`` prefix
    positions it has no slot for go to ``dropped``."""
    from timm.layers import resample_abs_pos_embed

    if pe.ndim != 3 or want.ndim != 3 or pe.shape[-1] != want.shape[-1]:
        return None
    if len(info["grid"]) == 3:
        _refuse_3d(pe, want, tuple(info["grid"]))
    gh, gw = info["grid"]
    prefix = int(info.get("prefix_tokens", 0))
    for p in dict.fromkeys((prefix, 1, 0, 5, 4)):  # class token, none, class + 4 registers, registers
        side = math.isqrt(pe.shape[1] - p) if pe.shape[1] > p else 0
        if side and side * side == pe.shape[1] - p and p >= prefix:
            break
    else:
        return None
    if p > prefix:  # the weights embed positions of prefix tokens this backbone embeds none for
        dropped.append(pe[:, prefix:p])
        pe = torch.cat([pe[:, :prefix], pe[:, p:]], 1) if prefix else pe[:, p:]
    if (side, side) != (gh, gw):
        pe = resample_abs_pos_embed(pe.float(), [gh, gw], [side, side], num_prefix_tokens=prefix)
        notes.append(f"pos_embed: {side}x{side} -> {gh}x{gw} patch grid (bicubic)")
    return pe


def _refuse_3d(pe: torch.Tensor, want: torch.Tensor, grid: tuple[int, int, int]) -> NoReturn:
    """Weights whose 3D position table has another length: made at another volume (or patch) size."""
    cubes = "x".join(map(str, grid))
    raise UsageError(f"--init weights hold 3D position embeddings for {pe.shape[1]} cubes and this backbone's "
                     f"{cubes} cube grid has {want.shape[1]}; 3D position embeddings are not resampled: give the "
                     f"--volume-size (and --backbone-opt patch_size) of the run the weights were made by")
