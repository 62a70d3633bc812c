"""``sslkit eval tsne``: a 2-D map (t-SNE, or UMAP) of the embeddings, coloured by label.

The pretrained encoder's map sits beside a random-init encoder's, so whether the classes
separate *because of pretraining* is visible at a glance.
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path, PurePath
from typing import Any, Callable

import numpy as np

from sslkit.data.pipeline import index_refs
from sslkit.errors import UsageError, shown
from sslkit.figure import save_png
from sslkit.embed import label_paths, sample_id
from sslkit.output_file import check_output
from sslkit.eval.features import embed_indexed, embed_sample, index_source, open_model
from sslkit.eval.labels import assign_labels, read_labels_csv
from sslkit.eval.report import new_report, save_picture, save_report, skipped_summary

PANEL_INCHES = 6.0
DPI = 100
UNLABELLED = "(unlabelled)"
UNLABELLED_COLOUR = "lightgray"
MISSING = "(missing)"  # --color-by FIELD: a file whose header lacks the field
LABEL_CHARS = 40  # a legend entry's label is cut to this many characters
LEGEND_ROWS = 20  # entries per legend column
MARKERS = ("o", "s", "^", "D", "v", "P")


def capped_perplexity(perplexity: float, n: int) -> float:
    """t-SNE's perplexity for ``n`` points: at most ``(n - 1) / 3``, so small sets work."""
    return float(min(perplexity, (n - 1) / 3))


def reduce_2d(x: np.ndarray, method: str = "tsne", perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """``(N, D) -> (N, 2)`` with scikit-learn's t-SNE (PCA init) or umap-learn's UMAP.

    The perplexity is capped at ``(N - 1) / 3`` so small sets work. t-SNE runs with one
    OpenMP thread (see below).
    """
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 3:
        raise UsageError(f"a 2-D map needs at least 3 images, got {len(x)}")
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UsageError("--umap needs umap-learn: pip install umap-learn") from None
        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perp = capped_perplexity(perplexity, len(x))
    # scikit-learn's OpenMP runtime and torch's (another libgomp) fight over the cores once
    # torch has run in this process: t-SNE of 300 points took minutes instead of a second.
    with threadpool_limits(1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)


def shorten(text: str, limit: int = LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis in the middle (its start and end both show)."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def category_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours, none grey (grey is ``(unlabelled)``): tab10 up to 10, tab20 without its two
    greys up to 18, beyond that hues spaced by the golden ratio at alternating saturation and brightness."""
    import matplotlib
    from matplotlib.colors import hsv_to_rgb

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 18:
        tab20 = matplotlib.colormaps["tab20"]
        return [tab20(i) for i in range(20) if i not in (14, 15)][:n]
    hsv = [((0.07 + i * 0.618033988749895) % 1.0, (0.95, 0.55)[i % 2], (0.9, 0.6)[(i // 2) % 2]) for i in range(n)]
    return [(*map(float, hsv_to_rgb(c)), 1.0) for c in hsv]


def legend_layout(entries: list[str]) -> tuple[int, float]:
    """Legend columns (one per :data:`LEGEND_ROWS` entries) and the inches it needs beside the panels."""
    ncol = max(1, -(-len(entries) // LEGEND_ROWS))
    chars = max((len(e) for e in entries), default=0)
    return ncol, 0.3 + ncol * (0.45 + 0.075 * chars)


def draw_maps(panels: dict[str, np.ndarray], labels: list[str], title: str) -> Any:
    """The figure of :func:`plot_maps`: one panel per map, one legend (shortened labels, their
    counts) outside the panels on the right, the figure widened by :func:`legend_layout`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = sorted(set(labels) - {UNLABELLED}) + ([UNLABELLED] if UNLABELLED in labels else [])
    lab = np.asarray(labels)
    entries = [f"{shorten(c)} ({int((lab == c).sum())})" for c in classes]
    ncol, legend_in = legend_layout(entries)
    width = round((PANEL_INCHES * len(panels) + legend_in) * DPI) / DPI  # whole pixels
    fig = Figure(figsize=(width, PANEL_INCHES), dpi=DPI)
    FigureCanvasAgg(fig)
    colours = category_colours(len(classes) - (UNLABELLED in classes)) + [UNLABELLED_COLOUR]
    markers = [MARKERS[ci // 10 % len(MARKERS)] if len(classes) > 20 else "o" for ci in range(len(classes))]
    size = max(2.0, min(20.0, 4000 / max(1, len(lab))))
    for i, (name, xy) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for ci, c in enumerate(classes):
            m = lab == c
            color = UNLABELLED_COLOUR if c == UNLABELLED else colours[ci]
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=color, marker=markers[ci], label=entries[ci], alpha=0.8,
                       linewidths=0)
        ax.set_title(f"{name} encoder")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, (width - legend_in) / width, 0.96))
    fig.legend(*fig.axes[-1].get_legend_handles_labels(), loc="upper left", fontsize="small", ncol=ncol,
               bbox_to_anchor=((width - legend_in + 0.1) / width, 0.93), markerscale=max(1.0, 6 / size ** 0.5),
               frameon=False, title=None)
    return fig


def plot_maps(panels: dict[str, np.ndarray], labels: list[str], title: str, out: Path) -> tuple[int, int]:
    """Scatter one ``(N, 2)`` map per panel side by side, coloured by ``labels`` (:func:`draw_maps`);
    returns the PNG's ``(W, H)`` px: ``PANEL_INCHES * DPI`` high, each panel that wide plus the legend."""
    fig = draw_maps(panels, labels, title)
    return save_png(fig, out, DPI)


def folder_aliases(source: Any, refs: list) -> dict[str, str]:
    """``{folder name: alias}`` of the folder names no picture or report shows, used by ``--color-by folder``
    and ``data preview``'s row labels. Hidden are:

    * every folder below the first level under the data root, whatever it holds: in
      ``DIR/<class>/<patient ID>/img.jpg`` the patient's folder, whether it holds one image or many (not a
      name the user chose as a label);
    * a file's own folder that holds one group (patient) only (a first-level folder, or the root);
    * any folder the source says carries a patient's name or ID (``Source.patient_folders``; a DICOM
      export's ``DOE_JOHN/``).

    The first-level folders otherwise keep their names: they are the classes the user chose. A hidden name
    becomes ``folder K (names a patient)``, ``folder K (one patient)`` or ``folder K (may name a
    patient)``, in that order of precedence, ``K`` counting the hidden names in sorted order, the files' own
    folders (what ``--color-by folder`` shows) before the folders above them: the same data gives the same
    aliases, in every command; a name hidden anywhere is hidden everywhere.
    """
    groups: dict[str, set[str]] = {}  # files' own folders: their groups
    named: set[str] = set()
    nested: set[str] = set()
    for r in refs:
        folders = _folders(source.relative(r.path)) or [PurePath(r.path).parent.name]  # a file in the root: the root's name
        nested.update(folders[1:])
        levels = source.patient_folders(r)
        named.update(f for level, f in enumerate(reversed(folders), 1) if level in levels)
        groups.setdefault(folders[-1], set()).add(r.group or r.path)
    one = {n for n, g in groups.items() if len(g) == 1}
    why = {**{n: "may name a patient" for n in nested}, **{n: "one patient" for n in one},
           **{n: "names a patient" for n in named}}
    order = sorted(why, key=lambda n: (n not in groups, n))  # files' own folders (the t-SNE colours) first
    return {n: f"folder {k} ({why[n]})" for k, n in enumerate(order, 1)}


def _folders(rel: str) -> list[str]:
    """The folders of ``rel`` (a path as :meth:`Source.relative` gives it), first level first (``[]``: a
    file in the root, a file source's file, or a path outside the root). A name that is not UTF-8 keeps
    its bytes as ``surrogateescape`` does, as :func:`folder_values` compares it."""
    rel = PurePath(rel)
    if rel.is_absolute() or ".." in rel.parts:
        return []
    return list(rel.parts[:-1])


def folder_values(source: Any, refs: list) -> dict[str, str]:
    """``{sample id: folder name}``, the names :func:`folder_aliases` hides replaced by their alias."""
    names = {sample_id(source, r): PurePath(r.path).parent.name for r in refs}
    alias = folder_aliases(source, refs)
    hidden = set(names.values()) & set(alias)
    if hidden:
        print(f"sslkit: note: --color-by folder: {len(hidden)} of {len(set(names.values()))} folder names hold one "
              "patient (group) or carry a patient's name or ID, or lie below the first level (so may name a "
              "patient), and are not shown", file=sys.stderr)
    return {sid: alias.get(n, n) for sid, n in names.items()}


def header_values(source: Any, refs: list, field: str) -> dict[str, str]:
    """``{sample id: value}`` of ``field`` for ``--color-by``: ``folder`` (the file's folder name) or
    a header field the source reports in ``Source.properties(ref)`` (case and ``_`` ignored, so
    ``Modality`` finds ``modality``; a file without it: :data:`MISSING`), for every ref of ``source``'s
    index (:func:`~sslkit.eval.features.index_source`). Index only: nothing is decoded."""
    if field == "folder":
        return folder_values(source, refs)

    def norm(key: str) -> str:
        return key.lower().replace("_", "")

    out: dict[str, str] = {}
    known: set[str] = set()
    for r in refs:
        props = source.properties(r)
        known |= set(props)
        key = next((k for k in props if norm(k) == norm(field)), None)
        if key is not None and props[key] is not None:
            out[sample_id(source, r)] = str(props[key])
    if not out:
        raise UsageError(f"--color-by {field!r}: {source.scheme} data gives no such field; choose from: label, "
                         f"folder{''.join(', ' + k for k in sorted(known))}")
    return {sample_id(source, r): out.get(sample_id(source, r), MISSING) for r in refs}


def random_pick(n: int, max_samples: int, seed: int) -> Callable[[set[int]], list[int]]:
    """``choose(failed)`` for :func:`~sslkit.eval.features.embed_sample`: the first ``max_samples`` of a
    ``seed``-fixed permutation of the ``n`` indexed samples, leaving out those that failed to decode (the next
    ones in the permutation take their place), in index order."""
    order = np.random.default_rng(seed).permutation(n)

    def choose(failed: set[int]) -> list[int]:
        return sorted(islice((int(i) for i in order if int(i) not in failed), max_samples))

    return choose


def map_embeddings(model: Any, data: str, source_options: dict[str, Any] | None, max_samples: int, seed: int,
                   baseline: bool, batch_size: int, progress: bool, color_by: str,
                   table: dict[str, str] | None = None) -> tuple[dict, dict | None, int]:
    """The embeddings a map shows, the ``--color-by`` values (None: by label) and how many samples ``data``
    holds. From the index, ``max_samples`` of them are picked at random (``seed``) and only those decoded
    (:func:`~sslkit.eval.features.embed_sample`); a set no larger is embedded whole, through the cache
    that the other evaluations share (:func:`~sslkit.eval.features.embed_indexed`: not indexed again). A labels
    ``table`` is matched against every indexed sample first, so that a row naming several files is refused
    before decoding, whichever samples are picked."""
    source = index_source(model, data, source_options)
    refs = index_refs(source, data)
    colours = header_values(source, refs, color_by) if color_by != "label" else None
    if colours is None and table is not None:
        assign_labels([sample_id(source, r) for r in refs], [r.label for r in refs], table,
                      [label_paths(source, r) for r in refs])
    if max_samples >= len(refs):
        embs = embed_indexed(model, data, source, refs, baseline, batch_size, progress)
        return embs, colours, len(embs["pretrained"].embeddings)
    embs, failed = embed_sample(model, data, source, refs, random_pick(len(refs), max_samples, seed), baseline,
                                batch_size, progress)
    return embs, colours, len(refs) - failed


def evaluate_tsne(model_path: str, data: str, out: str | None = None, labels_csv: str | None = None,
                  baseline: bool = True, method: str = "tsne", perplexity: float = 30.0,
                  max_samples: int = 5000, seed: int = 0, overwrite: bool = False, batch_size: int = 64,
                  source_options: dict[str, Any] | None = None, progress: bool = True,
                  device: str = "auto", color_by: str = "label", max_pixels: int | None = None) -> dict[str, Any]:
    """Embed ``data`` (at most ``max_samples`` of it: :func:`map_embeddings`), map it to 2-D, save the PNG
    (``out`` or ``RUN/eval/tsne-<stamp>.png``) and a report.

    Points are coloured by label (class folder or ``labels_csv``), or by ``color_by``: ``folder``
    or a header field of the source (see :func:`header_values`); ``labels_csv`` with another ``color_by``
    would colour nothing: refused in one line.
    """
    if labels_csv and color_by != "label":
        raise UsageError(f"--labels colour the points with --color-by label only; leave out --labels or --color-by "
                         f"{shown(color_by)}")
    model = open_model(model_path, device)
    model.max_pixels = max_pixels
    out_path = _check_out(out, overwrite)
    table = read_labels_csv(labels_csv) if labels_csv else None
    embs, colours, n_total = map_embeddings(model, data, source_options, max_samples, seed, baseline, batch_size,
                                            progress, color_by, table)
    emb = embs["pretrained"]
    labs = [colours.get(i) for i in emb.ids] if colours is not None else assign_labels(emb.ids, emb.labels, table,
                                                                                       emb.label_paths)
    labels = [lab if lab is not None else UNLABELLED for lab in labs]
    panels = {name: reduce_2d(e.embeddings, method, perplexity, seed) for name, e in embs.items()}
    desc = model.describe()
    title = (f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {len(labels)} embeddings: "
             f"{desc['task']} {desc['backbone']}" + (f"; colour: {color_by}" if color_by != "label" else ""))
    out_path, (width, height) = save_picture(out_path, model.report_dir, method,
                                             lambda path: plot_maps(panels, labels, title, path))
    used = capped_perplexity(perplexity, len(labels)) if method == "tsne" else None
    report = new_report(method, desc, {"method": method, "perplexity": perplexity, "perplexity_used": used,
                                       "seed": seed, "max_samples": max_samples, "baseline": baseline,
                                       "color_by": color_by})
    report["data"] = {"data": {"source": data, "samples": n_total, "plotted": len(labels),
                               "unlabelled": labels.count(UNLABELLED),
                               "skipped": skipped_summary(emb.skip_reasons)}}
    report["classes"] = sorted(set(labels) - {UNLABELLED})
    report["class_counts"] = {"plotted": {c: labels.count(c) for c in report["classes"]}}
    report["files"] = [str(out_path)]
    report["image_size"] = [width, height]
    save_report(report, model.report_dir, picture=out_path, overwrite=overwrite and out is not None)
    return report


def _check_out(out: str | None, overwrite: bool) -> Path | None:
    """``--out`` as a path (refused when it would replace a file silently); None: default name."""
    if out is None:
        return None
    path = Path(out)
    check_output(path, overwrite, ".png")
    return path
