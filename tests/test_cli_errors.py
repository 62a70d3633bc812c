"""Every user error is one line on stderr, exit code 2, no traceback, nothing written.

Most checks run the CLI in-process (the ``cli`` fixture: an exception escaping it fails the
test, as a traceback would); the real executable is run for one error of sslkit's own (``test_unknown_task``) and for
click's (``test_bad_option_value_and_missing_option``): one line and exit 2 as a user sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sslkit.api import UsageError
from tests.conftest import make_images, run_sslkit


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), n_per_class=4, size=32)


def _assert_user_error(proc, *needles: str) -> None:
    """``proc``: a finished subprocess or an in-process click result."""
    code = proc.returncode if hasattr(proc, "returncode") else proc.exit_code
    assert code == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _pretrain(*args, out, run=run_sslkit):
    return run("pretrain", "--out", out, "--max-steps", "1", "--image-size", "32", "--quiet", *args)


def test_unknown_task(images, tmp_path):
    proc = _pretrain("--task", "maee", "--data", images, out=tmp_path / "r")
    _assert_user_error(proc, "unknown task 'maee'", "did you mean 'mae'")
    assert not (tmp_path / "r").exists()


def test_unknown_backbone(images, tmp_path, cli):
    proc = _pretrain("--task", "simclr", "--backbone", "timm:resnet_nope", "--data", images, out=tmp_path / "r",
                     run=cli)
    _assert_user_error(proc, "unknown timm model 'resnet_nope'")


def test_unknown_source(tmp_path, cli):
    proc = _pretrain("--task", "simclr", "--data", "s3:bucket/scans", out=tmp_path / "r", run=cli)
    _assert_user_error(proc, "unknown data source 's3'", "dicom")


def test_missing_data_dir(tmp_path, cli):
    proc = _pretrain("--task", "mae", "--data", f"dicom:{tmp_path / 'nope'}", out=tmp_path / "r", run=cli)
    _assert_user_error(proc, "does not exist")


def test_empty_data_dir(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    proc = _pretrain("--task", "mae", "--data", f"folder:{tmp_path / 'empty'}", out=tmp_path / "r", run=cli)
    _assert_user_error(proc, "no images found")
    assert not (tmp_path / "r").exists()


def test_dir_without_decodable_image(tmp_path, cli):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png at all")
    proc = _pretrain("--task", "simclr", "--data", f"folder:{bad}", out=tmp_path / "r", run=cli)
    _assert_user_error(proc, "no decodable image")
    assert not (tmp_path / "r").exists()


def test_mae_with_cnn_backbone(images, tmp_path, cli):
    proc = _pretrain("--task", "mae", "--backbone", "timm:resnet18", "--data", images, out=tmp_path / "r",
                     run=cli)
    _assert_user_error(proc, "MAE needs a ViT backbone", "timm:vit_")
    assert not (tmp_path / "r").exists()


def test_bad_option_value_and_missing_option(images, tmp_path, cli):
    _assert_user_error(_pretrain("--task", "mae", "--data", images, "--task-opt", "mask_ratio=2",
                                 out=tmp_path / "r", run=cli), "mask_ratio must be in (0, 1)")
    runs = Path("runs")
    before = sorted(runs.iterdir()) if runs.is_dir() else []
    _assert_user_error(cli("pretrain", "--task", "mae"), "missing --data (")
    _assert_user_error(cli("pretrain", "--task", "mae", "--data", images, "--task-opt", "mask_ratio=2"), "mask_ratio")
    assert (sorted(runs.iterdir()) if runs.is_dir() else []) == before  # no default run folder left behind
    # click's own errors, from the real executable (cheap: raised before the heavy imports)
    _assert_user_error(run_sslkit("pretrain", "--task", "mae", "--data", images, "--out", tmp_path / "r",
                                  "--epochs", "zero"), "--epochs")
    _assert_user_error(run_sslkit("frobnicate"), "No such command")


def test_non_empty_run_dir_is_refused(images, tmp_path, cli):
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = _pretrain("--task", "simclr", "--data", images, out=out, run=cli)
    _assert_user_error(proc, "not empty", "not an sslkit run", "give a new or empty --out")  # neither flag takes it
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "run.json").write_text("{}")  # a run's folder: continue or replace it
    _assert_user_error(_pretrain("--task", "simclr", "--data", images, out=out, run=cli), "not empty", "--resume",
                       "--overwrite")


def test_export_errors(tmp_path, cli):
    _assert_user_error(cli("export", tmp_path / "nope", "--out", tmp_path / "e.onnx"), "does not exist")
    (tmp_path / "notrun").mkdir()
    _assert_user_error(cli("export", tmp_path / "notrun", "--out", tmp_path / "e.onnx"), "not an sslkit run")


@pytest.mark.parametrize("damage, needle", [(b"[1, 2]", "not an sslkit run record"), (b'"text"', "not an sslkit run record"),
                                            (b"{oops", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON")])
def test_a_damaged_run_json_is_one_line_for_export_and_resume(tmp_path, cli, damage, needle):
    """A run.json that is not JSON, not UTF-8, or JSON but not an object: export and --resume each
    refuse it in one line (a traceback before), and
    the file is left as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_bytes(damage)
    _assert_user_error(cli("export", run, "--out", tmp_path / "e.onnx"), needle)
    _assert_user_error(cli("pretrain", "--resume", run, "--quiet"), "--resume", "not a readable sslkit run.json")
    assert (run / "run.json").read_bytes() == damage
    assert not (tmp_path / "e.onnx").exists()


def test_export_refuses_an_out_named_for_another_format(tmp_path, cli):
    """--format safetensors --out x.onnx wrote safetensors under an .onnx name; eval and embed then
    took it for ONNX. Refused before the run is read (the run here does not exist)."""
    _assert_user_error(cli("export", tmp_path / "run", "--out", tmp_path / "x.onnx", "--format", "safetensors"),
                       "has the suffix of the onnx format, but --format safetensors writes safetensors")
    assert not (tmp_path / "x.onnx").exists()
    _assert_user_error(cli("data", "cache", "--cache", tmp_path, "--clear-older-than", "nan"),
                       "'nan' is not a finite number")
    _assert_user_error(cli("data", "cache", "--cache", tmp_path, "--clear", "--clear-older-than", "3"),
                       "give one of them")  # --clear won: the recent entries went too
    # preview wrote a PNG and dump an npz (zip) under whatever name --out gave
    _assert_user_error(cli("data", "preview", tmp_path, "--out", tmp_path / "p.txt"), "must be a .png file")
    _assert_user_error(cli("data", "dump", tmp_path, "--out", tmp_path / "d.txt"), "must be a .npz file")
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "d.txt").exists()


@pytest.mark.parametrize("record, needle", [
    ({}, "not a complete sslkit run record: 'task' is missing"),
    ({"task": "mae", "backbone": "timm:resnet18", "config": {}}, "'input_spec' is missing"),
    ({"task": "mae", "backbone": "timm:resnet18", "config": {}, "input_spec": {"channels": 1}},
     "its input_spec cannot be read (KeyError"),
])
def test_a_run_json_missing_a_key_is_one_line_for_export_embed_and_eval(tmp_path, cli, record, needle):
    """A KeyError traceback ('backbone', 'input_spec') from export, embed and eval before."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(record))
    _assert_user_error(cli("export", run, "--out", tmp_path / "e.onnx"), needle)
    _assert_user_error(cli("embed", run, "--data", tmp_path, "--out", tmp_path / "e.npz"), needle)
    _assert_user_error(cli("eval", "knn", run, "--train", tmp_path, "--test", tmp_path), needle)


def test_task_options_that_cannot_fit_the_backbone_are_refused_before_decoding(tmp_path, cli):
    """DINO's local crops on a fixed-size ViT: refused from the options alone. The files are
    not even images, so an error about them would mean decoding had started first."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png at all")
    proc = _pretrain("--task", "dino", "--task-opt", "local_crops=8", "--backbone", "timm:vit_tiny_patch16_224",
                     "--data", f"folder:{bad}", out=tmp_path / "r", run=cli)
    _assert_user_error(proc, "local crops", "local_crops=0")
    assert not (tmp_path / "r").exists()


def test_a_batch_batchnorm_cannot_normalise_is_one_line_exit_2(cli, gray_folder, tmp_path):
    """One image per step on a ResNet at 32 px leaves BatchNorm a 1x1 map: one value per channel, which torch
    refuses in training with a traceback; it is one line naming the batch size (checked at the first step)."""
    result = cli("pretrain", "--task", "denoising", "--data", f"folder:{gray_folder}", "--out", tmp_path / "r",
                 "--image-size", 32, "--batch-size", 1, "--max-steps", 2)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("decoding")]
    assert len(lines) == 1 and "--batch-size 2 or more" in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["cuda:x", "cuda:", "cudaX", "gpu", "cuda:-1"])
def test_a_malformed_device_is_one_line_whether_or_not_a_gpu_is_there(name, monkeypatch):
    from sslkit.engine import resolve_device

    for present in (False, True):
        monkeypatch.setattr("torch.cuda.is_available", lambda p=present: p)
        with pytest.raises(UsageError, match=rf"unknown --device '{name}'; choose from: auto, cpu, cuda, cuda:N"):
            resolve_device(name)


def test_a_gpu_index_the_machine_lacks_is_one_line(monkeypatch):
    from sslkit.engine import resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"--device cuda:7: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:7")
    assert str(resolve_device("cuda:1")) == "cuda:1"


def test_file_names_are_printed_on_one_line_whatever_they_hold(tmp_path, cli):
    """A newline in a file name cannot forge a line of output (an 'error:' line), an escape sequence
    is shown, not sent to the terminal, and a non-UTF-8 name prints under any output encoding."""
    from sslkit.errors import printable

    assert printable("a\nb\x1b[31m\x7f" + b"\xff".decode("utf-8", "surrogateescape") + " é") == "a\\nb\\x1b[31m\\x7f\\xff é"
    data = make_images(tmp_path / "d", n_per_class=3, size=20)
    (data / "a" / "bad\nerror: forged.png").write_bytes(b"not an image")
    (data / "a" / "\x1b[2Jclear.png").write_bytes(b"not an image")
    result = cli("data", "inspect", f"folder:{data}", "--image-size", 16)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert not any(line.startswith("error:") for line in lines) and "\x1b" not in result.stdout
    assert any("bad\\nerror: forged.png" in line for line in lines)
    missing = cli("pretrain", "--task", "simclr", "--data", f"folder:{tmp_path}/mis\nsing", "--out", tmp_path / "r")
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1 and "mis\\nsing" in missing.stderr
