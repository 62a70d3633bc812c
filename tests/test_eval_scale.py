"""Evaluation at scale: memory that does not grow with the data, same results as before.

Fine-tuning reads the decoded cache's rows batch by batch (no copy of every labelled image),
the label-efficiency curve holds one fold's embeddings at a time, the kNN's query chunk fits a
memory budget, and the --train/--test overlap check reads in full only files that can be equal.
"""

from __future__ import annotations

import gc
import json
import shutil
import tracemalloc
import weakref

import numpy as np
import pytest

from tests.conftest import make_images, tiny_run


# --- fine-tuning: the cache's rows, not a copy ----------------------------------------------------
@pytest.fixture(scope="module")
def ft_data(tmp_path_factory):
    """A labelled folder (one file per patient) and a 1-step run at 96 px: 3 x 96 x 96 uint16 per image."""
    root = tmp_path_factory.mktemp("scale")
    make_images(root / "data", n_per_class=40, size=16, seed=0)
    make_images(root / "test", n_per_class=20, size=16, seed=1)
    tiny_run(str(root / "data"), root / "run", 96)
    return root


def _handed(monkeypatch):
    """Replace ``_finetune_each`` by a spy that keeps what it is handed and reads one batch of each side."""
    from sslkit.eval import probes

    seen = []

    def spy(prep, run, xtr, ytr, xte, yte, options, dev, args, paired=True):
        seen.append((xtr, ytr, xte, yte))
        for x in (xtr, xte):
            x[np.arange(2)]
        return {e: {"n": len(yte)} for e in prep.sets}

    monkeypatch.setattr(probes, "_finetune_each", spy)
    return seen


@pytest.mark.parametrize("mode", ["split", "train/test"])
def test_finetune_is_handed_the_cache_rows_and_copies_no_image(ft_data, monkeypatch, mode):
    """``pixels[keep]`` and each fold's ``pixels[at[train]]``, ``pixels[at[test]]`` copied the labelled
    images into memory (twice over with a split). Now the fine-tune gets rows of the memory-mapped cache."""
    from sslkit.eval import probes
    from sslkit.eval.finetune import FinetuneOptions

    args = (probes.DataArgs(data=str(ft_data / "data"), split="group:3", baseline=False, progress=False)
            if mode == "split" else probes.DataArgs(train=str(ft_data / "data"), test=str(ft_data / "test"),
                                                    baseline=False, progress=False))
    prep = probes.prepare(str(ft_data / "run"), args)
    seen = _handed(monkeypatch)
    report = {"results": {"pretrained": {}}}
    probes._add_finetune(report, prep, args, FinetuneOptions(epochs=1))  # once untraced: imports, caches
    seen.clear()
    tracemalloc.start()
    try:
        probes._add_finetune(report, prep, args, FinetuneOptions(epochs=1))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        x0 = seen[0][0]
        copy = x0[np.arange(len(x0))]  # a copy of one side's rows, as the old code held: tracemalloc sees it
        copied = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tr, te = prep.sets["pretrained"]
    image = 3 * 96 * 96 * 2
    labelled = image * (len(tr.labels) + (len(te.labels) if mode == "train/test" else 0))  # 80 + 40 or 80
    assert peak < labelled / 10, f"+{peak} B while fine-tuning on {labelled} B of labelled images"
    assert copied >= copy.nbytes == len(x0) * image >= labelled / 3
    assert len(seen) == (3 if mode == "split" else 1)
    for xtr, ytr, xte, yte in seen:
        for x, y in ((xtr, ytr), (xte, yte)):
            assert isinstance(x.pixels, np.memmap) and len(x) == len(y)
            assert x.shape == (len(y), 3, 96, 96) and x.ndim == 4
            idx = np.array([len(x) - 1, 0, 1])
            np.testing.assert_array_equal(x[idx], np.asarray(x.pixels)[x.at[idx]])
    if mode == "split":  # every labelled image is tested once, in its own fold's rows
        tested = np.sort(np.concatenate([s[2].at for s in seen]))
        np.testing.assert_array_equal(tested, np.sort(seen[0][0].at.tolist() + seen[0][2].at.tolist()))


@pytest.mark.parametrize("mode", ["split", "train/test"])
def test_finetune_scores_equal_those_of_copied_pixels(ft_data, cli, monkeypatch, tmp_path, mode):
    """Bit for bit the report of the old code, which fine-tuned and predicted on in-memory copies."""
    import sslkit.eval.finetune as ft

    small = tmp_path / "small"
    for cls in ("a", "b"):  # 12 images at 96 px: a quick fine-tune
        for f in sorted((ft_data / "data" / cls).glob("*.png"))[:6]:
            (small / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, small / cls / f.name)
    data = (["--data", small, "--split", "group:2"] if mode == "split"
            else ["--train", small, "--test", ft_data / "test"])
    args = ["eval", "linear", ft_data / "run", *data, "--C", "1", "--finetune", "--finetune-epochs", "1",
            "--batch-size", "4", "--json", "--quiet"]
    kinds: list[str] = []
    real_ft, real_pp = ft.finetune, ft.predict_proba

    def copied(pixels):
        kinds.append(type(pixels).__name__)
        return np.ascontiguousarray(pixels[np.arange(len(pixels))])  # the old pixels[at[...]]

    new = cli(*args)
    assert new.exit_code == 0, new.output
    monkeypatch.setattr(ft, "finetune", lambda enc, spec, px, *a, **k: real_ft(enc, spec, copied(px), *a, **k))
    monkeypatch.setattr(ft, "predict_proba", lambda m, spec, px, *a, **k: real_pp(m, spec, copied(px), *a, **k))
    old = cli(*args)
    assert old.exit_code == 0, old.output
    assert set(kinds) == {"Rows"} and len(kinds) == 2 * 2 * (2 if mode == "split" else 1)
    got, want = json.loads(new.stdout)["results"], json.loads(old.stdout)["results"]
    assert set(got) == {"pretrained", "random"}
    for enc in got:
        assert got[enc]["finetune"] == want[enc]["finetune"]
    assert json.loads(new.stdout)["gain"] == json.loads(old.stdout)["gain"]


# --- the label-efficiency curve: one fold at a time -------------------------------------------------
def _folded(n=120, d=6, k=3, seed=0, folds=True):
    from sslkit.eval.labels import Labelled
    from sslkit.eval.probes import ProbeData
    from sslkit.eval.split import group_folds

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    labels, groups = [["a", "b", "c"][v] for v in y], [f"p{i // 2}" for i in range(n)]
    sets = {}
    for enc, sep in (("pretrained", 1.5), ("random", 0.2)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        x[np.arange(n), y] += sep
        s = Labelled(x, labels, 0, [f"id{i}" for i in range(n)], groups=groups)
        sets[enc] = (s, s)
    if not folds:  # a --train/--test pair: the first 80 samples train, the rest test
        from sslkit.eval.probes import take_samples

        tr, te = np.arange(80), np.arange(80, n)
        sets = {e: (take_samples(s, tr), take_samples(s, te)) for e, (s, _) in sets.items()}
        return ProbeData(None, sets, ["a", "b", "c"], None)
    return ProbeData(None, sets, ["a", "b", "c"], None, group_folds(y, groups, k, seed))


def _reference(prep, fractions, k, seed):
    """The curve as defined: for every fraction and fold, the probes on the fold's stratified subset
    (seed ``seed + 1000 * fold``), then each metric's mean and std over folds."""
    from sslkit.eval.curve import fraction_name, label_subset
    from sslkit.eval.probes import ProbeData, knn_results, linear_results, take_samples
    from sslkit.eval.split import mean_std

    out, correct = {}, {}
    for f in fractions:
        per_fold = []
        for i in range(len(prep.folds) if prep.folds is not None else 1):
            fold = prep.fold(i) if prep.folds is not None else prep
            tr0 = fold.sets["pretrained"][0]
            idx = label_subset(fold.indices(tr0.labels), f, seed + 1000 * i)
            sub = ProbeData(None, {e: (take_samples(tr, idx), te) for e, (tr, te) in fold.sets.items()},
                            prep.classes, prep.positive)
            labels = sub.sets["pretrained"][0].labels
            counts = {"train_labels": len(labels), "fewest_per_class": min(labels.count(c) for c in prep.classes)}
            lin, knn = linear_results(sub, [0.1, 1.0], 0.2, seed), knn_results(sub, [k])
            name = fraction_name(f)
            per_fold.append({e: {f"linear f={name}": {**lin[e]["linear"], **counts},
                                 f"k={k} f={name}": {**knn[e][f"k={k}"], **counts}} for e in lin})
            correct.update({(e, f"{s} f={name}"): c for (e, s), c in sub.correct.items()})
        for enc in per_fold[0]:
            for setting in per_fold[0][enc]:
                agg = mean_std([r[enc][setting] for r in per_fold])
                ns = [r[enc][setting]["train_labels"] for r in per_fold]
                agg["train_labels"] = ns[0] if len(set(ns)) == 1 else float(np.mean(ns))
                agg["fewest_per_class"] = min(r[enc][setting]["fewest_per_class"] for r in per_fold)
                agg["fraction"] = f
                out.setdefault(enc, {})[setting] = agg
    return out, correct


@pytest.mark.parametrize("folds", [True, False])
def test_curve_equals_the_per_fold_per_fraction_definition(folds):
    from sslkit.eval.curve import curve_results

    prep = _folded(folds=folds)
    got = curve_results(prep, [0.5, 0.1, 1], k=5, C_grid=[0.1, 1.0], seed=3)
    want, correct = _reference(_folded(folds=folds), [0.1, 0.5, 1.0], 5, 3)
    assert json.dumps(got) == json.dumps(want)  # same numbers, same key order
    assert list(got["pretrained"]) == ["linear f=0.1", "k=5 f=0.1", "linear f=0.5", "k=5 f=0.5", "linear f=1",
                                       "k=5 f=1"]
    assert list(prep.correct) == ([] if folds else list(correct))
    for key, c in correct.items() if not folds else ():
        np.testing.assert_array_equal(prep.correct[key], c)


def test_curve_holds_one_folds_embeddings_at_a_time(monkeypatch):
    """Every fold was cut before the first probe: K copies of the embeddings in memory at once."""
    from sslkit.eval.curve import curve_results
    from sslkit.eval.probes import ProbeData

    cut, alive_at_cut = [], []
    real = ProbeData.fold

    def counting(self, i):
        gc.collect()
        alive_at_cut.append(sum(r() is not None for r in cut))
        fold = real(self, i)
        cut.extend(weakref.ref(s.x) for pair in fold.sets.values() for s in pair)
        return fold

    monkeypatch.setattr(ProbeData, "fold", counting)
    prep = _folded(k=4)
    curve_results(prep, [0.2, 1], k=3, C_grid=[1.0])
    assert alive_at_cut == [0, 0, 0, 0]  # each fold's arrays are gone before the next is cut
    assert len(cut) == 4 * 2 * 2


# --- kNN: a query chunk within a memory budget --------------------------------------------------------
def test_knn_query_chunk_fits_the_budget():
    from sslkit.eval.knn import CHUNK_BYTES, MAX_CHUNK, query_chunk

    assert query_chunk(10_000, 200, 2) == MAX_CHUNK  # small data: as before
    for n, kmax, classes in ((100_000, 200, 2), (1_000_000, 20, 10), (50_000, 200, 1000)):
        m = query_chunk(n, kmax, classes)
        assert 1 <= m < MAX_CHUNK
        assert m * (4 * n + kmax * (24 + 16 * classes)) <= CHUNK_BYTES < (m + 1) * (4 * n + kmax * (24 + 16 * classes))
    assert query_chunk(10**9, 200, 2) == 1  # never zero
    assert query_chunk(0, 0, 2) == MAX_CHUNK  # no training sample: no division by zero


def test_knn_votes_in_budgeted_chunks_equal_the_1024_query_chunks(monkeypatch):
    from sslkit.eval import knn

    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((3000, 16)).astype(np.float32), rng.standard_normal((700, 16)).astype(np.float32)
    test[:4] = train[:4]  # exact matches: tied similarities
    y = rng.integers(0, 3, 3000)
    monkeypatch.setattr(knn, "CHUNK_BYTES", 2**20)
    assert knn.query_chunk(3000, 200, 3) == 39  # 2**20 // (4 * 3000 + 200 * (24 + 16 * 3)): 18 chunks
    calls = []
    real_topk = knn.torch.Tensor.topk
    monkeypatch.setattr(knn.torch.Tensor, "topk", lambda t, *a, **kw: calls.append(t.shape) or real_topk(t, *a, **kw))
    got = knn.knn_votes(train, y, test, 3, [20, 200])
    assert calls[0] == (39, 3000) and calls[-1] == (700 - 17 * 39, 3000) and len(calls) == 18
    monkeypatch.setattr(knn.torch.Tensor, "topk", real_topk)
    want = knn.knn_votes(train, y, test, 3, [20, 200], chunk=1024)
    for k in (20, 200):
        np.testing.assert_array_equal(got[k], want[k])


# --- the --train/--test overlap check: only files that can be equal are read in full -----------------
def test_overlap_reads_in_full_only_files_whose_quick_digest_both_sides_have(tmp_path, monkeypatch, capsys):
    from sslkit.api import SampleRef
    from sslkit.eval import overlap

    rng = np.random.default_rng(0)
    tr, te = tmp_path / "train", tmp_path / "test"
    tr.mkdir(), te.mkdir()
    blobs = [rng.bytes(20_000 + 100 * i) for i in range(6)]  # different sizes
    for i, b in enumerate(blobs):
        (tr / f"p{i}.bin").write_bytes(b)
    (te / "renamed.bin").write_bytes(blobs[0])  # same content, another name: found
    (te / "same_size.bin").write_bytes(rng.bytes(len(blobs[1])))  # same size, other bytes: not overlap
    ends = bytearray(blobs[2])
    ends[10_000] ^= 1  # same size, first and last 4 KiB: read in full, not overlap
    (te / "same_ends.bin").write_bytes(bytes(ends))
    (te / "other.bin").write_bytes(rng.bytes(12_345))  # no size in common: never read in full
    read = []
    real = overlap.file_sha256
    monkeypatch.setattr(overlap, "file_sha256", lambda paths: read.extend(paths) or real(paths))
    a = [SampleRef(str(f)) for f in sorted(tr.iterdir())]
    b = [SampleRef(str(f)) for f in sorted(te.iterdir())]
    o = overlap.check_overlap(a, b, True, progress=True)
    assert o.indexed == 1 and o.test[str(te / "renamed.bin")] == o.train[str(tr / "p0.bin")]
    assert sorted(read) == sorted(str(p) for p in (tr / "p0.bin", te / "renamed.bin", tr / "p2.bin",
                                                   te / "same_ends.bin"))
    assert capsys.readouterr().err.splitlines() == ["overlap check: 0/4 file"]
    # the verdicts of reading every file in full: the same count, scored on every subset of samples
    full_tr, full_te = overlap.content_keys(a), overlap.content_keys(b)
    assert set(o.train) == set(full_tr) and set(o.test) == set(full_te)
    for keep_tr in ([r.id for r in a], [r.id for r in a][1:], []):
        want = sum(full_te[i] in {full_tr[j] for j in keep_tr} for i in full_te)
        assert o.scored(keep_tr, list(o.test)) == want
    with pytest.raises(Exception, match="share 1 of the 4 test images"):
        overlap.check_overlap(a, b, False)


def test_overlap_of_a_folder_with_itself_and_frames_of_one_file(tmp_path):
    from sslkit.api import SampleRef
    from sslkit.eval.overlap import check_overlap

    make_images(tmp_path / "d", n_per_class=3, size=8)
    refs = [SampleRef(str(f)) for f in sorted((tmp_path / "d").rglob("*.png"))]
    assert check_overlap(refs, refs, True).indexed == 6
    frames = [SampleRef(refs[0].path, 0), SampleRef(refs[0].path, 1)]  # same file, other frame: not the image
    assert check_overlap(frames[:1], frames[1:], True).indexed == 0
    assert check_overlap(frames, frames[1:], True).indexed == 1
    gone = SampleRef(str(tmp_path / "missing.png"))  # unreadable: left out, as before
    o = check_overlap([gone, refs[0]], [gone], True)
    assert o.indexed == 0 and o.train.keys() == {refs[0].id} and o.test == {}
