"""A run's checkpoint as the model: ``sslkit export|embed|eval RUN/checkpoints/step-N`` uses that
step's encoder (a run still training, interrupted, or an earlier step), reports into RUN/eval and
says which checkpoint it was; a run without its final encoder names its newest checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sslkit.testing import crashed_copy
from tests.conftest import make_images


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("ckpt")
    images = make_images(root / "img", n_per_class=6, size=16)
    out = root / "run"
    r = CliRunner().invoke(main, ["pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data",
                                  f"folder:{images}", "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                                  "--image-size", "16", "--checkpoint-every", "1", "--keep-checkpoints", "0",
                                  "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def test_the_last_checkpoint_is_the_final_encoder_and_an_earlier_one_is_not(run):
    from sslkit.run import load_run

    steps = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-00000001", "step-00000002", "step-00000003"]
    final = load_run(run).build_encoder().state_dict()
    last = load_run(steps[-1])
    assert last.path == run and last.checkpoint == steps[-1]
    for k, v in last.build_encoder().state_dict().items():
        assert np.array_equal(v.numpy(), final[k].numpy()), k
    first = load_run(steps[0]).build_encoder().state_dict()
    assert any(not np.array_equal(first[k].numpy(), v.numpy()) for k, v in final.items() if v.is_floating_point())


def test_export_embed_and_eval_of_a_crashed_run_through_its_checkpoint(run, tmp_path, cli):
    crashed = crashed_copy(run, tmp_path / "crashed", keep=2)
    r = cli("export", crashed, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    step = crashed / "checkpoints" / "step-00000002"
    assert "pretraining has not finished" in r.stderr and f"give {str(step)!r}" in r.stderr
    r = cli("export", step, "--out", tmp_path / "x.onnx", "--check-data", "none")
    assert r.exit_code == 0, r.output
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "x.onnx")).metadata_props}["sslkit"])
    assert meta["checkpoint"] == "step-00000002"
    images = run.parent / "img"
    r = cli("eval", "knn", step, "--train", images, "--test", images, "--allow-overlap", "--json", "--quiet",
            "--no-baseline")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model"]["checkpoint"] == "step-00000002"
    assert Path(report["report_file"]).parent == crashed / "eval"  # not inside the checkpoint, which may be pruned
    r = cli("embed", step, "--data", images, "--out", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    from sslkit.run import load_run

    enc = load_run(step).build_encoder()
    emb = np.load(tmp_path / "e.npz")
    assert emb["embeddings"].shape[1] == int(enc.num_features)


def test_a_damaged_checkpoint_is_one_line(run, tmp_path, cli):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = copy / "checkpoints" / "step-00000002"
    model = step / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    r = cli("export", step, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"checkpoint {str(step)!r} is unusable: model.safetensors is missing or has the wrong size" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_init_from_a_checkpoint_folder_loads_that_steps_encoder(run):
    """``--init RUN/checkpoints/step-N``: the step's encoder (and, for the same task, its heads),
    recorded by the run-relative name, never a full local path."""
    from sslkit.init import load_init
    from sslkit.registry import create_backbone
    from sslkit.run import load_run

    step = run / "checkpoints" / "step-00000002"
    dst = create_backbone("timm:test_resnet", in_chans=3, image_size=16)
    record = load_init(str(step), dst)
    assert record["source"] == "run/checkpoints/step-00000002" and str(run.parent) not in json.dumps(record)
    want = load_run(step).build_encoder().state_dict()
    for k, v in dst.state_dict().items():
        assert np.array_equal(v.numpy(), want[k].numpy()), k
