"""Run callbacks (``register_callbacks``): a plugin installed from a folder receives every
event of a run in order, a raising callback is reported once and the run goes on, names
are checked, reserved metric names are refused, and every pretrain flag passes through
torchrun's parser unchanged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sslkit import plugins
from tests.conftest import install_plugin, make_images
from tests.test_engine import TINY_VIT, install_probe

RECORDER = '''
"""Test callbacks: ``record`` appends every event to $SSLKIT_TEST_EVENTS (JSON lines);
``explode`` raises at step 2; ``lr_task`` is a task that returns a reserved metric."""
import json
import os

import torch

from sslkit.api import Callback, hookimpl
from sslkit_probe import Probe


class Record(Callback):
    def _write(self, *event):
        with open(os.environ["SSLKIT_TEST_EVENTS"], "a") as f:
            f.write(json.dumps(event, default=str) + "\\n")

    def on_run_start(self, run):
        self._write("on_run_start", str(run.out), run.start_step, run.total_steps, run.resumed,
                    run.config["task"])

    def on_step_end(self, step, metrics):
        self._write("on_step_end", step, sorted(metrics), metrics["loss"])

    def on_checkpoint(self, path):
        self._write("on_checkpoint", path.name, path.is_dir())

    def on_run_end(self, summary):
        self._write("on_run_end", summary["status"], summary["steps"], str(summary["encoder"]))


class Explode(Callback):
    def __init__(self):
        self.calls = 0

    def on_step_end(self, step, metrics):
        self.calls += 1
        if step == 2:
            raise RuntimeError("tracker unreachable")
        with open(os.environ["SSLKIT_TEST_EVENTS"], "a") as f:
            f.write(json.dumps(["explode", step]) + "\\n")


class Broken(Callback):
    def __init__(self):
        raise ImportError("No module named 'mlflow'")


class LrTask(Probe):
    def forward(self, views):
        out = super().forward(views)
        return {**out, "lr": torch.zeros(())}


@hookimpl
def register_callbacks(register):
    register("record", Record)
    register("explode", Explode)
    register("broken", Broken)


@hookimpl
def register_tasks(register):
    register("lr_task", LrTask)
'''


def install_recorder(root: Path) -> Path:
    """The probe task plus the recorder plugin, as installed distributions on ``root``."""
    install_probe(root)
    return install_plugin(root, "sslkit_recorder", "recorder", RECORDER)


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> Path:
    root = install_recorder(tmp_path / "plugins")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("SSLKIT_TEST_EVENTS", str(tmp_path / "events.jsonl"))
    plugins.reset()
    return tmp_path / "events.jsonl"


def config(images: Path, out: Path, **kw):
    from sslkit.run import RunConfig

    base = dict(task="probe", data=f"folder:{images}", out=str(out), image_size=16, epochs=3, max_steps=5,
                batch_size=8, backbone_options={**TINY_VIT, "patch_size": 8}, progress=False, deterministic=True,
                warmup_epochs=0.5, cache_dir="")
    base.update(kw)
    return RunConfig(**base)


def events(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_callback_plugin_receives_every_event_in_order(recorder, tmp_path):
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=8, size=20)  # 16 images, batch 8: 2 steps per epoch
    out = tmp_path / "run"
    summary = pretrain(config(images, out, callbacks="csv,record"))
    assert summary["steps"] == 5
    got = events(recorder)
    kinds = [(e[0], e[1]) for e in got]
    assert kinds == [("on_run_start", str(out)),
                     ("on_step_end", 1), ("on_step_end", 2), ("on_checkpoint", "step-00000002"),
                     ("on_step_end", 3), ("on_step_end", 4), ("on_checkpoint", "step-00000004"),
                     ("on_step_end", 5), ("on_checkpoint", "step-00000005"),
                     ("on_run_end", "finished")]
    assert got[0][2:] == [0, 5, False, "probe"]
    assert all(e[2] for e in got if e[0] == "on_checkpoint")  # the folder exists when the event comes
    assert got[1][2] == ["epoch", "img_per_s", "loss", "lr", "z_norm"]
    with open(out / "metrics.csv", newline="") as f:  # the same losses the csv callback wrote
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == pytest.approx([e[3] for e in got if e[0] == "on_step_end"])
    assert got[-1][2] == 5 and got[-1][3] == str(out / "encoder.safetensors")


def test_a_raising_callback_is_reported_once_and_the_run_goes_on(recorder, tmp_path, capsys):
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    summary = pretrain(config(images, out, callbacks="explode,csv"))
    assert summary["steps"] == 5 and not summary["interrupted"]
    err = [line for line in capsys.readouterr().err.splitlines() if "explode" in line]
    assert len(err) == 1 and "RuntimeError" in err[0] and "tracker unreachable" in err[0], err
    assert "'explode' (plugin 'recorder')" in err[0] and "disabled" in err[0]
    assert events(recorder) == [["explode", 1]]  # never called again after raising
    assert len((out / "metrics.csv").read_text().splitlines()) == 6  # the csv callback wrote every step
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_unknown_callback_and_reserved_metric_are_one_line_errors(tmp_path, recorder, cli):
    """In-process (the recorder plugin on sys.path): ~10 s of subprocess imports less."""
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    common = ["--data", f"folder:{images}", "--image-size", "16", "--batch-size", "8", "--max-steps", "2",
              "--quiet", "--no-cache", *[a for k, v in {**TINY_VIT, "patch_size": 8}.items()
                                          for a in ("--backbone-opt", f"{k}={v}")]]
    bad = cli("pretrain", "--task", "probe", "--out", tmp_path / "a", "--callbacks", "csv,tensorbord", *common)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "unknown callback 'tensorbord'" in bad.stderr and "did you mean 'tensorboard'" in bad.stderr
    assert not (tmp_path / "a").exists()  # refused before anything was written

    broken = cli("pretrain", "--task", "probe", "--out", tmp_path / "c", "--callbacks", "csv,broken", *common)
    assert broken.exit_code == 2 and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    assert "callback 'broken' (plugin 'recorder') cannot start: ImportError: No module named 'mlflow'" in broken.stderr
    assert not (tmp_path / "c").exists()  # was a traceback after decoding, with a run folder left 'running'

    lr = cli("pretrain", "--task", "lr_task", "--out", tmp_path / "b", *common)
    assert lr.exit_code == 2 and len(lr.stderr.strip().splitlines()) == 1, lr.stderr
    assert "task 'lr_task' (plugin 'recorder')" in lr.stderr and "'lr'" in lr.stderr
    assert not (tmp_path / "b" / "encoder.safetensors").exists()


def test_every_pretrain_flag_passes_through_torchrun_unchanged():
    """torchrun's parser refuses an argument that abbreviates one of its own options
    (``--log`` for ``--log-dir``) even after ``-m sslkit``: no sslkit flag may."""
    from torch.distributed.run import get_args_parser

    from sslkit.cli import pretrain

    flags = sorted({o for p in pretrain.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")})
    assert "--callbacks" in flags and "--resume" in flags and len(flags) > 30
    parser = get_args_parser()
    for flag in flags:
        argv = ["pretrain", flag, "1"]
        args = parser.parse_args(["--nnodes", "1:2", "--nproc-per-node", "1", "-m", "sslkit", *argv])
        assert args.module and args.training_script == "sslkit"
        assert args.training_script_args == argv, flag


def test_mlflow_plugin_logs_params_metrics_and_the_encoder_to_a_file_store(tmp_path, monkeypatch):
    """examples/sslkit-mlflow, pip-installed into a folder, against a local file store (no server)."""
    import subprocess
    import sys

    pytest.importorskip("mlflow")
    from tests.conftest import REPO

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(REPO / "examples" / "sslkit-mlflow")], check=True, capture_output=True)
    probe = install_probe(tmp_path / "probe")
    for path in (site, probe):
        monkeypatch.syspath_prepend(str(path))
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sslkit-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    plugins.reset()
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    pretrain(config(images, out, callbacks="csv,mlflow"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("sslkit-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "probe " + json.loads((out / "run.json").read_text())["backbone"]
    assert run.data.params["task"] == "probe" and run.data.params["batch_size"] == "8"
    assert "data" not in run.data.params and "out" not in run.data.params  # paths stay local
    history = client.get_metric_history(run.info.run_id, "loss")
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([float(r["loss"]) for r in rows])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert artefacts == {"encoder/encoder.safetensors", "encoder/run.json"}
    local = client.download_artifacts(run.info.run_id, "encoder/encoder.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (out / "encoder.safetensors").read_bytes()
    shared = Path(client.download_artifacts(run.info.run_id, "encoder/run.json", str(tmp_path / "dl"))).read_text()
    assert str(tmp_path) not in shared and "command" not in json.loads(shared)["environment"]  # no path reaches MLflow
    assert json.loads(shared)["config"]["batch_size"] == 8

    from sslkit.testing import check_callback  # the kit a plugin author runs: a new, a resumed and a failed run

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sslkit-kit")
    check_callback("mlflow", tmp_path=tmp_path / "kit")
    kit = client.search_runs([client.get_experiment_by_name("sslkit-kit").experiment_id])
    assert sorted((r.info.status, r.data.tags["sslkit.resumed_from_step"]) for r in kit) == [
        ("FAILED", "0"), ("FINISHED", "0"), ("FINISHED", "2")]

    import os  # the plugin's own CI, as its author runs it: pytest examples/sslkit-mlflow, sslkit's kit inside

    example = REPO / "examples" / "sslkit-mlflow"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, cwd=example,
                          timeout=600)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_tensorboard_callback_writes_every_scalar(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.syspath_prepend(str(install_probe(tmp_path / "probe")))
    plugins.reset()
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    pretrain(config(images, out, callbacks="csv,tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/img_per_s", "train/z_norm"}
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)


def test_tensorboard_on_resume_drops_the_steps_a_killed_run_logged_past_its_checkpoint(tmp_path):
    """A run killed at step 4 after a checkpoint at 2, resumed: steps 3-4 were in the curve twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslkit.engine.events import RunInfo
    from sslkit_plugins.callbacks.tensorboard import TensorBoard

    for start, steps in ((0, (1, 2, 3, 4)), (2, (3, 4, 5))):
        tb = TensorBoard()
        tb.on_run_start(RunInfo(tmp_path, {}, start, 5, 0, 1))
        for step in steps:
            tb.on_step_end(step, {"loss": float(step + 10 * start)})
        tb.writer.close()  # killed: no on_run_end
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1), (2, 2), (3, 23), (4, 24), (5, 25)]


def test_list_callbacks_names_the_built_ins(cli):
    result = cli("list", "callbacks", "--json")
    assert result.exit_code == 0, result.output
    assert {"csv", "tensorboard"} <= set(json.loads(result.output))


def test_sslkit_plugins_says_what_a_callback_plugin_registers(cli):
    result = cli("plugins")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert lines["csv"].endswith("(built-in)  callbacks: csv"), lines["csv"]
    assert lines["tensorboard"].endswith("callbacks: tensorboard") and lines["simclr"].endswith("tasks: simclr")


def test_mlflow_shares_no_command_line_of_any_session(monkeypatch):
    """run.json records each resume's own command line too: none of them reaches MLflow."""
    from tests.conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "examples" / "sslkit-mlflow"))
    from sslkit_mlflow import shareable

    info = {"config": {"data": "folder:/scans/DOE_JOHN", "batch_size": 8},
            "environment": {"command": "sslkit pretrain --data folder:/scans/DOE_JOHN", "torch": "2"},
            "resumes": [{"from_step": 3, "environment": {"command": "sslkit pretrain --resume /runs/DOE_JOHN"}}]}
    shared = json.dumps(shareable(info))
    assert "DOE_JOHN" not in shared and json.loads(shared)["resumes"][0]["from_step"] == 3
