"""Embeddings of a dataset from a trained encoder: shared by ``sslkit embed`` and ``eval``.

The model is a run directory (PyTorch, the run's weights) or an ``.onnx`` file exported
by sslkit (onnxruntime; preprocessing read from its ``sslkit`` metadata). Either way the
data goes through the one data path (:func:`sslkit.data.pipeline.load_data`) with the
model's channels, image size and source options (the run's; ``source_options`` given
here override them when the data is of the run's source kind) and the run's decode limit
(``--max-pixels``, unless given here), so a run dir and its ONNX export give the same
embeddings.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import load_data, summary_line
from sslkit.errors import UsageError, first_line, without_quoted
from sslkit.output_file import check_output, write_atomic
from sslkit.progress import counted
from sslkit.pseudonym import file_key
from sslkit.raw_input import RawInput, fixed_windows, graph_preprocessing_of
from sslkit.registry import create_source, resolve_data
from sslkit.sample_modes import (SAMPLE_OPTIONS, check_sample_mode, check_sample_shape, note_other_spacing,
                                 source_option_names)
from sslkit.spec import InputSpec


@dataclass
class Embeddings:
    embeddings: np.ndarray  # (N, D) float32
    ids: list[str]  # file path, plus "#frame" for multi-frame files (``embed(ids="key")``: :func:`keyed_id`)
    labels: list[str | None]
    skipped: int = 0  # files that could not be decoded
    skip_reasons: dict[str, int] = field(default_factory=dict)  # why (no file names) -> how many files
    #: per sample, the paths a labels CSV row may name besides its id (:func:`label_paths`): a DICOM
    #: volume's slice files and their folders; empty for a sample its id names (in memory only, never saved)
    label_paths: list[tuple[str, ...]] = field(default_factory=list)


def sample_id(source: Any, ref: Any) -> str:
    """What ``sslkit embed`` calls a sample: the source's ``sample_id(ref)`` (a volume: a non-identifying
    series key), else ``ref.id`` (its path, ``#frame`` for a frame)."""
    own = getattr(source, "sample_id", None)
    return own(ref) if own is not None else ref.id


#: how ``embed`` and ``data dump`` may name samples: ``key`` (:func:`keyed_id`) or ``path`` (names that can carry
#: patient names)
IDS = ("key", "path")


def keyed_id(source: Any, ref: Any) -> str:
    """A sample as output files name it by default: the source's own id where it has one (a DICOM volume's
    ``series:<key>``), else ``file:`` and the keyed hash of its path below the data root
    (:func:`~sslkit.pseudonym.file_key`, as ``data_report.json`` and ``sslkit data inspect`` name files),
    ``#frame`` for a frame or slice: folder and file names can carry patient names."""
    if (own := sample_id(source, ref)) != ref.id:
        return own
    key = file_key(source.relative(ref.path))
    return key if ref.frame is None else f"{key}#{ref.frame}"


def check_ids(ids: str) -> None:
    """A one-line usage error unless ``ids`` is one of :data:`IDS`."""
    if ids not in IDS:
        raise UsageError(f"ids {ids!r}: give one of {', '.join(IDS)}")


def label_paths(source: Any, ref: Any) -> tuple[str, ...]:
    """What a ``--labels`` row may name for ``ref`` besides its id: nothing when the id is its path
    (``ref.id``); else (a volume called ``series:<key>``) the files it is read from and their folders."""
    if sample_id(source, ref) == ref.id:
        return ()
    files = list(getattr(source, "files_of", lambda r: [r.path])(ref))
    return tuple(dict.fromkeys(files + [str(Path(f).parent) for f in files]))


def skip_reasons(skipped: list[tuple[str, str]]) -> dict[str, int]:
    """How many files were skipped for each reason, the reasons without file names (a quoted name
    or path in a message, or the file's own name, becomes '...'), most frequent first: what a report may hold."""
    def clean(path: str, reason: str) -> str:
        for name in (path, Path(path).name):
            reason = reason.replace(name, "...") if name else reason
        return without_quoted(reason)[:200]

    return dict(Counter(clean(path, reason) for path, reason in skipped).most_common())


def check_finite(x: np.ndarray, what: str, then: str = "nothing was written") -> None:
    """A one-line usage error when any row of ``x`` ``(N, D)`` holds NaN or inf, naming how many."""
    bad = int((~np.isfinite(x).reshape(len(x), -1).all(1)).sum()) if len(x) else 0
    if bad:
        raise UsageError(f"{what} gave non-finite (NaN or inf) embeddings for {bad} of {len(x)} images: "
                         f"its weights or these inputs overflow (a diverged run?); {then}")


@dataclass
class Model:
    """An encoder ready to embed: ``encode((B, C, S, S) float32 in [0, 1]) -> (B, D) float32``."""

    spec: InputSpec
    source_options: dict[str, Any]
    encode: Callable[[np.ndarray], np.ndarray]
    engine: str  # "torch" or "onnxruntime"
    fixed_options: dict[str, Any]  # source options baked into the model (cannot be overridden)
    # images the raw graph input cannot represent exactly: (max pixel error in [0, 1], why)
    inexact: list[tuple[float, str]] = field(default_factory=list)
    #: the largest image (W x H) a decoder may open: the run's --max-pixels (None: the default)
    max_pixels: int | None = None


def normalize_unit(spec: InputSpec, unit: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] ``(B, C, S, S)`` -> the encoder's normalised input, per the spec."""
    ones = (1,) * (unit.ndim - 2)  # (B, C, S, S) or volumes (B, C, D, H, W)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, *ones)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, *ones)
    return ((unit - mean) / std).astype(np.float32)


def open_run(run_dir: str | Path, device: str = "cpu", weights: bool = True) -> Model:
    """A run directory's encoder in PyTorch (``weights=False``: random init, same architecture)."""
    from sslkit.engine import resolve_device
    from sslkit.run import load_run

    run = load_run(run_dir)
    device = resolve_device(str(device))
    config = run.info.get("config", {})
    options = dict(config.get("source_options") or {})
    return Model(run.spec, options, torch_encode(run.build_encoder(weights=weights), run.spec, device), "torch", {},
                 max_pixels=config.get("max_pixels"))


def torch_encode(encoder, spec: InputSpec, device) -> Callable[[np.ndarray], np.ndarray]:
    """``encode(unit)`` for a PyTorch encoder: pixels in [0, 1] ``(B, C, S, S)`` -> ``(B, D)``."""
    import torch

    encoder = encoder.to(device)

    @torch.no_grad()
    def encode(unit: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize_unit(spec, unit)).to(device)
        return encoder(x).float().cpu().numpy()

    return encode


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``sslkit`` metadata of an exported ONNX file (a usage error if unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UsageError(f"cannot read ONNX model {str(path)!r}: {type(exc).__name__}: {first_line(exc)}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "sslkit" not in props:
        raise UsageError(f"{str(path)!r} was not exported by sslkit (no 'sslkit' metadata); "
                         f"export it with sslkit export")
    try:
        meta = json.loads(props["sslkit"])
        meta["input"]["raw"], meta["spec"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{str(path)!r} has sslkit metadata from an older or unknown format; re-export it") from None
    return meta


def open_onnx(path: str | Path) -> Model:
    """An exported ONNX encoder in onnxruntime (CPU), with the preprocessing of its metadata."""
    import onnxruntime as ort

    meta = read_onnx_metadata(path)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UsageError(f"onnxruntime cannot load {str(path)!r}: {first_line(exc)}") from None
    spec = InputSpec.from_dict(meta["spec"])
    raw = RawInput.from_json(meta["input"]["raw"])
    name, output = meta["input"]["name"], meta["output"]["name"]

    # Only a window stack can fail structurally; uint8/uint16 inputs round resized pixels to
    # their grid, as any client feeding that dtype does (a difference of quantisation noise).
    why = ("they were windowed and resized before this graph's window stack, so no raw image "
           "reproduces them exactly (a client that resizes the raw values is not affected)")

    def encode(unit: np.ndarray) -> np.ndarray:
        x = normalize_unit(spec, unit) if raw.kind == "normalized" else raw.from_unit(unit)
        if len(raw.lower) > 1:
            err = np.abs(raw.to_unit(x) - unit).reshape(len(unit), -1).max(1)
            model.inexact.extend((float(e), why) for e in err if e > 1e-3)
        return session.run([output], {name: x})[0].astype(np.float32)

    options = dict(meta.get("source_options") or {})
    # the source options whose effect the graph applies (the source said which)
    fixed = {k: options.get(k) for k in graph_preprocessing_of(spec).options} if raw.kind == "window" else {}
    model = Model(spec, options, encode, "onnxruntime", fixed)
    return model


def open_model(model: str | Path, device: str = "cpu", weights: bool = True, max_pixels: int | None = None) -> Model:
    """A run directory or an ``.onnx`` file, as a :class:`Model`; ``max_pixels`` (not None)
    replaces the run's decode limit."""
    opened = _open_model(model, device, weights)
    if max_pixels is not None:
        opened.max_pixels = max_pixels
    return opened


def _open_model(model: str | Path, device: str, weights: bool) -> Model:
    from sslkit.run import checkpoint_path

    path = checkpoint_path(Path(model))  # RUN/checkpoints/step-N as its folder step-0000000N
    if path.is_dir():
        return open_run(path, device, weights)
    if is_safetensors(path):
        raise UsageError(f"{str(path)!r} is a safetensors export: it holds the encoder's weights only and cannot "
                         f"be embedded directly; embed the run directory or an ONNX export (sslkit export RUN)")
    if path.suffix.lower() == ".onnx" or path.is_file():
        if not path.is_file():
            raise UsageError(f"ONNX model {str(path)!r} does not exist")
        if not weights:
            raise UsageError("a random-init baseline needs a run directory, not an ONNX file")
        return open_onnx(path)
    raise UsageError(f"model {str(path)!r} does not exist; give a run directory or an .onnx file")


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file: by its suffix, or its header (an 8-byte length, then JSON)."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError:
        return False
    return len(head) == 10 and head[8:10] in (b'{"', b"{}") and int.from_bytes(head[:8], "little") < 100_000_000


def source_options_for(model: Model, data: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The model's source options when ``data`` is of its source kind (else its :data:`SAMPLE_OPTIONS` that ``data``'s
    source takes), then ``overrides``; checked before any decoding (:func:`check_sample_mode`)."""
    scheme, _ = resolve_data(data)
    if scheme == model.spec.source:
        options = dict(model.source_options)
    else:  # a run on one volumetric source embedding another: the same sample mode, size and spacing
        accepted = source_option_names(scheme)
        options = {k: v for k, v in model.source_options.items() if k in SAMPLE_OPTIONS and k in accepted}
    for key, value in (overrides or {}).items():
        fixed = model.fixed_options.get(key, value)
        if key in model.fixed_options and str(value) != str(fixed):
            if not same_graph_window(model.spec, data, {**options, key: value}, key, value):
                raise UsageError(f"this ONNX file applies {key}={fixed} inside its graph; "
                                 f"export the run again without --with-preprocessing to choose another {key}")
            value = fixed if fixed is not None else value  # the same windows, as the run wrote them
        options[key] = value
    check_sample_mode(model.spec, scheme, options)
    if "spacing" in (overrides or {}):
        note_other_spacing(model.spec, str(overrides["spacing"]))
    return options


def same_graph_window(spec: InputSpec, data: str, options: dict[str, Any], key: str, value: Any) -> bool:
    """Whether source ``options`` give the windows ``spec``'s graph applies (``400.0,40`` is ``400,40``):
    as the source parses them (its ``graph_preprocessing``), else (the source refuses the text) as
    sslkit describes a window (``W 400, L 40``, :func:`~sslkit.raw_input.fixed_windows`)."""
    want = graph_preprocessing_of(spec)
    try:
        got = create_source(data, **options).graph_preprocessing()
        if got.kind != want.kind:
            return False
        windows = list(zip(got.lower, got.upper))
    except UsageError:
        windows = fixed_windows({key: value}) if key == "window" else None
    return windows is not None and len(windows) == len(want.lower) and bool(
        np.allclose(windows, list(zip(want.lower, want.upper)), rtol=1e-9, atol=1e-9))


def embed(model: str | Path | Model, data: str, batch_size: int = 64, source_options: dict[str, Any] | None = None,
          progress: bool = True, weights: bool = True, device: str = "cpu", ids: str = "path") -> Embeddings:
    """Embed every image of ``data``: ``N`` images -> ``(N, D)`` float32 embeddings and ids.

    ``model``: a run directory, an exported ``.onnx`` file, or an opened :class:`Model`.
    ``weights=False`` (run directory only) uses a randomly initialised encoder of the same
    architecture (the baseline of ``eval``). Images larger than the model's ``max_pixels``
    (the run's ``--max-pixels``) are skipped unread, as in the run. ``ids``: ``path`` (:func:`sample_id`: a
    file's path, which ``--labels`` rows are matched against) or ``key`` (:func:`keyed_id`: what files store).
    """
    check_ids(ids)
    if not isinstance(model, Model):
        model = open_model(model, device, weights)
    spec = model.spec
    loaded = load_data(data, spec.image_size, spec.channels, source_options_for(model, data, source_options),
                       progress=progress, max_pixels=model.max_pixels)
    embeddings = encode_pixels(model, loaded.prepared.pixels, batch_size, progress)
    warn_inexact(model)
    refs = loaded.prepared.refs
    name = keyed_id if ids == "key" else sample_id
    return Embeddings(embeddings, [name(loaded.source, r) for r in refs],
                      [r.label for r in refs], len(loaded.prepared.skipped), skip_reasons(loaded.prepared.skipped),
                      [label_paths(loaded.source, r) for r in refs])


def encode_pixels(model: Model, pixels: Any, batch_size: int, progress: bool = True) -> np.ndarray:
    """``model.encode`` of prepared uint16 ``pixels`` ``(N, C, S, S)``, ``batch_size`` at a time through the
    :class:`~sslkit.data.loader.BatchLoader`: ``(N, D)`` float32. Their shape is checked against the model's."""
    check_sample_shape(tuple(pixels.shape[1:]), model.spec)
    reader = BatchLoader(pixels, batch_size, seed=0)
    out = []
    starts = range(0, len(pixels), batch_size)
    for start in counted(starts, len(starts), "embedding", "batch", progress):
        unit = reader.read(np.arange(start, min(start + batch_size, len(pixels)))).numpy()
        out.append(model.encode(unit))
    return np.concatenate(out).astype(np.float32)


def warn_inexact(model: Model) -> None:
    """The warning, once, that some images could not be given to an ONNX graph's raw input exactly."""
    if model.inexact:
        error, why = max(model.inexact)
        print(f"sslkit: warning: {len(model.inexact)} images cannot be given to this graph exactly (max pixel "
              f"error {error:.2g}): {why}; their embeddings differ from the run directory's", file=sys.stderr)


def embed_run(run_dir: str, data: str, batch_size: int = 64, source_options: dict[str, Any] | None = None,
              progress: bool = True, weights: bool = True) -> Embeddings:
    """Embed every image of ``data`` with the run's encoder and preprocessing (see :func:`embed`)."""
    return embed(open_run(run_dir, weights=weights), data, batch_size, source_options, progress)


def skipped_line(result: Embeddings) -> str:
    """``pretrain``'s one-line data summary (:func:`~sslkit.data.pipeline.summary_line`: the commonest
    reasons, with counts) of what ``embed`` skipped, from its reasons without file names."""
    rows = [("", reason) for reason, n in result.skip_reasons.items() for _ in range(n)]
    return summary_line(len(result.ids), rows, where="")  # embed writes no data_report.json


def embed_to_file(model: str | Path, data: str, out: str | Path, overwrite: bool = False, ids: str = "key",
                  **kwargs: Any) -> dict[str, Any]:
    """:func:`embed`, saved as ``.npz`` with ``embeddings`` ``(N, D)`` float32 and ``ids`` (strings): by default
    keyed file keys (:func:`keyed_id`); ``ids="path"``: the files' paths, which can carry patient names.

    ``labels`` (strings, "" for none) is added when the data layout gives class names.
    The output (an ``.npz`` name) is checked before any work and written atomically; embeddings
    that are not all finite are refused (:func:`check_finite`) and nothing is written.
    """
    out = Path(out)
    check_ids(ids)
    check_output(out, overwrite, ".npz")  # numpy.savez: embeddings, ids, labels
    opened = open_model(model, kwargs.pop("device", "cpu"), max_pixels=kwargs.pop("max_pixels", None))
    result = embed(opened, data, ids=ids, **kwargs)
    check_finite(result.embeddings, f"the model {str(model)!r}")
    if result.skipped:
        print(f"data: {skipped_line(result)}", file=sys.stderr)
    arrays = {"embeddings": result.embeddings, "ids": np.array(result.ids, dtype=str)}
    if any(label is not None for label in result.labels):
        arrays["labels"] = np.array([label or "" for label in result.labels], dtype=str)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(out, write, suffix=".npz")
    return {"n": len(result.ids), "dim": int(result.embeddings.shape[1]), "engine": opened.engine,
            "skipped": result.skipped, "out": str(out)}
