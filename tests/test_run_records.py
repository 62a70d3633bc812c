"""What a run leaves behind repeats it: run.json over resumes, config.toml, export metadata that names
its run, byte-identical safetensors exports, a command line a shell takes back."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import make_images, run_sslkit


TINY = ("--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "16", "--batch-size", "4",
        "--quiet", "--checkpoint-every", "1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("records") / "img", n_per_class=4, size=20)


def _pretrain(cli, monkeypatch, *args) -> None:
    """``sslkit pretrain ARGS`` in-process, as the installed ``sslkit`` would see its command line."""
    argv = ["/somewhere/bin/sslkit", "pretrain", *map(str, args)]
    monkeypatch.setattr("sys.argv", argv)
    result = cli(*argv[1:])
    assert result.exit_code == 0, result.output


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_resume_keeps_the_first_sessions_environment_and_records_its_own(images, tmp_path, cli, monkeypatch):
    """A resume overwrote the first session's environment (command, processes, threads) and dropped the
    note that augmentations were re-seeded: now run.json keeps the first and lists each resume's own."""
    import torch

    from sslkit import checkpoint

    run = tmp_path / "run"
    _pretrain(cli, monkeypatch, "--data", images, "--out", run, "--max-steps", 2, *TINY, "--data-opt",
              "group=^([a-z]+)/")
    first = _info(run)
    load = checkpoint.load

    def written_by_two(path):  # a checkpoint of a two-process run: one RNG state per process
        tensors, data = load(path)
        return tensors, {**data, "rng": data["rng"] * 2}

    monkeypatch.setattr(checkpoint, "load", written_by_two)
    torch.set_num_threads(2)
    _pretrain(cli, monkeypatch, "--resume", run, "--max-steps", 3, "--quiet")
    info = _info(run)
    assert info["environment"] == first["environment"] and info["run_id"] == first["run_id"]
    assert first["environment"]["command"].startswith("sslkit pretrain --data ")
    assert info["optimization"]["processes"] == 1 and info["optimization"]["batch_per_process"] == 4
    (entry,) = info["resumes"]
    assert entry["from_step"] == 2 and entry["total_steps"] == 3 and entry["reseeded"] is True
    assert entry["processes"] == 1 and entry["environment"]["cpu_threads"] == 2
    assert entry["environment"]["command"] == f"sslkit pretrain --resume {run} --max-steps 3 --quiet"
    assert entry["environment"]["torch"] == torch.__version__
    assert "resume" not in info["config"] and "overwrite" not in info["config"]


def test_config_toml_reruns_the_run_bit_for_bit(images, tmp_path, cli, monkeypatch):
    """run.json's config was no config file (--config takes .toml/.yaml) and, once resumed, held
    resume = true; config.toml in the run folder now reruns the run as it stands."""
    run, again, mine = tmp_path / "run", tmp_path / "again", tmp_path / "mine.toml"
    mine.write_text(f'data = "{images}"\nseed = 3\n[augment_options]\nrotate_p = 0.5\n')
    _pretrain(cli, monkeypatch, "--config", mine, "--out", run, "--max-steps", 2, *TINY)
    text = (run / "config.toml").read_text()
    assert not any(line.split(" = ")[0] in ("out", "resume", "overwrite") for line in text.splitlines())
    _pretrain(cli, monkeypatch, "--config", run / "config.toml", "--out", again)
    assert _same_tensors(run / "encoder.safetensors", again / "encoder.safetensors")
    assert _info(again)["config_sha256"] == _info(run)["config_sha256"]
    assert _info(again)["run_id"] != _info(run)["run_id"]
    # a value typed on the command line that the run used (0.5 from the file; channels as the data had): accepted
    _pretrain(cli, monkeypatch, "--resume", run, "--augment-opt", "rotate_p=0.5", "--channels", 3)
    # --overwrite removes sslkit's config.toml with the run; one of the user's stays
    (again / "config.toml").write_text("# mine\n")
    _pretrain(cli, monkeypatch, "--config", run / "config.toml", "--out", again, "--overwrite")
    assert (again / "config.toml").read_text() == "# mine\n"
    _pretrain(cli, monkeypatch, "--config", run / "config.toml", "--out", run, "--overwrite")
    assert (run / "config.toml").read_text() == text
    assert _same_tensors(run / "encoder.safetensors", again / "encoder.safetensors")


def test_exports_name_their_run_step_and_settings(images, tmp_path, cli, monkeypatch):
    """ONNX/safetensors metadata's run_id was a hash of the weights that run.json never named (two runs
    could share it) and a final encoder's export said no step; now it is run.json's, with the step,
    the weights' sha256 and the settings' hash."""
    from sslkit.export import export_metadata
    from sslkit.run import load_run

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        _pretrain(cli, monkeypatch, "--data", images, "--out", run, "--max-steps", 2, *TINY)
    meta = [export_metadata(load_run(run)) for run in runs]
    for run, m in zip(runs, meta):
        info = _info(run)
        assert m["run_id"] == info["run_id"] and m["run_id_from"] == "run.json"
        assert m["step"] == 2 and m["encoder_sha256"] == info["encoder_sha256"]
        assert m["config_sha256"] == info["config_sha256"] and len(m["config_sha256"]) == 64
    assert meta[0]["run_id"] != meta[1]["run_id"]
    step = export_metadata(load_run(runs[0] / "checkpoints" / "step-1"))
    manifest = json.loads((runs[0] / "checkpoints" / "step-00000001" / "manifest.json").read_text())
    assert step["step"] == 1 and step["checkpoint_sha256"] == manifest["files"]["model.safetensors"]["sha256"]
    assert step["run_id"] == meta[0]["run_id"]
    old = tmp_path / "old"  # a run recorded before run.json had a run_id: the weights' hash, said so
    shutil.copytree(runs[0], old)
    (old / "run.json").write_text(json.dumps({k: v for k, v in _info(old).items() if k != "run_id"}))
    legacy = export_metadata(load_run(old), load_run(old).build_encoder())
    assert len(legacy["run_id"]) == 16 and legacy["run_id_from"].startswith("weights sha256")


def test_a_safetensors_export_is_byte_identical(images, tmp_path, cli, monkeypatch):
    """Four exports of one run gave four sha256s (safetensors writes its metadata in hash-map order)."""
    from sslkit.export import export_run

    run = tmp_path / "run"
    _pretrain(cli, monkeypatch, "--data", images, "--out", run, "--max-steps", 1, *TINY)
    digests = set()
    for i in range(3):
        export_run(run, tmp_path / f"in{i}.safetensors", fmt="safetensors", check_data="none")
        digests.add(hashlib.sha256((tmp_path / f"in{i}.safetensors").read_bytes()).hexdigest())
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.safetensors"
        done = run_sslkit("export", run, "--out", out, "--format", "safetensors", "--check-data", "none",
                          env={"PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    assert json.loads(load_meta(tmp_path / "p1.safetensors")["sslkit"])["run_id"] == _info(run)["run_id"]


def load_meta(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return f.metadata()


def test_the_command_is_quoted_as_a_shell_takes_it_back(monkeypatch):
    """environment.command was argv joined by spaces (a regex option broke the shell) and named
    __main__.py under torchrun; torchrun's own settings were not recorded."""
    from sslkit.run_environment import environment

    argv = ["/venv/lib/python3.11/site-packages/sslkit/__main__.py", "pretrain", "--data-opt", "group=^([a-z]+)/",
            "--out", "my runs/a b"]
    monkeypatch.setattr("sys.argv", argv)
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GROUP_WORLD_SIZE", raising=False)
    env = environment()
    assert shlex.split(env["command"]) == ["sslkit", *argv[1:]]
    assert env["launcher"]["name"] == "torchrun" and env["launcher"]["world_size"] == 4
    assert env["launcher"]["local_world_size"] == 2 and env["launcher"]["nnodes"] == 2


def test_run_json_records_the_views_as_applied(images, tmp_path, cli, monkeypatch):
    """The augmentation is in run.json as it ran: the task's recipes, --augment-opt overrides and the
    engine's choices, so a reader need not rebuild it from the code of that commit."""
    run = tmp_path / "byol"
    _pretrain(cli, monkeypatch, "--task", "byol", "--data", images, "--out", run, "--backbone", "timm:resnet10t",
              "--image-size", "16", "--batch-size", "4", "--max-steps", "1", "--quiet", "--augment-opt", "blur_p=0.25")
    views = _info(run)["views"]["."]
    assert views["class"] == "MultiView" and len(views["recipes"]) == 2
    first, second = views["recipes"]
    assert first["size"] == 16 and first["saturation"] == 0.2 and first["scale"] == [0.9, 1.0]  # a short run: planned
    assert (first["solarize_p"], second["solarize_p"]) == (0.0, 0.2)  # BYOL's asymmetric pair
    assert first["blur_p"] == second["blur_p"] == 0.25 and first["colour"] is True


def test_config_toml_works_from_any_folder_and_a_users_edit_survives_a_resume(images, tmp_path, cli, monkeypatch):
    """The data typed relative to where the run started is written absolute (init already was), so the
    rerun reads the same data from any folder with the same config_sha256; an edit to config.toml is
    never replaced by a resume (its sha256 in run.json tells sslkit's own file from an edited one)."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    shutil.copytree(images, start / "img")
    monkeypatch.chdir(start)
    _pretrain(cli, monkeypatch, "--data", "folder:img", "--out", start / "run", "--max-steps", 2, *TINY)
    first = _info(start / "run")
    assert first["config"]["data"] == "folder:img"  # run.json keeps what was typed
    assert f'data = "folder:{start / "img"}"' in (start / "run" / "config.toml").read_text()
    monkeypatch.chdir(elsewhere)
    _pretrain(cli, monkeypatch, "--config", start / "run" / "config.toml", "--out", elsewhere / "again")
    assert _same_tensors(start / "run" / "encoder.safetensors", elsewhere / "again" / "encoder.safetensors")
    assert _info(elsewhere / "again")["config_sha256"] == first["config_sha256"]
    toml = start / "run" / "config.toml"
    edited = toml.read_text().replace("seed = 0", "seed = 5")
    toml.write_text(edited)
    monkeypatch.chdir(start)
    _pretrain(cli, monkeypatch, "--resume", start / "run", "--max-steps", 3)
    assert toml.read_text() == edited
    assert _info(start / "run")["config_toml_sha256"] == first["config_toml_sha256"]
