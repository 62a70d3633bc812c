"""sslkit eval: kNN, linear probe, metrics, labels, reports, t-SNE and attention PNGs, CLI errors."""

from __future__ import annotations

import os

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.errors import UsageError
from sslkit.eval.knn import knn_votes
from sslkit.eval.labels import assign_labels, class_index, read_labels_csv
from sslkit.eval.linear import fit_linear_probe
from sslkit.eval.metrics import classification_metrics
from tests.conftest import make_images


# --- kNN -----------------------------------------------------------------------------------
def test_knn_weighted_vote_matches_hand_computation():
    # One very close neighbour of class 0 against two far ones of class 1: a majority vote
    # says 1, the temperature-weighted vote (Wu et al. 2018) says 0.
    train = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2], [-1.0, 0.0]])
    y = np.array([0, 1, 1, 1])
    query = np.array([[3.0, 0.0]])  # normalised inside: cosine, not dot product
    votes = knn_votes(train, y, query, 2, ks=[3], temperature=0.07)[3]
    w0, w1 = math.exp(1 / 0.07), 2 * math.exp(0.5 / 0.07)
    assert votes[0] == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)], rel=1e-5)
    assert votes.argmax(1)[0] == 0
    # k=4 adds the opposite point (cos -1): tiny weight, prediction unchanged
    v4 = knn_votes(train, y, query, 2, ks=[4])[4]
    w1b = w1 + math.exp(-1 / 0.07)
    assert v4[0, 1] == pytest.approx(w1b / (w0 + w1b), rel=1e-5)


def test_knn_k_larger_than_train_uses_all_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    train, y, test = rng.normal(size=(7, 5)), rng.integers(0, 3, 7), rng.normal(size=(10, 5))
    a = knn_votes(train, y, test, 3, ks=[200, 7], chunk=3)
    b = knn_votes(train, y, test, 3, ks=[200, 7], chunk=1024)
    # float32 similarities go through exp(s / 0.07): a 1-ulp difference between BLAS paths
    # (chunk of 3 vs all rows: gemv vs gemm on some CPUs) becomes ~14 ulp, ~2e-6 relative
    np.testing.assert_allclose(a[200], a[7], rtol=1e-5)
    np.testing.assert_allclose(a[200], b[200], rtol=1e-5)


# --- linear probe ----------------------------------------------------------------------------
def _blobs(n, d=32, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + sep * y[:, None] * np.eye(d)[0]
    return x.astype(np.float32), y


def test_linear_probe_separable_is_near_perfect_and_shuffled_is_chance():
    xtr, ytr = _blobs(400, sep=8.0, seed=0)
    xte, yte = _blobs(600, sep=8.0, seed=1)
    probe = fit_linear_probe(xtr, ytr, 2)
    assert np.mean(probe.predict_proba(xte).argmax(1) == yte) >= 0.99
    assert set(probe.val_scores) == {1e-3, 1e-2, 1e-1, 1.0, 10.0}
    shuffled = np.random.default_rng(2).permutation(ytr)
    probe = fit_linear_probe(xtr, shuffled, 2)
    acc = np.mean(probe.predict_proba(xte).argmax(1) == yte)
    assert 0.4 <= acc <= 0.6


def test_linear_probe_pads_missing_class_columns():
    x, y = _blobs(60)
    probe = fit_linear_probe(x, y * 2, 3, C_grid=[1.0])  # classes 0 and 2 only
    p = probe.predict_proba(x)
    assert p.shape == (60, 3) and np.all(p[:, 1] == 0)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


# --- metrics and labels ----------------------------------------------------------------------
def test_linear_probe_extends_the_grid_past_a_winning_end(monkeypatch):
    from sslkit.eval import linear

    tried = []

    def score(x, y, tr, va, C, max_iter, seed):  # validation score peaks at C = 100
        tried.append(C)
        return -abs(np.log10(C) - 2)

    monkeypatch.setattr(linear, "_val_score", score)
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
    probe = fit_linear_probe(x, y, 2)
    assert tried == [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0] and probe.C == 100.0
    tried.clear()
    assert fit_linear_probe(x, y, 2, C_grid=[1.0, 10.0, 1000.0]).C == 10.0  # tie 10 / 1000: the stronger one
    assert tried == [1.0, 10.0, 1000.0]  # the best is inside the grid: nothing added
    tried.clear()
    monkeypatch.setattr(linear, "_val_score", lambda *a: tried.append(a[4]) or 0.5)  # all tied: no extension
    assert fit_linear_probe(x, y, 2).C == 1e-3 and len(tried) == 5


def test_c_is_not_chosen_on_a_validation_split_that_lacks_a_class():
    """2 + 3 labels (eval curve at 2 %): the split held one image of one class and picked C = 0.001
    on scores of 0 or 1; now the grid's middle C, with no validation score, and no sklearn warning."""
    x = np.random.default_rng(0).normal(size=(5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = fit_linear_probe(x, np.array([0, 0, 1, 1, 1]), 2)
    assert probe.C == 0.1 and probe.val_scores == {}
    x = np.random.default_rng(0).normal(size=(30, 4))
    assert len(fit_linear_probe(x, np.arange(30) % 2, 2).val_scores) >= 5  # enough of each class: chosen


def test_auroc_is_for_the_named_positive_class():
    y = np.array([0, 0, 1, 1])  # classes ["a", "b"]
    p_b = np.array([0.1, 0.4, 0.35, 0.8])
    scores = np.stack([1 - p_b, p_b], 1)
    # positives b: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs
    m = classification_metrics(y, scores.argmax(1), scores, 2, positive=1)
    assert m["auroc"] == pytest.approx(0.75)
    assert m["top1"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    # a score that ranks class a well but b badly: the AUROC follows the positive column
    odd = np.stack([[0.9, 0.8, 0.1, 0.2], [0.9, 0.8, 0.1, 0.2]], 1)
    assert classification_metrics(y, y, odd, 2, positive=0)["auroc"] == pytest.approx(1.0)
    assert classification_metrics(y, y, odd, 2, positive=1)["auroc"] == pytest.approx(0.0)
    assert classification_metrics(y, y, scores, 3, positive=None)["auroc"] is None


def test_a_test_fold_of_one_class_is_scored_without_scikit_learn_warnings():
    """A test fold without the positive class (100 NORMAL, 6 PNEUMONIA of 4 patients, --split group:5)
    printed scikit-learn's multi-line UserWarnings, with its file paths, on stderr; folds_scored
    reports that gap already. Other warnings are not swallowed."""
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one = classification_metrics(np.array([0, 0, 0]), np.array([0, 0, 0]), scores, 2, positive=1)
        extra = classification_metrics(np.array([0, 0, 0]), np.array([0, 1, 0]), scores, 2, positive=1)
        warnings.warn("a caller's own warning", UserWarning)
    assert [str(w.message) for w in caught] == ["a caller's own warning"]
    assert one == {"n": 3, "top1": 1.0, "balanced_accuracy": 1.0, "auroc": None}
    assert extra["top1"] == pytest.approx(2 / 3) and extra["balanced_accuracy"] == pytest.approx(2 / 3)
    assert extra["auroc"] is None  # one class in the test fold: no AUROC


def test_class_index_positive_default_and_errors():
    assert class_index(["b", "a", "a"], ["a"], None) == (["a", "b"], 1)
    assert class_index(["b", "a"], ["a"], "a") == (["a", "b"], 0)
    assert class_index(["a", "b", "c"], ["a"], None) == (["a", "b", "c"], None)
    with pytest.raises(UsageError, match="single class"):
        class_index(["a", "a"], ["a"], None)
    with pytest.raises(UsageError, match="do not occur in the training set"):
        class_index(["a", "b"], ["c"], None)
    with pytest.raises(UsageError, match="--positive: unknown class 'z'; choose from: a, b"):
        class_index(["a", "b"], ["a"], "z")


def test_labels_csv_matches_by_longest_path_suffix(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nx/1.png,cat\n1.png,dog\n/abs/y/2.png,cow\nscan.dcm#3,frame3\n")
    table = read_labels_csv(csv)
    ids = ["/data/x/1.png", "/data/z/1.png", "/abs/y/2.png", "/data/3.png", "/d/scan.dcm#3", "/d/scan.dcm#4"]
    assert assign_labels(ids, [None] * 6, table) == ["cat", "dog", "cow", None, "frame3", None]
    assert assign_labels(ids[:2], ["f1", "f2"], None) == ["f1", "f2"]  # class folders without a CSV
    # the audit's case: absolute rows for a relative --data (and ./ rows) matched nothing
    (tmp_path / "flat").mkdir()
    rows = tmp_path / "rows.csv"
    rows.write_text(f"{tmp_path}/flat/a.png,cat\n./flat/b.png,dog\n")
    table = read_labels_csv(rows)
    old_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert assign_labels(["flat/a.png", "flat/b.png", "./flat/c.png"], [None] * 3, table) == ["cat", "dog", None]
    finally:
        os.chdir(old_cwd)
    assert assign_labels([f"{tmp_path}/flat/a.png", f"{tmp_path}/flat/b.png"], [None] * 2, table) == ["cat", "dog"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,x\na.png,y\n")
    with pytest.raises(UsageError, match="two labels"):
        read_labels_csv(bad)


# --- pretrained minus baseline -----------------------------------------------------------------
def test_paired_gain_matches_hand_computation():
    from sslkit.eval.gain import gains, paired_gain

    a, b = np.array([1, 1, 0, 1], bool), np.array([0, 1, 0, 0], bool)
    d, se = paired_gain(a, b)  # differences 1, 0, 0, 1: mean 0.5, sample std sqrt(1/3)
    assert d == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)
    assert paired_gain(np.array([1.0]), np.array([0.0])) == (1.0, None)
    results = {"pretrained": {"k=1": {"top1": 0.75, "balanced_accuracy": 0.7, "auroc": None}},
               "random": {"k=1": {"top1": 0.25, "balanced_accuracy": 0.3, "auroc": None}}}
    g = gains(results, {("pretrained", "k=1"): a, ("random", "k=1"): b})["pretrained - random"]["k=1"]
    assert g["top1"] == 0.5 and g["top1_se"] == pytest.approx(se) and g["balanced_accuracy"] == pytest.approx(0.4)
    assert "auroc" not in g  # undefined on both sides
    assert "top1_se" not in gains(results, {})["pretrained - random"]["k=1"]  # no per-image correctness: no SE


# --- end to end on a tiny run ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-step SimCLR run (resnet18, CIFAR stem, 16 px) and labelled train/test folders."""
    from sslkit.engine import pretrain
    from sslkit.run import RunConfig

    root = tmp_path_factory.mktemp("eval")
    train = make_images(root / "train", n_per_class=10, size=16, seed=0)
    make_images(root / "test", n_per_class=6, size=16, seed=1)
    cfg = RunConfig(task="simclr", data=str(train), out=str(root / "run"), backbone="timm:resnet18",
                    backbone_options={"cifar_stem": True}, epochs=1, batch_size=8, image_size=16,
                    max_steps=2, progress=False)
    pretrain(cfg)
    return root


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_knn_json_report_and_baseline(tiny, cli):
    r = tiny
    rep = _json(cli("eval", "knn", r / "run", "--train", r / "train", "--test", r / "test", "--k", "3,50",
                    "--json", "--quiet"))
    assert rep["schema"] == "sslkit.eval/1" and rep["kind"] == "knn"
    assert rep["classes"] == ["a", "b"] and rep["positive_class"] == "b"
    assert set(rep["results"]) == {"pretrained", "random"}
    for enc in rep["results"].values():
        assert set(enc) == {"k=3", "k=50"}
        m = enc["k=3"]
        assert m["n"] == 12 and 0 <= m["top1"] <= 1 and 0 <= m["auroc"] <= 1
        assert enc["k=50"]["k_used"] == 20
    assert rep["data"]["train"]["samples"] == 20 and rep["data"]["test"]["samples"] == 12
    saved = json.loads(Path(rep["report_file"]).read_text())
    assert saved == rep and Path(rep["report_file"]).parent == r / "run" / "eval"
    # a second evaluation never overwrites the first report; --no-baseline drops the random rows
    rep2 = _json(cli("eval", "knn", r / "run", "--train", r / "train", "--test", r / "test", "--k", "3",
                     "--positive", "a", "--no-baseline", "--json", "--quiet"))
    assert rep2["report_file"] != rep["report_file"] and Path(rep["report_file"]).exists()
    assert set(rep2["results"]) == {"pretrained"} and rep2["positive_class"] == "a" and rep2["gain"] == {}
    # pretrained minus random: every metric's difference, and top-1's paired SE
    gain = rep["gain"]["pretrained - random"]
    assert set(gain) == {"k=3", "k=50"}
    for k, g in gain.items():
        mine, base = rep["results"]["pretrained"][k], rep["results"]["random"][k]
        for key in ("top1", "balanced_accuracy", "auroc"):
            assert g[key] == pytest.approx(mine[key] - base[key])
        # per-image differences in {-1, 0, 1} over 12 images: the sample std is at most sqrt(12/11)
        assert 0 <= g["top1_se"] <= 1 / math.sqrt(11) and g["se"] == "paired, per test image"
    text = cli("eval", "knn", r / "run", "--train", r / "train", "--test", r / "test", "--k", "3", "--quiet")
    assert text.exit_code == 0 and "gain pretrained - random, k=3: top1 " in text.stdout
    # the pretrained rows do not depend on whether the baseline ran
    assert rep2["results"]["pretrained"]["k=3"]["top1"] == rep["results"]["pretrained"]["k=3"]["top1"]


def test_random_baseline_is_reproducible(tiny):
    from sslkit.embed import embed
    from sslkit.eval.features import embed_all, open_model

    model = open_model(tiny / "run", "cpu")
    a = embed_all(model, str(tiny / "test"), progress=False)
    b = embed_all(model, str(tiny / "test"), progress=False)
    np.testing.assert_array_equal(a["random"].embeddings, b["random"].embeddings)
    assert not np.allclose(a["random"].embeddings, a["pretrained"].embeddings)
    # the one-pass pair equals what `sslkit embed` gives for the pretrained encoder
    ref = embed(tiny / "run", str(tiny / "test"), progress=False)
    np.testing.assert_allclose(a["pretrained"].embeddings, ref.embeddings, rtol=1e-5, atol=1e-6)
    assert a["pretrained"].ids == ref.ids


def test_cli_linear_probe_and_finetune(tiny, cli):
    r = tiny
    rep = _json(cli("eval", "linear", r / "run", "--train", r / "train", "--test", r / "test", "--C", "0.1,1",
                    "--finetune", "--finetune-epochs", "1", "--batch-size", "8", "--json", "--quiet"))
    assert rep["kind"] == "linear" and rep["settings"]["C_grid"] == [0.1, 1.0]
    for enc in ("pretrained", "random"):
        lin, ft = rep["results"][enc]["linear"], rep["results"][enc]["finetune"]
        by_c = {float(c): v for c, v in lin["val_balanced_accuracy_by_C"].items()}
        assert {0.1, 1.0} <= set(by_c) and by_c[lin["C"]] == max(by_c.values()) == lin["val_balanced_accuracy"]
        assert lin["n"] == 12 and ft["n"] == 12 and ft["epochs"] == 1
        assert lin["auroc"] is not None


def test_cli_knn_with_labels_csv(tiny, cli, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["path,label"]
    for cls in ("a", "b"):
        for f in sorted((tiny / "train" / cls).iterdir()):
            (flat / f"{cls}{f.name}").write_bytes(f.read_bytes())
            rows.append(f"{cls}{f.name},{cls}")
    (tmp_path / "labels.csv").write_text("\n".join(rows[:-2]) + "\n")  # two files left unlabelled
    rep = _json(cli("eval", "knn", tiny / "run", "--train", flat, "--test", flat, "--labels",
                    tmp_path / "labels.csv", "--k", "1", "--no-baseline", "--allow-overlap", "--json", "--quiet"))
    assert rep["data"]["train"] == {"source": str(flat), "samples": 18, "unlabelled": 2,
                                    "skipped": {"files": 0, "reasons": {}}}
    # the same folder twice: leakage, reported over the scored (labelled) test images
    assert rep["data"]["overlap"]["test_samples_in_train"] == 18
    assert rep["results"]["pretrained"]["k=1"]["top1"] == 1.0  # each image is its own neighbour


def test_tsne_png_size_and_input_count(tiny, cli, monkeypatch):
    import sslkit.eval.tsne as tsne

    seen = []
    real = tsne.reduce_2d
    monkeypatch.setattr(tsne, "reduce_2d", lambda x, *a, **k: seen.append(len(x)) or real(x, *a, **k))
    out = tiny / "map.png"
    rep = _json(cli("eval", "tsne", tiny / "run", "--data", tiny / "test", "--out", out, "--perplexity", "5",
                    "--json", "--quiet"))
    assert seen == [12, 12]  # pretrained and random maps, every sample
    assert rep["data"]["data"]["plotted"] == 12 and rep["files"] == [str(out)]
    assert rep["settings"]["perplexity"] == 5 and rep["settings"]["perplexity_used"] == pytest.approx(11 / 3)
    assert out.stat().st_size > 5000
    with Image.open(out) as img:
        assert img.size == tuple(rep["image_size"]) and img.size[1] == 600 and img.size[0] >= 1200  # + the legend
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank canvas
    again = cli("eval", "tsne", tiny / "run", "--data", tiny / "test", "--out", out, "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_attention_grid_cnn(tiny, cli):
    rep = _json(cli("eval", "attention", tiny / "run", "--data", tiny / "test", "--max-images", "3", "--json",
                    "--quiet"))
    assert rep["settings"]["method"].startswith("Grad-CAM")
    png = Path(rep["files"][0])
    assert png.parent == tiny / "run" / "eval" and png.stat().st_size > 5000
    with Image.open(png) as img:
        assert img.size == (3 * 200, 3 * 200)  # input | pretrained | random, 3 rows
    assert rep["class_counts"]["rows"] == {"a": 2, "b": 1}  # rows alternate between the classes


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_attention_on_a_device_this_machine_lacks_is_one_line(tiny, cli):
    result = cli("eval", "attention", tiny / "run", "--data", tiny / "test", "--device", "cuda", "--quiet")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "no CUDA GPU" in lines[0]


def test_attention_rows_alternate_between_classes_and_spread_within():
    from sslkit.eval.attention import pick_across_classes

    labels = ["a"] * 10 + ["b"] * 3 + [None] * 2
    rows = pick_across_classes(labels, 8)
    assert [labels[i] for i in rows] == ["a", "b", None, "a", "b", None, "a", "b"]
    assert [i for i in rows if labels[i] == "a"] == [0, 3, 6]  # evenly spread over a's 10 images
    assert pick_across_classes(["a"] * 5, 9) == [0, 1, 2, 3, 4]


def test_tsne_colour_by_folder_or_header_field(tiny, cli):
    rep = _json(cli("eval", "tsne", tiny / "run", "--data", tiny / "test", "--color-by", "folder", "--perplexity", "3",
                    "--no-baseline", "--json", "--quiet"))
    assert rep["classes"] == ["a", "b"] and rep["settings"]["color_by"] == "folder"
    rep = _json(cli("eval", "tsne", tiny / "run", "--data", tiny / "test", "--color-by", "Format", "--perplexity", "3",
                    "--no-baseline", "--json", "--quiet"))
    assert rep["classes"] == ["PNG"]  # folder images report their format in Source.properties
    bad = cli("eval", "tsne", tiny / "run", "--data", tiny / "test", "--color-by", "BodyPartExamined", "--quiet")
    lines = bad.stderr.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "choose from: label, folder, format" in lines[0]


def test_vit_cls_attention_matches_timm_attention_probabilities():
    from sslkit.eval.attention import vit_cls_attention
    from sslkit.registry import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("timm:vit_tiny_patch16_224", in_chans=1, image_size=32, patch_size=8).eval()
    attn = vit.model.blocks[-1].attn
    x = torch.randn(2, 1, 32, 32)
    maps = vit_cls_attention(vit, x)
    assert maps.shape == (2, 3, 4, 4)
    attn.fused_attn = False  # timm's explicit path; its attn_drop sees the probabilities
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        vit(x)
    hook.remove()
    ref = seen[0][:, :, 0, vit.num_prefix_tokens:].reshape(2, 3, 4, 4)
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)


def test_gradcam_equals_closed_form_for_global_average_pooling():
    from sslkit.eval.attention import gradcam
    from sslkit.registry import create_backbone

    torch.manual_seed(0)
    net = create_backbone("timm:resnet18", in_chans=3, image_size=32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feat = net.model.forward_features(x)  # (B, K, h, w)
        f = feat.mean((2, 3))  # the pooled embedding
    # d||f|| / dA_k(ij) = f_k / (||f|| h w): the weights are the embedding itself, scaled
    alpha = f / (f.norm(dim=1, keepdim=True) * feat.shape[2] * feat.shape[3])
    ref = torch.relu((alpha[:, :, None, None] * feat).sum(1, keepdim=True))
    torch.testing.assert_close(gradcam(net, x), ref, rtol=1e-4, atol=1e-7)


def test_attention_grid_vit_has_one_column_per_head(tmp_path, cli):
    from sslkit.engine import pretrain
    from sslkit.run import RunConfig

    data = make_images(tmp_path / "imgs", n_per_class=4, size=32, channels=1)
    pretrain(RunConfig(task="mae", data=str(data), out=str(tmp_path / "mae"), backbone="timm:vit_tiny_patch16_224",
                       backbone_options={"patch_size": 8}, epochs=1, batch_size=4, image_size=32, max_steps=1,
                       progress=False))
    out = tmp_path / "att.png"
    rep = _json(cli("eval", "attention", tmp_path / "mae", "--images", data, "--max-images", "2", "--out", out,
                    "--json", "--quiet"))
    assert rep["settings"]["method"].startswith("CLS attention")
    with Image.open(out) as img:
        assert img.size == ((1 + 2 * 3) * 200, 2 * 200)  # input + 3 heads x (pretrained, random)


# --- user errors: one line, exit code 2 ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["knn", "{run}", "--train", "{missing}", "--test", "{test}"], "does not exist"),
    (["knn", "{missing}", "--train", "{train}", "--test", "{test}"], "does not exist"),
    (["knn", "{run}", "--train", "{flat}", "--test", "{test}"], "no labelled images"),
    (["knn", "{run}", "--train", "{train}", "--test", "{test}", "--k", "0"], "positive integers"),
    (["knn", "{run}", "--train", "{train}", "--test", "{test}", "--positive", "zebra"], "unknown class 'zebra'"),
    (["linear", "{run}", "--train", "{train}", "--test", "{test}", "--C", "x"], "comma-separated numbers"),
    (["knn", "{run}", "--train", "{train}", "--test", "{test}", "--labels", "{missing}"], "does not exist"),
    (["tsne", "{run}", "--data", "{test}", "--out", "{root}/map.jpg"], "must be a .png"),
    (["attention", "{run}", "--images", "{missing}"], "does not exist"),
    (["linear", "{run}", "--train", "{train}", "--test", "{test}", "--finetune", "--finetune-layer-decay", "0.75"],
     "--finetune-layer-decay needs a ViT"),
    (["linear", "{run}", "--train", "{train}", "--test", "{test}", "--finetune", "--finetune-layer-decay", "0"],
     "0<x<=1"),
])
def test_cli_user_errors_are_one_line_exit_2(tiny, cli, tmp_path, args, message):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(flat / "x.png")
    paths = {"run": tiny / "run", "train": tiny / "train", "test": tiny / "test", "missing": tmp_path / "nope",
             "flat": flat, "root": tmp_path}
    reports = set((tiny / "run" / "eval").glob("*"))
    result = cli("eval", *[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert set((tiny / "run" / "eval").glob("*")) == reports  # no report written


@pytest.mark.slow
def test_knn_on_exported_onnx_matches_run_dir(tiny, cli):
    from sslkit.export import export_run

    onnx_file = tiny / "run" / "encoder.onnx"
    if not onnx_file.exists():
        export_run(tiny / "run", onnx_file)
    args = ["--train", tiny / "train", "--test", tiny / "test", "--k", "3", "--json", "--quiet"]
    from_run = _json(cli("eval", "knn", tiny / "run", *args))
    from_onnx = _json(cli("eval", "knn", onnx_file, *args))
    assert from_onnx["model"]["format"] == "onnx" and Path(from_onnx["report_file"]).parent == tiny / "run" / "eval"
    for enc in ("pretrained", "random"):  # the baseline is rebuilt from the ONNX metadata's backbone
        assert from_onnx["results"][enc]["k=3"]["top1"] == from_run["results"][enc]["k=3"]["top1"]
    bad = cli("eval", "linear", onnx_file, *args[:4], "--finetune", "--quiet")
    assert bad.exit_code == 2 and "needs the run directory" in bad.stderr


def test_umap_without_umap_learn_is_a_usage_error(monkeypatch):
    import builtins

    from sslkit.eval.tsne import reduce_2d

    real_import = builtins.__import__

    def no_umap(name, *a, **k):
        if name == "umap":
            raise ImportError("no umap")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_umap)
    with pytest.raises(UsageError, match="pip install umap-learn"):
        reduce_2d(np.zeros((5, 3)), "umap")
    with pytest.raises(UsageError, match="at least 3 images"):
        reduce_2d(np.zeros((2, 3)))


def test_finetune_layer_decay_holds_the_early_layers_and_needs_a_vit():
    from sslkit.eval.finetune import FinetuneOptions, finetune
    from sslkit.registry import create_backbone
    from sslkit.spec import InputSpec

    spec = InputSpec(channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65535, (16, 1, 16, 16), dtype=np.uint16)
    y = np.arange(16) % 2

    def deltas(decay):
        torch.manual_seed(0)
        enc = create_backbone("timm:vit_tiny_patch16_224", 1, 16, patch_size=8, depth=2)
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        model = finetune(enc, spec, pixels, y, 2, FinetuneOptions(epochs=2, batch_size=8, lr=1e-2, layer_decay=decay),
                         torch.device("cpu"), progress=False)
        return {k: (v - before[k]).abs().max().item() for k, v in model.encoder.state_dict().items()}

    plain, held = deltas(None), deltas(1e-4)
    patch = "model.patch_embed.proj.weight"
    # embeddings at decay^3 = 1e-12 of the LR: as good as frozen; without decay they move
    assert held[patch] < 1e-9 < 1e-4 < plain[patch]
    # the last block at decay^1 moves, less than the same block without decay
    last = "model.blocks.1.mlp.fc2.weight"
    assert 0 < held[last] < plain[last]
    cnn = create_backbone("timm:resnet18", 1, 16)
    with pytest.raises(UsageError, match="--finetune-layer-decay needs a ViT"):
        finetune(cnn, spec, pixels, y, 2, FinetuneOptions(epochs=1, batch_size=8, layer_decay=0.75),
                 torch.device("cpu"), progress=False)


def test_finetune_ends_with_batchnorm_statistics_of_its_training_images():
    """A short fine-tune leaves BatchNorm running statistics half-way between pretraining's and
    the augmented training batches'; they are recomputed on the training images, un-augmented
    and normalised as at prediction ("precise BN"). On 200 chest X-rays, 2 epochs, that took
    the pretrained encoder's top-1 from 0.50 (one class predicted) to 0.88 (BENCHMARKS.md)."""
    import copy

    from sslkit.data.loader import BatchLoader
    from sslkit.engine.batchnorm import recompute_batchnorm
    from sslkit.eval.finetune import FinetuneOptions, finetune
    from sslkit.registry import create_backbone
    from sslkit.spec import InputSpec

    spec = InputSpec(channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65535, (24, 1, 16, 16), dtype=np.uint16)
    y = np.arange(24) % 2
    torch.manual_seed(0)
    options = FinetuneOptions(epochs=1, batch_size=8, lr=1e-2)
    model = finetune(create_backbone("timm:resnet10t", 1, 16), spec, pixels, y, 2, options, torch.device("cpu"),
                     progress=False)
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not model.training
    expected = copy.deepcopy(model.encoder)  # the same weights, statistics averaged over the 24 images
    recompute_batchnorm(expected, BatchLoader(pixels, 8, options.seed), spec.mean, spec.std, torch.device("cpu"),
                        options.seed)
    want = [m for m in expected.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for got, ref in zip(bns, want):
        assert torch.allclose(got.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(got.running_var, ref.running_var, atol=1e-6)
    first = bns[0]  # and they are those images' statistics: the first layer's input is the normalised stem conv
    with torch.no_grad():
        x = (torch.from_numpy(pixels.astype(np.float32) / 65535) - 0.5) / 0.25
        conv = model.encoder.model.conv1[0](x) if isinstance(model.encoder.model.conv1, torch.nn.Sequential) \
            else model.encoder.model.conv1(x)
    assert torch.allclose(first.running_mean, conv.mean((0, 2, 3)), atol=1e-4)


def test_finetune_over_grouped_folds(tiny, cli, tmp_path):
    """``--finetune`` with ``--data --split group:K``: one fine-tune per fold and encoder, each
    scored on its fold's held-out patients, reported as mean ± std with the per-fold values."""
    data = tmp_path / "all"
    for part in ("train", "test"):
        for f in (tiny / part).rglob("*.png"):
            dest = data / f.parent.name / f"{part}-{f.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    rep = _json(cli("eval", "linear", tiny / "run", "--data", data, "--split", "group:2", "--C", "1",
                    "--finetune", "--finetune-epochs", "1", "--batch-size", "8", "--json", "--quiet"))
    n = sum(1 for _ in data.rglob("*.png"))
    for enc in ("pretrained", "random"):
        ft, lin = rep["results"][enc]["finetune"], rep["results"][enc]["linear"]
        assert ft["n"] == lin["n"] == n and len(ft["folds"]) == 2 and ft["epochs"] == 1
        assert sum(f["n"] for f in ft["folds"]) == n and ft["top1"] == pytest.approx(np.mean([f["top1"] for f in
                                                                                            ft["folds"]]))
    assert rep["gain"]["pretrained - random"]["finetune"]["se"] == "over folds"


def test_attention_on_a_1x1_cnn_map_is_the_input_gradient_not_a_constant_stretched_into_noise():
    """A ResNet at 32 px ends in a 1x1 map: its Grad-CAM is one value per image, and min-max scaling turned
    rounding error into speckles; such a backbone gets the input-gradient saliency, a 2x2 map Grad-CAM."""
    from sslkit.eval.attention import saliency
    from sslkit.registry import create_backbone

    torch.manual_seed(0)
    net = create_backbone("timm:resnet18", in_chans=1, image_size=32).eval()
    kind, maps = saliency(net, torch.randn(2, 1, 32, 32))
    assert kind.startswith("input gradient") and maps.shape == (2, 1, 32, 32)
    assert (maps.amax((2, 3)) == 1).all() and (maps.amin((2, 3)) == 0).all()
    assert saliency(net, torch.randn(2, 1, 64, 64))[0].startswith("Grad-CAM")


def _patients(n_patients: int = 60, per: int = 6, seed: int = 0):
    """Near-identical images per patient, labels drawn per patient: nothing to learn beyond identity."""
    rng = np.random.default_rng(seed)
    centres, labels = rng.normal(size=(n_patients, 32)), rng.integers(0, 2, n_patients)
    x = np.repeat(centres, per, 0) + 0.1 * rng.normal(size=(n_patients * per, 32))
    return x, np.repeat(labels, per), [f"p{i}" for i in np.repeat(np.arange(n_patients), per)]


def test_the_validation_split_keeps_each_patient_on_one_side():
    from sslkit.eval.linear import validation_split

    x, y, groups = _patients()
    tr, va = validation_split(y, 0.2, seed=3, groups=groups)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
    assert set(y[tr].tolist()) == set(y[va].tolist()) == {0, 1}  # stratified by each patient's class
    assert len({groups[i] for i in va}) == sum(round(0.2 * n) for n in np.bincount(y[::6]))
    # every group of one image: the per-image split as before, bit for bit
    singles = [str(i) for i in range(len(y))]
    assert all(np.array_equal(a, b) for a, b in zip(validation_split(y, 0.2, 3, singles), validation_split(y, 0.2, 3)))


def test_c_is_chosen_without_a_patient_on_both_sides():
    """Was: a patient's images on both sides of the validation split scored the weakest regularisation
    0.92 on labels that carry no signal (and chose it); grouped, every C scores about chance."""
    x, y, groups = _patients()
    leaky, fair = fit_linear_probe(x, y, 2), fit_linear_probe(x, y, 2, groups=groups)
    assert leaky.C == 1.0 and leaky.val_scores[leaky.C] > 0.9
    assert max(fair.val_scores.values()) < 0.65
