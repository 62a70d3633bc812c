"""Backbones ``monai:<model>``: 3D networks from MONAI for ``--sample volume`` (random init).

* ``monai:resnet10`` / ``resnet18`` / ``resnet34`` / ``resnet50``: MONAI's 3D ResNets
  (Med3D layout), classifier removed: ``(B, C, D, H, W) -> (B, 512 or 2048)``.
* ``monai:vit``: MONAI's 3D ViT (cube patches, learned position embeddings, no class
  token), mean-pooled tokens ``(B, C, D, H, W) -> (B, hidden_size)``. It offers the token
  interface (:class:`sslkit.api.TokenBackbone`), so MAE masks its cube tokens and encodes
  only the visible ones. Options: ``patch_size`` (16), ``hidden_size`` (384), ``mlp_dim``
  (4 x hidden), ``num_layers`` (6), ``num_heads`` (6).

``in_chans`` follows the data; ``image_size`` is the run's volume size ``(D, H, W)`` (an
int means a cube). Every backbone here has ``spatial_dims = 3``: paired with 2D samples
(``--sample slice`` or ``slab:K``) the run is refused before decoding.
Needs MONAI (sslkit's ``volumes`` extra: ``pip install '.[volumes]'`` in the checkout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslkit.api import UsageError, first_line, hookimpl, unknown_name_message

RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50")
MODELS = (*RESNETS, "vit")


def _monai_nets():
    try:
        from monai.networks import nets
    except ImportError:
        raise UsageError("monai backbones need MONAI; install it with: pip install monai einops (or '.[volumes]' "
                         "in the sslkit checkout)") from None
    return nets


def _size3(image_size: Any) -> tuple[int, int, int]:
    if isinstance(image_size, int):
        return (image_size,) * 3
    size = tuple(int(v) for v in image_size)
    if len(size) != 3:
        raise UsageError(f"monai backbones take 3D volumes; got an input size of {size}")
    return size


class MonaiResNet(nn.Module):
    """``(B, C, D, H, W) -> (B, D_feat)``: a MONAI 3D ResNet without its classifier."""

    spatial_dims = 3

    def __init__(self, name: str, model: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.name = f"monai:{name}"
        self.model = model
        self.in_chans = in_chans
        self.num_features = int(model.in_planes)
        self.patch_size = 0  # not a token backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MonaiViT(nn.Module):
    """A MONAI 3D ViT with the token interface: cube patches of ``patch_size`` voxels."""

    spatial_dims = 3
    num_prefix_tokens = 0

    def __init__(self, model: nn.Module, in_chans: int, patch_size: int, hidden_size: int, grid: tuple[int, ...]):
        super().__init__()
        self.name = "monai:vit"
        self.model = model
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = self.num_features = hidden_size
        self.grid = grid  # patches along (D, H, W)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, N, hidden)``: cube embeddings plus position embeddings (raster order)."""
        return self.model.patch_embedding(x)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, hidden) -> (B, n, hidden)``: the transformer blocks and final norm."""
        for block in self.model.blocks:
            tokens = block(tokens)
        return self.model.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.patchify(x)).mean(dim=1)


def create(model: str, in_chans: int, image_size: Any, patch_size: int = 16, hidden_size: int = 384,
           mlp_dim: int | None = None, num_layers: int = 6, num_heads: int = 6, **options: Any) -> nn.Module:
    """Build ``monai:<model>`` (see the module docstring); ``options`` go to MONAI's constructor."""
    if model not in MODELS:
        raise UsageError(unknown_name_message("monai model", model, MODELS, suggestions=2))
    nets = _monai_nets()
    size = _size3(image_size)
    try:
        if model in RESNETS:
            net = getattr(nets, model)(spatial_dims=3, n_input_channels=in_chans, feed_forward=False, **options)
            return MonaiResNet(model, net, in_chans)
        if any(s % patch_size for s in size):
            raise UsageError(f"monai:vit needs a volume size divisible by patch_size {patch_size}; got "
                             f"{','.join(map(str, size))} (--volume-size, or --backbone-opt patch_size=...)")
        net = nets.ViT(in_channels=in_chans, img_size=size, patch_size=patch_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim or 4 * hidden_size, num_layers=num_layers, num_heads=num_heads,
                       classification=False, spatial_dims=3, **options)
    except (TypeError, ValueError, AssertionError) as exc:  # an option MONAI refuses (sizes were checked above)
        raise UsageError(f"cannot build monai:{model} with these --backbone-opt values: {first_line(exc)}") from None
    return MonaiViT(net, in_chans, patch_size, hidden_size, tuple(s // patch_size for s in size))


@hookimpl
def register_backbones(register):
    register("monai", create)
