"""``eval tsne`` and ``eval attention`` decode only the samples they show (chosen from the index, no cache
entry written for them); ``eval`` reads DICOM headers through the header index as ``load_data`` does; a
cache-room refusal advises only options the running command has."""

from __future__ import annotations

import json
import re
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sslkit.errors import UsageError
from sslkit.registry import create_source
from tests.conftest import make_images, tiny_run


N_PER_CLASS = 15


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """30 images in classes a and b, and a one-step run on them."""
    root = tmp_path_factory.mktemp("sample-decode")
    make_images(root / "data", n_per_class=N_PER_CLASS, size=16)
    tiny_run(str(root / "data"), root / "run", 16)
    return root


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def count_loads(monkeypatch, fail: set[str] = frozenset()) -> list[str]:
    """The paths the folder source decodes from now on; those in ``fail`` raise as a damaged file does."""
    from sslkit.data.source import Undecodable
    from sslkit_plugins.sources.folder import FolderSource

    loads: list[str] = []
    real = FolderSource.load

    def load(self, ref):
        loads.append(ref.path)
        if ref.path in fail:
            raise Undecodable("damaged for the test")
        return real(self, ref)

    monkeypatch.setattr(FolderSource, "load", load)
    return loads


def cache_entries() -> set[str]:
    """The decoded-pixel cache's entries (32-hex-digit folders) under the tests' ``SSLKIT_CACHE_DIR``."""
    from sslkit.data.cache import default_cache_root

    root = default_cache_root()
    return {p.name for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)} if root.exists() else set()


def tsne_picks(refs: list, max_samples: int, seed: int, skip: int = 0) -> list[int]:
    """The indices ``eval tsne`` maps: the first ``max_samples`` of the seed's permutation (after the first
    ``skip``), in index order: the rule it had when it embedded everything first."""
    return sorted(np.random.default_rng(seed).permutation(len(refs))[skip:skip + max_samples].tolist())


def test_tsne_decodes_its_random_sample_only_and_writes_no_cache_entry(run, cli, monkeypatch):
    refs = create_source(str(run / "data")).index()
    assert len(refs) == 2 * N_PER_CLASS
    before = cache_entries()
    loads = count_loads(monkeypatch)
    out = run / "sample.png"
    rep = _json(cli("eval", "tsne", run / "run", "--data", run / "data", "--max-samples", "6", "--seed", "3",
                    "--out", out, "--json", "--quiet"))
    assert sorted(loads) == sorted(refs[i].path for i in tsne_picks(refs, 6, 3))  # 6 decodes, the seed's choice
    assert rep["data"]["data"] == {"source": str(run / "data"), "samples": 30, "plotted": 6, "unlabelled": 0,
                                   "skipped": {"files": 0, "reasons": {}}}
    assert rep["class_counts"]["plotted"] == {c: sum(refs[i].label == c for i in tsne_picks(refs, 6, 3))
                                              for c in rep["classes"]}
    assert rep["files"] == [str(out)] and out.stat().st_size > 5000
    assert cache_entries() == before  # a sample fills no cache entry


def test_tsne_replaces_a_pick_that_fails_to_decode_with_the_next_in_the_permutation(run, cli, monkeypatch):
    refs = create_source(str(run / "data")).index()
    first = int(np.random.default_rng(0).permutation(len(refs))[0])
    loads = count_loads(monkeypatch, fail={refs[first].path})
    rep = _json(cli("eval", "tsne", run / "run", "--data", run / "data", "--max-samples", "5", "--no-baseline",
                    "--out", run / "failing.png", "--json", "--quiet"))
    assert sorted(loads) == sorted(refs[i].path for i in tsne_picks(refs, 6, 0))  # the 5 picks, then 1 more
    assert rep["data"]["data"]["plotted"] == 5 and rep["data"]["data"]["samples"] == 29
    assert rep["data"]["data"]["skipped"] == {"files": 1, "reasons": {"damaged for the test": 1}}


def test_sample_embeddings_equal_those_of_the_whole_set(run):
    from sslkit.embed import sample_id
    from sslkit.data.pipeline import index_refs
    from sslkit.eval.features import embed_all, embed_sample, index_source, open_model
    from sslkit.eval.tsne import random_pick

    model = open_model(run / "run", "cpu")
    data = str(run / "data")
    source = index_source(model, data)
    refs = index_refs(source, data)
    pick = random_pick(len(refs), 7, 1)
    sample, failed = embed_sample(model, data, source, refs, pick, True, 4, False)
    whole = embed_all(model, data, True, 4, None, False)
    assert failed == 0 and sample["pretrained"].ids == [sample_id(source, refs[i]) for i in tsne_picks(refs, 7, 1)]
    assert set(sample) == set(whole) == {"pretrained", "random"}
    for name, emb in sample.items():
        rows = [whole[name].ids.index(i) for i in emb.ids]
        assert emb.labels == [whole[name].labels[r] for r in rows]
        np.testing.assert_allclose(emb.embeddings, whole[name].embeddings[rows], rtol=1e-4, atol=1e-5)


def test_embed_indexed_equals_embed_all(run):
    """What ``eval tsne`` embeds when it maps the whole set (already indexed) is what ``embed_all`` embeds."""
    from dataclasses import asdict

    from sslkit.data.pipeline import index_refs
    from sslkit.eval.features import embed_all, embed_indexed, index_source, open_model

    model = open_model(run / "run", "cpu")
    data = str(run / "data")
    source = index_source(model, data)
    got = embed_indexed(model, data, source, index_refs(source, data), True, 4, False)
    whole = embed_all(model, data, True, 4, None, False)
    assert set(got) == set(whole) == {"pretrained", "random"}
    for name, emb in got.items():
        mine, theirs = asdict(emb), asdict(whole[name])
        np.testing.assert_array_equal(mine.pop("embeddings"), theirs.pop("embeddings"))
        assert mine == theirs and len(mine["ids"]) == 2 * N_PER_CLASS


def test_tsne_of_the_whole_set_indexes_it_once(run, cli, monkeypatch):
    """``--max-samples`` no smaller than the set: the index tsne read first is the one decoded (it indexed the
    data a second time to embed it all)."""
    from sslkit_plugins.sources.folder import FolderSource

    indexed: list[str] = []
    real = FolderSource.index
    monkeypatch.setattr(FolderSource, "index", lambda self: indexed.append(str(self.root)) or real(self))
    loads = count_loads(monkeypatch)
    rep = _json(cli("eval", "tsne", run / "run", "--data", run / "data", "--max-samples", str(2 * N_PER_CLASS),
                    "--perplexity", "3", "--no-baseline", "--out", run / "whole.png", "--json", "--quiet"))
    assert len(indexed) == 1
    assert rep["data"]["data"]["samples"] == rep["data"]["data"]["plotted"] == 2 * N_PER_CLASS
    assert len(loads) in (0, 2 * N_PER_CLASS)  # through the cache: decoded all, or none when cached already


def test_attention_decodes_its_rows_only_spread_across_classes(run, cli, monkeypatch):
    from sslkit.eval.attention import pick_across_classes

    refs = create_source(str(run / "data")).index()
    rows = pick_across_classes([r.label for r in refs], 4)
    before = cache_entries()
    loads = count_loads(monkeypatch)
    rep = _json(cli("eval", "attention", run / "run", "--data", run / "data", "--max-images", "4", "--no-baseline",
                    "--out", run / "att.png", "--json", "--quiet"))
    assert loads == [refs[i].path for i in rows]  # 4 decodes, in row order
    assert [refs[i].label for i in rows] == ["a", "b", "a", "b"] and rep["class_counts"]["rows"] == {"a": 2, "b": 2}
    assert rep["data"]["data"] == {"source": str(run / "data"), "samples": 30, "rows": 4,
                                   "skipped": {"files": 0, "reasons": {}}}
    assert rep["image_size"] == [2 * 200, 4 * 200] and (run / "att.png").stat().st_size > 5000
    assert cache_entries() == before


def test_attention_replaces_a_row_that_fails_to_decode_within_its_class(run, cli, monkeypatch):
    from sslkit.eval.attention import pick_across_classes

    refs = create_source(str(run / "data")).index()
    labels = [r.label for r in refs]
    first = pick_across_classes(labels, 4)
    bad = first[1]  # the first "b" row
    left = [i for i in range(len(refs)) if i != bad]
    rows = [left[j] for j in pick_across_classes([labels[i] for i in left], 4)]  # b's rows spread over the rest
    loads = count_loads(monkeypatch, fail={refs[bad].path})
    rep = _json(cli("eval", "attention", run / "run", "--data", run / "data", "--max-images", "4", "--no-baseline",
                    "--out", run / "att-failing.png", "--json", "--quiet"))
    assert sorted(loads) == sorted(refs[i].path for i in set(first) | set(rows))  # each decoded once
    assert len(loads) < 8 and [labels[i] for i in rows] == ["a", "b", "a", "b"]
    assert rep["class_counts"]["rows"] == {"a": 2, "b": 2} and rep["data"]["data"]["samples"] == 29
    assert rep["data"]["data"]["skipped"]["files"] == 1


def test_a_sample_that_never_decodes_is_one_line_not_every_file_tried(tmp_path, monkeypatch):
    from sslkit.eval.features import decode_sample

    data = make_images(tmp_path / "d", n_per_class=40, size=16)
    source = create_source(str(data))
    refs = source.index()
    loads = count_loads(monkeypatch, fail={r.path for r in refs})

    def pick(failed: set[int]) -> list[int]:
        return [i for i in range(len(refs)) if i not in failed][:2]

    with pytest.raises(UsageError, match=r"^no decodable image among the 20 samples tried \(first: damaged"):
        decode_sample(source, refs, 3, 16, pick, lambda kept, px: None, False)
    assert len(loads) == 20  # 10 tries per pick, not all 80 files


def test_tsne_refuses_an_ambiguous_labels_row_before_decoding_whatever_the_pick(run, cli, monkeypatch, tmp_path):
    """A bare ``0.png`` names a/0.png and b/0.png: refused from the index, as eval knn refuses it, not only when
    the random pick holds both (seed 0's 4 picks hold neither: it was mapped, labelling whatever it matched)."""
    refs = create_source(str(run / "data")).index()
    picks = {Path(refs[i].path).relative_to(run / "data").as_posix() for i in tsne_picks(refs, 4, 0)}
    assert len(picks) == 4 and not picks & {"a/0.png", "b/0.png"}
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n0.png,x\n")
    loads = count_loads(monkeypatch)
    result = cli("eval", "tsne", run / "run", "--data", run / "data", "--labels", labels, "--max-samples", "4",
                 "--no-baseline", "--out", tmp_path / "m.png", "--json", "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --labels: row '0.png' matches 2 files in different folders; give each "
                                     "file its own row, with its path relative to the data folder (FOLDER/NAME)")
    assert loads == [] and not (tmp_path / "m.png").exists()


def test_decode_sample_never_returns_an_empty_pick(tmp_path, monkeypatch):
    """A choice rule that moves away from what decoded (attention's spread) can end, at the failure limit,
    with none of its picks decoded: one line, not an empty list (np.stack of no rows was a traceback)."""
    import sslkit.eval.features as features

    data = make_images(tmp_path / "d", n_per_class=4, size=16)
    source = create_source(str(data))
    refs = source.index()
    count_loads(monkeypatch, fail={r.path for r in refs[1:]})  # only refs[0] decodes
    monkeypatch.setattr(features, "TRIES_PER_PICK", 1)

    def pick(failed: set[int]) -> list[int]:  # [0, 1], then two picks past the failures, never 0 again
        return [0, 1] if not failed else [max(failed) + 1, max(failed) + 2]

    with pytest.raises(UsageError, match=r"^no decodable image among the 3 samples tried"):
        features.decode_sample(source, refs, 3, 16, pick, lambda kept, px: None, False)


# ---------------------------------------------------------------- the header index
def test_eval_reads_dicom_headers_through_the_header_index(run, cli, tmp_path, monkeypatch):
    """``index_labels`` (knn, linear, ...) and ``--color-by`` read the headers as ``load_data`` does: a second
    pass over unchanged files reads none (each read them all, every run)."""
    import sslkit_plugins.sources.dicom as dicom
    from sslkit.eval.features import index_labels, open_model
    from tests.dicom_factory import write_dicom

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(3):
            write_dicom(tmp_path / "dcm" / c / f"p{i}" / "1.dcm", rng.integers(0, 500, (24, 24)).astype(np.uint16),
                        patient_id=f"{c}{i}", modality="CT" if c == "a" else "MR")
    reads: list[str] = []
    real = dicom.read_header
    monkeypatch.setattr(dicom, "read_header", lambda path: reads.append(path) or real(path))
    data = f"dicom:{tmp_path / 'dcm'}"
    _, labels, refs, _, source = index_labels(open_model(run / "run", "cpu"), data, "--data", None, {"workers": 1})
    assert sorted(labels) == ["a"] * 3 + ["b"] * 3 and len(reads) == 6
    from sslkit.data.cache import default_cache_root

    assert source.header_cache == default_cache_root() / "headers"
    rep = _json(cli("eval", "tsne", run / "run", "--data", data, "--data-opt", "workers=1", "--color-by", "Modality",
                    "--perplexity", "1", "--no-baseline", "--out", tmp_path / "m.png", "--json", "--quiet"))
    assert rep["classes"] == ["CT", "MR"]
    index_labels(open_model(run / "run", "cpu"), data, "--data", None, {"workers": 1})
    assert len(reads) == 6  # the tsne run's pass and the second index_labels read no header


# ---------------------------------------------------------------- cache-room advice
def full_disk(monkeypatch) -> None:
    import sslkit.data.room as room

    usage = namedtuple("usage", "total used free")(2**30, 2**30, 1024)
    monkeypatch.setattr(room, "shutil", SimpleNamespace(disk_usage=lambda path: usage))


def test_room_advice_names_only_the_options_given(tmp_path, monkeypatch):
    from sslkit.data import room

    full_disk(monkeypatch)
    with pytest.raises(UsageError) as pretrain:
        room.check_room(tmp_path, 3 * 2**20, (48, 1, 32, 32), 1, 32, room.PRETRAIN_FLAGS)
    assert str(pretrain.value).endswith("1.0 KiB free; free space, choose another folder with --cache DIR, or lower "
                                        "--image-size (or --cache-size)")
    with pytest.raises(UsageError) as model_sized:  # embed, eval: neither --cache nor --image-size
        room.check_room(tmp_path, 3 * 2**20, (48, 1, 32, 32), 1, 32, frozenset({"--data", "--out"}))
    assert str(model_sized.value).endswith("1.0 KiB free; free space, or set SSLKIT_CACHE_DIR to a folder with room")
    monkeypatch.setattr(room, "available_memory", lambda: 2**20)
    with pytest.raises(UsageError) as memory:
        room.check_room(None, 3 * 2**20, (48, 1, 32, 32), 1, 32, frozenset())
    assert str(memory.value) == "48 images at 32 px need 3.0 MiB of memory, 1.0 MiB is available; free memory"
    with pytest.raises(UsageError) as no_cache:
        room.check_room(None, 3 * 2**20, (48, 1, 32, 32), 1, 32, room.PRETRAIN_FLAGS)
    assert str(no_cache.value).endswith("of memory with --no-cache, 1.0 MiB is available; lower --image-size (or "
                                        "--cache-size), or use the disk cache")
    with pytest.raises(UsageError) as sample:
        room.check_sample_room(1, 4096, frozenset())
    assert str(sample.value).startswith("image size 4096: resizing") and str(sample.value).endswith("; free memory")


def test_room_advice_of_pretrain_embed_and_eval_commands(run, cli, tmp_path, monkeypatch):
    full_disk(monkeypatch)
    data = make_images(tmp_path / "fresh", n_per_class=3, size=16, seed=7)  # no cache entry yet
    pretrain = cli("pretrain", "--task", "simclr", "--data", data, "--out", tmp_path / "r", "--backbone",
                   "timm:resnet10t", "--image-size", "16", "--batch-size", "4", "--max-steps", "1", "--quiet",
                   "--cache", tmp_path / "cache")
    assert pretrain.exit_code == 2, pretrain.output
    assert "free space, choose another folder with --cache DIR, or lower --image-size (or --cache-size)" in \
        pretrain.stderr
    for args in (["embed", run / "run", "--data", data, "--out", tmp_path / "e.npz"],
                 ["eval", "knn", run / "run", "--train", data, "--test", data, "--allow-overlap"]):
        result = cli(*args, "--quiet")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].endswith("free space, or set SSLKIT_CACHE_DIR to a folder with room"), lines
        assert "--cache" not in lines[0] and "--image-size" not in lines[0]
