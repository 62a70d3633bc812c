"""This plugin's CI: sslkit's contract kit on the ``mlflow`` callback, against a local file store."""

from sslkit.testing import check_callback, registered


def test_registered_by_this_package():
    assert registered("callbacks", "sslkit-mlflow") == ["mlflow"]


def test_callback_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    report = check_callback("mlflow", tmp_path=tmp_path)  # a new, a resumed and a failed run
    assert report["events"]["on_step_end"] == 3
