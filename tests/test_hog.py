"""HOG targets (``target=hog`` of mae and simmim): the histograms, their tokens, and the losses on them."""

from __future__ import annotations

import math

import pytest
import torch
from sslkit.hog import BINS, hog_cell, hog_map, hog_token_size, hog_tokens, to_tokens

from sslkit.errors import UsageError
from sslkit.registry import create_backbone, create_task
from tests.test_3d import TINY_VIT3D, volume_spec
from tests.test_tasks import TINY_VIT, build, images, overfit, start_end


def ramp(angle: float, size: int = 16, slope: float = 0.01) -> torch.Tensor:
    """``(1, 1, size, size)``: intensity rising by ``slope`` a pixel along ``angle`` (radians, x right, y down)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    return ((xx * math.cos(angle) + yy * math.sin(angle)) * slope).float()[None, None]


@pytest.mark.parametrize("degrees,expected_bin", [(0, 0), (45, 2), (90, 4), (135, 6), (180, 0), (-45, 6)])
def test_a_ramp_votes_its_whole_gradient_into_its_orientation_bin(degrees, expected_bin):
    """Unsigned orientations: 180 degrees is 0, -45 is 135; each of 9 bins spans 20 degrees."""
    maps = hog_map(ramp(math.radians(degrees)), cell=4)  # (1, 9, 4, 4)
    inner = maps[0, :, 1:3, 1:3]  # cells off the border, where the central difference sees the ramp
    assert inner.argmax(0).unique().tolist() == [expected_bin]
    # 16 pixels a cell, each a central difference of 2 * slope along the ramp
    torch.testing.assert_close(inner.sum(0), torch.full((2, 2), 16 * 2 * 0.01), rtol=1e-4, atol=1e-6)
    assert inner[expected_bin].sum() == pytest.approx(inner.sum().item(), rel=1e-5)


def test_tokens_are_each_patchs_cells_in_raster_order():
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2 x 2 patches of 2 x 2 cells
    tokens = to_tokens(maps, 2)
    assert tokens.shape == (1, 4, 4)
    assert [sorted(t.tolist()) for t in tokens[0]] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                                       [10, 11, 14, 15]]


def test_hog_tokens_are_unit_vectors_blind_to_brightness_and_contrast():
    x = images(2, 3, 32)
    tokens = hog_tokens(x, 8)
    assert hog_cell(8) == 4 and hog_cell(7) == 7
    assert tokens.shape == (2, 16, hog_token_size(8, 3)) == (2, 16, 2 * 2 * BINS * 3)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(hog_tokens(2.5 * x - 0.7, 8), tokens, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hog_tokens(x.flip(-1), 8), tokens, atol=1e-3)  # but not to the edges' directions


def test_hog_is_a_float32_target_under_autocast():
    x = images(2, 1, 32).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = hog_tokens(x, 8)
    assert tokens.dtype == torch.float32 and not tokens.requires_grad
    torch.testing.assert_close(tokens, hog_tokens(x.detach(), 8))


def test_mae_hog_scores_masked_patches_against_hog_tokens():
    task, spec = build("mae", "timm:vit_tiny_patch16_224", channels=3, size=32, backbone_opts=TINY_VIT,
                       decoder_dim=32, decoder_depth=1, decoder_heads=2, target="hog")
    x = task.views(spec)(images(2, 3, 32))[0]
    latent, mask, ids_restore = task.forward_encoder(x)
    pred = task.forward_decoder(latent, ids_restore)
    target = hog_tokens(x, 8)
    assert pred.shape == target.shape == (2, 16, 108)
    wrong_where_visible = torch.where(mask.bool()[..., None], target, target + 5)
    assert task.forward_loss(x, wrong_where_visible, mask).item() == pytest.approx(0.0, abs=1e-6)
    # a zero prediction misses each unit-norm token by 1 / 108 per value
    assert task.forward_loss(x, torch.zeros_like(pred), mask).item() == pytest.approx(1 / 108, rel=1e-5)


def test_simmim_hog_head_predicts_cells_and_scores_only_masked_tokens():
    task, spec = build("simmim", "timm:vit_tiny_patch16_224", channels=3, backbone_opts=TINY_VIT, target="hog")
    x = task.views(spec)(images(2, 3, 32))[0]
    feats = task.encode_masked(x, torch.zeros(2, 4, 4))
    rec = task.reconstruct(feats)
    assert rec.shape == (2, hog_token_size(8, 3), 4, 4)  # a HOG vector per token: 2x2 cells x 9 bins x 3 channels
    assert rec.flatten(2).transpose(1, 2).shape == hog_tokens(x, 8).shape


def test_simmim_hog_loss_is_the_masked_tokens_mse(monkeypatch):
    import sslkit_plugins.tasks.simmim as simmim

    task, spec = build("simmim", "timm:vit_tiny_patch16_224", channels=1, backbone_opts=TINY_VIT, target="hog")
    x = task.views(spec)(images(2, 1, 32))[0]
    mask = torch.zeros(2, 4, 4)
    mask[:, 1, 2] = 1  # one masked token per image
    monkeypatch.setattr(simmim, "token_mask", lambda *a, **k: mask)
    target = hog_tokens(x, 8)
    torch.manual_seed(0)
    loss = task((x,))["loss"]
    torch.manual_seed(0)
    pred = task.reconstruct(task.encode_masked(x, mask)).flatten(2).transpose(1, 2)
    expected = ((pred - target) ** 2).mean(-1)[:, 1 * 4 + 2].mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("visible_weight", [0.25, 1.0])
def test_simmim_visible_weight_adds_the_visible_tokens_to_the_loss(monkeypatch, visible_weight):
    """Each image: one masked token (weight 1) and 15 visible ones (weight visible_weight), a weighted mean."""
    import sslkit_plugins.tasks.simmim as simmim

    task, spec = build("simmim", "timm:vit_tiny_patch16_224", channels=1, backbone_opts=TINY_VIT, target="hog",
                       visible_weight=visible_weight)
    x = task.views(spec)(images(2, 1, 32))[0]
    mask = torch.zeros(2, 4, 4)
    mask[:, 1, 2] = 1
    monkeypatch.setattr(simmim, "token_mask", lambda *a, **k: mask)
    torch.manual_seed(0)
    loss = task((x,))["loss"]
    torch.manual_seed(0)
    pred = task.reconstruct(task.encode_masked(x, mask)).flatten(2).transpose(1, 2)
    per_token = ((pred - hog_tokens(x, 8)) ** 2).mean(-1)  # (2, 16)
    masked = per_token[:, 6].sum()
    visible = per_token.sum() - masked
    torch.testing.assert_close(loss, (masked + visible_weight * visible) / (2 + visible_weight * 30))


@pytest.mark.parametrize("task_name,opts,schedule", [
    ("mae", dict(decoder_dim=32, decoder_depth=1, decoder_heads=2), dict(steps=120, lr=2e-3)),
    ("simmim", dict(), dict(steps=60, lr=3e-3)),
])
def test_hog_target_is_learnable_on_a_fixed_batch(task_name, opts, schedule):
    task, spec = build(task_name, "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, target="hog", **opts)
    first, last = start_end(overfit(task, spec, noise=0.02, **schedule))
    assert last < 0.75 * first, f"{task_name} hog: {first:.4f} -> {last:.4f}"


def test_hog_is_the_default_target_on_images_and_pixels_on_volumes():
    mae, _ = build("mae", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT)
    simmim, _ = build("simmim", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT)
    assert mae.target == simmim.target == "hog"
    spec = volume_spec()
    backbone = create_backbone("monai:vit", 1, spec.volume_size, **TINY_VIT3D)
    assert create_task("mae", backbone, spec).target == "pixels"
    with pytest.raises(UsageError, match="target=hog") as err:
        create_task("mae", backbone, spec, target="hog")
    assert "\n" not in str(err.value)


def test_simmim_hog_on_swin_predicts_a_vector_per_4_px_token():
    swin = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    task, spec = build("simmim", "timm:swin_tiny_patch4_window7_224", size=64, backbone_opts=swin, target="hog")
    x = task.views(spec)(images(2, 1, 64))[0]
    rec = task.reconstruct(task.encode_masked(x, torch.zeros(2, 16, 16)))
    assert rec.shape == (2, 2 * 2 * BINS, 16, 16)  # stride 32 shuffled to the 16 x 16 token grid
    loss = task((x,))["loss"]
    loss.backward()
    assert loss.isfinite() and task.mask_token.grad.abs().sum() > 0
