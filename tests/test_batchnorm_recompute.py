"""BatchNorm statistics recomputed on whole images after pretraining (``Task.recompute_batchnorm``).

The unit tests check the statistics against their definition (mean over the images used,
mean of the per-batch unbiased variances); the run test checks that a jigsaw run's saved
encoder normalises with whole-image statistics while its checkpoint keeps the tiles' ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sslkit import checkpoint
from sslkit.data.loader import BatchLoader
from sslkit.engine.batchnorm import recompute_batchnorm
from tests.conftest import make_images


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def loader_of(n: int, batch: int, raw: bool = False) -> BatchLoader:
    pixels = np.random.default_rng(1).integers(0, 65536, (n, 3, 12, 12), dtype=np.uint16)
    return BatchLoader(pixels, batch, seed=0, pin_memory=False, raw=raw)


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def whole(loader: BatchLoader, idx: np.ndarray) -> torch.Tensor:
    x = loader.read(np.sort(idx))
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("n, batch, images, used", [(64, 16, 2048, 64), (300, 128, 2048, 256), (10, 16, 2048, 10),
                                                     (100, 16, 40, 32)])
def test_statistics_are_the_mean_over_whole_images(n, batch, images, used):
    net, loader = small_cnn(), loader_of(n, batch)
    net[1].running_mean.fill_(5.0)  # stale statistics, as from training on tiles
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    net.eval()
    report = recompute_batchnorm(net, loader, MEAN, STD, torch.device("cpu"), seed=3, images=images)
    assert report == {"layers": 2, "images": used}

    order = np.random.default_rng([3, 0xB4]).permutation(n)[:used]
    batches = [order[i:i + batch] for i in range(0, used, batch)]
    with torch.no_grad():
        first = [net[0](whole(loader, b)) for b in batches]
    # equal batches: the cumulative average of batch means is the mean over every image used
    expected_mean = torch.cat(first).mean(dim=(0, 2, 3))
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in first]).mean(0)
    torch.testing.assert_close(net[1].running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, expected_var, rtol=1e-5, atol=1e-5)
    assert int(net[1].num_batches_tracked) == len(batches)
    # weights kept, momentum and mode restored
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net[1].momentum == 0.1 and not net.training


def test_a_loader_of_raw_cache_integers_gives_the_same_statistics():
    nets = [small_cnn(), small_cnn()]
    for net, raw in zip(nets, (False, True)):
        recompute_batchnorm(net, loader_of(48, 16, raw=raw), MEAN, STD, torch.device("cpu"), seed=0)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b)


def test_an_encoder_without_batchnorm_is_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recompute_batchnorm(net, loader_of(8, 4), MEAN, STD, torch.device("cpu"), seed=0) is None
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def first_bn_input(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the encoder's first BatchNorm layer receives for ``x`` (nothing before it normalises)."""
    bn = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        encoder.eval()(x)
    handle.remove()
    return seen[0]


def test_a_jigsaw_run_saves_an_encoder_with_whole_image_statistics(tmp_path, cli):
    from safetensors.torch import load_file

    from sslkit.data.pipeline import load_data
    from sslkit.embed import normalize_unit
    from sslkit.run import load_run

    images = make_images(tmp_path / "img", n_per_class=8, size=64)
    out = tmp_path / "run"
    result = cli("pretrain", "--task", "jigsaw", "--data", f"folder:{images}", "--out", out, "--backbone",
                 "timm:resnet10t", "--image-size", 64, "--batch-size", 8, "--max-steps", 2, "--epochs", 1,
                 "--task-opt", "num_permutations=5", "--quiet", "--cache", "")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["batchnorm_recomputed"]["images"] == 16

    run = load_run(out)
    encoder = run.build_encoder()
    loaded = load_data(f"folder:{images}", 64, 3, {}, progress=False)
    unit = BatchLoader(loaded.prepared.pixels, 16, seed=0, pin_memory=False).read(np.arange(16)).numpy()
    inputs = first_bn_input(encoder, torch.from_numpy(normalize_unit(run.spec, unit)))
    bn = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, inputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)

    # the checkpoint keeps the statistics training gathered on tiles, and its weights are the saved ones
    saved = load_file(str(out / "encoder.safetensors"))
    _, model, _, _ = checkpoint.load_latest(out / "checkpoints")
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.allclose(model[f"encoder.{k}"], saved[k]) for k in stats)
    for k in saved:
        if k not in stats and not k.endswith("num_batches_tracked"):
            assert torch.equal(model[f"encoder.{k}"], saved[k]), k


def test_other_tasks_keep_their_training_statistics(tmp_path):
    from tests.conftest import tiny_run

    images = make_images(tmp_path / "img", n_per_class=4, size=32)
    out = tiny_run(f"folder:{images}", tmp_path / "run")
    assert "batchnorm_recomputed" not in json.loads((out / "run.json").read_text())
