"""``sslkit data inspect SRC``: what a data source holds, before any training.

Counts files and samples by header facts (for DICOM: modality, transfer syntax,
photometric interpretation, bits stored, size, frames), lists every file that cannot be
indexed or decoded with its reason, and estimates the decoded size: the cache holds one
uint16 ``C x S x S`` image per sample (``slab:K``: ``C*K`` channels), or with
``--sample volume`` one ``C x D x H x W`` volume per series (``--volume-size``). Nothing identifying
is reported: header facts are technical, groups are only counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sslkit.data.prepare import majority_channels, prepare
from sslkit.data.volume import sample_mode, stored_size
from sslkit.errors import printable
from sslkit.progress import human_bytes
from sslkit.pseudonym import file_key
from sslkit.registry import create_source


def inspect_data(data: str, source_options: dict[str, Any] | None = None, decode: bool = True,
                 image_size: int = 224, workers: int = 0, progress: bool = False,
                 max_pixels: int | None = None, every_sample: bool = False) -> dict[str, Any]:
    """A JSON-able report of ``data``; file paths in it are relative to the data root.

    ``decode``: also decode one sample of every file (in parallel, nothing cached) so
    that files whose header reads but whose pixels do not are found and reported;
    ``every_sample``: decode every sample (each frame of a multi-frame file or array, each
    time point of a 4D volume). ``max_pixels`` as in :func:`sslkit.data.pipeline.load_data`.
    """
    source = create_source(data, **(source_options or {}))
    if max_pixels is not None:
        source.max_pixels = max_pixels
    refs = source.index()
    first: dict[str, Any] = {}
    per_file: Counter = Counter()
    for ref in refs:
        first.setdefault(ref.path, ref)
        per_file[ref.path] += 1
    mode = sample_mode(source)
    facts, full_bytes = _header_facts(source, first, per_file, mode.volumetric)
    channels = majority_channels(source, refs) if refs else 1
    # what one sample is cached as (uint16): C x S x S (a slab: C*K channels), or C x D x H x W
    stored = list(mode.size) if mode.volumetric else [image_size, image_size]
    per_sample = channels * 2
    for n in stored:
        per_sample *= n
    files_of = getattr(source, "files_of", None)  # a volume or slab reads several files
    files = len({f for ref in refs for f in files_of(ref)}) if files_of and mode.mode != "slice" else len(first)
    report: dict[str, Any] = {
        "source": source.scheme,
        "files": files,
        "images": len(refs),
        "groups": len({r.group for r in refs}),
        "channels": channels,
        "counts": {k: dict(v.most_common()) for k, v in facts.items()},
        "unreadable": [{"path": source.relative(p), "key": file_key(source.relative(p)), "reason": r}
                       for p, r in source.skipped],
        "preprocessing": source.describe(),
        "estimated_bytes": {
            "cache_at_image_size": len(refs) * per_sample,
            "image_size": image_size,
            "sample": mode.describe().get("sample", "slice"),
            "stored_shape": [channels, *stored],
            "decoded_full_resolution_float32": full_bytes or None,
        },
    }
    filtered = getattr(source, "filtered", 0)
    if filtered:
        report["filtered_out"] = filtered
    if decode and first:
        # at 8 px a slice (cheap), or the run's volume size: a volume sample has no other shape
        samples = list(refs) if every_sample else list(first.values())
        checked = prepare(source, samples, channels, stored_size(source, 8), cache_dir=False,
                          progress=progress, workers=workers)
        report["undecodable"] = [{"path": p, "key": file_key(p), "reason": r} for p, r in checked.skipped]
        report["decoded_ok"] = len(checked)
        what = _checked(mode.volumetric, every_sample, len(samples) == len(refs))
        report["decode_checked"] = {"of": len(samples), "what": what}
    return report


def _checked(volumetric: bool, every_sample: bool, every: bool) -> str:
    """What the decode check counted (``decode_checked["what"]``): ``volumes`` when it decoded every
    volume, ``samples`` every 2D sample (``--every-sample``), else ``files`` (the first of each)."""
    if volumetric and every:
        return "volumes"
    return "samples" if every_sample else "files"


def _header_facts(source, first: dict[str, Any], per_file: Counter, volumetric: bool) -> tuple[dict[str, Counter], int]:
    """Counts of each header property's values over the files (``first``: path -> its first
    sample), and the bytes of every sample decoded at full resolution as float32."""
    facts: dict[str, Counter] = {}
    full_bytes = 0
    for ref in first.values():
        props = source.properties(ref)
        for key, value in props.items():
            facts.setdefault(key, Counter())[str(value)] += 1
        try:
            w, h = (int(v) for v in str(props.get("size", "")).split("x"))
            c = int(props.get("samples_per_pixel", props.get("channels", 1)) or 1)
            depth = int(props.get("depth", 1) or 1) if volumetric else 1  # a volume: all its slices
            full_bytes += w * h * c * depth * 4 * per_file[ref.path]  # every sample (frame, array row) of the file
        except (ValueError, TypeError):
            pass
    return facts, full_bytes


def _size(n: int | None) -> str:
    return human_bytes(n) if n else "unknown"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_data`'s report."""
    what = "volumes" if report["estimated_bytes"].get("sample") == "volume" else "images"
    lines = [f"{report['source']}: {report['images']} {what} in {report['files']} files "
             f"({report['groups']} split groups), {report['channels']} channel(s) by majority"]
    if report.get("filtered_out"):
        lines.append(f"filtered out by the source's options: {report['filtered_out']} files")
    for key, counts in report["counts"].items():
        items = list(counts.items())
        shown = ", ".join(f"{printable(str(v))} {n}" for v, n in items[:12])
        shown += f", ... ({len(items) - 12} more)" if len(items) > 12 else ""
        lines.append(f"  {key}: {shown}")
    est = report["estimated_bytes"]
    shape = est.get("stored_shape") or [report["channels"], est["image_size"], est["image_size"]]
    at = (f"{'x'.join(map(str, shape[1:]))} voxels x {shape[0]} channel(s) per volume" if len(shape) == 4 else
          f"{est['image_size']} px x {shape[0]} channel(s)"
          + (f" ({est['sample']}: slices as channels)" if est.get("sample", "slice") != "slice" else ""))
    lines.append(f"decoded size: {_size(est['cache_at_image_size'])} cached at {at} "
                 f"(uint16); {_size(est['decoded_full_resolution_float32'])} at full resolution (float32)")
    bad = report["unreadable"] + report.get("undecodable", [])
    if "decoded_ok" in report:
        checked = report.get("decode_checked") or {"of": report["files"], "what": "files"}
        first = (f" (the first {what[:-1]} of each; --every-sample decodes all {report['images']})"
                 if checked["what"] == "files" and checked["of"] < report["images"] else "")
        lines.append(f"decode check: {report['decoded_ok']} of {checked['of']} {checked['what']} decode{first}")
    lines.append(f"unusable files: {len(bad)}" + (" (path, the key a run's data_report.json names it by: reason)"
                                                   if bad else ""))
    lines += [f"  {printable(str(b['path']))} [{b['key']}]: {printable(str(b['reason']))}" for b in bad]
    return "\n".join(lines)
