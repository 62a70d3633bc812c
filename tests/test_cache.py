"""Decoded-pixel cache: read once, reused by later epochs and runs, invalidated by changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sslkit.data.pipeline import load_data
from sslkit_plugins.sources.dicom import DicomSource
from sslkit_plugins.sources.folder import FolderSource
from sslkit.pseudonym import file_key
from tests.conftest import force_decode_pool, make_images
from tests.dicom_factory import write_dicom


@pytest.fixture
def dicom_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "scans"
    for i in range(6):
        img = (rng.random((40, 40)) * 3000 + i * 100).astype(np.uint16)
        write_dicom(root / f"p{i}" / "img.dcm", img, patient_id=f"P{i}", syntax=("explicit", "rle")[i % 2],
                    slope=1.0, intercept=-1024.0, modality="CT")
    return root


@pytest.fixture
def count_loads(monkeypatch):
    """Count DicomSource.load calls (decoding is serial for so few files, so in this process)."""
    calls = []
    original = DicomSource.load

    def counting(self, ref):
        calls.append(ref.id)
        return original(self, ref)

    monkeypatch.setattr(DicomSource, "load", counting)
    return calls


def test_second_run_reads_no_dicom_and_window_change_invalidates(dicom_folder, tmp_path, count_loads):
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert len(count_loads) == 6 and first.prepared.cache_path
    count_loads.clear()
    again = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert count_loads == []  # served from the memory-mapped cache
    assert isinstance(again.prepared.pixels, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.prepared.pixels), np.asarray(first.prepared.pixels))
    # a different window is a different preprocessing: decoded again, new entry
    lung = load_data(f"dicom:{dicom_folder}", 24, source_options={"window": "lung"}, cache_dir=cache, progress=False)
    assert len(count_loads) == 6 and lung.prepared.cache_path != first.prepared.cache_path
    assert not np.array_equal(np.asarray(lung.prepared.pixels), np.asarray(first.prepared.pixels))
    # so is a different size
    count_loads.clear()
    load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    assert len(count_loads) == 6


def test_changed_file_invalidates_the_cache(dicom_folder, tmp_path, count_loads):
    cache = tmp_path / "cache"
    before = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    count_loads.clear()
    f = dicom_folder / "p0" / "img.dcm"
    stat = f.stat()
    write_dicom(f, np.full((40, 40), 7, np.uint16) + np.eye(40, dtype=np.uint16) * 900, patient_id="P0",
                slope=1.0, intercept=-1024.0, modality="CT")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime restored
    after = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert len(count_loads) == 6 and after.prepared.cache_path != before.prepared.cache_path
    i = [Path(r.path) for r in after.prepared.refs].index(f)
    assert not np.array_equal(np.asarray(after.prepared.pixels[i]), np.asarray(before.prepared.pixels[i]))


def test_no_cache_keeps_pixels_in_memory(dicom_folder, tmp_path, count_loads, monkeypatch):
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "default-cache"))
    data = load_data(f"dicom:{dicom_folder}", 24, cache_dir="", progress=False)
    assert data.prepared.cache_path is None and not (tmp_path / "default-cache").exists()
    # cache_dir=None is the default cache location
    data = load_data(f"dicom:{dicom_folder}", 24, progress=False)
    assert Path(data.prepared.cache_path).parent == tmp_path / "default-cache"


def test_pretrain_decodes_each_file_once_and_survives_a_truncated_file(dicom_folder, tmp_path, cli, count_loads):
    good = dicom_folder / "p1" / "img.dcm"
    broken = dicom_folder / "p9" / "broken.dcm"
    broken.parent.mkdir()
    broken.write_bytes(good.read_bytes()[: good.stat().st_size - 700])  # truncated RLE pixel data
    cut = dicom_folder / "p9" / "cut.dcm"
    raw = (dicom_folder / "p0" / "img.dcm").read_bytes()
    cut.write_bytes(raw[: len(raw) - 700])  # truncated uncompressed pixel data
    run = tmp_path / "run"
    result = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"dicom:{dicom_folder}",
                 "--out", run, "--epochs", "3",
                 "--batch-size", "2", "--image-size", "32", "--cache", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(count_loads) == sorted({*count_loads})  # every sample decoded once over 3 epochs
    assert len(count_loads) == 8
    report = json.loads((run / "data_report.json").read_text())
    assert report["samples"] == 6 and report["skipped"] == 2
    reasons = {f["file"]: f["reason"] for f in report["skipped_files"]}
    assert set(reasons) == {file_key("p9/broken.dcm"), file_key("p9/cut.dcm")}  # keyed paths below the root
    assert "truncated" in reasons[file_key("p9/broken.dcm")] and "less than expected" in reasons[file_key("p9/cut.dcm")]
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"]["samples"] == 6
    assert "data: 6 images; 2 files skipped (reasons in data_report.json)" in result.output  # end-of-run summary


def test_cache_listing_and_clearing(dicom_folder, tmp_path, cli, count_loads):
    cache = tmp_path / "cache"
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    entries = json.loads(cli("data", "cache", "--cache", cache, "--json").output)
    assert len(entries) == 1 and entries[0]["samples"] == 6 and entries[0]["shape"] == [6, 1, 24, 24]
    assert entries[0]["source"] == f"dicom:{dicom_folder}" and entries[0]["bytes"] >= 6 * 24 * 24 * 2
    assert json.loads(cli("data", "cache", "--cache", cache, "--clear-older-than", "1", "--json").output) == []
    r = cli("data", "cache", "--cache", cache, "--clear")
    assert r.exit_code == 0 and "removed: 1" in r.output
    assert [p.name for p in cache.iterdir()] == [".sslkit-cache"]  # only sslkit's marker is left
    count_loads.clear()
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert len(count_loads) == 6


def test_parallel_decode_and_index_equal_serial(pydicom_dir, monkeypatch):
    """Spawned worker processes give the same pixels, skips and headers as one process."""
    from sslkit.data import prepare as prep
    from sslkit.data.parallel import parallel_map
    from sslkit.registry import create_source
    from sslkit_plugins.sources.dicom import read_header

    src = create_source(f"dicom:{pydicom_dir}", workers=1)
    refs = src.index()
    serial = prep.prepare(src, refs, 1, 16, cache_dir=False, progress=False, workers=1)
    force_decode_pool(monkeypatch, 2)  # the first sample here, the rest in the workers
    parallel = prep.prepare(src, refs, 1, 16, cache_dir=False, progress=False, workers=2)
    assert [r.id for r in parallel.refs] == [r.id for r in serial.refs] and parallel.skipped == serial.skipped
    np.testing.assert_array_equal(parallel.pixels, serial.pixels)
    files = sorted({r.path for r in refs})[:40]
    assert parallel_map(read_header, files, workers=2, min_parallel=0) == [read_header(f) for f in files]


def test_later_runs_reread_only_changed_headers(dicom_folder, tmp_path, monkeypatch):
    import sslkit_plugins.sources.dicom as dicom_plugin

    reads = []
    original = dicom_plugin.read_header
    monkeypatch.setattr(dicom_plugin, "read_header", lambda f: reads.append(f) or original(f))
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    assert len(reads) == 6
    reads.clear()
    again = load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    assert reads == [] and again.prepared.refs == first.prepared.refs  # same refs, groups included
    changed = dicom_folder / "p3" / "img.dcm"
    write_dicom(changed, np.zeros((40, 40), np.uint16) + 5, patient_id="P3-new", modality="MR")
    load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    # the changed file, and one unchanged file per stored patient group (the index keeps no
    # group hash, so a group is recovered by reading one of its files; here every patient has one)
    assert reads[0] == str(changed) and sorted(reads[1:]) == sorted(
        str(f) for f in dicom_folder.glob("p*/img.dcm") if f != changed)
    reads.clear()
    load_data(f"dicom:{dicom_folder}", 16, cache_dir="", progress=False)  # --no-cache: no header cache either
    assert len(reads) == 6


class CrashesInWorkers:
    """Mixed into the folder source: loading image b/4 kills a worker process (as a
    crashing codec or the OOM killer would), never this one."""

    def load(self, ref):
        import multiprocessing

        if multiprocessing.current_process().name != "MainProcess":
            if os.environ.get("SSLKIT_TEST_WORKER_MARKS"):  # which workers loaded samples
                Path(os.environ["SSLKIT_TEST_WORKER_MARKS"], str(os.getpid())).touch()
            if ref.path.endswith("/b/4.png"):
                os._exit(3)
        return super().load(ref)


class Crashing(CrashesInWorkers, FolderSource):
    """At module level, so that spawned workers unpickle it (a class made inside the test was not
    importable there: the pool broke at once and the test decoded everything in this process)."""


def test_a_decode_worker_that_dies_leaves_the_rest_to_this_process(tmp_path, monkeypatch):
    """Chunks alternate between this process and the workers; after a worker dies every
    sample is still decoded once, in order, as one process decodes them."""
    from sslkit.data import prepare as prep

    images = make_images(tmp_path / "img", n_per_class=12, size=20)
    source = Crashing(str(images))
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("SSLKIT_TEST_WORKER_MARKS", str(marks))
    refs = source.index()
    serial = prep.prepare(source, refs, 3, 16, cache_dir=False, progress=False, workers=1)
    force_decode_pool(monkeypatch, 2)
    shared = prep.prepare(source, refs, 3, 16, cache_dir=False, progress=False, workers=2)
    assert [r.id for r in shared.refs] == [r.id for r in serial.refs] and len(serial.refs) == 24
    np.testing.assert_array_equal(shared.pixels, serial.pixels)
    assert list(marks.iterdir()), "no worker loaded a sample: the pool never ran"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [
    lambda e: (e / "index.json").write_bytes(b"\xff{not json"),
    lambda e: (e / "index.json").write_text("[0, 1]"),
    lambda e: (e / "index.json").write_text(json.dumps({**json.loads((e / "index.json").read_text()),
                                                        "kept": [0, 1, 99]})),
    lambda e: (e / "index.json").unlink(),
    lambda e: _truncate(e / "pixels.npy"),
    lambda e: (e / "pixels.npy").unlink(),
    lambda e: np.save(e / "pixels.npy", np.zeros((6, 1, 8, 8), np.uint16)),
], ids=["not-json", "not-an-object", "index-out-of-range", "no-index", "truncated-pixels", "no-pixels",
        "wrong-shape"])
def test_a_damaged_cache_entry_is_reported_and_decoded_again(dicom_folder, tmp_path, count_loads, capsys, damage):
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    expected = np.array(first.prepared.pixels)
    entry = Path(first.prepared.cache_path)
    del first
    damage(entry)
    count_loads.clear()
    capsys.readouterr()
    again = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    err = capsys.readouterr().err
    assert f"cache entry {entry.name} is damaged" in err and "decoding again" in err and "Traceback" not in err
    assert len(count_loads) == 6 and again.prepared.cache_path == str(entry)  # rebuilt in place
    np.testing.assert_array_equal(np.asarray(again.prepared.pixels), expected)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []  # nothing left aside
    count_loads.clear()
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert count_loads == [] and "damaged" not in capsys.readouterr().err


def test_unusable_entries_are_listed_and_cleared(dicom_folder, tmp_path, cli):
    cache = tmp_path / "cache"
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    old = cache / ("a" * 32)  # an older sslkit's format: its key can never be asked for again
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": 1, "kept": [0]}))
    (old / "pixels.npy").write_bytes(b"\0" * 4096)
    broken = cache / ("b" * 32)  # killed mid-way by something outside sslkit: no index
    broken.mkdir()
    (broken / "pixels.npy").write_bytes(b"\0" * 100)
    (cache / "notes").mkdir()  # not sslkit's: neither listed nor touched
    entries = {e["key"]: e for e in json.loads(cli("data", "cache", "--cache", cache, "--json").output)}
    assert len(entries) == 3 and sum(e["usable"] for e in entries.values()) == 1
    assert entries["a" * 32]["bytes"] == 4096 + len((old / "index.json").read_bytes())
    assert entries["b" * 32]["samples"] == 0 and entries["b" * 32]["source"] is None
    listing = cli("data", "cache", "--cache", cache).output
    assert listing.count("never read") == 2 and "entries: 3" in listing
    r = cli("data", "cache", "--cache", cache, "--clear")
    assert r.exit_code == 0 and "removed: 3" in r.output
    assert sorted(p.name for p in cache.iterdir()) == [".sslkit-cache", "notes"]


@pytest.mark.parametrize("damage", [
    lambda files: [],  # "files" not an object
    lambda files: {k: 5 for k in files},  # entries not [header, group]
    lambda files: {k: [h, "P0"] for k, (h, _) in files.items()},  # a group that is not a number
    lambda files: {k: ["header", g] for k, (_, g) in files.items()},
], ids=["files-list", "entry-int", "group-str", "header-str"])
def test_a_damaged_header_index_reads_the_headers_again(dicom_folder, tmp_path, monkeypatch, damage):
    import sslkit_plugins.sources.dicom as dicom_plugin

    reads = []
    original = dicom_plugin.read_header
    monkeypatch.setattr(dicom_plugin, "read_header", lambda f: reads.append(f) or original(f))
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    (store,) = (cache / "headers").iterdir()
    saved = json.loads(store.read_text())
    store.write_text(json.dumps({**saved, "files": damage(saved["files"])}))
    reads.clear()
    again = load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    assert len(reads) == 6 and again.prepared.refs == first.prepared.refs
    reads.clear()
    load_data(f"dicom:{dicom_folder}", 16, cache_dir=cache, progress=False)
    assert reads == []  # the index was written afresh


def test_an_entry_whose_use_time_cannot_be_set_is_still_read(dicom_folder, tmp_path, count_loads, capsys,
                                                             monkeypatch):
    """A cache shared read-only: marking "last used" fails, the entry is read all the same."""
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    count_loads.clear()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "utime", read_only)
    again = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert count_loads == [] and again.prepared.cache_path == first.prepared.cache_path
    assert "damaged" not in capsys.readouterr().err


def test_pretrain_over_a_damaged_cache_entry_says_so_once_and_trains(dicom_folder, tmp_path, cli):
    def pretrain(out):
        return cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"dicom:{dicom_folder}",
                   "--out", out, "--max-steps", "2", "--batch-size", "2", "--image-size", "32",
                   "--cache", tmp_path / "cache", "--quiet")

    assert pretrain(tmp_path / "run1").exit_code == 0
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and len(p.name) == 32]
    _truncate(entry / "pixels.npy")
    result = pretrain(tmp_path / "run2")
    assert result.exit_code == 0, result.output
    assert result.output.count("is damaged") == 1 and "decoding again" in result.output
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "run2" / "data_report.json").read_text())["samples"] == 6


def test_the_cache_stays_private_under_a_permissive_umask(cli, dicom_folder, tmp_path):
    """Decoded pixels and the header index are 0600 in 0700 folders whatever the umask (run
    outputs follow the umask; the cache holds patients' pixels and is never shared)."""
    import stat

    saved = os.umask(0o022)
    try:
        result = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data",
                     f"dicom:{dicom_folder}", "--out", tmp_path / "run", "--max-steps", "1", "--batch-size", "2",
                     "--image-size", "32", "--cache", tmp_path / "cache", "--quiet")
    finally:
        os.umask(saved)
    assert result.exit_code == 0, result.output
    modes = {str(p.relative_to(tmp_path / "cache")): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "cache").rglob("*")}
    assert any(k.endswith("pixels.npy") for k in modes) and any(k.startswith("headers") for k in modes), sorted(modes)
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o700 if (tmp_path / "cache" / k).is_dir() else 0o600)}
    assert not wrong, wrong
