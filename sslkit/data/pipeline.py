"""From ``--data`` to a prepared pixel array: the one way every command reads data."""

from __future__ import annotations

import gc
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sslkit.data.cache import mark_root, resolve_cache_dir
from sslkit.data.prepare import FINGERPRINT_SCHEMES, Prepared, fingerprint, majority_channels, prepare
from sslkit.data.source import Source
from sslkit.data.splits import split_refs
from sslkit.errors import UsageError, reports_here
from sslkit.output_file import read_json
from sslkit.data.volume import sample_mode, stored_size
from sslkit.registry import create_source
from sslkit.run import DATA_REPORT, RUN_JSON


@dataclass
class LoadedData:
    source: Source
    prepared: Prepared  # the training samples (the validation part, if any, is left out)
    channels: int
    split: dict[str, Any] = field(default_factory=dict)  # for run.json: counts only
    val_refs: list = field(default_factory=list)  # the held-out samples (run.json's val_fingerprint reads
    # them, on rank 0 alone under torchrun: sslkit.engine.setup)


def load_data(data: str, image_size: int, channels: int | None = None,
              source_options: dict[str, Any] | None = None, cache_dir: str | Path | bool | None = None,
              progress: bool = True, val_fraction: float = 0.0, seed: int = 0, workers: int = 0,
              max_pixels: int | None = None) -> LoadedData:
    """Index and decode ``data`` once; skipped files (index + decode) are in ``prepared.skipped``
    as ``(path relative to the data root, reason)``, one row per file.

    ``cache_dir``: ``None`` = the default cache (``$SSLKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/sslkit``, else ``~/.cache/sslkit``), ``False`` or ``""`` = in memory.
    ``val_fraction`` holds out whole groups (patients) with :func:`split_refs`; they are
    neither decoded nor trained on: ``split`` records their count, ``val_refs`` holds them (the caller
    fingerprints them for run.json, once).
    ``max_pixels``: the largest image (width x height) any decoder may open (None: the
    default, :data:`~sslkit.data.source.DEFAULT_MAX_PIXELS`; 0: no limit).
    """
    source = open_source(data, source_options, cache_dir, max_pixels)
    refs = index_refs(source, data)
    return load_refs(source, refs, data, image_size, channels, cache_dir, progress, val_fraction, seed, workers)


def open_source(data: str, source_options: dict[str, Any] | None = None, cache_dir: str | Path | bool | None = None,
                max_pixels: int | None = None) -> Source:
    """The source of ``data`` as :func:`load_data` reads it: ``source_options``, the decode limit
    ``max_pixels`` (None: the source's own), and the header index under the cache root's ``headers/``
    (``cache_dir`` as in :func:`load_data`; none without a disk cache). Nothing is indexed yet."""
    source = create_source(data, **(source_options or {}))
    if max_pixels is not None:
        source.max_pixels = max_pixels
    root = resolve_cache_dir(cache_dir)
    if root is not None:
        mark_root(root)
    source.header_cache = root / "headers" if root is not None else None
    return source


def index_refs(source: Source, data: str) -> list:
    """``source.index()``, its skipped files made relative to the data root (as the loader reports
    them); none found is one line (``no images found in DATA``, with the count skipped as unreadable).
    The garbage collector skips what existed before (:func:`_new_objects_only`), for every caller."""
    with _new_objects_only():
        refs = source.index()
    source.skipped = [(source.relative(p), r) for p, r in source.skipped]
    if not refs:
        extra = f" ({len(source.skipped)} files skipped as unreadable)" if source.skipped else ""
        raise UsageError(f"no images found in {data!r}{extra}")
    return refs


def sample_format(source: Source, refs: Sequence[Any], channels: int | None, image_size: int) -> tuple[int, Any]:
    """The channels and stored size (:func:`~sslkit.data.volume.stored_size`) the samples ``refs`` of
    ``source`` are decoded at: ``channels`` (None: the majority's own), checked from the headers
    (:func:`check_channels`) before anything is decoded."""
    own = majority_channels(source, refs)
    check_channels(source, own, channels)
    return channels or own, stored_size(source, image_size)


def check_channels(source: Source, own: int, channels: int | None) -> None:
    """Refuse, before decoding, a ``--channels`` the source's samples cannot become: ``own`` channels
    that are not colour planes (a slab's slices, stacked windows) mixed into one as if they were
    RGB, or a count that converts to no other (5 slices to 3)."""
    if not channels or channels == own:
        return
    graph = source.graph_preprocessing()
    why = (f"slices of a {sample_mode(source).describe().get('sample')} sample" if sample_mode(source).slab > 1
           else "stacked windows" if graph.kind == "window" and len(graph.lower) > 1 else None)
    if why or own not in (1, 3):
        raise UsageError(f"--channels {channels}: the data gives {own} channels"
                         + (f" ({why}, not colour planes to mix)" if why else "")
                         + f"; leave --channels out (or give {own})")


def load_refs(source: Source, refs: list, data: str, image_size: int, channels: int | None = None,
              cache_dir: str | Path | bool | None = None, progress: bool = True, val_fraction: float = 0.0,
              seed: int = 0, workers: int = 0) -> LoadedData:
    """:func:`load_data` of ``refs``, ``source``'s index (:func:`open_source`, :func:`index_refs`), so
    that data indexed already is not indexed again: split, check (:func:`sample_format`), decode."""
    with _new_objects_only():
        train, val = split_refs(refs, val_fraction, seed)
        split = {}
        if val:
            split = {"val_fraction": val_fraction, "val_samples": len(val), "val_groups": len({r.group for r in val}),
                     "train_groups": len({r.group for r in train})}
            held = len(val) / len(refs)
            if abs(held - val_fraction) > max(0.05, val_fraction / 2) and reports_here():  # whole groups; once
                print(f"note: --val-fraction {val_fraction:g} held out {held:.0%} of the samples ({len(val)} of "
                      f"{len(refs)}, {split['val_groups']} of {split['val_groups'] + split['train_groups']} groups): "
                      f"patients (groups) are never split", file=sys.stderr)
        channels, size = sample_format(source, train, channels, image_size)
        prepared = prepare(source, train, channels, size, cache_dir, progress, workers)
    prepared.skipped = list(source.skipped) + list(prepared.skipped)
    if not len(prepared):
        raise UsageError(
            f"no decodable image in {data!r}: all {len(train)} samples failed to decode "
            f"(first: {prepared.skipped[0][1] if prepared.skipped else 'unknown'})"
        )
    return LoadedData(source, prepared, channels, split, val)


@contextmanager
def _new_objects_only():
    """Python's cyclic garbage collector skips what existed before the pass (modules, torch,
    plugins: ~400,000 objects): indexing and decoding make many long-lived objects, which
    trigger full collections that each walk all of them (~0.1 ms per small DICOM file, a
    fifth of a first pass). They are collected as usual again afterwards (unfreeze)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def summary_line(samples: int, skipped: list[tuple[str, str]], shown: int = 4,
                 where: str = " (reasons in data_report.json)") -> str:
    """``"1234 images; 5 files skipped (reasons in data_report.json): 2 x unreadable header, ..."``.

    Reasons are counted by their text before the first ``:``; the ``shown`` most common
    are named and the rest summed as ``and N more (K other reasons)``, so the counts
    always add up to the number skipped. ``where``: where the full reasons are ("": nowhere).
    """
    line = f"{samples} images"
    if skipped:
        reasons: dict[str, int] = {}
        for _, reason in skipped:
            key = " ".join(reason.split(":")[0].split())[:80]
            reasons[key] = reasons.get(key, 0) + 1
        ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        parts = [f"{n} x {k}" for k, n in ranked[:shown]]
        rest = ranked[shown:]
        if rest:
            parts.append(f"and {sum(n for _, n in rest)} more ({len(rest)} other reason{'s' * (len(rest) > 1)})")
        line += f"; {len(skipped)} files skipped{where}: {', '.join(parts)}"
    return line


def report_summary(run_dir: str | Path) -> str | None:
    """The summary line of ``RUN_DIR/data_report.json`` when files were skipped, else None."""
    report = read_json(Path(run_dir) / DATA_REPORT)
    skipped = [(f.get("file", f.get("path")), f["reason"]) for f in report.get("skipped_files", [])]
    return summary_line(report.get("samples", 0), skipped) if skipped else None


def check_resume_data(saved: dict[str, Any], now: dict[str, Any], allow_change: bool,
                      decoding: Sequence[str] = ()) -> str | None:
    """Whether a run may resume on the data it finds now (``--resume``).

    ``saved`` and ``now`` are ``run.json``'s ``dataset`` records (``fingerprint`` from
    :func:`~sslkit.data.prepare.fingerprint`: the content of every file, so a replaced
    image is found even with its name and size unchanged). Changed data is refused with
    one line unless ``allow_change`` (``--allow-data-change``); then a note is returned.
    A run recorded without a fingerprint is not checked. ``decoding``: the keys of the source's
    ``describe()`` that differ from the run's (this sslkit decodes the same files differently).
    """
    before, after = saved.get("fingerprint"), now.get("fingerprint")
    if not before or before == after:
        return None
    what = (f"{saved.get('samples', '?')} samples then, {now.get('samples', '?')} now" if saved.get("samples")
            != now.get("samples") else f"{now.get('samples', '?')} samples, content differs")
    if decoding and saved.get("samples") == now.get("samples"):  # the files may be the same; the decoding is not
        what = f"this sslkit decodes them differently: {', '.join(decoding)} in the source's description changed"
    if not allow_change:
        raise UsageError(f"--resume: the data changed since this run started ({what}); pass "
                         f"--allow-data-change to continue on it with the run's normalisation, or start a new run")
    return (f"note: the data changed since this run started ({what}); continuing on it, with the run's "
            f"input spec (normalisation) unchanged")


def drift_note(saved: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> str | None:
    """On ``--resume``: a note when the data as decoded now has a per-channel mean more than half the
    run's std away from the mean the run recorded (``saved``: its ``input_spec``), however the
    fingerprint fared: files edited in place between its sampled blocks, or a newer sslkit that
    decodes them otherwise (a MINISWHITE TIFF now inverted). The run keeps its own mean/std."""
    was, scale = saved.get("mean") or [], saved.get("std") or []
    if len(was) != len(mean) or len(scale) != len(mean):
        return None
    worst = max(abs(a - b) / max(s, 1e-6) for a, b, s in zip(mean, was, scale))
    if worst <= 0.5:
        return None
    shown = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
    return (f"note: the data decoded now has mean {shown(mean)} where this run recorded {shown(was)} (std "
            f"{shown(scale)}): files changed in place, or this sslkit decodes them otherwise; training goes on "
            f"with the run's normalisation")


def changed_keys(was: Any, now: Any) -> list[str]:
    """The keys whose values differ between two ``describe()`` records (``now`` as run.json would
    hold it); none when either is not a record."""
    if not isinstance(was, dict) or not isinstance(now, dict):
        return []
    now = json.loads(json.dumps(now, default=str))
    return sorted(k for k in {*was, *now} if was.get(k) != now.get(k))


def resume_input_spec(run_dir: str | Path, prepared: Prepared, preprocessing: Any,
                      allow_change: bool, stats: tuple[Sequence[float], Sequence[float]] | None = None
                      ) -> dict[str, Any] | None:
    """On ``--resume``: refuse changed data (:func:`check_resume_data`) and return the run's
    saved ``input_spec`` (None when run.json has none), which a resumed run keeps: its
    mean/std are what the encoder was trained with, whatever the data is now. ``stats``: the
    data's mean and std now, for :func:`drift_note`."""
    saved = read_json(Path(run_dir) / RUN_JSON)
    if not saved:
        return None
    dataset = saved.get("dataset") or {}
    scheme = dataset.get("fingerprint_scheme", "content-v2")  # a run recorded before schemes were named
    if scheme not in FINGERPRINT_SCHEMES:
        raise UsageError(f"--resume: run.json's dataset fingerprint scheme {scheme!r} is not one this sslkit knows "
                         f"({', '.join(FINGERPRINT_SCHEMES)}); resume it with the sslkit that started it")
    now = {"fingerprint": fingerprint(prepared.refs, preprocessing, scheme), "samples": len(prepared)}
    decoding = changed_keys((saved.get("input_spec") or {}).get("preprocessing"), preprocessing)
    note = check_resume_data(dataset, now, allow_change, decoding)
    drift = drift_note(saved.get("input_spec") or {}, *stats) if stats and not note else None
    for line in (note, drift) if reports_here() else ():  # once, not once per process
        if line:
            print(line, file=sys.stderr)
    return saved.get("input_spec")
