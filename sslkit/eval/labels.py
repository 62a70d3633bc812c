"""Labels for evaluation: class sub-folders, or a CSV that maps files to classes.

A labels CSV has two columns, ``path,label`` (a header row naming them is optional).
``path`` is matched against the end of each sample's path, so it may be absolute,
relative to the data folder, or a bare file name; the longest match wins. A row that is the
match of several files (a bare ``IM0001`` or ``0000.jpg`` found in several folders) is refused:
it would label all of them alike, silently. A multi-frame file's frames share its label unless
a row names ``file#frame``.

A DICOM series read as one volume (``--sample volume``) is not named by a path (its id is
``series:<key>``); it is matched through its slices instead: a row naming any of its slice
files, or the folder that holds them (e.g. ``train/a/p1/st/se``), labels the series. Rows
that give one series two different labels leave it unlabelled.

Class sub-folders: the first folder below the data root, however deep the file lies (as
torchvision's ``ImageFolder``): ``<class>/<patient>/img.png`` for image folders and NIfTI files,
``<class>/<patient>/<study>/<series>/*.dcm`` for DICOM.
"""

from __future__ import annotations

import csv
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Sequence

import numpy as np

from sslkit.errors import UsageError, first_line, shown, unknown_name_message
from sslkit.output_file import check_regular


@dataclass
class Labelled:
    """The labelled part of an embedded dataset."""

    x: np.ndarray  # (N, D) float32
    labels: list[str]  # (N,) class names
    unlabelled: int  # samples dropped for want of a label
    ids: list[str] = field(default_factory=list)  # (N,) sample ids (path, "#frame"), for grouped splits
    skipped: dict[str, int] = field(default_factory=dict)  # files not decoded: reason (no file names) -> count
    groups: list[str] = field(default_factory=list)  # (N,) split group (patient) of each sample, where known


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """``path,label`` rows -> ``{normalised path: label}``."""
    file = Path(path)
    if not file.is_file():
        check_regular(file)  # there, but a folder or a FIFO: said so
        raise UsageError(f"--labels: file {str(path)!r} does not exist")
    table: dict[str, str] = {}
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for i, row in enumerate(reader):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if len(row) < 2:
                    raise UsageError(f"--labels {str(path)!r} line {i + 1}: expected 'path,label', got {shown(row)}")
                key, label = _norm(row[0]), row[1].strip()
                if i == 0 and label.lower() in ("label", "class", "target"):
                    continue  # header
                if not key or not label:
                    raise UsageError(f"--labels {str(path)!r} line {i + 1}: empty path or label")
                if table.get(key, label) != label:
                    raise UsageError(f"--labels {str(path)!r}: {shown(row[0])} has two labels, "
                                     f"{shown(table[key])} and {shown(label)}")
                table[key] = label
    except UnicodeDecodeError:
        raise UsageError(f"--labels {str(path)!r} is not a UTF-8 text CSV file") from None
    except csv.Error as exc:  # a field over csv.field_size_limit() (128 KiB), a NUL byte...
        raise UsageError(f"--labels {str(path)!r} line {reader.line_num}: not a 'path,label' CSV row "
                         f"({first_line(exc)})") from None
    if not table:
        raise UsageError(f"--labels {str(path)!r} holds no 'path,label' rows")
    return table


def _norm(p: str) -> str:
    """A row's path as ids are compared: ``/`` separators, no ``.`` segments (``./a/b.png``), no
    leading or trailing ``/`` (an absolute row matches by its tail, like any other)."""
    p = p.strip().replace("\\", "/")
    return posixpath.normpath(p).strip("/") if p else p


def _suffixes(sample_id: str) -> list[str]:
    """``/a/b/c.png#2`` -> ``["a/b/c.png#2", "b/c.png#2", "c.png#2", "a/b/c.png", ...]``, longest first."""
    path, _, frame = sample_id.partition("#")
    parts = [p for p in PurePath(path.replace("\\", "/")).parts if p not in ("/", "")]
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    return ([f"{t}#{frame}" for t in tails] if frame else []) + tails


def assign_labels(ids: Sequence[str], folder_labels: Sequence[str | None], table: dict[str, str] | None,
                  paths: Sequence[Sequence[str]] = ()) -> list[str | None]:
    """Each sample's label: from ``table`` (a labels CSV) when given, else its class folder.

    ``paths``: per sample, further paths a row may name besides its id (a DICOM volume's
    slice files and their folders; empty for a sample named by its own path). The rows
    matching the id or any of them must agree, else the sample has no label. A row that is
    the match of several different files or folders is a usage error (:func:`_check_unique`).
    """
    if table is None:
        return list(folder_labels)
    out: list[str | None] = []
    named: dict[str, set[str]] = {}  # row -> the files (frame left out) and folders it was the match of
    for i, sid in enumerate(ids):
        rows = set()
        for p in (sid, *(paths[i] if paths else ())):
            row = _match(table, p)
            if row is not None:
                rows.add(row)
                named.setdefault(row, set()).add(p.partition("#")[0])
        found = {table[row] for row in rows}
        out.append(found.pop() if len(found) == 1 else None)
    _check_unique(named)
    return out


def _check_unique(named: dict[str, set[str]]) -> None:
    """Refuse a row that matched several files (``0000.jpg`` in ``airplane/`` and ``cat/``; DICOM's
    ``IM0001`` in every series): it labelled all of them alike, silently."""
    row, where = max(named.items(), key=lambda item: len(item[1]), default=("", set()))
    if len(where) > 1:
        raise UsageError(f"--labels: row {shown(row)} matches {len(where)} files in different folders; give each "
                         f"file its own row, with its path relative to the data folder (FOLDER/NAME)")


def _match(table: dict[str, str], path: str) -> str | None:
    """The longest row of ``table`` that ends ``path`` or its absolute form (an absolute row for a
    relative ``--data``); None: no row does."""
    file, sep, frame = path.partition("#")
    whole = os.path.abspath(file) + sep + frame
    return next((s for s in (*_suffixes(whole), *_suffixes(path)) if s in table), None)


def no_labels(what: str, data: str, csv_given: bool) -> UsageError:
    hint = ("no row of --labels matches its files" if csv_given else
            f"put images in class sub-folders ({data}/<class>/image.png) or pass --labels labels.csv")
    return UsageError(f"{what} {data!r} has no labelled images: {hint}")


def select_labelled(x: np.ndarray, labels: Sequence[str | None], what: str, data: str,
                    csv_given: bool, ids: Sequence[str] = ()) -> Labelled:
    """Keep the samples that have a label; a set with none is a usage error."""
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        raise no_labels(what, data, csv_given)
    return Labelled(x[keep], [labels[i] for i in keep], len(labels) - len(keep), [ids[i] for i in keep] if ids else [])


#: how a source's alias of a class folder holding one patient ends (``folder K (one patient)``)
ONE_PATIENT_SUFFIX = "(one patient)"


def class_index(train: Sequence[str], test: Sequence[str], positive: str | None) -> tuple[list[str], int | None]:
    """Sorted class names of the training set and the index of the positive class (two classes).

    The positive class defaults to the second name in sorted order (scikit-learn's
    ``pos_label`` convention); name it with ``--positive``.
    """
    classes = sorted(set(train))
    if len(classes) < 2:
        raise UsageError(f"the training set has a single class ({classes[0]!r}); a probe needs at least two")
    unseen = sorted(set(test) - set(classes))
    if unseen:
        aliased = any(name.endswith(ONE_PATIENT_SUFFIX) for name in unseen)
        raise UsageError(f"test classes {', '.join(map(repr, unseen))} do not occur in the training set "
                         f"(training classes: {', '.join(classes)})"
                         + ("; a class folder holding one patient is named by an alias, not its name (which may "
                            "be the patient's): give the classes with --labels FILE.csv" if aliased else ""))
    if positive is not None and positive not in classes:
        raise UsageError("--positive: " + unknown_name_message("class", positive, classes))
    if len(classes) != 2:
        if positive is not None:
            raise UsageError(f"--positive applies to two classes; there are {len(classes)}")
        return classes, None
    return classes, classes.index(positive) if positive is not None else 1
