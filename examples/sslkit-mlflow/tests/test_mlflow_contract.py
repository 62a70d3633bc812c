"""This plugin's CI: sslkit's contract kit on the ``mlflow`` callback, against a local file store."""

from sslkit.testing import check_callback, registered


def test_registered_by_this_package():
    assert registered("callbacks", "sslkit-mlflow") == ["mlflow"]


def test_callback_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    report = check_callback("mlflow", tmp_path=tmp_path)  # a new, a resumed and a failed run
    assert report["events"]["on_step_end"] == 3


def test_an_unreachable_server_is_one_line_not_minutes_of_retries(tmp_path, monkeypatch):
    import socket
    import time

    import pytest
    from sslkit_mlflow import MlflowCallback

    from sslkit.api import RunInfo

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}/scans/PatientX")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        MlflowCallback().on_run_start(RunInfo(tmp_path, {"task": "t", "backbone": "b"}, 0, 5, 0, 1))
    assert time.monotonic() - start < 60  # MLflow's own retries took about 4 minutes here
    assert str(err.value).startswith(f"the MLflow server 127.0.0.1:{port} cannot be reached (")
    assert "secret" not in str(err.value) and "PatientX" not in str(err.value)
