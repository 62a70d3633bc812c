"""Backbones ``monai:<model>``: 3D networks from MONAI for ``--sample volume`` (random init).

* ``monai:resnet10`` / ``resnet18`` / ``resnet34`` / ``resnet50``: MONAI's 3D ResNets
  (Med3D layout), classifier removed: ``(B, C, D, H, W) -> (B, 512 or 2048)``.
* ``monai:vit``: MONAI's 3D ViT (cube patches, learned position embeddings, no class
  token), mean-pooled tokens ``(B, C, D, H, W) -> (B, hidden_size)``. It offers the token
  interface (:class:`sslkit.api.TokenBackbone`), so MAE masks its cube tokens and encodes
  only the visible ones. Options: ``patch_size`` (16), ``hidden_size`` (384), ``mlp_dim``
  (4 x hidden), ``num_layers`` (6), ``num_heads`` (6), and MONAI's ``proj_type``,
  ``pos_embed_type``, ``dropout_rate``, ``qkv_bias``, ``save_attn``.

The ResNets take MONAI's ``conv1_t_size``, ``conv1_t_stride``, ``no_max_pool``,
``shortcut_type``, ``widen_factor``, ``bias_downsample``, ``act`` and ``norm``. Any other
``--backbone-opt`` (one of the other family's, or one sslkit sets itself or that only a
classifier would use) is refused in one line naming it and the backbone, never ignored.

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
#: the ``--backbone-opt`` names each family uses (sslkit's ViT sizes, then MONAI's constructor arguments
#: that change the network; those sslkit sets or that only a classifier uses are not among them)
VIT_OPTIONS = ("patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type", "pos_embed_type",
               "dropout_rate", "qkv_bias", "save_attn")
RESNET_OPTIONS = ("conv1_t_size", "conv1_t_stride", "no_max_pool", "shortcut_type", "widen_factor",
                  "bias_downsample", "act", "norm")


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

    def init_target(self) -> dict[str, Any]:
        """Where ``--init`` weights go (:func:`sslkit.init.init_target`): the learned position table of the
        ``(D, H, W)`` cube grid, so weights made at another ``--volume-size`` are refused by that name."""
        return {"module": self, "first_conv": None, "pos_embed": "model.patch_embedding.position_embeddings",
                "grid": self.grid, "prefix_tokens": 0}

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


def check_options(model: str, options: dict[str, Any]) -> None:
    """Refuse a ``--backbone-opt`` that ``monai:<model>``'s family does not use, naming it and the backbone."""
    used = RESNET_OPTIONS if model in RESNETS else VIT_OPTIONS
    for name in options:
        if name not in used:
            family = "monai:vit" if name in VIT_OPTIONS else "monai:resnet*" if name in RESNET_OPTIONS else ""
            hint = f"; {name} is a {family} option, not used by monai:{model}" if family else ""
            raise UsageError(unknown_name_message(f"monai:{model} --backbone-opt", name, used, hint))


def create(model: str, in_chans: int, image_size: Any, **options: Any) -> nn.Module:
    """Build ``monai:<model>`` (see the module docstring); ``options`` go to MONAI's constructor."""
    if model not in MODELS:
        raise UsageError(unknown_name_message("monai model", model, MODELS, suggestions=2))
    check_options(model, options)
    nets, size = _monai_nets(), _size3(image_size)
    if model in RESNETS:
        return _resnet(nets, model, in_chans, options)
    return _vit(nets, in_chans, size, **options)


def _resnet(nets: Any, model: str, in_chans: int, options: dict[str, Any]) -> nn.Module:
    try:
        net = getattr(nets, model)(spatial_dims=3, n_input_channels=in_chans, feed_forward=False, **options)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:  # a value MONAI refuses
        raise UsageError(f"cannot build monai:{model} with these --backbone-opt values: {first_line(exc)}") from None
    return MonaiResNet(model, net, in_chans)


def _vit(nets: Any, in_chans: int, size: tuple[int, int, int], patch_size: int = 16, hidden_size: int = 384,
         mlp_dim: int | None = None, num_layers: int = 6, num_heads: int = 6, **options: Any) -> nn.Module:
    sizes = {"patch_size": patch_size, "hidden_size": hidden_size, "mlp_dim": mlp_dim, "num_layers": num_layers,
             "num_heads": num_heads}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"monai:vit --backbone-opt {name} must be a positive integer; got {repr(value)[:40]}")
    if any(s % patch_size for s in size):
        raise UsageError(f"monai:vit needs a volume size divisible by patch_size {patch_size}; got "
                         f"{','.join(map(str, size))} (--volume-size, or --backbone-opt patch_size=...)")
    try:
        net = nets.ViT(in_channels=in_chans, img_size=size, patch_size=patch_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim or 4 * hidden_size, num_layers=num_layers, num_heads=num_heads,
                       classification=False, spatial_dims=3, **options)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:  # a value MONAI refuses (sizes checked above)
        raise UsageError(f"cannot build monai:vit with these --backbone-opt values: {first_line(exc)}") from None
    return MonaiViT(net, in_chans, patch_size, hidden_size, tuple(s // patch_size for s in size))


@hookimpl
def register_backbones(register):
    register("monai", create)
