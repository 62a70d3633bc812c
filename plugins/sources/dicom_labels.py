"""Labels of DICOM samples for ``eval``.

The class is the first folder below the data root (``ROOT/<class>/<patient>/<study>/<series>/
*.dcm``; a file in the root itself has none), not the file's own folder as for image folders,
since DICOM trees are deep. A series (``--sample slab:K|volume``) takes the class of its
slices; one whose slices lie under several class folders has none. First folders that each
hold exactly one patient of their own (three or more) are a plain export's patient folders,
not classes: no labels.
"""

from __future__ import annotations

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


def not_patient_folders(refs: list[SampleRef]) -> list[SampleRef]:
    """``refs`` without labels when the first folders below the root are patients, not classes
    (three or more, each holding exactly one patient of its own): a plain ``<patient>/<study>/``
    export would otherwise be evaluated with one class per patient, named after its folder."""
    groups: dict[str, set[str]] = {}
    for r in refs:
        if r.label is not None:
            groups.setdefault(r.label, set()).add(r.group)
    owners = [next(iter(g)) for g in groups.values() if len(g) == 1]
    if len(groups) >= 3 and len(owners) == len(groups) == len(set(owners)):
        return [replace(r, label=None) for r in refs]
    return refs
