"""Labels of DICOM samples for ``eval``.

The class is the first folder below the data root (``ROOT/<class>/<patient>/<study>/<series>/
*.dcm``; a file in the root itself has none), however deep the file, as for image folders and
NIfTI. A series (``--sample slab:K|volume``) takes the class of its
slices; one whose slices lie under several class folders has none. First folders that each
hold exactly one patient of their own (three or more, and nothing else) are a plain export's
patient folders, not classes: no labels; otherwise a first folder that holds one patient of its
own keeps its class under an alias, ``folder K (one patient)``, not its name (:func:`not_patient_folders`).
A first folder whose name carries the PatientName or PatientID of a file under it
(:func:`named_levels`, read with the header, kept as folder levels only) is never a class,
whatever the others are.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from sslkit.api import SampleRef


def class_of(path: str, root: Path) -> str | None:
    """The class of a file: the first folder below ``root`` (None for a file in the root)."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


def series_labelled(refs: list[SampleRef], volume_of: Callable[[SampleRef], Any], root: Path) -> list[SampleRef]:
    """``refs`` of slabs or volumes with the class of their series (``volume_of(ref).slices``): the one
    class folder all its slices lie under, None where they lie under several (or in the root)."""
    labels: dict[int, str | None] = {}
    out = []
    for ref in refs:
        vol = volume_of(ref)
        if id(vol) not in labels:
            found = {class_of(path, root) for path, _, _ in vol.slices}
            labels[id(vol)] = found.pop() if len(found) == 1 else None
        out.append(replace(ref, label=labels[id(vol)]))
    return out


#: folder levels above a file checked against its patient's name and ID (1: its own folder)
NAMED_LEVELS = 8


def _tokens(text: str) -> set[str]:
    """Upper-case runs of letters or digits, 3 or more long (``DOE^JOHN`` -> DOE, JOHN)."""
    return {t for t in re.split(r"[^0-9A-Z]+", text.upper()) if len(t) >= 3}


def named_levels(path: str, patient_name: str, patient_id: str) -> list[int]:
    """The levels of ``path``'s folders (1: its own) whose names share a word of 3 or more letters or
    digits with the patient's name or ID: only these small integers are kept, never the name."""
    words = _tokens(patient_name) | _tokens(patient_id)
    if not words:
        return []
    parents = list(Path(path).parents)[:NAMED_LEVELS]
    return [k for k, folder in enumerate(parents, 1) if _tokens(folder.name) & words]


#: the label of a class folder that holds one patient: the wording of ``--color-by folder``'s aliases
ONE_PATIENT = "folder {k} (one patient)"


def not_patient_folders(refs: list[SampleRef], named: set[str] = frozenset()) -> list[SampleRef]:
    """``refs`` with no class folder's name that may name a patient, decided per folder:

    * a class in ``named`` (a folder named after a patient of its files) loses its label;
    * three or more first folders, each holding exactly one patient of its own and nothing else, are a
      plain ``<patient>/<study>/`` export, not classes: no labels at all;
    * otherwise a first folder that holds exactly one patient of its own keeps its class under an alias
      that cannot carry its name, ``folder K (one patient)`` (:data:`ONE_PATIENT`), ``K`` counting these
      folders' names in sorted order: the same data gives the same aliases in every command. A class of
      one patient is legitimate (a tiny pilot set), but nothing tells its name from the patient's.

    "Of its own": a patient whose images lie under several first folders is sorted into classes by them
    (a phantom, one subject's conditions): those folders keep their names."""
    refs = [replace(r, label=None) if r.label in named else r for r in refs]
    groups: dict[str, set[str]] = {}
    for r in refs:
        if r.label is not None:
            groups.setdefault(r.label, set()).add(r.group or r.path)
    folders_of = Counter(g for members in groups.values() for g in members)
    owners = [label for label, g in groups.items() if len(g) == 1 and folders_of[next(iter(g))] == 1]
    if len(groups) >= 3 and len(owners) == len(groups):
        return [replace(r, label=None) for r in refs]
    alias = {name: ONE_PATIENT.format(k=k) for k, name in enumerate(sorted(owners), 1)}
    return [replace(r, label=alias[r.label]) if r.label in alias else r for r in refs]


def patient_named_classes(headers: dict[str, dict[str, Any]], root: Path) -> set[str]:
    """The first folders below ``root`` whose names carry a patient's name or ID of a file under them
    (``headers``: path -> header facts with ``named_levels``)."""
    named = set()
    for path, h in headers.items():
        try:
            parts = Path(path).relative_to(root).parts
        except ValueError:
            continue
        if len(parts) > 1 and len(parts) - 1 in h.get("named_levels", ()):
            named.add(parts[0])
    return named
