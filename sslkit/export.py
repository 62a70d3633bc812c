"""Export a run's encoder through an exporter plugin (``register_exporters``).

``export_run`` reads the run back, checks the destination before any work (an existing
file is never replaced without ``overwrite``; a missing or read-only folder is a usage
error), gathers a few real samples of the run's data for the exporter's parity check,
and hands the encoder, its :class:`~sslkit.spec.InputSpec` and the run's metadata to the
exporter, which writes through a temporary file so nothing half-written is left.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sslkit.errors import UsageError
from sslkit.output_file import OutputExists, check_output, file_sha256, published_here, read_json
from sslkit.raw_input import graph_preprocessing_of, pixel_grid
from sslkit.registry import get_exporter
from sslkit.run import ENCODER_FILE, Run, check_not_run_file, load_run

REAL_SAMPLES = 8


def run_id(run: Run, encoder: Any = None) -> str | None:
    """The run's id: ``run.json``'s ``run_id`` when it has one, else (a run recorded before run.json
    had one) a hash of the exported weights (``encoder``'s tensors: a checkpoint's when one is
    exported), else of ``encoder.safetensors``. :func:`export_metadata` says which (``run_id_from``)."""
    if run.info.get("run_id"):
        return str(run.info["run_id"])
    h = hashlib.sha256()
    if encoder is not None:
        import torch

        for key, value in sorted(encoder.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]
    file = run.path / ENCODER_FILE
    return file_sha256([file])[:16] if file.exists() else None


def weights_record(run: Run) -> dict[str, Any]:
    """Which weights of the run are exported: the optimizer step they are from, and the sha256 of the
    file they were read from as the run recorded it (``encoder_sha256`` in run.json, or the checkpoint's
    ``model.safetensors`` as its manifest lists it: loading the checkpoint checked the file against it)."""
    from sslkit.checkpoint import MANIFEST, MODEL_FILE

    if run.checkpoint is None:
        return {"step": (run.info.get("summary") or {}).get("steps"), "encoder_sha256": run.info.get("encoder_sha256")}
    manifest = read_json(run.checkpoint / MANIFEST)
    model = (manifest.get("files") or {}).get(MODEL_FILE) or {}
    return {"step": manifest.get("step"), "checkpoint_sha256": model.get("sha256")}


def export_metadata(run: Run, encoder: Any = None) -> dict[str, Any]:
    """What an exported artefact carries about its run (``encoder``: the weights exported, for
    ``run_id`` of a run recorded without one): ``run_id``, the step and sha256 of the weights, the
    sha256 of the run's settings (``config_sha256``, as run.json records it). No paths, no patient
    identifiers."""
    from sslkit import __version__
    from sslkit.init import onnx_record
    from sslkit.run_record import config_sha256

    config = run.info.get("config", {})
    return {
        "input": run.spec.to_dict(),
        "task": run.info["task"],
        "backbone": run.backbone_name,
        "backbone_options": dict(run.info.get("backbone_options", {})),
        "source_options": dict(config.get("source_options") or {}),
        "embedding_dim": run.info["embedding_dim"],
        "dataset_fingerprint": run.info.get("dataset", {}).get("fingerprint"),
        "run_id": run_id(run, encoder),
        "run_id_from": "run.json" if run.info.get("run_id") else "weights sha256 (a run recorded without a run_id)",
        "config_sha256": run.info.get("config_sha256") or config_sha256(config),
        **weights_record(run),
        "sslkit_version": __version__,
        "init": onnx_record(run.info.get("init")),  # --init: source name, sha256, adaptations (no path)
        "checkpoint": run.checkpoint.name if run.checkpoint is not None else None,  # step-N, or the final encoder
    }


def real_samples(run: Run, data: str | None = None, n: int = REAL_SAMPLES) -> tuple[np.ndarray | None, str]:
    """Up to ``n`` images of ``data`` (default: the run's own data), evenly spaced.

    Decoded with the run's source options, converted to its channels and resized as in
    pretraining: float32 ``(n, C, S, S)`` in [0, 1], and a note naming what was used (the run's
    data, or ``--check-data`` and its source kind: no path, as everything an export records).
    Returns ``(None, why)`` when the data is not reachable (another machine, deleted) or
    ``data == "none"``.
    """
    samples, note, _ = read_samples(run, data, n)
    return samples, note


def read_samples(run: Run, data: str | None = None, n: int = REAL_SAMPLES) -> tuple[np.ndarray | None, str, str | None]:
    """:func:`real_samples`, and the grid the images' values lie on as the source decoded them,
    before any channel conversion or resizing (:func:`sslkit.raw_input.pixel_grid`: ``uint8``,
    ``uint16`` where any image is finer than 8-bit, ``float`` where any is on neither grid), None
    when no image was read."""
    from sslkit.data.prepare import resize_square
    from sslkit.data.source import to_channels
    from sslkit.registry import create_source, resolve_data

    if data == "none":
        return None, "skipped: --check-data none", None
    location = data or run.info.get("config", {}).get("data")
    if not location:
        return None, "skipped: the run records no data location", None
    spec = run.spec
    try:
        scheme = resolve_data(location)[0]
        same_kind = scheme == spec.source
        options = (run.info.get("config", {}).get("source_options") or {}) if same_kind else {}
        source = create_source(location, **options)
        refs = source.index()
    except UsageError as exc:
        if data:
            raise
        return None, f"skipped: the run's data is not reachable here ({exc})", None
    out, grids = [], set()
    for ref in refs[:: max(1, len(refs) // n)]:
        try:
            native = source.load(ref)
            x = to_channels(native, spec.channels)
            x = x if spec.sample == "volume" else resize_square(x, spec.image_size)  # volumes come fitted
        except Exception:
            continue  # undecodable files were skipped in pretraining too
        out.append(x.astype(np.float32))
        grids.add(pixel_grid(native))
        if len(out) == n:
            break
    what = f"--check-data ({scheme} source)" if data else "the run's data"
    if not out:
        return None, f"skipped: no decodable image in {what}", None
    grid = next(g for g in ("float", "uint16", "uint8") if g in grids)  # the finest any image needs
    return np.stack(out), f"{len(out)} images of {what}", grid


def _check_suffix(out: Path, fmt: str) -> None:
    """Refuse an ``--out`` whose suffix names another export format (``x.onnx`` with ``--format
    safetensors``): embed and eval would then take the file for what its name says."""
    from sslkit.plugins import get_plugins

    named = out.suffix.lower().lstrip(".")
    if named != fmt.lower() and named in {n.lower() for n in get_plugins().entries["exporters"]}:
        raise UsageError(f"--out {out.name!r} has the suffix of the {named} format, but --format {fmt} writes {fmt}: "
                         f"name it {out.with_suffix('.' + fmt).name!r}, or give --format {named}")


def check_finite_weights(encoder: Any, run: Any) -> None:
    """Refuse, in one line, an encoder whose weights hold NaN or inf (a diverged run, a damaged file):
    its export could only fail the parity check, which would send the user after the exporter."""
    import torch

    bad = [k for k, v in encoder.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        what = f"checkpoint {run.checkpoint.name}" if run.checkpoint is not None else "encoder"
        raise UsageError(f"the run's {what} holds NaN or inf weights ({len(bad)} tensors, e.g. {bad[0]}): a diverged "
                         "run or a damaged file; nothing was exported")


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx", overwrite: bool = False,
               check_data: str | None = None, log: Callable[[str], None] | None = None,
               **options: Any) -> dict[str, Any]:
    """Export ``run_dir``'s encoder as ``fmt`` to ``out``; returns the exporter's report.

    ``check_data``: data for the real-input parity check (default: the run's own data,
    ``"none"`` to skip). ``options`` go to the exporter (e.g. ``opset``, ``fp16``,
    ``with_preprocessing`` for ``onnx``).
    """
    exporter = get_exporter(fmt)
    out = Path(out)
    existed = out.exists() or out.is_symlink()  # a file the user had is never removed, whatever happens
    _check_suffix(out, fmt)
    run = load_run(run_dir)
    check_not_run_file(out, run.path)
    check_output(out, overwrite)
    encoder = run.build_encoder()
    check_finite_weights(encoder, run)
    samples, note, grid = read_samples(run, check_data)
    metadata, chosen = export_metadata(run, encoder), input_dtype_choice(exporter, run, options, grid, note)
    if grid is not None and graph_preprocessing_of(run.spec).kind == "pixels":
        metadata["data_pixels"] = {"grid": grid, "read": note}  # what a pixels graph's input dtype follows
    try:  # the one exporter signature (hookspecs.register_exporters): always these keywords
        report = exporter(encoder, run.spec, metadata, out, samples=samples, samples_note=note,
                          log=log or (lambda line: None), **options)
        check_exported(fmt, out, report)
    except OutputExists:  # another process (or the user) put it there meanwhile: theirs, kept
        raise
    except BaseException:
        _remove_own(out, existed, fmt)
        raise
    return {"format": fmt, "out": str(out), **report, **chosen}


def _remove_own(out: Path, existed: bool, fmt: str) -> None:
    """After a failed export: remove what this process wrote at ``out``, never a file the user had or another
    process published meanwhile (a second export to the same name that lost the race, or was interrupted
    after the first published). sslkit's exporters publish through write_atomic (:func:`published_here` tells
    their file); a third-party exporter may write ``out`` in place, and a half-written file where none was
    before is taken for its own."""
    from sslkit.plugins import get_plugins
    from sslkit.registry import plugin_of

    info = get_plugins().infos.get(plugin_of("exporters", fmt))
    in_place = info is None or not info.builtin
    if published_here(out) or (in_place and not existed and out.is_file()):
        out.unlink(missing_ok=True)


def check_exported(fmt: str, out: Path, report: Any) -> None:
    """Refuse, in one line naming the exporter's plugin (exit 1), an export whose exporter returned
    without writing ``out`` (or left it empty) or returned no dict report."""
    from sslkit.errors import PluginError
    from sslkit.registry import plugin_of

    if out.is_dir():
        problem = None if any(out.iterdir()) else f"left --out {out.name!r} an empty folder"
    else:
        size = out.stat().st_size if out.is_file() else None
        problem = f"wrote no file to --out {out.name!r}" if size is None else \
            f"left --out {out.name!r} empty (0 bytes)" if size == 0 else None
    if problem is None and not isinstance(report, dict):
        problem = f"returned {type(report).__name__}, not a dict report"
    if problem:
        raise PluginError(f"export format {fmt!r} (plugin {plugin_of('exporters', fmt)!r}) {problem}; an exporter "
                          f"writes --out and returns a dict (its report); nothing was exported")


def input_dtype_choice(exporter: Callable, run: Run, options: dict[str, Any], grid: str | None,
                       note: str) -> dict[str, str]:
    """For an export ``with_preprocessing`` of a ``pixels`` source by an exporter that takes ``input_dtype``:
    set ``options["input_dtype"]``, when not given, to the grid of the run's data (``grid``, of the images
    ``note`` names: :func:`sslkit.raw_input.default_input_dtype`), and say why in ``input_dtype_from``; a
    given one coarser than the data is said too. ``{}`` for any other export."""
    from sslkit.raw_input import default_input_dtype

    if not options.get("with_preprocessing") or not _takes(exporter, "input_dtype"):
        return {}
    given = options.get("input_dtype")
    if given is None:
        dtype, why = default_input_dtype(run.spec, grid, note)
        if dtype is not None:
            options["input_dtype"] = dtype
        return {"input_dtype_from": why} if why else {}
    if grid in {"uint8": ("uint16", "float"), "uint16": ("float",)}.get(given, ()):
        return {"input_dtype_from": f"--input-dtype {given}, coarser than the run's data ({grid} values, {note}): "
                                    f"the client's pixels lose bits the run saw (input rounding says how much)"}
    return {}


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (False where its signature cannot be read)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


#: keys of the built-in exporters' reports that :func:`report_lines` says in words (or leaves out)
REPORT_WORDS = {"format", "out", "verified_by", "max_abs_diff", "tolerance", "min_cosine", "real_inputs", "fp16",
                "client_note", "checks", "dynamic_hw", "input_kind", "opset", "data_config", "input_dtype_from",
                "input_rounding"}
#: the longest client note said whole: sslkit's own are shorter (their plugin parts bounded, see
#: :func:`sslkit.raw_input.source_mapping`); a longer one (an exporter plugin's) is bounded
CLIENT_NOTE_MAX = 3000


def report_lines(report: dict) -> list[str]:
    """An export report in words: each known key (the built-in exporters') where present, a plugin's
    own keys as ``key=value``, then where the file went. An exporter only promises a JSON-able report."""
    from sslkit.errors import shown

    def num(value, fmt: str) -> str:  # a number formatted, anything else bounded as it is
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else shown(value)

    def words(value, limit: int = 300) -> str:  # a one-line string as it is, anything else bounded
        return value if isinstance(value, str) and "\n" not in value and len(value) <= limit else shown(value)

    def parity(part: dict, tolerance: str = "") -> str:  # "max abs diff X (tolerance T), min cosine C", as present
        diff = f"max abs diff {num(part['max_abs_diff'], '.2e')}{tolerance}" if "max_abs_diff" in part else ""
        cosine = f"min cosine {num(part['min_cosine'], '.6f')}" if "min_cosine" in part else ""
        return ", ".join(w for w in (diff, cosine) if w)

    lines, limit = [], ""
    if "verified_by" in report:
        diff = f" (max abs diff {num(report['max_abs_diff'], '.2e')})" if "max_abs_diff" in report else ""
        lines.append(f"verified: {words(report['verified_by'])} gives the encoder's features{diff}")
    elif "max_abs_diff" in report or "min_cosine" in report:
        limit = _limit_words(report)  # the ONNX exporter's, else its tolerance as it is
        tolerance = limit or (f" (tolerance {num(report['tolerance'], 'g')})" if "tolerance" in report else "")
        real = f"; real inputs: {words(report['real_inputs'])}" if "real_inputs" in report else ""
        label = "float32" if "tolerance" in report else "check"  # the ONNX exporter's, else a plugin's own
        lines.append(f"{label}: {parity(report, tolerance)}{real}")
    fp16 = report.get("fp16")
    if isinstance(fp16, dict) and ("max_abs_diff" in fp16 or "min_cosine" in fp16):
        tolerance = f" (tolerance: {words(fp16['tolerance'])})" if "tolerance" in fp16 else ""
        lines.append(f"float16: {parity(fp16)}{tolerance}")
    lines += _rounding_lines(report, num, words)
    if report.get("client_note"):
        lines.append(f"client: {words(report['client_note'], CLIENT_NOTE_MAX)}")
    own = [f"{k}={shown(v)}" for k, v in report.items() if k not in REPORT_WORDS and not (k == "limit" and limit)]
    if own:
        lines.append("report: " + ", ".join(own))
    lines.append(f"exported {report.get('format')} to {report.get('out')}")
    return lines


def _rounding_lines(report: dict, num: Callable, words: Callable) -> list[str]:
    """The graph input's dtype and why (``input_dtype_from``), and what rounding the real images to it cost
    (``input_rounding``: the graph on the client's input vs PyTorch on the run's unrounded pixels)."""
    lines = [f"input: {words(report['input_dtype_from'])}"] if report.get("input_dtype_from") else []
    r = report.get("input_rounding")
    if isinstance(r, dict) and "max_abs_diff" in r:
        lines.append(f"input rounding ({words(r.get('input'))} input vs the run's unrounded pixels, real inputs): "
                     f"max abs diff {num(r['max_abs_diff'], '.2e')} ({num(r.get('relative'), '.2e')} of max "
                     f"|embedding|), min cosine {num(r.get('min_cosine'), '.6f')}")
    return lines


def _limit_words(report: dict) -> str:
    """`` (limit L = T x max |embedding| S)``: the limit the ONNX exporter applied to ``max_abs_diff``
    (``limit``: ``tolerance`` x max(1, max |embedding|) of the check it came from), "" without both numbers."""
    limit, tolerance = report.get("limit"), report.get("tolerance")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (limit, tolerance)):
        return ""
    if limit > tolerance * (1 + 1e-9):
        return f" (limit {limit:.2e} = {tolerance:g} x max |embedding| {limit / tolerance:.3g})"
    return f" (limit {limit:.2e} = {tolerance:g}, max |embedding| <= 1)"

