"""The backbone protocol: pixels in, one embedding per image out.

Every backbone factory (``register_backbones``) returns an ``nn.Module`` with

* ``forward(x)``: ``(B, C, H, W) -> (B, D)`` pooled embedding. This is what export ships.
* ``in_chans: int`` and ``num_features: int`` (``D``).

Vision transformers additionally offer the token interface masked tasks need (see
:class:`TokenBackbone`); tasks test for it with :func:`is_token_backbone`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """What every backbone factory returns: an ``nn.Module`` with ``in_chans``,
    ``num_features`` (``D``) and ``forward(x): (B, C, H, W) -> (B, D)``."""

    in_chans: int
    num_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TokenBackbone(Protocol):
    """What a ViT-like backbone exposes for masked image modelling.

    * ``patch_size: int``, ``embed_dim: int``, ``num_prefix_tokens: int``.
    * ``patchify(x)``: ``(B, C, H, W) -> (B, N, D)`` patch embeddings with positions added.
    * ``encode_tokens(tokens)``: ``(B, n, D) -> (B, num_prefix_tokens + n, D)``: prepends
      the class token(s) and runs the transformer blocks and final norm on the tokens
      given, so an encoder that sees only the visible patches costs O(n), not O(N).
    """

    patch_size: int
    embed_dim: int
    num_prefix_tokens: int

    def patchify(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...


def is_token_backbone(backbone: nn.Module) -> bool:
    """True when ``backbone`` offers the :class:`TokenBackbone` interface masked tasks need."""
    return isinstance(backbone, TokenBackbone) and getattr(backbone, "patch_size", 0) > 0


def describe(backbone: nn.Module) -> str:
    return getattr(backbone, "name", type(backbone).__name__)
