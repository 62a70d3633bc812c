"""A data file removed between the index and the cache key (or the fingerprint) is a skipped,
reported file, never a traceback that aborts the run (removed deterministically, not by a race)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sslkit.data.prepare as prep
from sslkit.data.cache import cache_key
from sslkit.data.pipeline import load_data
from sslkit.data.prepare import fingerprint
from tests.conftest import make_images


def _remove_after_readable(monkeypatch, victim: Path) -> None:
    """``readable`` sees every file; the victim is removed right after, before the cache key reads it."""
    original = prep.readable

    def then_remove(refs, relative=str):
        out = original(refs, relative)
        victim.unlink()
        return out

    monkeypatch.setattr(prep, "readable", then_remove)


def test_file_removed_before_the_cache_key_is_skipped_as_unreadable(tmp_path, monkeypatch):
    root = make_images(tmp_path / "data", n_per_class=3, size=24, channels=1)
    victim = root / "a" / "1.png"
    _remove_after_readable(monkeypatch, victim)
    data = load_data(f"folder:{root}", 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    prepared = data.prepared
    assert len(prepared) == 5 and all(r.path != str(victim) for r in prepared.refs)
    assert prepared.pixels.shape[0] == 5
    reasons = dict(prepared.skipped)
    assert reasons == {os.path.join("a", "1.png"): "unreadable: FileNotFoundError: No such file or directory"}
    assert str(tmp_path) not in repr(prepared.skipped)  # no absolute path (a patient's folder) in the reason
    # the entry written is the one a later run without the file reads: same key, nothing decoded again
    monkeypatch.undo()
    again = load_data(f"folder:{root}", 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    assert again.prepared.cache_path == prepared.cache_path and len(again.prepared) == 5


def test_cache_key_without_a_place_for_unreadable_files_still_raises(tmp_path):
    root = make_images(tmp_path / "data", n_per_class=1, size=24, channels=1)
    from sslkit.registry import create_source

    source = create_source(f"folder:{root}")
    refs = source.index()
    (root / "a" / "0.png").unlink()
    with pytest.raises(FileNotFoundError):
        cache_key(source, refs, 1, 16)
    gone: dict = {}
    key = cache_key(source, refs, 1, 16, gone)
    assert list(gone) == [0] and gone[0][1].startswith("unreadable: FileNotFoundError")
    assert key == cache_key(source, refs[1:], 1, 16)  # the key of the samples kept


def test_fingerprint_of_a_file_removed_after_decoding_is_one_note(tmp_path, capsys):
    root = make_images(tmp_path / "data", n_per_class=2, size=24, channels=1)
    from sslkit.registry import create_source

    refs = create_source(f"folder:{root}").index()
    before = fingerprint(refs, {"x": 1})
    (root / "b" / "1.png").unlink()
    after = fingerprint(refs, {"x": 1})
    assert after != before and len(after) == 16
    err = capsys.readouterr().err
    assert "1 samples' files were removed" in err and "1.png" not in err
