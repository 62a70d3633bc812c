"""Train / validation splits that keep every group (patient, study, file) on one side.

Sources give each :class:`SampleRef` a ``group``: for DICOM the files of one PatientID (else
StudyInstanceUID, else the file), named after the group's first file; for folders a user
regex match. ``run.json`` fingerprints the held-out part by content
(:func:`sslkit.data.prepare.fingerprint`), never by its group keys. All frames
of a file share it, so no patient and no multi-frame file is ever on both sides.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from sslkit.data.source import SampleRef
from sslkit.errors import UsageError


def _rank(group: str, seed: int) -> str:
    return hashlib.sha256(f"sslkit-split\0{seed}\0{group}".encode("utf-8", "surrogateescape")).hexdigest()


def split_refs(refs: Sequence[SampleRef], fraction: float, seed: int = 0) -> tuple[list[SampleRef], list[SampleRef]]:
    """``refs -> (train, val)`` with about ``fraction`` of the samples in ``val``.

    Groups are ordered by a seeded hash of the group key and taken into ``val`` until it
    holds ``round(fraction * N)`` samples (at least one group). The choice depends only on
    ``(group, seed)``, not on file order, so the same data and seed give the same split
    everywhere. ``fraction == 0`` gives ``(refs, [])``. Input order is kept on both sides.
    """
    refs = list(refs)
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not refs:
        return refs, []
    sizes: dict[str, int] = {}
    for r in refs:
        key = r.group or r.path
        sizes[key] = sizes.get(key, 0) + 1
    if len(sizes) < 2:
        raise UsageError(
            f"--val-fraction {fraction}: all {len(refs)} samples belong to one patient/group; "
            "nothing can be held out without leaking it into training"
        )
    want = max(1, round(fraction * len(refs)))
    val_groups: set[str] = set()
    taken = 0
    for key in sorted(sizes, key=lambda k: _rank(k, seed)):
        if taken >= want or len(val_groups) == len(sizes) - 1:
            break
        val_groups.add(key)
        taken += sizes[key]
    train = [r for r in refs if (r.group or r.path) not in val_groups]
    val = [r for r in refs if (r.group or r.path) in val_groups]
    return train, val

