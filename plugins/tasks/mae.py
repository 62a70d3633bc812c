"""Task ``mae``: Masked Autoencoders (He, Chen, Xie, Li, Dollár, Girshick, CVPR 2022), on images
with MaskFeat's targets (Wei, Fan, Xie, Wu, Yuille, Feichtenhofer, CVPR 2022).

The image is cut into ``N`` patches; a random ``mask_ratio`` of them is dropped and the
ViT encoder sees only the ``N_vis = N * (1 - mask_ratio)`` visible patches. A light
transformer decoder gets the encoded visible tokens plus a shared learned mask token at
every masked position (and the class token, without a position, as in the authors' code:
so the loss trains the class token, the encoder's exported embedding) and predicts a
target ``t_p`` for each patch. The loss is the mean squared error on masked patches only::

    L = sum_p m_p * ||y_p - t_p||^2 / (D * sum_p m_p)      (m_p = 1 for masked patches, D values per target)

The target (``target``): on images by default ``hog``, MaskFeat's histograms of oriented
gradients (``sslkit.api.hog_tokens``: per channel, each pixel's gradient magnitude voted into one of 9
unsigned orientation bins, summed over 2x2 cells per patch, the patch's histograms
L2-normalised, so brightness and contrast drop out); ``target=pixels`` (on volumes always)
is the MAE paper's per-patch normalised pixels (``norm_pix_loss``)::

    t_p = (x_p - mean(x_p)) / sqrt(var(x_p) + 1e-6)

Measured (BENCHMARKS.md "HOG targets for MAE and SimMIM"; ViT-Tiny, patch 8, 32 px): at 2
CPU min HOG at ``base_lr`` 2.5e-4 (MaskFeat's recipe: 2e-4 per 256 images) lifts CIFAR-10
kNN by +3.2, +3.5 and +1.3 points (paired SE 0.7, three seeds) over pixels at 1e-3, and
past a random ViT (+1.1, +0.8 and +0.4 ± 0.7), which no pixel setting reached; HOG wants a
low LR (1e-3: -0.9 and -0.7 against random; 2e-3 worse). At 8 CPU min pixels at 1e-3 are
ahead (-2.0, -0.1 and -5.8 ± 0.8): HOG's loss at 32 px is flat after about 200 steps, so
for longer runs on 32-px images ``target=pixels`` with ``--base-lr 1e-3`` is the measured
better choice. On the 64-px chest X-rays -0.009, +0.000 and -0.001 (SE <= 0.004) AUROC
against pixels at the table's 0.6 CPU min, and +0.009 ± 0.009 at 4 CPU min (971 steps).

Defaults: mask ratio 0.75, decoder depth 2 with 8 heads, decoder width half the encoder's
(paper: 512 for ViT-L's 1024), a multiple of 32 between 64 and 512 (ViT-Tiny 96, ViT-Small
192, ViT-Base 384), so the decoder stays a small fraction of the step at every encoder
size (paper: 8 blocks of 512; ``--task-opt decoder_depth=8 decoder_dim=512``), HOG targets
on images, per-patch normalised pixels on volumes (``norm_pix_loss=true``), ``base_lr``
2.5e-4 on both (the MAE paper's is 1.5e-4; ``--task-opt target=pixels --base-lr 1e-3`` is
the former 2-D default) scaled by the square root of the batch (Adam's rule; at batch 64 twice
linear's LR: level on CIFAR-10 and the X-rays pooled over four seeds, and past the random ViT on
the X-rays at every seed, where linear missed one; BENCHMARKS.md "MAE's LR at small batches";
``--lr-scaling linear`` restores it), flips and random resized crops of scale 0.2-1 from 96 px (the
paper's, at 224 px) and 0.5-1 below (``default_min_scale``; volumes 0.2-1).
Needs a ViT backbone (token interface), e.g. ``timm:vit_tiny_patch16_224``, the default; below
96 px it gets 8-px patches, and below 64 px 6 blocks (``default_backbone_options``; measured against
12 blocks at equal CPU, BENCHMARKS.md "A 6-block ViT for MAE below 64 px": on 32-px CIFAR-10 kNN
+0.5, +0.5, -0.1 and +0.9 ± 0.6 at 2 CPU min over four seeds, past its random ViT at all four in the
table's runs where 12 blocks passed at two (a replicate at seed 1: +0.5 ± 0.7, within its SE), -1.3 and
-0.9 ± 0.5 at 0.5 CPU min, the linear probe +3.1 and +4.3 over random init where 12 blocks gained +1.7
and +2.3, fine-tuning level with training from scratch where 12 blocks ended below it; on the 64-px
chest X-rays **behind** 12 blocks, +0.001, -0.010, -0.021 and -0.004 AUROC (SE 0.004-0.009), so 64 px
and up keep 12 blocks).

The encoder's embedding (``embed``, ``eval``, the export) is the mean of its normed patch
tokens (``Task.embedding = "patch_mean"``: on a timm ViT, ``global_pool=avg``,
``fc_norm=false`` in ``run.json``; ``--backbone-opt global_pool=token`` keeps the class
token). Measured (BENCHMARKS.md, "DINO without local crops below 96 px; MAE and SimMIM at
8 and 16 CPU minutes"): the class token stops at a random ViT's CIFAR-10 kNN (27.8 % vs
27.5 % at 8 and 16 CPU min) while the mean beats it by +2.2 and +2.8 (paired SE 0.8) at
8 CPU min over two seeds and +4.5 at 16; level with the class token at 2 CPU min and on
the chest X-rays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslkit.api import (MultiView, Task, ViewRecipe, check_unit_interval, hog_token_size, hog_tokens, hookimpl,
                        is_token_backbone)


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75  # fraction of the patches hidden from the encoder, in (0, 1)
    decoder_dim: int | None = None  # decoder width; None: half the encoder's, multiple of 32 in 64-512 (paper: 512)
    decoder_depth: int = 2  # transformer blocks in the decoder (paper: 8)
    decoder_heads: int = 8  # attention heads per decoder block; must divide decoder_dim
    norm_pix_loss: bool = True  # target=pixels: normalise each patch to mean 0, std 1 (the paper's); hog ignores it
    min_scale: float | None = None  # smallest crop area fraction; None: 0.2 from 96 px (paper), else 0.5; volumes 0.2
    target: str | None = None  # hog (MaskFeat's gradient histograms) or pixels; None: hog, pixels on volumes

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError("mask_ratio must be in (0, 1)")
        if self.decoder_depth < 1 or self.decoder_heads < 1:
            raise ValueError("decoder_depth and decoder_heads must be >= 1")
        if self.decoder_dim is not None and self.decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1, got {self.decoder_dim}")
        if self.decoder_dim is not None and (self.decoder_dim % self.decoder_heads or self.decoder_dim % 4):
            raise ValueError("decoder_dim must be divisible by decoder_heads and by 4")
        if self.min_scale is not None:
            check_unit_interval("min_scale", self.min_scale)
        if self.target not in (None, "pixels", "hog"):
            raise ValueError("target must be pixels or hog")


#: from this image size the crops are the paper's (scale PAPER_MIN_SCALE-1); milder below
PAPER_CROPS_FROM_PX = 96
PAPER_MIN_SCALE = 0.2
#: the default ViT below PAPER_CROPS_FROM_PX: patch side; below FEW_TOKENS_BELOW_PX also fewer blocks
#: (MAE.default_backbone_options)
SMALL_PATCH = 8
FEW_TOKENS_BELOW_PX = 64  # fewer than 64 patches of SMALL_PATCH
SMALL_DEPTH = 6
MIN_TOKENS = 4  # patch tokens an image needs: one stays visible at the default mask ratio, 0.75


def default_min_scale(image_size: int) -> float:
    """Smallest crop scale: the paper's 0.2 from ``PAPER_CROPS_FROM_PX``, 0.5 below.

    Measured (BENCHMARKS.md, "MAE's crops below 96 px, SimMIM's LR and head"): at 32 px, 0.5 beats 0.2 by
    +1.6 and +1.9 CIFAR-10 kNN points (paired SE 0.5) over two seeds at 2 CPU min; at 64 px the
    chest X-ray AUROC is level (-0.002 and +0.004, per-fold SE 0.005 and 0.001).
    """
    return PAPER_MIN_SCALE if image_size >= PAPER_CROPS_FROM_PX else 0.5


def default_decoder_dim(embed_dim: int, heads: int) -> int:
    """Half the encoder width, a multiple of 32 (and of ``heads``) in [64, 512].

    Measured (BENCHMARKS.md, "MAE's decoder as wide as the encoder"): on ViT-Tiny at the default's steps, a
    192-wide decoder gains 1.5-2.3 CIFAR-10 kNN points at two seeds (still below a random ViT) but
    loses 0.008-0.043 chest X-ray AUROC, where this width beats random init; so half stays.
    """
    d = max(64, min(512, embed_dim // 2 // 32 * 32))
    while d % heads or d % 4:
        d += 32
    return d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)``, patches in raster order, pixels (row, col, chan)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images: ``(B, N, p*p*C) -> (B, C, H, W)``."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``(grid*grid, dim)``, raster order (MAE Sec. A.1).

    Half the channels encode the row, half the column; each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError("decoder_dim must be divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p: torch.Tensor) -> torch.Tensor:
        out = p.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def random_masking(n_batch: int, n_tokens: int, ratio: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise.

    Returns ``ids_keep (B, N_vis)``, ``mask (B, N)`` (1 = masked, in original order) and
    ``ids_restore (B, N)`` (the permutation that un-shuffles ``[visible, masked]``).
    """
    n_keep = max(1, int(round(n_tokens * (1 - ratio))))
    noise = torch.rand(n_batch, n_tokens, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(n_batch, n_tokens, device=device)
    mask[:, :n_keep] = 0
    mask = mask.gather(1, ids_restore)
    return ids_keep, mask, ids_restore


class MAE(Task):
    Options = MAEOptions
    #: base_lr measured (benchmarks/task_table.py, BENCHMARKS.md "HOG targets for MAE and SimMIM"): with HOG
    #: targets, CIFAR-10 kNN at 2 CPU min falls as the LR rises (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3: 29.8,
    #: 28.3, 27.7, 26.4, 26.3 % at seed 0), and at 8 CPU min too (30.4, 28.1, 27.4 % for 2.5e-4-1e-3);
    #: MaskFeat's recipe is 2e-4 per 256. Pixel targets were tuned at 1e-3 (5e-4 level, 3e-3 worse).
    #: Scaled by the square root of the batch (AdamW's rule, Malladi et al. 2022), not linearly: the same
    #: 2.5e-4 at 256 images, twice linear's LR at the table's batch 64 and 2.8x at the X-rays' 32 (BENCHMARKS.md
    #: "MAE's LR at small batches"), a quarter of it at 4096.
    engine_defaults = {"base_lr": 2.5e-4, "lr_scaling": "sqrt"}
    default_backbone = "timm:vit_tiny_patch16_224"
    legacy_option_values = {"target": "pixels"}  # runs recorded before HOG targets regressed pixels
    capturable = True  # --capture graphs: the step has no host reads or Python-side state (engine/capture.py)
    embedding = "patch_mean"  # measured: module docstring
    sample_modes = ("slice", "slab", "volume")  # volumes: MAE3D (mae_volume.py), cube patches

    @classmethod
    def default_backbone_options(cls, image_size):
        """Below 96 px the default ViT-Tiny gets 8-px patches (a 32-px image: 16 tokens, not 4), and below
        64 px (fewer than 64 tokens) 6 blocks, which buy more steps: measured, BENCHMARKS.md "A 6-block ViT
        for MAE below 64 px" (ahead on 32-px CIFAR-10, behind on the 64-px chest X-rays)."""
        if image_size >= PAPER_CROPS_FROM_PX or image_size % SMALL_PATCH:
            return {}
        fewer = {"depth": SMALL_DEPTH} if image_size < FEW_TOKENS_BELOW_PX else {}
        return {"patch_size": SMALL_PATCH, **fewer}

    def __new__(cls, backbone=None, options=None, spec=None):
        if cls is MAE and getattr(spec, "sample", "slice") == "volume":
            from sslkit_plugins.tasks.mae_volume import MAE3D

            return super().__new__(MAE3D)
        return super().__new__(cls)

    @classmethod
    def check(cls, backbone, spec):
        if cls is MAE and getattr(spec, "sample", "slice") == "volume":
            from sslkit_plugins.tasks.mae_volume import MAE3D

            return MAE3D.check(backbone, spec)
        if not is_token_backbone(backbone):
            return (f"MAE needs a ViT backbone with patch tokens, e.g. timm:vit_tiny_patch16_224 or "
                    f"timm:vit_small_patch16_224; {getattr(backbone, 'name', 'this backbone')} is not one")
        p = backbone.patch_size
        tokens = (spec.image_size // p) ** 2
        if tokens < MIN_TOKENS:  # at mask ratio 0.75 no token would be left visible: a NaN loss at step 1
            return (f"MAE at --image-size {spec.image_size} with {p}-px patches has {tokens} patch token(s), "
                    f"fewer than {MIN_TOKENS}: use --image-size {2 * p} or more, or a smaller "
                    f"--backbone-opt patch_size")
        return None

    def __init__(self, backbone, options: MAEOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        p, grid = backbone.patch_size, spec.image_size // backbone.patch_size
        self.target = options.target or "hog"
        values = p * p * spec.channels if self.target == "pixels" else hog_token_size(p, spec.channels)
        self.build_decoder(grid * grid, lambda d: sincos_pos_embed_2d(d, grid), values)

    def build_decoder(self, num_patches: int, pos_embed, patch_values: int) -> None:
        """The light decoder: embed, mask token, fixed sin-cos positions ``pos_embed(d) -> (N, d)``,
        ``decoder_depth`` blocks, norm, and a linear head to ``patch_values`` per patch."""
        from timm.models.vision_transformer import Block  # at build, not when the plugin loads (see timm.py)

        backbone, options = self.encoder, self.options
        self.num_patches = num_patches
        d = options.decoder_dim or default_decoder_dim(backbone.embed_dim, options.decoder_heads)
        self.decoder_dim = d
        self.decoder_embed = nn.Linear(backbone.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos", pos_embed(d)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(d, options.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(options.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, patch_values)
        nn.init.normal_(self.mask_token, std=0.02)

    def min_scale(self, spec) -> float:
        """The crops' smallest scale: ``min_scale``, by default ``default_min_scale`` of the image size."""
        given = self.options.min_scale
        return default_min_scale(spec.image_size) if given is None else given

    def resolved_options(self):
        return {"target": self.target, "decoder_dim": self.decoder_dim, "min_scale": self.min_scale(self.spec)}

    def views(self, spec):
        recipe = ViewRecipe(spec.image_size, scale=(self.min_scale(spec), 1.0), jitter_p=0.0, gray_p=0.0,
                            blur_p=0.0, gamma_p=0.0)
        return MultiView([recipe], spec.mean, spec.std)

    def forward_encoder(self, x: torch.Tensor):
        """``x: (B, C, H, W)`` -> latent ``(B, P + N_vis, D)``, mask ``(B, N)``, ids_restore ``(B, N)``."""
        tokens = self.encoder.patchify(x)
        b, n, d = tokens.shape
        ids_keep, mask, ids_restore = random_masking(b, n, self.options.mask_ratio, x.device)
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return self.encoder.encode_tokens(visible), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``(B, P + N_vis, D)`` -> predicted pixels ``(B, N, p*p*C)``."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        visible = x[:, prefix:]
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        full = torch.cat([visible, masked], dim=1)
        full = full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        # the class token(s) go through the decoder too (no position), as in the MAE authors' code
        x = self.decoder_norm(self.decoder_blocks(torch.cat([x[:, :prefix], full + self.decoder_pos], dim=1)))
        return self.decoder_pred(x[:, prefix:])

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches. x ``(B, C, H, W)``, pred ``(B, N, L)``, mask ``(B, N)``."""
        p = self.encoder.patch_size
        if self.target == "hog":
            target = hog_tokens(x, p)
        else:
            target = patchify(x, p)
            if self.options.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, views):
        (x,) = views
        latent, mask, ids_restore = self.forward_encoder(x)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(x, pred, mask)}


@hookimpl
def register_tasks(register):
    register("mae", MAE)
