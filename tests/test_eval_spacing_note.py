"""``sslkit eval knn`` / ``linear`` of a volume run given a ``--spacing`` other than the run's note it once:
they resolved the source options (and printed the note) at every read of the data (its index, its
embedding, the fine-tuning's decode), so the same line came two to four times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")


NOTE = ("sslkit: note: --spacing {} resamples to another voxel size than the model's (2,2,2 mm, x,y,z): it sees "
        "the anatomy at another scale")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-step SimCLR run of monai:resnet10 on 8x8x8 volumes resampled to 2 mm, and its data: four
    20x18x12 volumes in each of the class folders a and b (``nii``) and a link to that folder (``link``)."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("spacing")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "nii" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.normal(0, 100, (20, 18, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.5, 1.0])), folder / f"vol{i}.nii.gz")
    (root / "link").symlink_to(root / "nii", target_is_directory=True)
    args = ["pretrain", "--task", "simclr", "--backbone", "monai:resnet10", "--data", f"nifti:{root / 'nii'}",
            "--sample", "volume", "--volume-size", "8,8,8", "--spacing", "2", "--max-steps", "1", "--batch-size", "2",
            "--device", "cpu", "--quiet", "--task-opt", "proj_hidden_dim=64", "--task-opt", "proj_dim=32",
            "--out", str(root / "run")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("command,data", [
    ("knn", ("--data", "nii", "--split", "group:2")),
    ("knn", ("--train", "nii", "--test", "link", "--allow-overlap")),  # read twice, by two sides
    ("linear", ("--data", "nii", "--split", "group:2", "--finetune", "--finetune-epochs", "1")),  # a third read
])
def test_another_spacing_is_noted_once(cli, run, command, data):
    data = [f"nifti:{run / a}" if a in ("nii", "link") else a for a in data]
    result = cli("eval", command, run / "run", *data, "--spacing", "3", "--no-baseline", "--quiet")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("sslkit: note:")]
    assert notes == [NOTE.format("3,3,3")], result.stderr


def test_each_side_notes_its_own_spacing(cli, run):
    """Resolved once per source kind and options, not once per command: another spacing per side is two notes."""
    result = cli("eval", "knn", run / "run", "--train", f"nifti:{run / 'nii'}", "--test", f"nifti:{run / 'link'}",
                 "--allow-overlap", "--train-opt", "spacing=3", "--test-opt", "spacing=4", "--no-baseline", "--quiet")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("sslkit: note:")]
    assert notes == [NOTE.format("3,3,3"), NOTE.format("4,4,4")], result.stderr
