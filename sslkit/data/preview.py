"""``sslkit data preview``: a contact sheet of what the model sees.

One row per sample (evenly spaced over the source): the decoded sample as training gets
it (resized to ``image_size``; a volume as its three orthogonal mid-planes, axial,
coronal, sagittal), then two augmented views of it (2D: a named recipe of
:mod:`sslkit.views`, default ``simclr``; volumes: :func:`sslkit.augment3d.pair_volume_recipes`).
The caption states the source, sample mode, window and spacing. Slabs show their centre
slice. Row labels are sample paths relative to the data root (DICOM volumes: keyed series keys), every
folder name below the first level, and one that names or alone holds a patient, replaced (as ``eval tsne
--color-by folder`` does, whatever the name's encoding), and the file name replaced by its keyed file key
(``file:`` and 12 hex digits, ``#frame`` for a frame or slice: :func:`sslkit.embed.keyed_id`, as
``data_report.json`` names files; ``ids="path"``: the file name, which can carry a patient's name), a long
one shortened to its first folder, ``…`` and its last part.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from sslkit.data.dump import sample_key
from sslkit.data.prepare import NARROW_SPAN, majority_channels, resize_square
from sslkit.data.source import to_channels
from sslkit.data.volume import sample_mode
from sslkit.errors import UsageError
from sslkit.figure import save_png
from sslkit.output_file import check_output
from sslkit.registry import create_source

PLANES = ("axial", "coronal", "sagittal")
LABEL_CHARS = 40  # a row label longer than this shows its first folder, "…" and its file name


def planes(x: np.ndarray) -> list[np.ndarray]:
    """``(C, D, H, W)`` -> its three mid-planes ``(H, W)``, ``(D, W)``, ``(D, H)`` (channel 0); D runs
    inferior to superior, so the coronal and sagittal planes are turned to show superior at the top."""
    c, d, h, w = x.shape
    return [x[0, d // 2], x[0, ::-1, h // 2], x[0, ::-1, :, w // 2]]


def plane_aspects(spacing: Any) -> list[float]:
    """imshow's ``aspect`` (a pixel's height / width) of each of :func:`planes`, from ``(dz, dy, dx)``
    mm: anisotropic voxels drawn at their true proportions (1 where the spacing is unknown)."""
    try:
        dz, dy, dx = (float(v) for v in spacing)
        return [dy / dx, dz / dx, dz / dy]
    except (TypeError, ValueError, ZeroDivisionError):
        return [1.0, 1.0, 1.0]


def shown(x: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` image as matplotlib shows it: gray ``(H, W)`` or RGB ``(H, W, 3)``."""
    if x.shape[0] == 3 and x.ndim == 3:
        return np.clip(x.transpose(1, 2, 0), 0, 1)
    return x[x.shape[0] // 2] if x.ndim == 3 else x  # a slab: its centre slice


def views_of(batch: torch.Tensor, volumetric: bool, size: Any, recipe_name: str) -> list[torch.Tensor]:
    """Two augmented views of ``batch`` in [0, 1] (no normalisation)."""
    if volumetric:
        from sslkit.augment3d import pair_volume_recipes

        return [r(batch) for r in pair_volume_recipes(size)]
    from sslkit.views import recipe

    r = recipe(recipe_name, size)
    return [r(batch), r(batch)]


def preview(src: str, out: str | Path, options: dict[str, Any] | None = None, samples: int = 6,
            image_size: int = 224, recipe_name: str = "simclr", seed: int = 0,
            overwrite: bool = False, ids: str = "key") -> dict[str, Any]:
    """Draw the sheet (see the module docstring) to ``out`` (PNG); returns what was drawn."""
    import matplotlib

    from sslkit.embed import check_ids

    check_ids(ids)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    check_output(out, overwrite, ".png")
    source = create_source(src, **(options or {}))
    refs = source.index()
    if not refs:
        raise UsageError(f"no images found in {src!r}")
    mode = sample_mode(source)
    picked, arrays = pick(source, refs, samples, mode, image_size)
    if not arrays:
        raise UsageError(f"no decodable sample in {src!r}")
    torch.manual_seed(seed)
    batch, low, high, rescaled = in_range(torch.from_numpy(np.stack(arrays).astype(np.float32)))
    arrays = list(batch.numpy()) if rescaled else arrays
    views = [v.numpy() for v in views_of(batch, mode.volumetric, mode.size if mode.volumetric else image_size,
                                         recipe_name)]
    per = 3 if mode.volumetric else 1
    labels = row_labels(source, refs, picked, ids)
    fig, axes = plt.subplots(len(arrays), 3 * per, figsize=(2.2 * 3 * per, 2.3 * len(arrays)), squeeze=False)
    titles = ["decoded", "view 1", "view 2"]
    for i, ref in enumerate(picked):
        images = [arrays[i], views[0][i], views[1][i]]
        for j, img in enumerate(images):
            panels = planes(img) if mode.volumetric else [shown(img)]
            aspects = plane_aspects(voxel_mm(source, ref, mode)) if mode.volumetric else [1.0]
            for k, panel in enumerate(panels):
                ax = axes[i][j * per + k]
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspects[k])
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{titles[j]}" + (f" {PLANES[k]}" if mode.volumetric else ""), fontsize=8)
        axes[i][0].set_ylabel(labels[i], fontsize=6)
    fig.suptitle(caption(source, picked[0], mode) + (f"; shown from its value range {low:.4g}-{high:.4g} to 0-1, as "
                                                      "training's views see it" if rescaled else ""), fontsize=8)
    try:
        save_png(fig, out, 80, tight_rect=(0, 0, 1, 1))
    finally:
        plt.close(fig)
    return {"samples": len(arrays), "out": str(out), "sample": mode.describe().get("sample", "slice"),
            "value_range": [low, high] if rescaled else [0.0, 1.0]}


def pick(source, refs: list, samples: int, mode, image_size: int) -> tuple[list, list[np.ndarray]]:
    """Up to ``samples`` references spread over ``refs`` (:func:`spread`; the others, in order, in place of any
    that does not decode) and their arrays, in the channels the run would train with (grey and colour mixed are
    one kind), images resized to ``image_size``."""
    channels = majority_channels(source, refs)
    picked, arrays = [], []
    first = spread(len(refs), samples)
    chosen = set(first)
    for ref in [refs[i] for i in first] + [r for i, r in enumerate(refs) if i not in chosen]:
        try:
            x = to_channels(source.load(ref), channels)
        except Exception:  # a sheet of what decodes: `sslkit data inspect` lists the others, with reasons
            continue
        arrays.append(x if mode.volumetric else resize_square(x.astype(np.float32), image_size))
        picked.append(ref)
        if len(arrays) == samples:
            break
    return picked, arrays


def spread(n: int, samples: int) -> list[int]:
    """Up to ``samples`` distinct indices of ``n`` items spread evenly from the first to the last."""
    return [int(i) for i in np.unique(np.linspace(0, n - 1, min(samples, n)).round())]


def row_labels(source: Any, refs: list, picked: list, ids: str = "key") -> list[str]:
    """Each picked sample's path below the root with the folder names ``eval tsne --color-by folder`` hides
    (every one below the first level, and any that names or alone holds a patient:
    :func:`sslkit.eval.tsne.folder_aliases`) replaced by their aliases, compared as the key writes them (a name
    that is not UTF-8 with ``\\xNN`` escapes), and (``ids="key"``) the file name by the sample's keyed file key
    (:func:`sslkit.embed.keyed_id`); a long one as its first folder, ``…`` and its last part."""
    from sslkit.eval.tsne import folder_aliases, shorten

    alias = {key_text(name): hidden for name, hidden in folder_aliases(source, refs).items()}
    out = []
    for ref in picked:
        key = sample_key(source, ref, "path")
        parts = list(PurePath(key).parts)
        if key.startswith(key_text(source.relative(ref.path))):  # a path, not a series key
            parts[:-1] = [alias.get(p, p) for p in parts[:-1]]
            parts[-1] = sample_key(source, ref, ids) if ids == "key" else parts[-1]
        label = "/".join(parts)
        if len(label) > LABEL_CHARS and len(parts) > 2:
            label = f"{parts[0]}/…/{parts[-1]}"
        out.append(shorten(label, LABEL_CHARS))
    return out


def key_text(text: str) -> str:
    """``text`` as :func:`sslkit.data.dump.sample_key` writes it: bytes that are not UTF-8 as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def in_range(batch: torch.Tensor) -> tuple[torch.Tensor, float, float, bool]:
    """``batch`` rescaled from its own range to [0, 1] when it spans less than :data:`NARROW_SPAN`,
    as a run's views see narrow-range data (``InputSpec.value_range``); its range; whether it was."""
    low, high = float(batch.min()), float(batch.max())
    rescaled = 0 < high - low < NARROW_SPAN
    return ((batch - low) / (high - low) if rescaled else batch), low, high, rescaled


def voxel_mm(source: Any, ref: Any, mode: Any) -> Any:
    """``(dz, dy, dx)`` of a volume sample: the mode's spacing, else the source's for ``ref`` (None: unknown)."""
    if mode.spacing:
        return mode.spacing
    spacing_of = getattr(source, "spacing_of", None)
    try:
        return spacing_of(ref) if spacing_of else None
    except (KeyError, ValueError):
        return None


def caption(source: Any, ref: Any, mode: Any) -> str:
    """``dicom: sample volume, window W 400, L 40, spacing 2 x 2 x 2 mm (first sample)``."""
    desc = source.describe()
    window = desc.get("window")
    window = ", ".join(window) if isinstance(window, list) else window
    spacing = getattr(source, "spacing_of", lambda r: None)(ref)
    sp = " x ".join(f"{v:g}" for v in spacing) + " mm" if spacing else "unknown"
    return (f"{source.scheme}: sample {desc.get('sample', 'slice')}, window {window or 'source scaling'}, "
            f"spacing {sp} (first sample)")
