"""``--init`` across ``--resume`` and directories, and a Hub that cannot be reached.

A resume from a checkpoint never reads the init (the checkpoint holds every weight) and keeps
run.json's ``init`` record; one before the first checkpoint loads it and refuses changed
weights. A local ``--init`` is recorded as an absolute path. ``--allow-download`` resolves a Hub
id once per process and fails in one line when the Hub cannot be reached. Every weights file
is built here; the "Hub" is a closed local port or a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from safetensors.torch import save_file

from sslkit.init.resume import CHECKPOINT_LINE
from sslkit.registry import create_backbone
from tests.conftest import make_images
from tests.test_init import _random_like


BACKBONE = "timm:resnet10t"


def _weights(path: Path, seed: int) -> Path:
    save_file(_random_like(create_backbone(BACKBONE, in_chans=3, image_size=32).model, seed), str(path))
    return path


def _args(data: Path, *extra) -> list:
    return ["pretrain", "--task", "simclr", "--data", data, "--backbone", BACKBONE, "--image-size", 32,
            "--batch-size", 8, "--epochs", 5, "--device", "cpu", "--quiet", *extra]


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture
def first_run(tmp_path, cli, monkeypatch):
    """A one-step run started in ``tmp_path/work`` with a relative ``--init``; (work dir, run, data)."""
    work = tmp_path / "work"
    work.mkdir()
    data = make_images(tmp_path / "imgs", n_per_class=4, size=32, channels=1)
    _weights(work / "init.safetensors", seed=1)
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    result = cli(*_args(data, "--out", "run", "--init", "init.safetensors", "--max-steps", 1))
    assert result.exit_code == 0, result.output
    return work, work / "run", data


def test_resume_from_a_checkpoint_neither_reads_nor_rerecords_the_init(first_run, tmp_path, cli, monkeypatch):
    work, run, _ = first_run
    before = _info(run)
    assert before["config"]["init"] == str(work / "init.safetensors")  # recorded absolute
    assert before["init"]["source"] == "init.safetensors"  # the record names the file, never a folder
    _weights(work / "init.safetensors", seed=2)  # other weights at the same path
    result = cli("pretrain", "--resume", "run", "--max-steps", 2, "--init", "./init.safetensors")  # same file
    assert result.exit_code == 0, result.output
    assert CHECKPOINT_LINE in result.stderr
    assert "tensors loaded" not in result.stderr and "task parts" not in result.stderr, result.stderr
    after = _info(run)
    assert after["init"] == before["init"] and after["config"]["init"] == before["config"]["init"]
    assert after["summary"]["steps"] == 2
    # the weights gone, and resumed from another directory: nothing to read, nothing fails
    (work / "init.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("pretrain", "--resume", run, "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert _info(run)["init"] == before["init"] and _info(run)["summary"]["steps"] == 3
    # another --init is still another run
    _weights(elsewhere / "init.safetensors", seed=3)
    result = cli("pretrain", "--resume", run, "--max-steps", 4, "--init", "init.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "init was" in lines[0], result.output


def test_resume_before_the_first_checkpoint_loads_the_init_and_checks_its_sha256(first_run, cli):
    work, run, _ = first_run
    recorded = _info(run)["init"]
    shutil.rmtree(run / "checkpoints")  # as a run that failed before its first checkpoint left it
    info = _info(run)
    info.pop("summary")
    (run / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    original = (work / "init.safetensors").read_bytes()
    _weights(work / "init.safetensors", seed=2)
    result = cli("pretrain", "--resume", "run", "--max-steps", 1)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--init init.safetensors changed since the run started" in lines[0]
    assert recorded["sha256"][:12] in lines[0]
    (work / "init.safetensors").write_bytes(original)
    result = cli("pretrain", "--resume", "run", "--max-steps", 1)
    assert result.exit_code == 0, result.output
    assert "init: init.safetensors (sha256" in result.stderr and CHECKPOINT_LINE not in result.stderr
    assert _info(run)["init"]["sha256"] == recorded["sha256"]


def test_eval_finds_the_init_of_a_relative_path_from_another_directory(first_run, tmp_path, cli, monkeypatch):
    work, run, data = first_run
    monkeypatch.chdir(tmp_path)
    result = cli("eval", "knn", run, "--train", data, "--test", data, "--allow-overlap", "--device", "cpu",
                 "--k", 3)
    assert result.exit_code == 0, result.output
    assert "no 'init' row" not in result.stderr, result.stderr
    assert any(line.split()[1:2] == ["init"] for line in result.stdout.splitlines()), result.stdout
    (work / "init.safetensors").unlink()  # gone: no init row, said once for --train and --test together
    result = cli("eval", "knn", run, "--train", data, "--test", data, "--allow-overlap", "--device", "cpu",
                 "--k", 3)
    assert result.exit_code == 0 and result.stderr.count("no 'init' row") == 1, result.stderr


# --- the Hub ----------------------------------------------------------------------------------------
def _point_the_hub_at(monkeypatch, endpoint: str, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    try:  # the client's best-effort telemetry would ask the real Hub: nothing leaves this machine
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_fetch_registry", lambda: None)
    except ImportError:
        pass


def _count_reach_checks(monkeypatch) -> list[str]:
    from sslkit.init import hub

    calls: list[str] = []
    real = hub.check_reachable

    def counted(what: str) -> None:
        calls.append(what)
        real(what)

    monkeypatch.setattr(hub, "check_reachable", counted)
    return calls


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["acme/not-there", "timm:resnet10t.c3_in1k"])
def test_a_hub_that_cannot_be_reached_is_one_line_and_one_try(tmp_path, cli, monkeypatch, init):
    _point_the_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hub")  # a closed port: no network used
    calls = _count_reach_checks(monkeypatch)
    data = make_images(tmp_path / "imgs", n_per_class=2, size=32, channels=1)
    result = cli(*_args(data, "--out", tmp_path / "run", "--init", init, "--allow-download", "--max-steps", 1))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output  # no retry warnings
    assert lines[0].startswith(f"error: --init {init}: cannot reach the Hugging Face Hub (http://127.0.0.1:9"), lines
    assert calls == [init]  # resolved once, though the channel count is unknown (two probes)
    assert not (tmp_path / "run").exists()


def _serve_hub(files: dict[tuple[str, str], bytes]):
    """A local stand-in for the Hub's ``/{repo}/resolve/{rev}/{file}``; returns the server and its requests."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self) -> bytes | None:
            seen.append((self.command, self.path))
            parts = self.path.split("?")[0].split("/")
            data = files.get(("/".join(parts[1:3]), "/".join(parts[5:]))) if parts[3:4] == ["resolve"] else b""
            self.send_response(404 if data is None else 200)
            if data:
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            elif data is None:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            return data

        def do_HEAD(self):
            self._answer()

        def do_GET(self):
            data = self._answer()
            if data:
                self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.timeout(300)
def test_allow_download_fetches_once_per_process(tmp_path, cli, monkeypatch):
    weights = _weights(tmp_path / "w.safetensors", seed=4).read_bytes()
    server, seen = _serve_hub({("acme/tiny-r10", "model.safetensors"): weights})
    try:
        _point_the_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hub")
        monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
        data = make_images(tmp_path / "imgs", n_per_class=4, size=32, channels=1)
        result = cli(*_args(data, "--out", tmp_path / "run", "--init", "acme/tiny-r10", "--allow-download",
                            "--max-steps", 1))
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    fetched = [p for m, p in seen if m == "GET" and p.endswith("/model.safetensors")]
    assert fetched == ["/acme/tiny-r10/resolve/main/model.safetensors"], seen
    rec = _info(tmp_path / "run")["init"]
    assert (rec["source"], rec["kind"], rec["sha256"]) == ("acme/tiny-r10", "hub", hashlib.sha256(weights).hexdigest())
    assert _info(tmp_path / "run")["config"]["init"] == "acme/tiny-r10"  # a Hub id is recorded as given


@pytest.mark.timeout(120)
def test_a_hub_that_answers_its_address_but_stalls_on_files_is_one_line_in_seconds(tmp_path, cli, monkeypatch):
    """The audit's stalled proxy: ``HEAD /`` answered, file requests never; huggingface_hub's retries
    (60 s per file name, four names) took about 25 minutes."""
    import time

    stop = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            if self.path != "/":
                stop.wait(60)  # a file: no answer
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _point_the_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hub")
        data = make_images(tmp_path / "imgs", n_per_class=2, size=32, channels=1)
        start = time.monotonic()
        result = cli(*_args(data, "--out", tmp_path / "run", "--init", "acme/r18", "--allow-download",
                            "--max-steps", 1))
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        server.shutdown()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: --init acme/r18: cannot download acme/r18 (") and "did not answer" in lines[0]
    assert elapsed < 40 and not (tmp_path / "run").exists()


# --- small refusals -----------------------------------------------------------------------------------
def test_init_flags_without_weights_are_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_images(tmp_path / "imgs", n_per_class=2, size=32, channels=1)
    for extra, message in [(["--allow-download"], "--allow-download lets --init fetch Hub weights; give --init too"),
                           (["--init", "typo-run/"], "--init typo-run/: no local file or folder of that name, and "
                                                     "not a Hub id ORG/NAME ("),
                           (["--init", "hf-hub:"], "--init 'hf-hub:' names no Hub repository"),
                           (["--init", "runs/typo"], "--init runs/typo: no local file or folder of that name, and "
                                                     "runs/typo is not in the local Hugging Face cache"),
                           (["--init", "timm:"], "--init timm: names no model"),
                           (["--init", "timm:.a1_in1k"], "--init timm: names no model")]:
        result = cli(*_args(data, "--out", tmp_path / "run", "--max-steps", 1, *extra))
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_the_missing_count_and_the_total_count_the_same_tensors(tmp_path):
    from sslkit.errors import UsageError
    from sslkit.init import load_init

    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    own = dst.model.state_dict()
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    save_file({k: own[k].clone() for k in counted[:5]}, str(tmp_path / "part.safetensors"))
    with pytest.raises(UsageError) as err:
        load_init(str(tmp_path / "part.safetensors"), dst)
    assert f"{len(counted) - 5} of its {len(counted)} tensors are not in the weights" in str(err.value)
    assert os.path.basename(str(tmp_path)) not in str(err.value)
