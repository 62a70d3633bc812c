"""Backbones ``timm:<model>``: any timm architecture, random init, never downloading weights.

``in_chans`` follows the data (1 for grayscale); ViTs are built for the run's image size
and also offer the token interface (:class:`sslkit.backbone.TokenBackbone`) that masked
image modelling needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.api import UsageError, first_line, hookimpl, unknown_name_message


def _is_vit(module: nn.Module) -> bool:
    """A timm VisionTransformer. timm is imported when a model is built, not when the plugin loads: its import
    (torchvision's, torch._dynamo's) is half a CLI's start-up, which a listing or a one-line error never needs."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


class TimmBackbone(nn.Module):
    """``(B, C, H, W) -> (B, D)``: a timm model with its classifier removed.

    ``self.model`` is the plain timm module, so ``model.*`` keys of the state dict are
    timm's own and load into ``timm.create_model(name, in_chans=C)``.
    """

    def __init__(self, name: str, model: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.name = f"timm:{name}"
        self.model = model
        self.in_chans = in_chans
        self.num_features = int(model.num_features)
        if _is_vit(model) and model.pos_embed is not None and not model.dynamic_img_size:
            self.patch_size = int(model.patch_embed.patch_size[0])
            self.embed_dim = int(model.embed_dim)
            self.num_prefix_tokens = int(model.num_prefix_tokens)
        else:
            self.patch_size = 0  # not a token backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def embedding_options(self, embedding: str) -> dict[str, Any] | None:
        """The timm options that make this model embed by ``embedding`` (``Task.embedding``), or None.

        ``"patch_mean"`` on a ViT that pools its class token: ``global_pool="avg"`` with
        ``fc_norm=False``, so the final norm stays on every token (the parameters are the
        same) and the embedding is the mean of the normed patch tokens.
        """
        m = self.model
        if (embedding == "patch_mean" and _is_vit(m) and m.global_pool == "token"
                and isinstance(m.fc_norm, nn.Identity)):
            return {"global_pool": "avg", "fc_norm": False}
        return None

    def init_target(self) -> dict[str, Any]:
        """Where ``--init`` weights go: ``self.model`` (timm's key names), its stem weight
        (timm's ``pretrained_cfg["first_conv"]``) and, for ViTs, the position embeddings'
        patch grid ``(h, w)`` and the count of prefix tokens they include."""
        m = self.model
        first = (getattr(m, "pretrained_cfg", None) or {}).get("first_conv")
        first = first[0] if isinstance(first, (list, tuple)) else first
        target: dict[str, Any] = {"module": m, "first_conv": f"{first}.weight" if first else None, "pos_embed": None}
        if _is_vit(m) and m.pos_embed is not None:
            target.update(pos_embed="pos_embed", grid=tuple(int(g) for g in m.patch_embed.grid_size),
                          prefix_tokens=0 if m.no_embed_class else int(m.num_prefix_tokens))
        return target

    # --- token interface (ViTs) -------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, D)``: patch embeddings plus their position embeddings."""
        m = self.model
        tokens = self.embed_patches(x)
        start = 0 if m.no_embed_class else m.num_prefix_tokens
        return tokens + m.pos_embed[:, start:]

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, D)``: timm's patch embedding, as one matrix product.

        A convolution whose kernel equals its stride is a linear map of each patch, so the
        patches are cut out (in the kernel's ``(C, p, p)`` order) and multiplied by the
        flattened kernel: ``patch_embed(x)`` up to float rounding. cuDNN's bf16 strided
        convolution took about 1 ms forward and 1 ms backward of a 23 ms ViT-S MAE step
        (batch 256, H200; BENCHMARKS.md). Other patch embeddings are called as they are.
        """
        pe, p = self.model.patch_embed, self.patch_size
        proj = getattr(pe, "proj", None)
        b, c, h, w = x.shape
        if not (type(proj) is nn.Conv2d and proj.kernel_size == (p, p) and proj.stride == (p, p)
                and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1
                and getattr(pe, "flatten", False) and not getattr(pe, "dynamic_img_pad", True)
                and h % p == 0 and w % p == 0):
            return pe(x)
        cols = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        cols = cols.reshape(b, (h // p) * (w // p), c * p * p)
        return pe.norm(F.linear(cols, proj.weight.reshape(proj.out_channels, -1), proj.bias))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, D) -> (B, P + n, D)``: prepend class/register tokens, run blocks, norm."""
        m = self.model
        prefix = [t for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)
            if not m.no_embed_class:
                pre = pre + m.pos_embed[:, : m.num_prefix_tokens]
            tokens = torch.cat([pre.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = m.norm_pre(m.pos_drop(tokens))
        return m.norm(m.blocks(x))


def use_cifar_stem(net: nn.Module) -> None:
    """Small-image stem for ResNets (SimCLR's CIFAR variant): 3x3 stride-1 conv, no max-pool."""
    conv = getattr(net, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(net, "maxpool"):
        raise UsageError("cifar_stem=true applies to ResNet-style timm models (conv1 + maxpool), e.g. timm:resnet18")
    net.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()


#: ``pos_embed=sincos``: fixed 2-D sine-cosine position embeddings, as MAE and MoCo v3 build their ViTs
SINCOS = "sincos"


def timm_create_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` keywords for the backbone options (``cifar_stem`` aside):
    ``pos_embed=sincos`` is timm's learned table (``"learn"``), filled in and frozen after
    building, so its values are in the weights."""
    return {**options, "pos_embed": "learn"} if options.get("pos_embed") == SINCOS else dict(options)


def use_sincos_pos_embed(net: nn.Module) -> None:
    """Fixed 2-D sine-cosine position embeddings (MAE, MoCo v3): filled in, not trained.

    Half the channels encode the patch row, half its column (``timm.layers.build_sincos2d_pos_embed``);
    class/register tokens get position 0. ``requires_grad`` is off, so the optimizer leaves the
    table (weights loaded by ``--init`` replace it and stay frozen too).
    """
    if not _is_vit(net) or net.pos_embed is None:
        raise UsageError("pos_embed=sincos applies to timm ViTs with position embeddings, "
                         "e.g. timm:vit_tiny_patch16_224")
    from timm.layers import build_sincos2d_pos_embed

    gh, gw = (int(g) for g in net.patch_embed.grid_size)
    if net.embed_dim % 4:
        raise UsageError(f"pos_embed=sincos needs an embedding width divisible by 4, not {net.embed_dim}")
    table = build_sincos2d_pos_embed([gh, gw], net.embed_dim)
    with torch.no_grad():
        net.pos_embed.zero_()
        net.pos_embed[0, net.pos_embed.shape[1] - gh * gw:] = table.to(net.pos_embed.dtype)
    net.pos_embed.requires_grad_(False)


#: timm keywords sslkit sets itself: what each is set to, and how a user changes it
SET_BY_SSLKIT = {
    "num_classes": ("0: the encoder's features, no classifier", "remove it (eval fits classifiers on the features)"),
    "pretrained": ("false: weights are never downloaded",
                   "start from weights with --init (e.g. --init timm:MODEL.TAG)"),
    "img_size": ("from --image-size", "give --image-size instead"),
    "model": ("from --backbone timm:MODEL", "give --backbone instead"),
}
#: options that are sizes (positive integers, or one per stage) beside the dropout rates (``*drop*_rate``,
#: in [0, 1); not DenseNet's ``growth_rate``)
POSITIVE_INTS = ("patch_size", "embed_dim", "depth", "num_heads")


def check_options(options: dict[str, Any]) -> None:
    """Refuse, in one line, an option sslkit sets itself, a rate outside [0, 1) and a size below 1,
    before timm builds anything (timm takes such values silently and fails in training)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key, value in options.items():
        if key in SET_BY_SSLKIT:
            what, how = SET_BY_SSLKIT[key]
            raise UsageError(f"--backbone-opt {key}: sslkit sets it ({what}); {how}")
        if "drop" in key and key.endswith("_rate") and not (number(value) and 0 <= value < 1):
            raise UsageError(f"--backbone-opt {key} must be a number in [0, 1), got {value!r}")
        sizes = value if isinstance(value, (list, tuple)) else [value]  # per stage (Swin's num_heads, ...)
        if key in POSITIVE_INTS and not (sizes and all(type(v) is int and v >= 1 for v in sizes)):
            raise UsageError(f"--backbone-opt {key} must be an integer >= 1, got {value!r}")
        if key == "zero_init_last" and not isinstance(value, bool):  # timm takes any text as true
            raise UsageError(f"--backbone-opt zero_init_last must be true or false, got {value!r}")
        if key == "mlp_ratio" and not (number(value) and value > 0):
            raise UsageError(f"--backbone-opt {key} must be a number > 0, got {value!r}")


def _build(model: str, in_chans: int, image_size: int, options: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with ``options``; what it raises is one line naming them (on torch's meta
    device it is raised as it is, so :func:`sslkit.registry.meta_backbone` builds again for real)."""
    import timm

    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans, **timm_create_options(options))
    try:
        try:
            return timm.create_model(model, img_size=image_size, **kwargs)
        except TypeError:  # architectures without an img_size argument (CNNs)
            return timm.create_model(model, **kwargs)
    except Exception as exc:
        if torch.get_default_device().type == "meta":
            raise
        given = f" with {', '.join(f'{k}={v}' for k, v in options.items())}" if options else ""
        raise UsageError(f"cannot build timm:{model} for {in_chans}x{image_size}x{image_size} input{given}: "
                         f"{first_line(exc)}") from None


#: norm layers timm's ``zero_init_last`` zeroes (a residual block's last BatchNorm, or GroupNorm in ResNetV2)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def live_residual_blocks(net: nn.Module) -> int:
    """Set to one the norm weights a fresh timm model holds at zero (``zero_init_last``: each
    residual block's last norm), so every block passes its signal from the first step, as
    torchvision's ResNets and the SSL references built on them start. With them at zero a random
    ResNet is a chain of strided 1x1 convolutions: at 32 px its embedding reads only the top-left
    8 x 8 pixels, a degenerate start and a degenerate random-init baseline. Returns how many."""
    count = 0
    with torch.no_grad():
        for m in net.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, _NORMS) and isinstance(w, torch.Tensor) and not w.is_meta and w.numel() and not w.any():
                w.fill_(1.0)
                count += 1
    return count


def _check_patch_size(model: str, net: nn.Module, image_size: int) -> None:
    """A ViT's patches must tile the image: refused in one line with the sizes that would."""
    if _is_vit(net):
        p = int(net.patch_embed.patch_size[0])
        if image_size % p:
            sizes = sorted({s for s in (image_size // p * p, (image_size // p + 1) * p) if s >= p})
            raise UsageError(f"--image-size {image_size} is not a multiple of timm:{model}'s patch size {p}; "
                             f"use --image-size {' or '.join(map(str, sizes))}, or another patch_size")


def create(model: str, /, in_chans: int, image_size: int, cifar_stem: bool = False, **options: Any) -> TimmBackbone:
    """Build ``timm:<model>`` with ``pretrained=False`` and ``num_classes=0``.

    ``options`` go to ``timm.create_model`` (e.g. ``patch_size=8``, ``drop_path_rate=0.1``;
    :func:`check_options` refuses what sslkit sets itself and values out of range);
    ``cifar_stem=True`` swaps a ResNet's stem for a 3x3 stride-1 conv without max-pool;
    ``pos_embed=sincos`` gives a ViT fixed sine-cosine position embeddings (:func:`use_sincos_pos_embed`);
    residual blocks start live (:func:`live_residual_blocks`) unless ``zero_init_last`` is given.
    """
    import timm

    if not timm.is_model(model):
        raise UsageError(unknown_name_message("timm model", model, timm.list_models(), "; see timm.list_models()",
                                              suggestions=3, listed=0))
    check_options(options)
    net = _build(model, in_chans, image_size, options)
    if "zero_init_last" not in options:
        live_residual_blocks(net)
    if cifar_stem:
        use_cifar_stem(net)
    if options.get("pos_embed") == SINCOS:
        use_sincos_pos_embed(net)
    _check_patch_size(model, net, image_size)
    backbone = TimmBackbone(model, net, in_chans)
    #: what turns a fresh ``timm.create_model(model)`` into this architecture (exporters rebuild it)
    backbone.timm_modifier = use_cifar_stem if cifar_stem else None
    #: ``timm.create_model`` keywords (beside ``in_chans``, ``img_size``) that build it before the modifier
    backbone.create_options = timm_create_options(options)
    return backbone


@hookimpl
def register_backbones(register):
    register("timm", create)
