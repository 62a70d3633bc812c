"""``check_source``: a source indexes real files, loads [0, 1] pixels, reports damage, pickles."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sslkit.options import option_names
from sslkit.testing.registry import resolve

#: samples whose values (only) :func:`check_source` checks are in [0, 1], besides ``max_samples`` fully checked
RANGE_SAMPLES = 64


def check_source(source: Any, location: str, *, tmp_path: Path, options: Any = None, max_samples: int = 8,
                 damaged_file_raises: bool = True, other_options: Any = None) -> dict[str, Any]:
    """Check source ``source`` (a registered scheme or the Source class) on ``location``.

    Builds ``SourceClass(location, options)`` as sslkit does (``options``: an instance of
    its ``Options``, a dict of its fields, or None) and checks: ``scheme`` is the registered
    name; ``index()`` gives ``SampleRef`` objects whose ``path`` is an existing file;
    ``load`` of up to ``max_samples`` of them gives float32 ``(C, H, W)`` in [0, 1] with
    ``C`` as ``channels_of`` says (a source whose ``sample`` is a volumetric
    ``SampleMode``, ``--sample volume``: ``(C, D, H, W)`` of exactly its ``size``, what
    training stores), and that of up to :data:`RANGE_SAMPLES` more, spread over the index
    (all of a smaller one), values in [0, 1] (the first pass skips a sample that is not); the
    source pickles and the copy loads the same pixels;
    ``describe()`` is JSON-serialisable; ``sniff`` is in [0, 1] and 0 for an empty folder; and, with
    ``damaged_file_raises`` (turn it off only for sources that read no files), a truncated
    copy of a sample's file gives no pixels, neither to ``load`` nor to a source of its own
    on the copy (:func:`_check_damaged`); and
    ``graph_preprocessing()`` is a ``GraphPreprocessing`` that survives the run's InputSpec
    (JSON, as ``run.json`` stores it) unchanged, names only fields of ``Options`` as baked-in
    options, and (a ``window`` graph) has one window per loaded channel, so ``sslkit export
    --with-preprocessing`` accepts it; ``options_not_in_cache_key`` names only fields of
    ``Options``, and, given ``other_options`` (as ``options``), where a source built with them
    loads other pixels for the same samples, its decoded-pixel cache key differs
    (:func:`_check_cache_key`). Returns ``{"scheme", "samples", "loaded", "channels",
    "damaged", "graph", "cache_key"}``.
    """
    from sslkit.api import SampleRef, Source, Undecodable
    from sslkit.data.volume import sample_mode

    name, cls = resolve("sources", source)
    assert isinstance(cls, type) and issubclass(cls, Source), f"{source!r} is not a subclass of sslkit.api.Source"
    assert name is None or cls.scheme == name, f"{cls.__name__}.scheme is {cls.scheme!r}, registered as {name!r}"
    src = cls(location, _options(cls, options))
    refs = src.index()
    assert isinstance(refs, list) and refs, f"{cls.__name__}.index() found nothing in {location!r}"
    for ref in refs:
        assert isinstance(ref, SampleRef), f"{cls.__name__}.index() returned {type(ref).__name__}, not SampleRef"
        assert os.path.isfile(ref.path), f"SampleRef.path {ref.path!r} is not an existing file"
    picked = refs[:: max(1, len(refs) // max_samples)][:max_samples]
    volume = sample_mode(src).size if sample_mode(src).volumetric else None
    channels = {_check_load(src, cls, ref, volume) for ref in picked}
    _check_more_ranges(src, cls, refs, picked)
    _check_pickles(src, cls, picked[0])
    _check_describe(src, cls)
    graph = _check_graph_preprocessing(src, cls, channels)
    _check_sniff(cls, location, Path(tmp_path))
    keyed = _check_cache_key(src, cls, picked, None if other_options is None else _options(cls, other_options))
    damaged = "not checked (damaged_file_raises=False)"
    if damaged_file_raises:
        damaged = _check_damaged(src, picked[0], Path(tmp_path), Undecodable)
    return {"scheme": name or cls.scheme, "samples": len(refs), "loaded": len(picked), "channels": sorted(channels),
            "damaged": damaged, "graph": graph, "cache_key": keyed}


def _options(cls: type, options: Any) -> Any:
    """``options`` as ``cls(location, options)`` takes them: a dict of ``Options`` fields is built."""
    if isinstance(options, dict):
        assert cls.Options is not None, f"{cls.__name__} has no Options dataclass but options were given"
        return cls.Options(**options)
    return options


def _check_cache_key(src: Any, cls: type, refs: list[Any], other: Any) -> str:
    """``options_not_in_cache_key`` names ``Options`` fields; a source built with ``other``
    options that loads other pixels for ``refs`` has another decoded-pixel cache key (the
    core keys every option but those declared pixel-neutral: one declared wrongly is caught)."""
    from sslkit.data.cache import cache_key

    fields = option_names(cls.Options)
    unknown = sorted(set(cls.options_not_in_cache_key) - fields)
    assert not unknown, f"{cls.__name__}.options_not_in_cache_key names {unknown}, not fields of " \
                        f"{cls.__name__}.Options"
    if other is None:
        return "not checked (no other_options)"
    changed = sorted(k for k in fields if getattr(src.options, k, None) != getattr(other, k, None))
    second = cls(src.location, other)
    theirs = {ref.id: ref for ref in second.index()}  # indexed first: a source may load by what index() saw
    refs = [ref for ref in refs if ref.id in theirs]
    if not refs:
        return "another options value, other samples"
    if all(np.array_equal(src.load(ref), second.load(theirs[ref.id])) for ref in refs):
        return "another options value, the same pixels"
    assert cache_key(src, refs, 1, 32) != cache_key(second, refs, 1, 32), \
        f"{cls.__name__}: options {changed} change the pixels but not the decoded-pixel cache key: a run would " \
        f"read pixels decoded with the old value (options_not_in_cache_key is for options that never change pixels)"
    return "another options value, other pixels: another cache key"


def _check_load(src: Any, cls: type, ref: Any, volume: tuple[int, ...] | None) -> int:
    """``load(ref)``: float32 ``(C, H, W)`` (volumes: ``(C, *volume)``) in [0, 1], ``C`` as
    ``channels_of`` says; returns ``C``."""
    from sslkit.data.volume import sample_mode

    x = src.load(ref)
    what = f"{cls.__name__}.load({ref.id!r})"
    assert isinstance(x, np.ndarray) and x.dtype == np.float32, f"{what}: want a float32 numpy array, got " \
                                                               f"{type(x).__name__} {getattr(x, 'dtype', '')}"
    if volume is not None:
        assert x.ndim == 4 and x.shape[0] >= 1 and x.shape[1:] == tuple(volume), \
            f"{what}: sampling volumes of {tuple(volume)}, want (C, {', '.join(map(str, volume))}), got {x.shape}"
    else:
        assert x.ndim == 3 and x.shape[0] >= 1 and min(x.shape[1:]) >= 1, f"{what}: want (C, H, W), got {x.shape}"
        most = 4 * sample_mode(src).slab  # grey, RGB(A); a slab of K slices: K times that
        assert x.shape[0] <= most, f"{what}: samples are (C, H, W) with at most {most} channels, got {x.shape}" + \
            (" (channels last? return x.transpose(2, 0, 1))" if x.shape[-1] in (1, 3, 4) else "")
    _check_unit_range(x, what)
    declared = src.channels_of(ref)
    assert declared is None or declared == x.shape[0], f"{what}: channels_of says {declared}, loaded {x.shape[0]}"
    return int(x.shape[0])


def _check_unit_range(x: np.ndarray, what: str) -> None:
    """Finite values in [0, 1] (the first pass skips a sample that is not, naming the source)."""
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0, \
        f"{what}: values must be in [0, 1], got [{x.min()}, {x.max()}]"


def _check_more_ranges(src: Any, cls: type, refs: list[Any], picked: list[Any]) -> None:
    """The values of up to :data:`RANGE_SAMPLES` samples spread over the index (every one of a
    smaller index) besides ``picked`` are in [0, 1]: a load, no more, for each. One that raises
    is left to the checks of ``picked`` (the first pass skips it with its reason)."""
    seen = {id(ref) for ref in picked}
    for ref in refs[:: max(1, len(refs) // RANGE_SAMPLES)][:RANGE_SAMPLES]:
        if id(ref) in seen:
            continue
        try:
            x = np.asarray(src.load(ref))
        except Exception:
            continue
        _check_unit_range(x, f"{cls.__name__}.load({ref.id!r})")


def _check_describe(src: Any, cls: type) -> None:
    """``describe()`` goes into run.json and the cache key: JSON values only."""
    try:
        json.dumps(src.describe())
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{cls.__name__}.describe() must return JSON-serialisable values (it is stored in "
                             f"run.json): {exc}") from None


def _check_pickles(src: Any, cls: type, ref: Any) -> None:
    """The source pickles (the first decoding pass runs in worker processes) and the copy
    loads the same pixels."""
    try:
        copy = pickle.loads(pickle.dumps(src))
    except Exception as exc:
        raise AssertionError(f"{cls.__name__} does not pickle (the first decoding pass runs in worker "
                             f"processes): {type(exc).__name__}: {exc}") from None
    assert np.array_equal(copy.load(ref), src.load(ref)), f"{cls.__name__}: a pickled copy loads different pixels"


def _check_graph_preprocessing(src: Any, cls: type, channels: set[int]) -> str:
    """``graph_preprocessing()``: what ``sslkit export --with-preprocessing`` builds from the
    run's InputSpec, checked the way it is stored (JSON) and read back."""
    from sslkit.api import GraphPreprocessing, InputSpec, UsageError, raw_input_for
    from sslkit.raw_input import graph_preprocessing_of

    what = f"{cls.__name__}.graph_preprocessing()"
    try:
        declared = src.graph_preprocessing()
    except Exception as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from None
    assert isinstance(declared, GraphPreprocessing), \
        f"{what} returned {type(declared).__name__}, not sslkit.api.GraphPreprocessing"
    c = next(iter(channels)) if len(channels) == 1 else 1
    spec = InputSpec(c, 32, (0.5,) * c, (0.25,) * c, source=cls.scheme, preprocessing=src.describe(),
                     graph_preprocessing=declared.to_json())
    try:
        stored = json.loads(json.dumps(spec.to_dict()))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{what} does not serialise into run.json: {exc}") from None
    assert graph_preprocessing_of(InputSpec.from_dict(stored)) == declared, \
        f"{what} reads back from run.json as something else: {stored['graph_preprocessing']}"
    fields = option_names(cls.Options)
    unknown = sorted(set(declared.options) - fields)
    assert not unknown, f"{what} bakes in options {unknown} that are not fields of {cls.__name__}.Options"
    if declared.kind == "window" and len(channels) == 1:
        try:
            raw_input_for(spec, True)
        except UsageError as exc:
            raise AssertionError(f"{what}: sslkit export --with-preprocessing refuses it: {exc}") from None
    return declared.kind


def _check_sniff(cls: type, location: str, tmp_path: Path) -> None:
    empty = tmp_path / "sniff-empty"
    empty.mkdir(parents=True, exist_ok=True)
    assert float(cls.sniff(empty)) == 0.0, f"{cls.__name__}.sniff claims an empty folder"
    if Path(location).exists():
        score = float(cls.sniff(Path(location)))
        assert 0.0 <= score <= 1.0, f"{cls.__name__}.sniff({location!r}) = {score}, must be in [0, 1]"


def _check_damaged(src: Any, ref: Any, tmp_path: Path, undecodable: type) -> str:
    """A copy of ``ref``'s file cut to a few bytes must be reported, both ways a run could
    meet it: ``load`` of it raises (a lookup error is allowed: a source that finds samples by
    what ``index()`` saw never read the copy; so is an array where the location is the file
    itself), and a source of its own on the copy (or on its folder) refuses it, lists it in
    ``skipped``, or raises on every load. The report names the first that applies."""
    data = Path(ref.path).read_bytes()
    bad = tmp_path / "damaged" / Path(ref.path).name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(data[: min(64, len(data) // 2)])
    on_file = Path(src.location).resolve() == Path(ref.path).resolve()
    loaded = None
    try:
        x = src.load(dataclasses.replace(ref, path=str(bad)))
    except undecodable as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), "Undecodable needs a one-line reason"
        loaded = f"load raises Undecodable: {exc}"
    except LookupError:  # the source looks a sample up in what index() read: the copy was never decoded
        pass
    except Exception as exc:  # any error is recorded and skipped by the pipeline
        loaded = f"load raises {type(exc).__name__}"
    else:
        if not on_file:
            _returned(src, x)
    fresh = _fresh_source_on(src, bad if on_file else bad.parent)  # always: raises if it makes up pixels
    return loaded or fresh


def _fresh_source_on(src: Any, location: Path) -> str:
    """What a source of ``src``'s class built on ``location`` (holding the damaged copy) does with it."""
    try:
        other = type(src)(str(location), src.options)
        refs = other.index()
    except Exception as exc:
        return f"a source on the damaged file refuses it: {type(exc).__name__}"
    if other.skipped or not refs:
        return "a source on the damaged file skips it"
    for r in refs:
        try:
            x = other.load(r)
        except Exception:
            continue
        _returned(src, x)
    return "a source on the damaged file fails every load"


def _returned(src: Any, x: Any) -> None:
    raise AssertionError(f"{type(src).__name__}.load of a truncated file returned an array of shape "
                         f"{getattr(x, 'shape', None)} instead of raising")
