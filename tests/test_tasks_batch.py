"""Tasks and the batch: ``--accumulate K`` gives the update of a K x larger batch to state kept
between steps (MoCo v2's queue, DINO's centre), and a batch too small for a task's loss
(``Task.min_batch``) is one line, exit 2, before any image is decoded."""

from __future__ import annotations

import copy

import pytest
import torch

from sslkit.errors import UsageError
from sslkit.run import RunConfig
from tests.conftest import make_images
from tests.test_tasks import TINY_VIT, build, images


# a ViT has no BatchNorm: a sample's outputs do not depend on the rest of its batch, so K micro-batches
# and one batch K times larger must give the same state (BatchNorm is the documented exception)
VIT = dict(backbone="timm:vit_tiny_patch16_224", backbone_opts=TINY_VIT)


@pytest.mark.parametrize("task,opts", [
    ("moco", dict(queue_size=64, proj_dim=16, proj_hidden_dim=32, key_bn_splits=1)),
    ("dino", dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, local_crops=0)),
])
def test_accumulated_micro_batches_update_like_one_larger_batch(task, opts):
    torch.manual_seed(0)
    acc, spec = build(task, **VIT, **opts)
    big = copy.deepcopy(acc)
    views = acc.views(spec)(images(8, 1, 32))
    for part in (slice(0, 4), slice(4, 8)):  # --accumulate 2 of 4 images each
        acc(tuple(v[part] for v in views))
    acc.on_step_end(1, 10)
    big(views)
    big.on_step_end(1, 10)
    for name, value in big.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[name], value, msg=lambda m, n=name: f"{n}: {m}")
    if task == "moco":
        assert int(acc.queue_ptr) == 8


def test_accumulated_moco_enqueues_every_micro_batch_in_a_run(cli, tmp_path):
    """The audit's case: 3 steps of 2 x 8 images put 48 keys in the queue, not 24."""
    from safetensors.torch import load_file

    data = make_images(tmp_path / "img", n_per_class=20, size=32)
    out = tmp_path / "run"
    result = cli("pretrain", "--task", "moco", "--data", f"folder:{data}", "--out", out, "--image-size", 32,
                 "--batch-size", 8, "--accumulate", 2, "--max-steps", 3, "--backbone", "timm:resnet10t",
                 "--task-opt", "queue_size=64", "--task-opt", "proj_hidden_dim=32", "--task-opt", "proj_dim=16",
                 "--quiet")
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert int(state["queue_ptr"]) == 48
    # a queue of 64 over 40 images holds keys of each query's own image: said once, the run goes on
    notes = [line for line in result.stderr.splitlines() if "queue" in line]
    assert notes == ["sslkit: note: task 'moco': its queue of 64 negative keys is not shorter than the 40 training "
                     "images, so it holds keys of each query's own image (false negatives); set --task-opt "
                     "queue_size below the image count"]


@pytest.mark.parametrize("opts,images,noted", [({"queue_size": 64}, 64, True), ({"queue_size": 64}, 65, False),
                                               ({"version": 3}, 10, False)])
def test_moco_notes_a_queue_as_long_as_the_data(opts, images, noted):
    task, _ = build("moco", **opts)
    assert (task.data_note(images) is not None) == noted
    assert build("simclr")[0].data_note(1) is None  # the default: nothing to say


def _assert_one_line_exit_2(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("task,opts", [("simclr", []), ("moco", ["--task-opt", "version=3"]), ("vicreg", []),
                                       ("barlowtwins", []), ("jigsaw", [])])
def test_a_batch_of_one_is_refused_before_decoding_where_the_loss_needs_two(task, opts, cli, tmp_path):
    """simclr and moco v3 had trained on a constant loss of 0 (no negatives), vicreg on NaN. The files
    are not images: an error about them would mean decoding had started first."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png at all")
    result = cli("pretrain", "--task", task, *opts, "--data", f"folder:{bad}", "--out", tmp_path / "r",
                 "--image-size", 64, "--batch-size", 1, "--max-steps", 1, "--backbone", "timm:resnet10t", "--quiet")
    _assert_one_line_exit_2(result, f"task '{task}' needs at least 2 images per process", "--batch-size 2 or more")
    assert not (tmp_path / "r").exists()


def test_data_smaller_than_two_images_is_refused_for_a_contrastive_task(cli, tmp_path):
    data = make_images(tmp_path / "img", n_per_class=1, size=32, classes=("a",))
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", tmp_path / "r",
                 "--image-size", 32, "--batch-size", 8, "--max-steps", 1, "--backbone", "timm:resnet10t", "--quiet")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "the data's 1 image(s) give 1; use 2 images or more" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("task,opts,need", [("moco", {}, 1), ("moco", {"version": 3}, 2), ("byol", {}, 1),
                                            ("dino", {"local_crops": 0}, 1), ("simclr", {}, 2)])
def test_min_batch_follows_the_task_and_its_options(task, opts, need):
    from sslkit.engine.model_setup import check_batch

    t, _ = build(task, **opts)
    cfg = RunConfig(task=task, data="folder:unused", out="unused", batch_size=1)
    if need == 1:
        check_batch(cfg, t, 1)
    else:
        with pytest.raises(UsageError, match=f"needs at least {need} images per process"):
            check_batch(cfg, t, 1)
    check_batch(cfg, t, 2)
