"""Every task: invariances of its views, refusals, options, learning on a tiny fixed batch, EMA.

Learning tests train on one fixed batch of views (augmented once) with tiny backbones at
32-64 px and check that the loss falls by a clear margin in a few dozen CPU steps.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from sslkit import registry
from sslkit.errors import UsageError
from sslkit.registry import create_backbone, create_task
from sslkit.spec import InputSpec
from sslkit_plugins.tasks.jigsaw import assemble_tiles, cut_tiles, shuffle_tiles
from sslkit_plugins.tasks.rotation import rotate_batch

ALL_TASKS = ["autoencoder", "barlowtwins", "byol", "denoising", "dino", "inpainting", "jigsaw", "mae", "moco",
             "rotation", "simclr", "simmim", "vae", "vicreg"]

TINY_VIT = dict(patch_size=8, depth=2, embed_dim=64, num_heads=2)


def spec_of(channels: int, size: int) -> InputSpec:
    return InputSpec(channels, size, (0.5,) * channels, (0.25,) * channels)


def build(task: str, backbone: str = "timm:resnet10t", channels: int = 1, size: int = 32,
          backbone_opts: dict | None = None, **opts):
    spec = spec_of(channels, size)
    bb = create_backbone(backbone, channels, size, **(backbone_opts or {}))
    return create_task(task, bb, spec, **opts), spec


def images(b: int, channels: int, size: int, seed: int = 0, noise: float = 0.2) -> torch.Tensor:
    """``(B, C, S, S)`` in [0, 1]: oriented sinusoids of random frequency and phase, plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq = torch.rand(b, 1, 1, 1, generator=g) * 6 + 1
    phase = torch.rand(b, 1, 1, 1, generator=g) * 6
    base = (torch.sin((xx * freq + yy * freq.flip(0)) * 3.14 + phase) + 1) / 2
    return (base * 0.8 + torch.rand(b, channels, size, size, generator=g) * noise).clamp(0, 1)


def overfit(task, spec, steps: int, lr: float = 1e-3, batch: int = 8, seed: int = 0,
            metric: str = "loss", noise: float = 0.2) -> list[float]:
    torch.manual_seed(seed)
    x = images(batch, spec.channels, spec.image_size, seed, noise)
    views = task.views(spec)(x)  # fixed views: the batch to overfit
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=lr)
    task.train()
    losses = []
    for step in range(1, steps + 1):
        out = task(views)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.on_step_end(step, steps)
        losses.append(float(out[metric].detach()))
    return losses


def start_end(losses: list[float], k: int = 3) -> tuple[float, float]:
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


# --- registry / CLI -------------------------------------------------------------------------
def test_every_task_is_listed(cli):
    result = cli("list", "tasks", "--json")
    assert result.exit_code == 0
    assert set(ALL_TASKS) <= set(json.loads(result.output))


def test_list_says_what_each_task_is_in_one_line(cli):
    """``sslkit list tasks``: each name beside the first sentence of its module docstring (the paper), on one line;
    ``--json`` stays the list of names."""
    rows = dict(line.split(None, 1) for line in cli("list", "tasks").stdout.splitlines())
    assert set(rows) == set(ALL_TASKS)
    assert rows["mae"].startswith("Masked Autoencoders (He, Chen, Xie, Li, Dollár, Girshick, CVPR 2022)")
    assert rows["vae"].endswith("Bowman et al. 2016 / Sonderby et al. 2016).")  # "et al." ends no sentence
    assert all(len(text) <= 200 and not text.startswith("Task ") for text in rows.values())
    sources = dict(line.split(None, 1) for line in cli("list", "sources").stdout.splitlines())
    assert sources["dicom"] == "every DICOM image below PATH."  # its own docstring, not the Source base class's
    for kind in ("backbones", "exporters", "callbacks", "sources"):
        assert "``" not in cli("list", kind).stdout  # reStructuredText's double backquotes shown as single


def test_list_summary_skips_docstrings_that_are_not_the_objects_own():
    """A dataclass's generated signature and an instance's class docstring say nothing about the plugin:
    its module's docstring is used (here the test module's)."""
    import dataclasses
    import functools

    from sslkit import plugins

    @dataclasses.dataclass
    class Plain:
        a: int = 1

    entries = plugins.get_plugins().entries["tasks"]
    for obj in (Plain, functools.partial(print, "x")):
        entries["kit-summary"] = plugins.Entry(obj, "test")
        try:
            text = registry.summary("tasks", "kit-summary")
        finally:
            del entries["kit-summary"]
        assert not text.startswith(("Plain(", "partial(")), text


@pytest.mark.parametrize("task", ALL_TASKS)
def test_module_docstring_names_paper_equation_and_defaults(task):
    doc = registry.get_task(task).__module__
    text = __import__(doc, fromlist=["_"]).__doc__
    assert text and "Default" in text and re.search(r"\bL(_\w+)?\s*=", text)  # the loss equation
    assert any(ch.isdigit() for ch in text.split("\n")[0])  # the paper's year in the first line


@pytest.mark.parametrize("task,opt", [
    ("moco", "version=4"), ("moco", "temperature=0"), ("byol", "tau_base=1.5"), ("dino", "local_crops=-1"),
    ("vae", "beta=-1"), ("jigsaw", "num_permutations=1"), ("inpainting", "region=corner"),
    ("denoising", "mask_ratio=1.0"), ("simmim", "mask_ratio=0"), ("simmim", "head_depth=-1"),
    ("simmim", "visible_weight=-0.5"), ("simmim", "target=depth"), ("mae", "target=depth"), ("vicreg", "mu=-1"),
    ("barlowtwins", "lambd=-1"),
    ("rotation", "hidden_dim=0"), ("autoencoder", "decoder_width=2"), ("dino", "teacher_temp_warmup=2"),
])
def test_bad_option_is_one_line_exit_2(task, opt, cli, gray_folder, tmp_path):
    result = cli("pretrain", "--task", task, "--data", f"folder:{gray_folder}", "--out", tmp_path / "r",
                 "--image-size", 64, "--task-opt", opt, "--max-steps", 1)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and task in lines[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("task,backbone,size,needle", [
    ("mae", "timm:resnet10t", 32, "timm:vit_tiny_patch16_224"),
    ("simmim", "timm:mixer_s16_224", 32, "timm:swin_tiny_patch4_window7_224"),
    ("jigsaw", "timm:resnet10t", 32, "--image-size >= 57"),
    ("jigsaw", "timm:vit_tiny_patch16_224", 64, "timm:resnet18"),
])
def test_incompatible_pairings_refused_naming_what_works(task, backbone, size, needle):
    with pytest.raises(UsageError) as err:
        build(task, backbone, size=size, backbone_opts=TINY_VIT if "vit" in backbone else None)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_dino_local_crops_on_fixed_size_vit_refused():
    with pytest.raises(UsageError, match="local_crops=0"):
        build("dino", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, local_crops=8)
    task, spec = build("dino", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, local_crops=0, out_dim=64)
    assert len(task.views(spec)(images(2, 1, 32))) == 2


@pytest.mark.parametrize("size,default_views", [(32, 2), (64, 2), (95, 2), (96, 10)])
def test_dino_local_crops_default_to_none_below_96_px(size, default_views):
    """8 local crops from 96 px (the paper's), none below (measured); an explicit count always wins."""
    small = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    task, spec = build("dino", size=size, **small)
    views = task.views(spec)(images(2, 1, size))
    assert len(views) == default_views
    assert [v.shape[-1] for v in views[2:]] == [round(size * 96 / 224 / 2) * 2] * (default_views - 2)
    task, spec = build("dino", size=size, local_crops=1, **small)
    assert len(task.views(spec)(images(2, 1, size))) == 3
    with pytest.raises(UsageError, match="local_crops=0"):  # a fixed-size ViT at 96 px: local crops by default
        build("dino", "timm:vit_tiny_patch16_224", size=96, backbone_opts=TINY_VIT, **small)


def test_moco_version_defaults():
    v2, _ = build("moco", version=2)
    v3, _ = build("moco", version="3")  # as the CLI passes it
    assert (v2.options.temperature, v2.options.momentum, v2.options.proj_dim) == (0.2, 0.999, 128)
    assert (v3.options.temperature, v3.options.momentum, v3.options.proj_dim) == (1.0, 0.99, 256)
    assert hasattr(v2, "queue") and not hasattr(v3, "queue") and v3.predictor is not None
    # crops: MoCo v2's 0.2 of the area, v3's 0.08 (it was 0.2 for both); recorded for a resume
    assert (v2.options.min_scale, v3.options.min_scale) == (0.2, 0.08)
    assert v3.resolved_options()["min_scale"] == 0.08
    assert [r.scale for r in v3.views(v3.spec).recipes] == [(0.08, 1.0)] * 2
    assert build("moco", version=3, min_scale=0.5)[0].options.min_scale == 0.5


# --- invariances ----------------------------------------------------------------------------
def test_rotation_labels_match_the_applied_rotation():
    x = images(5, 3, 16, seed=1)
    for all_rot in (True, False):
        torch.manual_seed(0)
        rotated, labels = rotate_batch(x, all_rot)
        assert rotated.shape[0] == (4 * 5 if all_rot else 5)
        for i in range(rotated.shape[0]):
            undone = torch.rot90(rotated[i], -int(labels[i]), dims=(1, 2))
            assert torch.equal(undone, x[i % 5])
        if all_rot:
            assert labels.bincount().tolist() == [5, 5, 5, 5]


def test_rotation_task_views_cover_four_rotations():
    task, spec = build("rotation", channels=3)
    views, labels = task.views(spec)(images(4, 3, 32))
    assert views.shape == (16, 3, 32, 32) and sorted(labels.tolist()) == sorted([0, 1, 2, 3] * 4)


def test_jigsaw_tiles_reassemble_under_inverse_permutation():
    tile = 5
    x = torch.rand(4, 3, 3 * tile, 3 * tile)
    tiles = cut_tiles(x, tile, torch.zeros(4, 9, 2, dtype=torch.long))
    assert torch.equal(assemble_tiles(tiles), x)
    perms = torch.stack([torch.randperm(9) for _ in range(6)])
    labels = torch.tensor([5, 0, 3, 3])
    puzzles = shuffle_tiles(tiles, perms, labels)
    inverse = perms[labels].argsort(1)
    restored = puzzles.gather(1, inverse.view(4, 9, 1, 1, 1).expand_as(puzzles))
    assert torch.equal(assemble_tiles(restored), x)
    assert not torch.equal(assemble_tiles(puzzles), x)


def test_jigsaw_random_offsets_stay_inside_their_cell():
    x = torch.arange(64 * 64, dtype=torch.float).view(1, 1, 64, 64)
    tiles = cut_tiles(x, 18)  # cell 21, offsets 0..3
    for i in range(9):
        r, c = divmod(i, 3)
        first = int(tiles[0, i, 0, 0, 0])
        row, col = divmod(first, 64)
        assert r * 21 <= row <= r * 21 + 3 and c * 21 <= col <= c * 21 + 3
        assert torch.equal(tiles[0, i, 0], x[0, 0, row:row + 18, col:col + 18])


def test_mae_encoder_receives_exactly_the_visible_tokens():
    task, spec = build("mae", "timm:vit_tiny_patch16_224", size=64, backbone_opts=TINY_VIT, mask_ratio=0.75,
                       decoder_dim=32, decoder_depth=1)
    seen = []
    original = task.encoder.encode_tokens
    task.encoder.encode_tokens = lambda t: (seen.append(t.shape[1]), original(t))[1]
    task(task.views(spec)(images(2, 1, 64)))
    n = (64 // 8) ** 2
    assert seen == [int(n * (1 - 0.75))] == [16]


def test_mae_class_token_goes_through_the_decoder():
    """As in the MAE authors' code: the encoder's class token (the exported embedding) is a
    decoder input, so the loss trains it; its prediction is dropped (one output per patch)."""
    task, spec = build("mae", "timm:vit_tiny_patch16_224", size=32, backbone_opts=TINY_VIT, decoder_dim=32,
                       decoder_depth=1, decoder_heads=2, target="pixels")
    x = task.views(spec)(images(2, 1, 32))[0]
    latent, mask, ids_restore = task.forward_encoder(x)
    assert task.encoder.num_prefix_tokens == 1
    latent = latent.detach().requires_grad_(True)
    pred = task.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 8 * 8)
    task.forward_loss(x, pred, mask).backward()
    assert latent.grad[:, 0].abs().sum() > 0


def test_mae_crops_are_the_papers_from_96_px_and_milder_below():
    from sslkit_plugins.tasks.mae import PAPER_CROPS_FROM_PX, default_min_scale
    assert PAPER_CROPS_FROM_PX == 96 and default_min_scale(96) == 0.2 and default_min_scale(95) == 0.5
    small, spec = build("mae", "timm:vit_tiny_patch16_224", size=32, backbone_opts=TINY_VIT)
    assert [r.scale for r in small.views(spec).recipes] == [(0.5, 1.0)]
    big, spec = build("mae", "timm:vit_tiny_patch16_224", size=96, backbone_opts=dict(TINY_VIT, patch_size=16))
    assert [r.scale for r in big.views(spec).recipes] == [(0.2, 1.0)]
    mine, spec = build("mae", "timm:vit_tiny_patch16_224", size=32, backbone_opts=TINY_VIT, min_scale=0.3)
    assert [r.scale for r in mine.views(spec).recipes] == [(0.3, 1.0)]


def test_simmim_masks_the_requested_fraction_and_only_scores_masked_pixels():
    from sslkit_plugins.tasks.simmim import token_mask
    m = token_mask(3, 8, 2, 0.6, "cpu")
    assert m.shape == (3, 8, 8) and (m.sum((1, 2)) == 4 * 10).all()  # ceil(0.6 * 16) blocks of 2x2
    task, spec = build("simmim", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, target="pixels")
    x = task.views(spec)(images(2, 1, 32))[0]
    mask = torch.zeros(2, 4, 4)
    feats = task.encode_masked(x, mask)
    assert feats.shape == (2, 64, 4, 4) and task.reconstruct(feats).shape == x.shape and not len(task.head_blocks)


def test_simmim_head_blocks_sit_between_the_encoder_and_the_pixel_head():
    task, spec = build("simmim", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, head_depth=2,
                       target="pixels")
    x = task.views(spec)(images(2, 1, 32))[0]
    feats = task.encode_masked(x, torch.zeros(2, 4, 4))
    linear_only = task.head(feats)
    rec = task.reconstruct(feats)
    assert len(task.head_blocks) == 2 and rec.shape == linear_only.shape == x.shape
    assert not torch.allclose(rec, linear_only)
    task((x,))["loss"].backward()
    assert task.head_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(not n.startswith("head") for n, _ in task.encoder.named_parameters())  # not exported


def test_inpainting_scores_only_the_region():
    from sslkit_plugins.tasks.inpainting import masked_l2, region_mask
    m = region_mask(2, 16, 0.5, "center", "cpu")
    assert m.sum().item() == 2 * 64 and m[0, 0, 4:12, 4:12].min() == 1
    x, pred = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    pred[m.bool().expand_as(pred).logical_not()] = 100.0  # errors outside the region do not count
    pred[0, 0, 8, 8] = 2.0
    assert masked_l2(pred, x, m).item() == pytest.approx(4.0 / 128)
    r = region_mask(50, 16, 0.25, "random", "cpu")
    assert (r.sum((1, 2, 3)) == 16).all() and len({tuple(v.nonzero()[0].tolist()) for v in r}) > 5


def test_inpainting_visible_weight_adds_the_loss_outside_the_region():
    from sslkit_plugins.tasks.inpainting import masked_l2, region_mask
    x = images(4, 1, 32)
    losses = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        task, _ = build("inpainting", visible_weight=w)
        losses[w] = task((x,))["loss"]
    torch.manual_seed(0)
    task, _ = build("inpainting")
    m = region_mask(4, 32, 0.5, "center", "cpu")
    pred = task.decoder(task.encoder(x * (1 - m)))
    inside, outside = masked_l2(pred, x, m), masked_l2(pred, x, 1 - m)
    assert losses[0.0].item() == pytest.approx(inside.item(), rel=1e-5)
    assert losses[0.5].item() == pytest.approx(inside.item() + 0.5 * outside.item(), rel=1e-5)
    assert outside.item() > 0.01 * inside.item()  # the term is not negligible: the test can fail


def test_denoising_corrupts_input_but_targets_clean():
    from sslkit_plugins.tasks.denoising import corrupt
    x = torch.ones(2, 1, 16, 16)
    masked = corrupt(x, "mask", 0.0, 0.25, 4)
    assert (masked == 0).float().mean().item() == pytest.approx(0.25)
    noisy = corrupt(x, "noise", 0.5, 0.0, 4)
    assert 0.4 < (noisy - x).std().item() < 0.6


def test_vae_kl_weight_warms_up_linearly():
    task, _ = build("vae", beta=2.0, kl_warmup=0.5)
    assert task.kl_weight.item() == 0.0
    task.on_step_end(25, 100)
    assert task.kl_weight.item() == pytest.approx(1.0)
    task.on_step_end(80, 100)
    assert task.kl_weight.item() == pytest.approx(2.0)


def test_dino_teacher_temperature_warms_up_and_state_is_checkpointed():
    task, _ = build("dino", out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=16)
    assert task.teacher_temp.item() == pytest.approx(0.04)
    task.on_step_end(15, 100)  # half of the 30% warm-up
    assert task.teacher_temp.item() == pytest.approx(0.055)
    task.on_step_end(60, 100)
    assert task.teacher_temp.item() == pytest.approx(0.07)
    keys = task.state_dict().keys()
    assert {"center", "teacher_temp"} <= set(keys) and any(k.startswith("teacher_encoder.") for k in keys)


def test_moco_queue_is_a_checkpointed_buffer():
    task, _ = build("moco", queue_size=32, proj_dim=16, proj_hidden_dim=32)
    state = task.state_dict()
    assert state["queue"].shape == (32, 16) and "queue_ptr" in state
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(32))


# --- EMA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,opts", [
    ("byol", dict(proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64)),
    ("moco", dict(proj_hidden_dim=64, proj_dim=32, queue_size=64)),
    ("moco", dict(version=3, proj_hidden_dim=64, proj_dim=32)),
    ("dino", dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=16)),
])
def test_ema_teacher_follows_but_differs_from_student(task, opts):
    t, spec = build(task, **opts)
    teacher = t.target_encoder if task == "byol" else t.key_encoder if task == "moco" else t.teacher_encoder
    before = [p.clone() for p in teacher.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, t.encoder.parameters()))  # starts as a copy
    assert not any(p.requires_grad for p in teacher.parameters())
    overfit(t, spec, steps=1, lr=1e-2, batch=4)
    moved = [not torch.equal(a, b) for a, b in zip(before, teacher.parameters())]
    differs = [not torch.equal(a, b) for a, b in zip(teacher.parameters(), t.encoder.parameters())]
    assert any(moved) and any(differs)
    # one EMA step of momentum m moves the teacher by (1 - m) of the student's step
    p_t, p_before, p_s = next(teacher.parameters()), before[0], next(t.encoder.parameters())
    m = {"byol": 0.996, "moco": 0.999 if opts.get("version", 2) == 2 else 0.99, "dino": 0.996}[task]
    torch.testing.assert_close(p_t, m * p_before + (1 - m) * p_s, rtol=1e-5, atol=1e-6)


# --- learning -------------------------------------------------------------------------------
SMALL_HEADS = {
    "simclr": dict(proj_hidden_dim=64, proj_dim=32),
    "moco": dict(version=3, proj_hidden_dim=64, proj_dim=32),  # v2: test_moco_v2_learns_instance_discrimination
    "byol": dict(proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64),
    "dino": dict(out_dim=256, hidden_dim=64, bottleneck_dim=32, local_crops=2, local_size=16),
    "barlowtwins": dict(proj_dim=64),
    "vicreg": dict(proj_dim=64),
    "autoencoder": dict(decoder_width=64),
    "denoising": dict(decoder_width=64),
    "inpainting": dict(decoder_width=64),
    "vae": dict(decoder_width=64, latent_dim=16, kl_warmup=0.0),
    "rotation": dict(hidden_dim=64),
    "jigsaw": dict(num_permutations=10, tile_dim=32, hidden_dim=64),
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "simmim": dict(),
}
VIT_TASKS = {"mae", "simmim"}
# what must fall: DINO's loss is H(P_t) + KL(P_t || P_s) and the centred teacher's entropy
# rises as the centre follows it, so the student's fit to the teacher (KL) is the signal.
METRIC = {"dino": "kl"}
# masked modelling draws a new mask every step: more (cheap) steps on smooth images
SCHEDULE = {"mae": dict(steps=200, lr=2e-3, noise=0.02), "simmim": dict(steps=100, lr=3e-3, noise=0.02)}


def overfit_metric(task: str, channels: int) -> list[float]:
    size = 64 if task == "jigsaw" else 32
    backbone = "timm:vit_tiny_patch16_224" if task in VIT_TASKS else "timm:resnet10t"
    t, spec = build(task, backbone, channels=channels, size=size,
                    backbone_opts=TINY_VIT if task in VIT_TASKS else None, **SMALL_HEADS[task])
    return overfit(t, spec, metric=METRIC.get(task, "loss"), **SCHEDULE.get(task, dict(steps=30)))


@pytest.mark.parametrize("task", sorted(SMALL_HEADS))
def test_task_overfits_a_tiny_fixed_batch(task):
    values = overfit_metric(task, channels=1)
    first, last = start_end(values)
    assert all(v == v and abs(v) != float("inf") for v in values)
    assert last < 0.75 * first, f"{task}: {METRIC.get(task, 'loss')} {first:.4f} -> {last:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(SMALL_HEADS))
def test_task_overfits_a_tiny_fixed_batch_rgb(task):
    first, last = start_end(overfit_metric(task, channels=3))
    assert last < 0.75 * first, f"{task}: {first:.4f} -> {last:.4f}"


def test_moco_v2_learns_instance_discrimination():
    """A fixed batch cannot be overfitted with a queue (its own keys become negatives), so:
    64 images in 8 batches, cycled; the queue (56) holds exactly the other 7 batches' keys.
    One BN split: at 8 images a batch, shuffled 4-image BN statistics would make keys noise."""
    t, spec = build("moco", proj_hidden_dim=64, proj_dim=128, queue_size=56, key_bn_splits=1)
    torch.manual_seed(0)
    batches = [t.views(spec)(images(8, 1, 32, seed=i, noise=0.1)) for i in range(8)]
    opt = torch.optim.Adam([p for p in t.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(1, 57):
        out = t(batches[(step - 1) % 8])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        t.on_step_end(step, 56)
        losses.append(out["loss"].item())
    second_cycle, last_cycle = sum(losses[8:16]) / 8, sum(losses[-8:]) / 8  # first cycle: random queue
    assert last_cycle < 0.8 * second_cycle, f"{second_cycle:.3f} -> {last_cycle:.3f}"


@pytest.mark.slow
def test_simmim_trains_on_swin():
    swin = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    t, spec = build("simmim", "timm:swin_tiny_patch4_window7_224", size=64, backbone_opts=swin)
    assert t.kind == "swin" and t.stride == 32
    first, last = start_end(overfit(t, spec, steps=30))
    assert last < 0.75 * first


def test_simmim_swin_forward_shapes():
    swin = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    t, spec = build("simmim", "timm:swin_tiny_patch4_window7_224", size=64, backbone_opts=swin)
    out = t(t.views(spec)(images(2, 1, 64)))
    assert torch.isfinite(out["loss"]) and t.grid == 16 and t.scale == 2
    out["loss"].backward()
    assert t.mask_token.grad is not None and t.mask_token.grad.abs().sum() > 0


def test_inpainting_adversarial_term_reaches_the_generator_not_the_discriminator():
    """Scaling adv_weight changes the encoder's gradient but not the discriminator's (L_D only)."""
    t, spec = build("inpainting", decoder_width=32, adv_weight=0.001, rec_weight=0.999)
    views = t.views(spec)(images(4, 1, 32))  # region=center: the forward pass is deterministic

    def grads(adv_weight):
        t.options.adv_weight = adv_weight
        t.zero_grad()
        out = t(views)
        out["loss"].backward()
        return ([p.grad.clone() for p in t.discriminator.parameters()],
                [p.grad.clone() for p in t.encoder.parameters() if p.grad is not None], out)

    d_small, e_small, out = grads(0.001)
    d_big, e_big, _ = grads(1000.0)
    assert {"rec", "adv", "disc"} <= set(out)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(d_small, d_big))
    assert any(g.abs().sum() > 0 for g in d_small)
    assert not all(torch.allclose(a, b) for a, b in zip(e_small, e_big))


def test_mae_decoder_width_follows_the_encoder():
    from sslkit_plugins.tasks.mae import default_decoder_dim
    assert [default_decoder_dim(d, 8) for d in (192, 384, 768, 1024, 64)] == [96, 192, 384, 512, 64]
    task, _ = build("mae", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT)
    assert task.decoder_dim == 64 and task.decoder_pred.out_features == 2 * 2 * 9 * 1  # 2x2 HOG cells a patch
    task, _ = build("mae", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, target="pixels")
    assert task.decoder_pred.out_features == 8 * 8 * 1
    task, _ = build("mae", "timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT, decoder_dim=32, decoder_heads=4)
    assert task.decoder_dim == 32


def test_augment_overrides_reach_task_specific_views():
    rot, spec = build("rotation")
    with pytest.raises(UsageError, match="rot90_p"):
        rot.views(spec).override(rot90_p="0.5")
    views, labels = rot.views(spec).override(rotate_p="0.5", noise_p="1.0")(images(2, 1, 32))
    assert views.shape == (8, 1, 32, 32) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    jig, spec = build("jigsaw", size=64, num_permutations=5, tile_dim=8, hidden_dim=8)
    noisy = jig.views(spec).override(noise_p="1.0")
    assert noisy.recipe.noise_p == 1.0 and noisy(images(2, 1, 64))[0].shape == (2, 9, 1, 17, 17)


@pytest.mark.parametrize("task,opts", [
    ("byol", dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)),
    ("moco", dict(proj_hidden_dim=32, proj_dim=16, queue_size=24)),
    ("moco", dict(version=3, proj_hidden_dim=32, proj_dim=16)),
    ("dino", dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=8)),
    ("vae", dict(decoder_width=16, latent_dim=8)),
])
def test_task_state_dict_carries_everything_a_resume_needs(task, opts):
    """Teachers, queues, centres and schedules live in the state dict: a task rebuilt from a
    different initialisation and loaded from step 3 continues exactly like the original."""
    def make(seed):
        torch.manual_seed(seed)
        t, spec = build(task, size=16, **opts)
        return t, spec, torch.optim.Adam([p for p in t.parameters() if p.requires_grad], lr=1e-3)

    a, spec, opt_a = make(0)
    torch.manual_seed(5)
    batches = [a.views(spec)(images(4, 1, 16, seed=i)) for i in range(5)]

    def steps(t, opt, first, last):
        out = []
        for step in range(first, last + 1):
            loss = t(batches[step - 1])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            t.on_step_end(step, 5)
            out.append(loss.item())
        return out

    steps(a, opt_a, 1, 3)
    state, opt_state = {k: v.clone() for k, v in a.state_dict().items()}, copy.deepcopy(opt_a.state_dict())
    torch.manual_seed(9)
    expected = steps(a, opt_a, 4, 5)
    b, _, opt_b = make(1)
    b.load_state_dict(state)
    opt_b.load_state_dict(opt_state)
    torch.manual_seed(9)
    assert steps(b, opt_b, 4, 5) == expected


@pytest.mark.parametrize("task", ALL_TASKS)
def test_engine_defaults_reach_the_config_and_the_command_line_wins(task):
    """A task's measured ``engine_defaults`` (benchmarks/task_table.py), under its
    ``backbone_engine_defaults`` for the backbone the run builds, are what a run uses unless the user
    sets the field; the resolved config (run.json) records the value."""
    from sslkit import config

    cls = registry.get_task(task)
    base = {"task": task, "data": "folder:x", "out": "y"}
    cfg = config.resolve(dict(base))
    built = registry.meta_backbone(cfg.backbone, 3, cfg.image_size, **cfg.backbone_options)
    defaults = {**(cls.engine_defaults or {}), **(cls.backbone_engine_defaults(built) or {})}
    for field, value in defaults.items():
        assert getattr(cfg, field) == (tuple(value) if isinstance(value, list) else value)
    assert config.resolve({**base, "base_lr": 0.123}).base_lr == 0.123


def test_simmim_on_a_cnn_masks_pixels_and_scores_only_the_masked_tokens(monkeypatch):
    """A CNN has no tokens to swap: the masked 4-px squares of the image are set to a learned value
    per channel before the encoder; the linear head predicts every token from the stride-32 map."""
    import sslkit_plugins.tasks.simmim as simmim

    t, spec = build("simmim", "timm:resnet10t", size=32, target="pixels", mask_patch=8, visible_weight=0)
    assert (t.kind, t.patch, t.grid, t.scale, t.stride) == ("cnn", 4, 8, 2, 32)
    mask = torch.zeros(2, 8, 8)
    mask[:, :2, :2] = 1  # the top-left 8-px square
    monkeypatch.setattr(simmim, "token_mask", lambda *a, **k: mask)
    seen = {}
    forward_features = t.encoder.model.forward_features

    def capture(x):
        seen["x"] = x
        return forward_features(x)

    monkeypatch.setattr(t.encoder.model, "forward_features", capture)
    with torch.no_grad():
        t.mask_token.fill_(0.25)
    x = images(2, 1, 32)
    loss = t((x,))["loss"]
    fed = seen["x"]
    assert torch.equal(fed[:, :, :8, :8], torch.full_like(fed[:, :, :8, :8], 0.25))
    assert torch.equal(fed[:, :, 8:], x[:, :, 8:]) and torch.equal(fed[:, :, :8, 8:], x[:, :, :8, 8:])
    rec = t.reconstruct(forward_features(fed))
    torch.testing.assert_close(loss, (x - rec)[:, :, :8, :8].abs().mean())  # the masked pixels only
    loss.backward()
    assert t.mask_token.grad.abs().sum() > 0
    # the CNN default scores the visible pixels too, at the masked ones' weight: the mean over every pixel
    d, _ = build("simmim", "timm:resnet10t", size=32, mask_patch=8)
    assert d.visible_weight == 1.0 and d.resolved_options()["visible_weight"] == 1.0
    d.load_state_dict(t.state_dict())
    monkeypatch.setattr(d.encoder.model, "forward_features", capture)
    torch.testing.assert_close(d((x,))["loss"], (x - d.reconstruct(forward_features(fed))).abs().mean())


def test_simmim_on_a_cnn_probes_its_stride_without_moving_batchnorm():
    from sslkit.registry import create_backbone
    backbone = create_backbone("timm:resnet10t", 1, 32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    task = create_task("simmim", backbone, spec_of(1, 32))
    assert task.stride == 32 and backbone.training
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_simmim_learns_on_a_cnn():
    t, spec = build("simmim", "timm:resnet10t", size=32)
    first, last = start_end(overfit(t, spec, steps=60, lr=3e-3, noise=0.02))
    assert last < 0.75 * first, f"{first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("size", [30, 36, 95])
def test_simmim_on_a_cnn_trains_at_any_size_its_last_tokens_cropped_at_the_edge(size):
    """The default ResNet-18 below 96 px takes every size: tokens and mask squares that overhang an image side
    4 does not divide are cut at the edge, and the head's output (whole cells of the CNN's map) is cropped
    to the image, so only pixels of the image are masked and scored."""
    t, spec = build("simmim", "timm:resnet10t", size=size, channels=1)
    assert t.target == "pixels" and t.grid == -(-size // 4)
    mask = torch.zeros(2, t.grid, t.grid)
    mask[:, -1, :] = 1  # the bottom row of tokens, partly outside the image where 4 does not divide size
    x = images(2, 1, size)
    rec = t.reconstruct(t.encode_masked(x, mask))
    assert rec.shape == x.shape
    pix = t.pixel_mask(mask, size)
    assert pix.shape == (2, 1, size, size) and pix[:, :, -1].all() and not pix[:, :, : (t.grid - 1) * 4].any()
    loss = t((x,))["loss"]
    loss.backward()
    assert loss.isfinite() and t.mask_token.grad.abs().sum() > 0


def test_simmim_mask_patch_scales_with_the_size_even_where_it_does_not_divide_it():
    """32 px at 224, scaled: 20 px at 128 (it used to fall back to the 4-px token where the scaled size did
    not divide the image); the last row and column of squares overhang the edge."""
    from sslkit_plugins.tasks.simmim import token_mask

    t, _ = build("simmim", "timm:resnet10t", size=128)
    assert (t.patch, t.scale, t.grid) == (4, 5, 32)
    m = token_mask(3, 32, 5, 0.6, "cpu")
    assert m.shape == (3, 32, 32)
    assert torch.equal(m[:, :5, :5], m[:, :1, :1].expand(3, 5, 5))  # one 20-px square decides 5 x 5 tokens


def test_simmim_options_that_mask_the_whole_image_or_need_whole_tokens_are_one_line_exit_2(cli, gray_folder,
                                                                                          tmp_path):
    for opts, needle in ((("--task-opt", "mask_patch=32", "--image-size", 32), "nothing visible"),
                         (("--task-opt", "target=hog", "--image-size", 30), "target=pixels")):
        out = tmp_path / opts[1]
        result = cli("pretrain", "--task", "simmim", "--data", f"folder:{gray_folder}", "--out", out, *opts,
                     "--max-steps", 1)
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("task, schedule", [("dino", "teacher_temp"), ("vae", "kl_weight")])
def test_init_from_a_run_restores_heads_but_not_a_schedules_value(task, schedule):
    """--init RUN_DIR restored DINO's teacher temperature and the VAE's KL weight at the old run's
    final values, so the first step ran at them, not at the new run's warm-up start."""
    t, _ = build(task, **({"local_crops": 0} if task == "dino" else {}))
    state = t.head_state()
    assert schedule in t.state_dict() and set(state) == {k for k in t.state_dict()
                                                         if not k.startswith("encoder.")} - {schedule}


def test_jigsaw_refuses_more_permutations_than_can_be_chosen_in_reasonable_time():
    """Up to 9! was accepted: ~15 ms each to choose, 1.5 h before the first step."""
    from sslkit.options import build_options

    cls = registry.get_task("jigsaw").Options
    assert build_options(cls, {"num_permutations": "2000"}, "task 'jigsaw'").num_permutations == 2000
    with pytest.raises(UsageError, match=r"num_permutations must be in \[2, 2000\]"):
        build_options(cls, {"num_permutations": "2001"}, "task 'jigsaw'")


def test_dino_global_crops_may_be_wider_than_the_local_ones_only_without_local_crops():
    """DINO's code suggests global crops from 0.14 without local crops; that was refused for the unused
    local_scale_max 0.4 above it. With local crops the order is still one line."""
    from sslkit.errors import UsageError

    task, _ = build("dino", size=32, global_scale_min=0.14)
    assert task.local_crops == 0 and task.views(task.spec).recipes[0].scale == (0.14, 1.0)
    with pytest.raises(UsageError, match=r"^dino's local crops must be smaller than the global ones: "
                                         r"local_scale_max 0.4 is above global_scale_min 0.14$"):
        build("dino", size=32, global_scale_min=0.14, local_crops=2, local_size=16)
