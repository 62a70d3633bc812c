"""sslkit eval curve: label subsets, fold aggregation, the init row, PNG and report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from sslkit.eval.curve import label_subset, parse_fractions
from sslkit.errors import UsageError
from tests.conftest import make_images

VIT = {"depth": 1, "patch_size": 8}


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    """A 1-step MAE run at LR 1e-12 started from a (3-channel, 32 px) weights file: its pretrained
    encoder is the init, adapted to 1 channel and a 2 x 2 patch grid."""
    import torch

    from sslkit.engine import pretrain
    from sslkit.registry import create_backbone
    from sslkit.run import RunConfig

    root = tmp_path_factory.mktemp("curve")
    data = make_images(root / "data", n_per_class=12, size=16, channels=1)
    torch.manual_seed(1)
    save_file(create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, **VIT).model.state_dict(),
              str(root / "init.safetensors"))
    cfg = RunConfig(task="mae", data=str(data), out=str(root / "run"), backbone="timm:vit_tiny_patch16_224",
                    backbone_options=VIT, init=str(root / "init.safetensors"), epochs=1, batch_size=8,
                    image_size=16, max_steps=1, lr=1e-12, progress=False, cache_dir="")
    pretrain(cfg)
    return root


def test_label_subset_is_stratified_with_a_floor_per_class():
    y = np.array([0] * 90 + [1] * 10)
    idx = label_subset(y, 0.1, seed=0)
    assert (y[idx] == 0).sum() == 9 and (y[idx] == 1).sum() == 2  # round(1.0) -> the floor of 2
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx)) == len(idx)
    assert np.array_equal(label_subset(y, 0.1, seed=0), idx) and not np.array_equal(label_subset(y, 0.1, 1), idx)
    assert len(label_subset(y, 1.0, 0)) == 100
    assert parse_fractions("1,0.01,0.1") == [0.01, 0.1, 1.0]
    for bad in ("0", "1.5", "x", ""):
        with pytest.raises(UsageError, match="--fractions"):
            parse_fractions(bad)


def test_curve_cli_png_report_and_init_row(init_run, cli):
    out = init_run / "curve.png"
    result = cli("eval", "curve", init_run / "run", "--data", init_run / "data", "--split", "group:3",
                 "--fractions", "0.25,1", "--k", "3", "--C", "1", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["kind"] == "curve" and rep["schema"] == "sslkit.eval/1" and rep["files"] == [str(out)]
    assert set(rep["results"]) == {"pretrained", "random", "init"}
    res = rep["results"]
    assert set(res["pretrained"]) == {"linear f=0.25", "k=3 f=0.25", "linear f=1", "k=3 f=1"}
    for enc in res:
        small, full = res[enc]["linear f=0.25"], res[enc]["linear f=1"]
        assert small["n"] == full["n"] == 24  # every image tested once over the 3 folds
        assert small["train_labels"] == pytest.approx(np.mean([f["train_labels"] for f in small["folds"]]))
        assert 4 <= small["train_labels"] < full["train_labels"] == pytest.approx(16)
        assert small["auroc"] == pytest.approx(np.mean([f["auroc"] for f in small["folds"]]))
    # at LR 1e-12 the pretrained encoder is still the init: identical rows, unlike the random encoder's
    for setting in res["init"]:
        assert res["init"][setting]["auroc"] == pytest.approx(res["pretrained"][setting]["auroc"], abs=1e-9)
        assert rep["gain"]["pretrained - init"][setting]["auroc"] == pytest.approx(0, abs=1e-9)
    # the gain over random init at each fraction: the mean of its per-fold differences, with their SE
    g = rep["gain"]["pretrained - random"]["linear f=0.25"]
    diffs = [a["auroc"] - b["auroc"] for a, b in zip(res["pretrained"]["linear f=0.25"]["folds"],
                                                     res["random"]["linear f=0.25"]["folds"])]
    assert g["auroc"] == pytest.approx(np.mean(diffs)) and g["auroc_se"] == pytest.approx(np.std(diffs, ddof=1) / 3 ** 0.5)
    with Image.open(out) as img:
        assert img.size == tuple(rep["image_size"]) == (1000, 400)
    assert json.loads(open(rep["report_file"]).read())["results"] == res
    again = cli("eval", "curve", init_run / "run", "--data", init_run / "data", "--out", out, "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr  # never replaced silently


def test_curve_on_train_test_pair_has_no_std(init_run, cli, tmp_path):
    test = make_images(tmp_path / "test", n_per_class=4, size=16, channels=1, seed=5)
    result = cli("eval", "curve", init_run / "run", "--train", init_run / "data", "--test", test, "--fractions", "1",
                 "--k", "3", "--C", "1", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    lin = rep["results"]["pretrained"]["linear f=1"]
    assert lin["n"] == 8 and lin["std"]["auroc"] is None and len(lin["folds"]) == 1
    # one split: the gain's SE is the paired one over the 8 test images, not over folds
    res = rep["results"]
    for setting in ("linear f=1", "k=3 f=1"):
        g = rep["gain"]["pretrained - random"][setting]
        assert g["se"] == "paired, per test image" and g["top1_se"] is not None
        assert g["top1"] == pytest.approx(res["pretrained"][setting]["top1"] - res["random"][setting]["top1"])


def test_finetune_baseline_rows_include_the_init_weights(init_run, cli, tmp_path):
    test = make_images(tmp_path / "test", n_per_class=3, size=16, channels=1, seed=7)
    result = cli("eval", "linear", init_run / "run", "--train", init_run / "data", "--test", test, "--C", "1",
                 "--finetune", "--finetune-epochs", "1", "--batch-size", "8", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)["results"]
    assert set(res) == {"pretrained", "random", "init"}
    assert all(res[e]["finetune"]["n"] == 6 for e in res)
    # the frozen init encoder is the (LR 1e-12) pretrained one: same probe scores
    assert res["init"]["linear"]["auroc"] == pytest.approx(res["pretrained"]["linear"]["auroc"], abs=1e-9)


def test_a_class_under_the_floor_is_noted_and_reported(capsys):
    from sslkit.eval.curve import curve_results
    from sslkit.eval.labels import Labelled
    from sslkit.eval.probes import ProbeData

    rng = np.random.default_rng(0)
    labels = ["a"] * 20 + ["b"] * 20 + ["c"]  # class c: one training image, all there is
    train = Labelled(rng.normal(size=(41, 4)).astype(np.float32), labels, 0)
    test = Labelled(rng.normal(size=(9, 4)).astype(np.float32), ["a", "b", "c"] * 3, 0)
    prep = ProbeData(None, {"pretrained": (train, test), "random": (train, test)}, ["a", "b", "c"], None)
    res = curve_results(prep, [0.1, 1], k=3, C_grid=[1.0])
    assert res["pretrained"]["linear f=0.1"]["fewest_per_class"] == res["random"]["k=3 f=1"]["fewest_per_class"] == 1
    assert res["pretrained"]["linear f=0.1"]["train_labels"] == 2 + 2 + 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sslkit: note: at f={f}, class 'c' had fewer than 2 training labels (all the fold had) in 1 of "
                   "1 fold(s); its scores there rest on so few images" for f in ("0.1", "1")]


def test_every_fold_fine_tunes_the_init_weights_afresh(init_run, cli, monkeypatch):
    """The audit's leak: the cached init encoder was trained in place, so fold 2 started from fold 1's
    fine-tuning (whose training images hold fold 2's test patients)."""
    import sslkit.eval.finetune as ft

    seen: list[float] = []
    real = ft.finetune

    def recording(encoder, *args, **kwargs):
        seen.append(float(sum(p.double().abs().sum() for p in encoder.state_dict().values() if p.is_floating_point())))
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(ft, "finetune", recording)
    result = cli("eval", "linear", init_run / "run", "--data", init_run / "data", "--split", "group:2", "--C", "1",
                 "--finetune", "--finetune-epochs", "1", "--batch-size", "8", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    per_fold = [seen[i:i + 3] for i in range(0, len(seen), 3)]  # pretrained, random, init in each fold
    assert len(per_fold) == 2 and per_fold[0] == per_fold[1]  # every encoder starts each fold from the same weights


def test_an_onnx_export_of_an_init_run_says_why_it_has_no_init_row(init_run, cli, tmp_path):
    onnx = tmp_path / "enc.onnx"
    assert cli("export", init_run / "run", "--out", onnx, "--check-data", "none").exit_code == 0
    result = cli("eval", "knn", onnx, "--data", init_run / "data", "--split", "group:3", "--k", "3", "--json",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["results"]) == {"pretrained", "random"}
    assert result.stderr.count("no 'init' row: an ONNX file does not carry the --init weights") == 1
