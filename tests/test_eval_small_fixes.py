"""Four small defects of a user-journey audit: the linear probe's C chosen on float noise, the
``--window`` help of ``embed`` / ``eval``, a bare file name in ``--labels`` matching files in
several folders, and byte sizes labelled MB that were MiB."""

from __future__ import annotations

import json
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_images, tiny_run
from sslkit.errors import UsageError
from sslkit.eval import linear
from sslkit.eval.labels import assign_labels
from sslkit.progress import human_bytes


FIVE_SEVENTHS = ((4 / 7 + 6 / 7) / 2, (5 / 7 + 5 / 7) / 2)  # 0.7142857142857142, 0.7142857142857143


# --- 1. the linear probe's C ------------------------------------------------------------------
def _probe_with(monkeypatch, scores: dict[float, float]) -> tuple[float, list[float]]:
    """The chosen C and the Cs tried when the validation score of each C is ``scores[C]`` (0 elsewhere)."""
    tried: list[float] = []

    def score(x, y, tr, va, C, max_iter, seed):
        tried.append(C)
        return scores.get(C, 0.0)

    monkeypatch.setattr(linear, "_val_score", score)
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
    return linear.fit_linear_probe(x, y, 2).C, tried


def test_scores_equal_up_to_float_noise_tie_to_the_stronger_regularisation(monkeypatch):
    low, high = FIVE_SEVENTHS
    assert low < high  # the noise itself: one ulp
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    # inside the grid: 0.001 and 0.01 tie (both 5/7); the report showed ...42 and ...43
    assert _probe_with(monkeypatch, {1e-3: low, 1e-2: high, 1e-1: 0.6, 1.0: 0.5, 10.0: 0.5}) == (1e-3, grid)
    # the upper end "beating" its neighbour by one ulp: no decade beyond, and the stronger C
    assert _probe_with(monkeypatch, {1e-3: 0.5, 1e-2: 0.5, 1e-1: 0.6, 1.0: low, 10.0: high}) == (1.0, grid)
    # the lower end above its neighbour by one ulp: a tie, so no decade below either
    assert _probe_with(monkeypatch, {1e-3: high, 1e-2: low, 1e-1: 0.6, 1.0: 0.5, 10.0: 0.5}) == (1e-3, grid)
    # a real difference still extends the grid
    assert _probe_with(monkeypatch, {1.0: 0.70, 10.0: 0.72, 100.0: 0.74, 1000.0: 0.74}) == (
        100.0, grid + [100.0, 1000.0])


def test_validation_score_is_exact_so_equal_scores_are_equal_floats(monkeypatch):
    """Recalls 4/7, 6/7 and 5/7, 5/7: balanced accuracy 5/7 both times, the same float."""
    true = np.array([0] * 7 + [1] * 7)
    preds = {1.0: np.array([0] * 4 + [1] * 3 + [1] * 6 + [0]), 10.0: np.array([0] * 5 + [1] * 2 + [1] * 5 + [0] * 2)}
    monkeypatch.setattr(linear, "_fit", lambda x, y, C, max_iter, seed: SimpleNamespace(predict=lambda _: preds[C]))
    x, va = np.zeros((14, 1)), np.arange(14)
    got = [linear._val_score(x, true, va, va, C, 10, 0) for C in (1.0, 10.0)]
    assert got == [float(Fraction(5, 7))] * 2
    from sklearn.metrics import balanced_accuracy_score

    for C, score in zip((1.0, 10.0), got):  # scikit-learn's value, up to its rounding
        assert score == pytest.approx(balanced_accuracy_score(true, preds[C]), abs=1e-15)


# --- 2. --window's default in embed and eval ----------------------------------------------------
def _help(*args: str) -> str:
    from sslkit.cli import main

    result = CliRunner().invoke(main, [*args, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("command", [("embed",), ("eval", "linear"), ("eval", "tsne")])
def test_embed_and_eval_say_an_unset_window_is_the_runs(command):
    text = _help(*command)
    assert "(default: the run's, else auto)" in text and "(default: auto)" not in text
    assert "(default: the run's, else the series' own spacing)" in text
    assert _help(*command) == text  # asked twice: rewritten once
    assert "(default: auto)" in _help("pretrain")  # where no run is read, the source's default is the default


def test_an_unset_window_is_the_runs_for_data_of_its_source():
    """What the help says: the run's window where the data is the run's source kind, else the source's."""
    from sslkit.embed import source_options_for
    from sslkit.spec import InputSpec

    model = SimpleNamespace(spec=InputSpec(1, 32, (0.5,), (0.25,), "dicom", {}), source_options={"window": "400,40"},
                            fixed_options={})
    assert source_options_for(model, "dicom:/scans", {}) == {"window": "400,40"}
    assert source_options_for(model, "dicom:/scans", {"window": "lung"}) == {"window": "lung"}
    assert source_options_for(model, "nifti:/scans", {}) == {}  # another source: its own default


# --- 3. a bare file name in --labels ------------------------------------------------------------
def test_a_bare_name_of_files_in_several_folders_is_refused():
    ids = ["/d/airplane/0000.jpg", "/d/cat/0000.jpg", "/d/cat/0001.jpg"]
    with pytest.raises(UsageError) as err:
        assign_labels(ids, [None] * 3, {"0000.jpg": "A"})
    assert str(err.value) == ("--labels: row '0000.jpg' matches 2 files in different folders; give each file its "
                              "own row, with its path relative to the data folder (FOLDER/NAME)")
    # relative paths name each file; a bare name of one file still works, and so does a bare name
    # left to the files no longer row names (the longest match wins)
    assert assign_labels(ids, [None] * 3, {"airplane/0000.jpg": "A", "cat/0000.jpg": "B", "0001.jpg": "C"}) == [
        "A", "B", "C"]
    assert assign_labels(ids, [None] * 3, {"cat/0000.jpg": "B", "0000.jpg": "A"}) == ["A", "B", None]
    # a multi-frame file's frames are one file
    assert assign_labels(["/d/x/scan.dcm#0", "/d/x/scan.dcm#1"], [None] * 2, {"scan.dcm": "A"}) == ["A", "A"]


def test_a_bare_slice_name_or_series_folder_of_several_volumes_is_refused():
    """DICOM exports repeat IM0001 in every series; a volume is matched through its slices and folder."""
    ids = ["series:k1", "series:k2"]
    paths = [("/d/p1/se/IM0001", "/d/p1/se/IM0002", "/d/p1/se"), ("/d/p2/se/IM0001", "/d/p2/se")]
    for row in ("IM0001", "se"):
        with pytest.raises(UsageError, match=f"row '{row}' matches 2 files in different folders"):
            assign_labels(ids, [None] * 2, {row: "A"}, paths)
    assert assign_labels(ids, [None] * 2, {"p1/se": "A", "p2/se/IM0001": "B"}, paths) == ["A", "B"]


def test_eval_refuses_a_bare_name_in_one_line_exit_2(tmp_path, cli):
    train = make_images(tmp_path / "train", n_per_class=4, size=32, seed=0)
    test = make_images(tmp_path / "test", n_per_class=3, size=32, seed=1)
    run = tiny_run(str(train), tmp_path / "run")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n0.png,a\n")
    args = ["eval", "knn", run, "--train", train, "--test", test, "--labels", labels, "--k", "1", "--no-baseline",
            "--json", "--quiet"]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: --labels: row '0.png' matches 2 files in different folders; give each file its own row, with its "
        "path relative to the data folder (FOLDER/NAME)")
    assert not (run / "eval").exists() or not list((run / "eval").iterdir())  # no report
    # the same rows by relative path: one row names one file of --train and one of --test, each matched alone
    labels.write_text("path,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in "ab" for i in range(4)))
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["class_counts"] == {"train": {"a": 4, "b": 4}, "test": {"a": 3, "b": 3}}, report["class_counts"]


# --- 4. byte sizes -----------------------------------------------------------------------------
def test_human_bytes_names_binary_units():
    assert [human_bytes(n) for n in (512, 1024, 16.46e6, 5 * 2**30, 3 * 2**40)] == [
        "512 B", "1.0 KiB", "15.7 MiB", "5.0 GiB", "3.0 TiB"]


def test_knn_falls_back_to_the_cpu_when_a_gpus_memory_cannot_hold_the_bank(monkeypatch, capsys):
    """A GPU out of memory for the training embeddings: the same votes, on the CPU, with one note."""
    import torch

    from sslkit.eval import knn

    real, devices = knn.scored_votes, []

    def scored(*args):
        devices.append(str(args[-1]))
        if str(args[-1]) != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args)

    monkeypatch.setattr(knn, "scored_votes", scored)
    rng = np.random.default_rng(0)
    train, test, labels = rng.normal(size=(50, 8)), rng.normal(size=(9, 8)), rng.integers(0, 3, size=50)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = knn.knn_votes(train, labels, test, 3, (5,), device="cuda")
    assert devices == ["cuda", "cpu"]
    assert np.array_equal(got[5], real(train, labels, test, 3, (5,), knn.TEMPERATURE, None, "cpu")[5])
    assert capsys.readouterr().err == "note: the kNN's 50 training embeddings do not fit in cuda's memory: " \
                                      "scored on the CPU\n"
