"""Decoded-pixel cache faults: a read-only cache, a user's folder with a key's name, the
data path typed two ways, an entry edited after it was written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sslkit.data.pipeline import load_data
from sslkit.engine.data_setup import cache_build_lock
from sslkit.errors import UsageError
from sslkit_plugins.sources.dicom import DicomSource
from tests.test_cache import dicom_folder  # noqa: F401 (the fixture)


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    original = DicomSource.load
    monkeypatch.setattr(DicomSource, "load", lambda self, ref: calls.append(ref.id) or original(self, ref))
    return calls


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` behave as a read-only mount (root ignores chmod): every call that would
    create, change or delete something in it fails with EROFS."""
    inside = str(folder.resolve()) + os.sep

    def denied(path):
        if os.path.abspath(os.fspath(path)).startswith(inside):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def guard(name, writes=lambda *a, **k: True):
        original = getattr(os, name)

        def call(path, *args, **kwargs):
            if writes(*args, **kwargs):
                denied(path)
            return original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, call)

    guard("open", lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    for name in ("mkdir", "rmdir", "unlink", "utime", "rename", "replace"):
        guard(name)


def load(data: str, cache: Path):
    with cache_build_lock(str(cache)):  # as pretrain does (sslkit.engine.data_setup.load_run_data)
        return load_data(data, 24, cache_dir=str(cache), progress=False)


def test_a_read_only_cache_is_read_and_a_missing_entry_is_one_line(dicom_folder, tmp_path, count_loads,
                                                                    monkeypatch):
    cache = tmp_path / "cache"
    first = load(f"dicom:{dicom_folder}", cache)
    expected = np.array(first.prepared.pixels)
    count_loads.clear()
    read_only(monkeypatch, cache)
    again = load(f"dicom:{dicom_folder}", cache)  # no lock needed to read a complete entry
    assert count_loads == [] and again.prepared.cache_path == first.prepared.cache_path
    np.testing.assert_array_equal(np.asarray(again.prepared.pixels), expected)
    assert (cache / ".sslkit-cache.lock").is_file()  # taken shared, through a read-only descriptor
    with pytest.raises(UsageError) as missing:  # another size: no entry, none can be written
        with cache_build_lock(str(cache)):
            load_data(f"dicom:{dicom_folder}", 16, cache_dir=str(cache), progress=False)
    assert "Read-only file system" in str(missing.value) and "--no-cache" in str(missing.value)
    assert "free space" not in str(missing.value) and "\n" not in str(missing.value)


def test_a_damaged_entry_in_a_read_only_cache_is_one_line(dicom_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    entry = Path(load(f"dicom:{dicom_folder}", cache).prepared.cache_path)
    (entry / "pixels.npy").write_bytes((entry / "pixels.npy").read_bytes()[:-100])
    (cache / ".sslkit-cache.lock").unlink()  # never written there: read without a lock
    read_only(monkeypatch, cache)
    with pytest.raises(UsageError) as damaged:
        load(f"dicom:{dicom_folder}", cache)
    text = str(damaged.value)
    assert f"entry {entry.name} is damaged" in text and "cannot be replaced" in text and "\n" not in text
    assert (entry / "pixels.npy").exists()


def test_clearing_leaves_a_users_folder_with_a_key_name(dicom_folder, tmp_path, cli):
    cache = tmp_path / "cache"
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    mine = cache / ("0123456789abcdef" * 2)
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "index.json").write_text("{}")  # a name sslkit uses too: the folder is still not sslkit's
    listing = cli("data", "cache", "--cache", cache)
    assert "entries: 1" in listing.output and mine.name not in listing.output
    r = cli("data", "cache", "--cache", cache, "--clear")
    assert r.exit_code == 0 and "removed: 1" in r.output, r.output
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "index.json").read_text() == "{}"
    assert f"left {str(mine)!r}" in r.output
    assert sorted(p.name for p in cache.iterdir()) == [".sslkit-cache", mine.name]


@pytest.mark.parametrize("how", [["--clear"], ["--clear-older-than", "0"]], ids=["all", "older-than"])
def test_clearing_a_read_only_cache_says_so_in_one_line(dicom_folder, tmp_path, cli, monkeypatch, how):
    cache = tmp_path / "cache"
    entry = Path(load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False).prepared.cache_path)
    read_only(monkeypatch, cache)
    r = cli("data", "cache", "--cache", cache, *how)
    assert r.exit_code == 2 and "removed:" not in r.output, r.output
    assert f"cannot delete in {str(entry)!r}: Read-only file system" in r.output
    assert (entry / "pixels.npy").is_file() and (entry / "index.json").is_file()


def test_clearing_a_cache_folder_that_does_not_exist_is_one_line(tmp_path, cli, monkeypatch):
    """A mistyped --cache with --clear said "removed: 0 (0.0 MB)" and exit 0."""
    r = cli("data", "cache", "--cache", tmp_path / "cahce", "--clear")
    assert r.exit_code == 2 and r.output.strip() == f"error: no cache folder {str(tmp_path / 'cahce')!r}; nothing deleted"
    r = cli("data", "cache", "--cache", tmp_path / "cahce")  # listing said "entries: 0"
    assert r.exit_code == 2 and r.output.strip() == f"error: no cache folder {str(tmp_path / 'cahce')!r}; nothing to list"
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "env-typo"))
    r = cli("data", "cache", "--clear")
    assert r.exit_code == 2 and "no cache folder" in r.output and "env-typo" in r.output


def test_the_key_does_not_depend_on_how_the_data_path_is_typed(dicom_folder, tmp_path, count_loads, monkeypatch):
    cache = tmp_path / "cache"
    absolute = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    count_loads.clear()
    monkeypatch.chdir(tmp_path)
    relative = load_data("dicom:scans", 24, cache_dir=cache, progress=False)
    (tmp_path / "link").symlink_to(dicom_folder)
    linked = load_data("dicom:./link/", 24, cache_dir=cache, progress=False)
    assert count_loads == []
    assert absolute.prepared.cache_path == relative.prepared.cache_path == linked.prepared.cache_path


def _zero(entry: Path) -> None:
    pixels = np.load(entry / "pixels.npy", mmap_mode="r+")
    pixels[:] = 0
    pixels.flush()


def _edit_kept(entry: Path) -> None:  # one sample fewer, the shape made to agree
    meta = json.loads((entry / "index.json").read_text())
    meta["kept"], meta["shape"][0] = meta["kept"][1:], meta["shape"][0] - 1
    (entry / "index.json").write_text(json.dumps(meta))


def _edit_kept_only(entry: Path) -> None:
    meta = json.loads((entry / "index.json").read_text())
    meta["kept"] = meta["kept"][:-1]
    (entry / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_zero, _edit_kept, _edit_kept_only], ids=["zeroed", "kept-and-shape", "kept"])
def test_an_entry_changed_after_it_was_written_is_decoded_again(dicom_folder, tmp_path, count_loads, capsys,
                                                               damage):
    cache = tmp_path / "cache"
    first = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    expected, entry = np.array(first.prepared.pixels), Path(first.prepared.cache_path)
    del first
    damage(entry)
    count_loads.clear()
    capsys.readouterr()
    again = load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert f"entry {entry.name} is damaged" in capsys.readouterr().err and len(count_loads) == 6
    np.testing.assert_array_equal(np.asarray(again.prepared.pixels), expected)
    # an entry written before the check (no "check" in its index) is still read
    meta = json.loads((entry / "index.json").read_text())
    del meta["check"]
    (entry / "index.json").write_text(json.dumps(meta))
    count_loads.clear()
    load_data(f"dicom:{dicom_folder}", 24, cache_dir=cache, progress=False)
    assert count_loads == [] and "damaged" not in capsys.readouterr().err


def test_a_cache_write_failure_names_only_the_running_commands_flags(tmp_path):
    """embed and eval have no --cache or --no-cache: their line names SSLKIT_CACHE_DIR (it advised both)."""
    import click

    from sslkit.cli import main
    from sslkit.data.cache import disk_full_error

    full = OSError(errno.ENOSPC, "No space left on device")
    head = f"cannot write the decoded-pixel cache in {str(tmp_path)!r} (3.0 MiB): No space left on device; "
    assert str(disk_full_error(tmp_path, full, 3 * 2**20)) == (
        head + "free space, choose another folder with --cache DIR, or use --no-cache")
    with click.Context(main.commands["embed"]):
        assert str(disk_full_error(tmp_path, full, 3 * 2**20)) == (
            head + "free space, or set SSLKIT_CACHE_DIR to a folder with room")
    read_only = OSError(errno.EROFS, "Read-only file system")
    with click.Context(main.commands["pretrain"]):
        assert str(disk_full_error(tmp_path, read_only, 3 * 2**20)).endswith(
            "Read-only file system; choose another folder with --cache DIR, or use --no-cache")


def test_a_cache_folder_that_cannot_be_made_names_only_the_running_commands_flags(tmp_path):
    """mark_root (every command's first touch of the cache) advised --cache DIR and --no-cache to embed and eval."""
    import click

    from sslkit.cli import main
    from sslkit.data.cache import mark_root

    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder's parent should be: it cannot be made
    head = f"cache folder {str(blocked / 'cache')!r} cannot be written: Not a directory; "
    with pytest.raises(UsageError) as outside:
        mark_root(blocked / "cache")
    assert str(outside.value) == head + "choose another folder with --cache DIR, or use --no-cache"
    for command in (main.commands["embed"], main.commands["eval"].commands["tsne"]):
        with click.Context(command), pytest.raises(UsageError) as err:
            mark_root(blocked / "cache")
        assert str(err.value) == head + "set SSLKIT_CACHE_DIR to a folder with room"
