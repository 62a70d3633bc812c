"""Task ``jigsaw``: solving jigsaw puzzles (Noroozi & Favaro, ECCV 2016).

The image is cut into a 3x3 grid of cells; from each cell a tile of ``TILE_FRACTION``
of its side is cropped at a random offset (the gap keeps the network from matching
edges), and each tile is standardised on its own (no shortcut through low-level
statistics). The nine tiles are shuffled by one permutation ``pi_y`` of a fixed set of
``num_permutations`` permutations; a shared backbone embeds every tile (the paper's
context-free network), a per-tile linear layer and an MLP over the nine concatenated
codes classify which permutation was applied::

    L = CE( h([g(f(t_pi(1))), ..., g(f(t_pi(9)))]), y )

The permutation set is chosen for maximal Hamming distance (paper Sec. 3.2, Alg. 1):
starting from a random permutation, greedily add the permutation whose minimum Hamming
distance to those already chosen is largest (ties: largest mean distance, then lowest
index), seeded by ``permutation_seed`` so the set is reproducible; it is stored in the
task's state dict.

The encoder's BatchNorm statistics, gathered on tiles, are recomputed on whole images after
the last step (``Task.recompute_batchnorm``), since whole images are what it embeds.

Defaults: 100 permutations (paper: 1000), tile = 0.85 of the cell (paper: 64 of 75 px),
per-tile code 512, MLP hidden 1024. Needs a backbone that accepts tile-sized input (a
CNN, e.g. timm:resnet18) and an image of at least ``MIN_IMAGE_SIZE`` pixels (tiles of
16 px).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.api import (Task, ViewRecipe, check_unit_interval, hookimpl, is_token_backbone, mlp,
    override_recipe)


GRID = 3
TILE_FRACTION = 0.85
MIN_TILE = 16
MIN_IMAGE_SIZE = 57  # smallest side whose tiles are MIN_TILE pixels


def tile_size(image_size: int) -> int:
    return int(image_size // GRID * TILE_FRACTION)


@lru_cache(maxsize=8)
def _all_permutations() -> np.ndarray:
    return np.array(list(itertools.permutations(range(GRID * GRID))), dtype=np.int8)  # (9!, 9)


#: the largest ``num_permutations`` (choosing them costs ~15 ms each: 2000 in about 30 s)
MAX_PERMUTATIONS = 2000


def max_hamming_permutations(n: int, seed: int = 0) -> np.ndarray:
    """``n`` permutations of 9 tiles ``(n, 9)`` with greedily maximal Hamming distance
    (computed once per ``(n, seed)`` in a process: ~1-2 s for 100 of the 9! orders)."""
    return _max_hamming(n, seed).copy()


@lru_cache(maxsize=8)
def _max_hamming(n: int, seed: int) -> np.ndarray:
    perms = _all_permutations()
    if not 1 <= n <= len(perms):
        raise ValueError(f"num_permutations must be in [1, {len(perms)}]")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(perms)))]
    min_d = (perms != perms[chosen[0]]).sum(1).astype(np.int32)
    sum_d = min_d.copy()
    for _ in range(n - 1):
        score = min_d.astype(np.int64) * (len(perms) * GRID * GRID * 10) + sum_d  # lexicographic (min, sum)
        score[chosen] = -1
        nxt = int(score.argmax())
        chosen.append(nxt)
        d = (perms != perms[nxt]).sum(1).astype(np.int32)
        np.minimum(min_d, d, out=min_d)
        sum_d += d
    return perms[chosen].astype(np.int64)


def cut_tiles(x: torch.Tensor, tile: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x: (B, C, S, S)`` -> tiles ``(B, 9, C, tile, tile)`` in raster order of the grid.

    ``offsets: (B, 9, 2)`` integer (row, col) offsets of each tile inside its cell of
    side ``S // 3`` (random when None; all zeros with ``tile == S // 3`` tiles the image).
    """
    b, c, s, _ = x.shape
    cell = s // GRID
    if offsets is None:
        offsets = torch.randint(0, cell - tile + 1, (b, GRID * GRID, 2), device=x.device)
    cells = x[:, :, : cell * GRID, : cell * GRID].reshape(b, c, GRID, cell, GRID, cell)
    cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, c, cell, cell)
    ar = torch.arange(tile, device=x.device)
    rows = (offsets[..., 0:1] + ar).view(b, GRID * GRID, 1, tile, 1).expand(-1, -1, c, -1, cell)
    cells = cells.gather(3, rows)
    cols = (offsets[..., 1:2] + ar).view(b, GRID * GRID, 1, 1, tile).expand(-1, -1, c, tile, -1)
    return cells.gather(4, cols)


def assemble_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`cut_tiles` for gap-free tiles: ``(B, 9, C, t, t) -> (B, C, 3t, 3t)``."""
    b, _, c, t, _ = tiles.shape
    return tiles.view(b, GRID, GRID, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, GRID * t, GRID * t)


def shuffle_tiles(tiles: torch.Tensor, permutations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position ``j`` of puzzle ``i`` holds tile ``permutations[labels[i], j]``: ``(B, 9, ...)``."""
    order = permutations[labels]  # (B, 9)
    idx = order.view(*order.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, idx)


class JigsawViews(nn.Module):
    """``(B, C, S, S)`` in [0, 1] -> (puzzles ``(B, 9, C, t, t)``, labels ``(B,)``)."""

    def __init__(self, recipe: ViewRecipe, permutations: torch.Tensor, tile: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("permutations", permutations.clone(), persistent=False)
        self.tile = tile

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        tiles = cut_tiles(self.recipe(x), self.tile)
        mean = tiles.mean(dim=(2, 3, 4), keepdim=True)
        std = tiles.std(dim=(2, 3, 4), keepdim=True)
        tiles = (tiles - mean) / (std + 1e-3)
        labels = torch.randint(0, len(self.permutations), (x.shape[0],), device=x.device)
        return shuffle_tiles(tiles, self.permutations, labels), labels

    def override(self, **overrides) -> "JigsawViews":
        """``--augment-opt``: the same puzzles cut from views with ``overrides`` applied."""
        return JigsawViews(override_recipe(self.recipe, overrides), self.permutations, self.tile)


@dataclass
class JigsawOptions:
    num_permutations: int = 100  # tile orders to classify, chosen for maximal Hamming distance, 2-2000 (paper: 1000)
    permutation_seed: int = 0  # seed that picks the permutation set (same seed, same set), >= 0
    tile_dim: int = 512  # size of each tile's code, a linear layer on the backbone's embedding
    hidden_dim: int = 1024  # hidden width of the MLP that classifies the 9 concatenated tile codes
    min_scale: float = 0.6  # smallest area fraction of the random resized crop the puzzle is cut from, in (0, 1]

    def __post_init__(self) -> None:
        if not 2 <= self.num_permutations <= MAX_PERMUTATIONS:
            raise ValueError(f"num_permutations must be in [2, {MAX_PERMUTATIONS}] (the paper's largest set is 1000; "
                             "each takes ~15 ms to choose, so all 9! would take 1.5 h before the first step)")
        if min(self.tile_dim, self.hidden_dim) < 1:
            raise ValueError("tile_dim and hidden_dim must be >= 1")
        if self.permutation_seed < 0:
            raise ValueError(f"permutation_seed must be >= 0, got {self.permutation_seed}")
        check_unit_interval("min_scale", self.min_scale)


class Jigsaw(Task):
    Options = JigsawOptions
    default_backbone = "timm:resnet18"
    #: trained on standardised tiles, the encoder embeds whole images: BatchNorm statistics
    #: recomputed on them at the end (same weights, paired: chest X-ray kNN AUROC 0.918 ->
    #: 0.930, 5/5 folds; CIFAR-10 kNN at 64 px +3.2 points at 12 steps, -1.0 +- 0.9 at 46;
    #: BENCHMARKS.md, "jigsaw's BatchNorm statistics")
    recompute_batchnorm = True
    min_batch = 2  # the classifier's BatchNorm normalises over the batch
    #: LARS at rotation's LR, measured from the live start (benchmarks/task_table.py, BENCHMARKS.md "Recipes
    #: from the live start"): against the former AdamW 3e-3 at 2 CPU-min, CIFAR-10 kNN (ResNet-18, 64 px, 5,000
    #: test images) 31.8 / 33.7 % vs 27.3 / 32.1 over two seeds, paired (+4.4 / +1.6, SE 0.7 / 0.8), chest X-ray
    #: AUROC +0.007 / +0.019; LARS at 1.2 and 4.8 were worse
    engine_defaults = {"optimizer": "lars", "base_lr": 2.4, "lr_scaling": "sqrt", "weight_decay": 1e-6}

    @classmethod
    def check(cls, backbone, spec):
        if spec.image_size < MIN_IMAGE_SIZE:
            return (f"jigsaw cuts 3x3 tiles of >= {MIN_TILE} px and needs --image-size >= {MIN_IMAGE_SIZE} "
                    f"(e.g. 64 or 96), got {spec.image_size}")
        if is_token_backbone(backbone):
            return (f"jigsaw embeds {tile_size(spec.image_size)}-px tiles, which "
                    f"{getattr(backbone, 'name', 'this backbone')} (built for one input size) cannot take; "
                    f"use a CNN backbone such as timm:resnet18")
        return None

    def __init__(self, backbone, options: JigsawOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        perms = max_hamming_permutations(options.num_permutations, options.permutation_seed)
        self.register_buffer("permutations", torch.from_numpy(perms))
        self.tile = tile_size(spec.image_size)
        self.tile_fc = nn.Linear(backbone.num_features, options.tile_dim)
        self.classifier = mlp(GRID * GRID * options.tile_dim, options.hidden_dim, options.num_permutations)

    def views(self, spec):
        recipe = ViewRecipe(spec.image_size, scale=(self.options.min_scale, 1.0), jitter_p=0.0,
                            gray_p=0.3 if spec.channels == 3 else 0.0, blur_p=0.0, gamma_p=0.0)
        return JigsawViews(recipe, self.permutations, self.tile)

    def forward(self, views):
        puzzles, labels = views
        b = puzzles.shape[0]
        codes = F.relu(self.tile_fc(self.encoder(puzzles.flatten(0, 1))))  # (B*9, tile_dim)
        logits = self.classifier(codes.view(b, -1))
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().detach()}


@hookimpl
def register_tasks(register):
    register("jigsaw", Jigsaw)
