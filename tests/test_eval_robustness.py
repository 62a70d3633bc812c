"""eval and embed on awkward inputs: a tiny kNN temperature, non-finite options and embeddings,
undecodable files beside an overlap, label fractions that would share a name, a wrong --out suffix."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sslkit.errors import UsageError
from sslkit.eval.curve import fraction_name, parse_fractions
from sslkit.eval.knn import knn_votes
from sslkit.output_file import file_sha256
from tests.conftest import make_images, tiny_run
from tests.test_hardening_data import _one_line_error


N_PER_CLASS = 6  # decodable images per class folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 1-step run, a copy of it whose weights are all NaN, a folder with 2 undecodable files."""
    root = tmp_path_factory.mktemp("eval-robust")
    data = make_images(root / "data", n_per_class=N_PER_CLASS, size=24, channels=1)
    other = make_images(root / "other", n_per_class=4, size=24, channels=1, seed=3)
    mixed = make_images(root / "mixed", n_per_class=N_PER_CLASS, size=24, channels=1, seed=5)
    (mixed / "a" / "broken.png").write_bytes(b"not a png at all")
    (mixed / "b" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run = tiny_run(f"folder:{data}", root / "run", 16)
    nan_run = root / "nan-run"
    shutil.copytree(run, nan_run)
    weights = nan_run / "encoder.safetensors"
    with safe_open(str(weights), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
              str(weights), metadata=header)
    info = json.loads((nan_run / "run.json").read_text())  # as a run that wrote NaN weights records them
    info["encoder_sha256"] = file_sha256([weights])
    (nan_run / "run.json").write_text(json.dumps(info))
    return {"root": root, "data": data, "other": other, "mixed": mixed, "run": run, "nan_run": nan_run}


def _reports(run: Path) -> set[Path]:
    return set((run / "eval").glob("*"))


def test_knn_votes_at_a_tiny_temperature_equal_a_float64_reference():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    test = rng.standard_normal((7, 6)).astype(np.float32)
    got = knn_votes(train, y, test, 3, ks=[5, 40], temperature=0.01)
    # the definition, directly: exp(cos / T) per neighbour (exp(100) fits float64), summed per class
    tn = train.astype(np.float64) / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
    qn = test.astype(np.float64) / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
    sims = qn @ tn.T
    for k in (5, 40):
        ref = np.zeros((len(test), 3))
        for i, row in enumerate(sims):
            nearest = np.argsort(-row)[:k]
            np.add.at(ref[i], y[nearest], np.exp(row[nearest] / 0.01))
        ref /= ref.sum(1, keepdims=True)
        assert np.isfinite(got[k]).all()
        np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-12)  # float32 cosines, / 0.01


@pytest.mark.parametrize("args, message", [
    (["knn", "--temperature", "nan"], "--temperature expects a positive finite number"),
    (["knn", "--temperature", "inf"], "--temperature expects a positive finite number"),
    (["knn", "--temperature", "0"], "--temperature expects a positive finite number"),
    (["linear", "--C", "0.1,nan"], "--C expects positive finite numbers"),
    (["linear", "--C", "inf"], "--C expects positive finite numbers"),
    (["linear", "--finetune", "--finetune-lr", "nan"], "'nan' is not a finite number"),  # a torch traceback
    (["linear", "--finetune", "--finetune-lr", "inf"], "'inf' is not a finite number"),  # chance, silently
    (["linear", "--val-fraction", "nan"], "'nan' is not a finite number"),
    (["knn", "--seed", "-1"], "-1 is not in the range 0<=x<=4294967295"),  # numpy's traceback
    (["linear", "--finetune-lr", "1e-4"], "--finetune-lr set the fine-tune, which runs with --finetune only"),
    (["curve", "--data", "{data}", "--split", "group:2", "--fractions", "0.5000001,0.5000002"],
     "the same to 6 significant digits"),
])
def test_non_finite_and_indistinguishable_options_are_one_line_errors(runs, cli, args, message):
    kind, *rest = args
    sides = [] if "--data" in rest else ["--train", runs["data"], "--test", runs["other"]]
    before = _reports(runs["run"])
    result = cli("eval", kind, runs["run"], *sides, *[a.format(**runs) for a in rest], "--quiet")
    _one_line_error(result, message)
    assert _reports(runs["run"]) == before


def test_fraction_names_are_distinct_or_refused():
    with pytest.raises(UsageError, match="0.5000001 and 0.5000002"):
        parse_fractions("0.5000001,0.5000002")
    kept = parse_fractions("0.5,0.50001,1,0.5")
    assert kept == [0.5, 0.50001, 1.0] and len({fraction_name(f) for f in kept}) == 3


def test_nan_weights_are_refused_by_eval_and_embed(runs, cli, tmp_path):
    before = _reports(runs["nan_run"])
    result = cli("eval", "knn", runs["nan_run"], "--train", runs["data"], "--test", runs["other"], "--quiet")
    _one_line_error(result, "non-finite", f"for {2 * N_PER_CLASS} of {2 * N_PER_CLASS} images", "no report")
    result = cli("eval", "linear", runs["nan_run"], "--train", runs["data"], "--test", runs["other"], "--quiet")
    _one_line_error(result, "non-finite")
    assert _reports(runs["nan_run"]) == before
    out = tmp_path / "e.npz"
    _one_line_error(cli("embed", runs["nan_run"], "--data", runs["data"], "--out", out, "--quiet"),
                    "non-finite", f"for {2 * N_PER_CLASS} of {2 * N_PER_CLASS} images")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_embed_refuses_an_output_suffix_it_does_not_write(runs, cli, tmp_path):
    keep = tmp_path / "b.csv"
    keep.write_text("mine\n")
    _one_line_error(cli("embed", runs["run"], "--data", runs["data"], "--out", keep, "--overwrite", "--quiet"),
                    ".npz")
    assert keep.read_text() == "mine\n"
    _one_line_error(cli("embed", runs["run"], "--data", runs["data"], "--out", tmp_path / "e", "--quiet"), ".npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv"]


def test_overlap_counts_the_scored_images_and_skipped_files_are_reported(runs, cli):
    mixed = runs["mixed"]
    refused = cli("eval", "knn", runs["run"], "--train", mixed, "--test", mixed, "--quiet")
    # refused before decoding: the message says that it counts the indexed files (2 will not decode)
    _one_line_error(refused, f"share {2 * N_PER_CLASS + 2} of the {2 * N_PER_CLASS + 2} test images indexed",
                    "before decoding")
    result = cli("eval", "knn", runs["run"], "--train", mixed, "--test", mixed, "--allow-overlap", "--k", "3",
                 "--json", "--quiet", "--no-baseline")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    scored = 2 * N_PER_CLASS
    assert data["test"]["samples"] == scored and data["overlap"]["test_samples_in_train"] == scored
    for side in ("train", "test"):
        skipped = data[side]["skipped"]
        assert skipped["files"] == 2 and sum(skipped["reasons"].values()) == 2
        assert "broken" not in json.dumps(skipped) and "truncated" not in json.dumps(skipped)  # no file names
    # a test set that shares nothing scored: 0, and nothing skipped
    clean = cli("eval", "knn", runs["run"], "--train", mixed, "--test", runs["other"], "--allow-overlap", "--k", "3",
                "--json", "--quiet", "--no-baseline")
    data = json.loads(clean.stdout)["data"]
    assert data["overlap"]["test_samples_in_train"] == 0 and data["test"]["skipped"] == {"files": 0, "reasons": {}}
    text = cli("eval", "knn", runs["run"], "--train", mixed, "--test", mixed, "--allow-overlap", "--k", "3",
               "--quiet", "--no-baseline")
    assert f"train: {scored} images, 2 files not decoded" in text.stdout
    assert f"warning: {scored} scored test images are also in --train" in text.stdout


@pytest.mark.parametrize("command, args", [
    ("tsne", ["--data", "{mixed}", "--perplexity", "3"]),
    # attention decodes only the rows it draws: 14 rows try every image of the set, the 2 broken ones too
    ("attention", ["--images", "{mixed}", "--max-images", "14"]),
])
def test_tsne_and_attention_report_the_files_they_skipped_as_knn_does(runs, cli, command, args):
    mixed = runs["mixed"]
    argv = ["eval", command, runs["run"], *[a.format(**runs) for a in args], "--no-baseline", "--quiet"]
    result = cli(*argv, "--json")
    assert result.exit_code == 0, result.output
    skipped = json.loads(result.stdout)["data"]["data"]["skipped"]
    assert skipped["files"] == 2 and sum(skipped["reasons"].values()) == 2  # broken.png and truncated.png
    for reason in skipped["reasons"]:
        assert reason.strip()
        # reasons pass through sslkit.errors.without_quoted: no file name, and nothing quoted is left but '…'
        assert "broken" not in reason and "truncated" not in reason and str(mixed) not in reason, reason
        assert set(re.findall(r"'[^']*'|\"[^\"]*\"", reason)) <= {"'…'"}, reason
    text = cli(*argv)
    assert text.exit_code == 0, text.output
    assert "2 files not decoded (" in text.stdout
