"""Task ``simmim``: SimMIM, simple masked image modeling (Xie et al., CVPR 2022).

Random ``mask_patch``-sized squares (``mask_ratio`` of them) of the image are masked:
their patch embeddings are replaced by a learned mask token *before* the encoder, which
processes all tokens (unlike MAE). A one-layer prediction head - a 1x1 convolution
followed by a pixel shuffle by the encoder's output stride - regresses the target of
every masked token. With ``target=pixels`` (the paper's) that is the raw (normalised)
pixels, ``M`` the pixel mask (1 = masked), and the loss the L1 distance on masked pixels
(paper Sec. 3, Eq. 1)::

    L = sum( M * |x - x^| ) / (sum(M) * C)

On ViTs and Swin the default ``target=hog`` (on CNNs ``pixels``) regresses MaskFeat's (Wei et
al., CVPR 2022) histograms of oriented gradients instead (``sslkit.api.hog_tokens``: per channel, 9 unsigned
orientation bins over 2x2 cells per patch, each token's histograms L2-normalised), one
vector per token from the same head, ``m`` the token mask::

    L_hog = sum_t m_t * ||h^_t - h_t||^2 / (D * sum_t m_t)       (D values per token)

Measured on a ViT (BENCHMARKS.md "HOG targets for MAE and SimMIM"): on the 1-channel chest X-rays,
+0.020 AUROC over pixels at both seeds (per-fold SE 0.006 and 0.002), from below a
random ViT (-0.018 and -0.007) to level with or above it (+0.002 ± 0.006, +0.013 ± 0.007);
on CIFAR-10 level with pixels (-0.6 and +0.6 ± 0.7), still below the random ViT. Its LR
stays 1e-4: 3e-4 and 3e-5 are level with it on both.

``visible_weight`` adds the visible tokens to either loss at that weight against the masked
tokens' 1 (1: the paper's "predict all pixels" ablation). Default 1 on CNNs, 0 (the paper's) on
ViTs and Swin. Measured: on the CNN default below 96 px (ResNet-18, pixel targets, 2 CPU min) it
turns a level CIFAR-10 kNN into +2.8 / +3.2 (SE 0.7) over a live random ResNet-18 at two seeds
(BENCHMARKS.md "Recipes again, thirty-eighth session"); on a ViT with HOG targets no help (-0.4 /
-0.6, "SimMIM: visible tokens in the loss ...").

Backbones: timm ViTs (``timm:vit_*``; stride = patch size, prefix tokens dropped), Swin
transformers (``timm:swin_*``; stride 32, from the last stage) and CNNs with a square feature
map (``timm:resnet18``...): a CNN has no tokens to swap, so its masked squares are set to a
learned value per channel in the image itself, tokens are 4 px (as Swin's patches) and the head
predicts every token from the feature map of the encoder's output stride. Defaults (paper, but
the target): mask ratio 0.6, mask patch 32 px at 224 px (scaled with the image size, a multiple of
the model's patch size), random resized crops of scale 0.67-1 (``min_scale``) and flips. The
backbone (``default_backbone_for``): a ResNet-18 with pixel targets at AdamW 3e-3 below 96 px, where
no ViT setting searched beat a random ViT and the ResNet-18 beats a random one by 10-12 kNN points
at 2 CPU min (BENCHMARKS.md "SimMIM on a ResNet-18"); the paper's family, ViT-Tiny with HOG targets
at 1e-4, from 96 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sslkit.api import (Task, UsageError, check_unit_interval, hog_token_size, hog_tokens, hookimpl,
                        reconstruction_views)


def _architectures() -> tuple[type, type, type, type]:
    """timm's ``VisionTransformer, SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr``: what SimMIM knows
    how to mask, imported when a task is checked or built, not when the plugin loads (see backbones/timm.py)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr


#: below this image side the default backbone is SMALL_BACKBONE, a CNN (measured; see default_backbone_for)
SMALL_IMAGE = 96
SMALL_BACKBONE = "timm:resnet18"


#: a CNN's token (mask unit and HOG target) side, as Swin's 4-px patches
CNN_TOKEN = 4


def _model(backbone):
    return getattr(backbone, "model", None)


def _features(m, in_chans: int, s: int) -> torch.Tensor:
    """``m.forward_features`` of one blank ``s``-px image (the model's mode kept, so no BatchNorm
    statistics move): the shape of its output map."""
    training = m.training
    m.eval()
    try:
        with torch.no_grad():
            return m.forward_features(torch.zeros(1, in_chans, s, s))
    finally:
        m.train(training)


def _cnn_grid(m, backbone, spec):
    """``(side, channels)`` of a CNN's square ``(B, D, h, w)`` feature map on the run's images, or None."""
    if m is None or not hasattr(m, "forward_features"):
        return None
    try:
        out = _features(m, backbone.in_chans, spec.image_size)
    except (RuntimeError, ValueError, TypeError, AssertionError):
        return None
    if out.dim() != 4 or out.shape[-1] != out.shape[-2]:
        return None
    return int(out.shape[-1]), int(out.shape[1])


def token_mask(b: int, grid: int, scale: int, ratio: float, device) -> torch.Tensor:
    """``(B, grid, grid)`` float token mask; masking is decided per ``scale x scale`` block (the blocks of
    the last row and column overhang the grid's edge where ``scale`` does not divide it)."""
    g = -(-grid // scale)
    n = g * g
    k = int(-(-n * ratio // 1))  # ceil
    order = torch.rand(b, n, device=device).argsort(1)
    m = torch.zeros(b, n, device=device)
    m.scatter_(1, order[:, :k], 1.0)
    return m.view(b, g, g).repeat_interleave(scale, 1).repeat_interleave(scale, 2)[:, :grid, :grid]


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6  # fraction of the mask_patch squares masked, in (0, 1) (paper: 0.6)
    mask_patch: int | None = None  # masked square side in px, a multiple of the token size; None: 32 at 224 px, scaled
    min_scale: float = 0.67  # random resized crops of scale min_scale-1 (the paper's 0.67)
    head_depth: int = 0  # transformer blocks between the encoder and the linear pixel head (paper: 0)
    target: str | None = None  # hog (MaskFeat's histograms) or pixels (the paper's); None: hog, pixels on CNNs
    visible_weight: float | None = None  # loss weight of visible tokens vs masked ones' 1 (paper 0); None: 1 CNN, 0 ViT

    def __post_init__(self) -> None:
        check_unit_interval("min_scale", self.min_scale)
        if self.head_depth < 0:
            raise ValueError("head_depth must be >= 0")
        if not 0 < self.mask_ratio < 1:
            raise ValueError("mask_ratio must be in (0, 1)")
        if self.mask_patch is not None and self.mask_patch < 1:
            raise ValueError("mask_patch must be >= 1")
        if self.visible_weight is not None and not (math.isfinite(self.visible_weight) and self.visible_weight >= 0):
            raise ValueError(f"visible_weight must be a finite number >= 0, got {self.visible_weight}")
        if self.target not in (None, "pixels", "hog"):
            raise ValueError("target must be pixels or hog")


class SimMIM(Task):
    Options = SimMIMOptions
    #: CNNs (the default below 96 px): AdamW at base_lr 3e-3, measured (BENCHMARKS.md "SimMIM on a ResNet-18",
    #: ResNet-18, pixel targets, seeds 0 / 1): CIFAR-10 kNN at 2 CPU min 21.7 / 21.9 % at 3e-4, 27.4 / 29.0 at
    #: 1e-3, 30.3 / 31.8 at 3e-3, 32.7 / 33.2 at 1e-2, 32.3 / 31.9 at 3e-2 (random: 20.6); chest X-ray AUROC
    #: gain over random +0.024 / +0.028 at 3e-3 but +0.011 / +0.005 (SE 0.009 / 0.013) at 1e-2. 3e-3 beats
    #: random on both at both seeds, and stays moderate under linear scaling at large batches. LARS (the
    #: other CNN reconstruction tasks'): 31.0 / 31.4 %.
    engine_defaults = {"base_lr": 3e-3}
    #: ViTs and Swin: the paper's base_lr per 256 images (its Swin configs: 2e-4 per 512), and measured
    #: (BENCHMARKS.md "MAE's crops below 96 px, SimMIM's LR and head"): against 3e-4, CIFAR-10 kNN +1.6
    #: and +0.2 (paired SE 0.6) over two seeds at 2 CPU min, +2.1 (0.6) at 8 CPU min; X-ray AUROC +0.008
    transformer_engine_defaults = {"base_lr": 1e-4}
    default_backbone = "timm:vit_tiny_patch16_224"
    #: runs recorded before HOG targets regressed pixels, and before visible_weight (their loss: masked tokens only)
    legacy_option_values = {"target": "pixels", "visible_weight": 0.0}

    @classmethod
    def backbone_engine_defaults(cls, backbone):
        """The paper's settings for ViTs and Swin transformers; the CNN ones (``engine_defaults``) otherwise."""
        # trained at the paper's transformer LR (SwinV2-CR's (B, C, H, W) map is masked as a CNN's is)
        return cls.transformer_engine_defaults if isinstance(_model(backbone), _architectures()) else None

    @classmethod
    def default_backbone_for(cls, image_size):
        """Below 96 px a ResNet-18 (SMALL_BACKBONE; pixel-space masks, pixel targets): at 32 px it beats a
        random ResNet-18 where about 35 ViT settings never beat a random ViT (BENCHMARKS.md "SimMIM on a
        ResNet-18"). From 96 px the paper's family, a ViT."""
        return SMALL_BACKBONE if image_size < SMALL_IMAGE else cls.default_backbone

    @classmethod
    def check(cls, backbone, spec):
        m = _model(backbone)
        if isinstance(m, _architectures()[:2]):  # a ViT or a Swin (v1)
            return None
        if _cnn_grid(m, backbone, spec) is None:
            return (f"SimMIM masks patch tokens and needs a ViT, a Swin (v1) or a CNN with a square feature map, "
                    f"e.g. timm:vit_tiny_patch16_224, timm:swin_tiny_patch4_window7_224 or timm:resnet18; "
                    f"{getattr(backbone, 'name', 'this backbone')} is not one")
        return None

    def __init__(self, backbone, options: SimMIMOptions, spec) -> None:
        from timm.models.vision_transformer import Block

        super().__init__(backbone, options, spec)
        m = _model(backbone)
        vit, swin = _architectures()[:2]
        self.kind = "vit" if isinstance(m, vit) else "swin" if isinstance(m, swin) else "cnn"
        p = CNN_TOKEN if self.kind == "cnn" else int(m.patch_embed.patch_size[0])
        s = spec.image_size
        self.patch = p
        self.grid = -(-s // p)  # a CNN's last tokens may overhang an image side that 4 does not divide
        self.target = options.target or ("pixels" if self.kind == "cnn" else "hog")
        vw = options.visible_weight
        self.visible_weight = (1.0 if self.kind == "cnn" else 0.0) if vw is None else vw
        if self.target == "hog" and s % p:
            raise UsageError(f"simmim target=hog needs --image-size a multiple of its {p}-px tokens, got {s}; "
                             f"use --image-size {s // p * p or p} or target=pixels")
        mask_patch = options.mask_patch or max(p, int(round(32 * s / 224 / p)) * p)
        if mask_patch % p:
            raise UsageError(f"simmim mask_patch={mask_patch} must be a multiple of the patch size {p}; "
                             f"e.g. mask_patch={p}")
        self.scale = mask_patch // p
        self.mask_patch = mask_patch
        units = (-(-self.grid // self.scale)) ** 2
        if units - math.ceil(units * options.mask_ratio) < 1:
            raise UsageError(f"simmim mask_patch={mask_patch} at --image-size {s} leaves {units} mask square(s), "
                             f"all masked at mask_ratio={options.mask_ratio:g}: nothing visible to predict from; "
                             f"use a smaller mask_patch, e.g. mask_patch={p}")
        if self.kind == "cnn":  # masked in pixel space: a learned value per channel
            out_grid, out_dim = _cnn_grid(m, backbone, spec)
            self.mask_token = nn.Parameter(torch.zeros(1, spec.channels, 1, 1))
        else:
            out_grid = int(_features(m, backbone.in_chans, s).shape[1]) if self.kind == "swin" else self.grid
            out_dim = m.num_features if self.kind == "swin" else m.embed_dim
            self.mask_token = nn.Parameter(torch.zeros(1, 1, m.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.up = -(-self.grid // out_grid)  # tokens per output cell and side (the head's grid: cropped to grid)
        self.stride = self.up * p
        heads = next(h for h in (8, 6, 4, 3, 2, 1) if out_dim % h == 0)
        self.head_blocks = nn.Sequential(
            *[Block(out_dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(options.head_depth)]
        )
        # the head's output grid: pixels, or one HOG target vector per token for target=hog
        if self.target == "pixels":
            up, per_unit = self.stride, spec.channels
        else:
            up, per_unit = self.up, hog_token_size(p, spec.channels)
        self.head = nn.Sequential(nn.Conv2d(out_dim, up * up * per_unit, 1), nn.PixelShuffle(up))

    def resolved_options(self):
        return {"target": self.target, "mask_patch": self.mask_patch, "visible_weight": self.visible_weight}

    def views(self, spec):
        return reconstruction_views(spec, self.options.min_scale)

    def encode_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, S, S)``, token mask ``(B, g, g)`` -> feature map ``(B, D', h, w)``."""
        m = _model(self.encoder)
        if self.kind == "cnn":  # (B, C, S, S) with the masked squares set to the mask value
            w = self.pixel_mask(mask, x.shape[-1]).to(x.dtype)
            return m.forward_features(x * (1 - w) + self.mask_token * w)
        tokens = m.patch_embed(x)
        if self.kind == "swin":  # (B, g, g, D), channels last
            w = mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + self.mask_token.view(1, 1, 1, -1) * w
            return m.norm(m.layers(tokens)).permute(0, 3, 1, 2)
        w = mask.flatten(1).unsqueeze(-1).to(tokens.dtype)  # (B, N, 1)
        tokens = tokens * (1 - w) + self.mask_token * w
        h = m.norm(m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(tokens)))))
        h = h[:, m.num_prefix_tokens:]
        return h.transpose(1, 2).reshape(h.shape[0], -1, self.grid, self.grid)

    def pixel_mask(self, mask: torch.Tensor, size: int) -> torch.Tensor:
        """Token mask ``(B, g, g)`` -> ``(B, 1, S, S)``, each token's ``patch x patch`` pixels."""
        return mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)[:, None, :size, :size]

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, D', h, w)`` -> pixels ``(B, C, S, S)`` (``target=hog``: ``(B, D, S/p, S/p)``, one
        target vector per token): ``head_depth`` blocks, then the linear head, cropped to the image (a CNN's
        output cells may cover more than its side)."""
        if len(self.head_blocks):
            b, d, h, w = feats.shape
            feats = self.head_blocks(feats.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, d, h, w)
        side = self.spec.image_size if self.target == "pixels" else self.grid
        return self.head(feats)[..., :side, :side]

    def forward(self, views):
        (x,) = views
        mask = token_mask(x.shape[0], self.grid, self.scale, self.options.mask_ratio, x.device)
        rec = self.reconstruct(self.encode_masked(x, mask))
        weight = mask + self.visible_weight * (1 - mask)  # (B, g, g): 1 masked, visible_weight visible
        if self.target == "hog":  # rec: (B, D, g, g), a target vector per token
            per_token = ((rec.flatten(2).transpose(1, 2) - hog_tokens(x, self.patch)) ** 2).mean(-1)
            w = weight.flatten(1)
            return {"loss": (per_token * w).sum() / w.sum()}
        pix = self.pixel_mask(weight, x.shape[-1])
        loss = ((x - rec).abs() * pix).sum() / (pix.sum() * x.shape[1] + 1e-5)
        return {"loss": loss}


@hookimpl
def register_tasks(register):
    register("simmim", SimMIM)
