"""``sslkit pretrain --print-config`` refuses, with the run's own one line (exit 2) and before printing
anything, the settings the run refuses before decoding (a task/backbone pairing, an image size the task
or backbone cannot take), without reading the data: with no ``--data``, a ``--data`` not there yet, or
data that is there."""

from __future__ import annotations

import pytest

from tests.conftest import make_images


REFUSED = [
    ("--task", "jigsaw", "--image-size", "32"),
    ("--task", "mae", "--backbone", "timm:resnet18"),
    ("--task", "jigsaw", "--backbone", "timm:vit_tiny_patch16_224"),
]


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("args", REFUSED, ids=["jigsaw-32px", "mae-resnet18", "jigsaw-vit"])
def test_print_config_gives_the_runs_refusal(cli, tmp_path, monkeypatch, args):
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    run = cli("pretrain", *args, "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
              "--batch-size", "8", "--device", "cpu", "--quiet")
    line = _one_line(run)
    assert line.startswith("error: task ") and "cannot run here" in line, line
    for data_args in ((), ("--data", tmp_path / "not-yet"), ("--data", data)):
        printed = cli("pretrain", *args, *data_args, "--batch-size", "8", "--print-config")
        assert _one_line(printed) == line, data_args
        assert printed.stdout == ""  # refused before printing
    assert not list((tmp_path / "cache").glob("*/pixels.npy"))  # nothing decoded


def test_print_config_still_prints_a_pairing_the_run_takes(cli, tmp_path, monkeypatch):
    """The same settings at a size and backbone the run takes still print (and load back); the check
    does not refuse a volume run whose data is not there yet (its sample mode is the source's)."""
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    good = cli("pretrain", "--task", "jigsaw", "--image-size", "64", "--print-config")
    assert good.exit_code == 0 and 'task = "jigsaw"' in good.stdout and "image_size = 64" in good.stdout
    volume = cli("pretrain", "--task", "simclr", "--data", f"nifti:{tmp_path / 'not-yet'}", "--backbone",
                 "monai:resnet10", "--sample", "volume", "--volume-size", "8,8,8", "--print-config")
    assert volume.exit_code == 0, volume.output
    assert 'backbone = "monai:resnet10"' in volume.stdout


def test_print_config_prints_the_continued_pretraining_flags(cli, tmp_path):
    """``--init`` with ``--init-freeze-steps`` / ``--init-lr-scale`` / ``--layer-decay`` prints (the checks
    probe the run without its weights: they once dropped ``--init`` but kept its flags and refused them)."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read by --print-config")
    printed = cli("pretrain", "--task", "mae", "--init", weights, "--init-freeze-steps", "0",
                  "--init-lr-scale", "0.3", "--layer-decay", "0.75", "--print-config")
    assert printed.exit_code == 0, printed.output
    for line in ("init_freeze_steps = 0", "init_lr_scale = 0.3", "layer_decay = 0.75"):
        assert line in printed.stdout.splitlines(), line
    alone = cli("pretrain", "--task", "mae", "--init-lr-scale", "0.3", "--print-config")
    assert alone.exit_code == 2 and "give --init too" in alone.stderr
