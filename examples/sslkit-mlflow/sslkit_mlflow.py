"""sslkit callback ``mlflow``: a pretraining run as an MLflow run.

    pip install ./examples/sslkit-mlflow
    MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:/shared/mlruns sslkit pretrain ... --callbacks csv,mlflow

* ``on_run_start``: an MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default
  ``sslkit``) at ``$MLFLOW_TRACKING_URI`` (default ``file:RUN_DIR/mlruns``, no server;
  MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for a ``file:`` store you name; an
  ``http(s)`` server that takes no connection within ``$SSLKIT_MLFLOW_CONNECT_TIMEOUT``
  seconds, default 10, disables the callback in one line, not after MLflow's minutes of retries),
  named ``$MLFLOW_RUN_NAME``, else ``<task> <backbone>``; every setting of the run as a
  param, task and backbone as tags. Paths are never sent (they may carry patient names):
  not the ``data``, ``out``, cache, init and resume paths, not the run folder's name.
* ``on_step_end``: every metric of the step (loss, lr, img_per_s, the task's scalars),
  with its step number.
* ``on_run_end``: ``encoder.safetensors`` and ``run.json`` as artefacts under
  ``encoder/`` (``run.json`` without those paths and without the command line); the MLflow
  run ends FINISHED, KILLED (interrupted) or FAILED.

Rank 0 only (sslkit calls callbacks there). Each session of a resumed run is its own
MLflow run, tagged with the step it resumed from.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from sslkit.api import Callback, RunInfo, hookimpl

sslkit_api = ">=1,<2"

PRIVATE = ("data", "out", "cache_dir", "init", "resume")  # paths: not sent to a tracking server
STATUS = {"finished": "FINISHED", "interrupted": "KILLED"}


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


def shareable(info: dict[str, Any]) -> dict[str, Any]:
    """run.json without what may name a patient: the paths in ``config``, the init file's path and
    the command line (which repeats them)."""
    out = json.loads(json.dumps(info, default=str))
    out["config"] = {k: v for k, v in out.get("config", {}).items() if k not in PRIVATE}
    out.get("environment", {}).pop("command", None)
    for resume in out.get("resumes") or []:  # each resume records its own command line too
        if isinstance(resume, dict) and isinstance(resume.get("environment"), dict):
            resume["environment"].pop("command", None)
    if isinstance(out.get("init"), dict):
        out["init"].pop("source", None)
    return out


def check_reachable(uri: str) -> None:
    """An ``http(s)`` tracking server must take a TCP connection within the timeout; else a
    RuntimeError naming its host and port only (a URI may carry credentials or a path)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    timeout = float(os.environ.get("SSLKIT_MLFLOW_CONNECT_TIMEOUT", "10"))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        raise RuntimeError(f"the MLflow server {host}:{port} cannot be reached ({why} within {timeout:g} s); "
                           "check MLFLOW_TRACKING_URI") from None


class MlflowCallback(Callback):
    """Logs params at the start, metrics every step, the encoder at the end."""

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client_cls = MlflowClient
        self.client = None
        self.run_id: str | None = None

    def on_run_start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store behind an opt-in; the default here is one
            uri = (run.out / "mlruns").absolute().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        check_reachable(uri)
        self.client = self._client_cls(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sslkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"sslkit.task": str(run.info.get("task")), "sslkit.backbone": str(run.info.get("backbone")),
                "sslkit.resumed_from_step": str(run.start_step)}
        run_name = os.environ.get("MLFLOW_RUN_NAME") or f"{run.info.get('task')} {run.info.get('backbone')}"
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params: dict[str, str] = {}
        _flat("", {k: v for k, v in run.config.items() if k not in PRIVATE}, params)
        params["total_steps"] = str(run.total_steps)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in sorted(params.items())])

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        encoder = summary.get("encoder")
        if encoder is not None:
            self.client.log_artifact(self.run_id, str(encoder), "encoder")
            run_json = encoder.parent / "run.json"
            if run_json.exists():
                with tempfile.TemporaryDirectory() as tmp:
                    copy = Path(tmp) / "run.json"
                    copy.write_text(json.dumps(shareable(json.loads(run_json.read_text())), indent=2))
                    self.client.log_artifact(self.run_id, str(copy), "encoder")
        self.client.set_terminated(self.run_id, STATUS.get(summary.get("status"), "FAILED"))


@hookimpl
def register_callbacks(register):
    register("mlflow", MlflowCallback)
