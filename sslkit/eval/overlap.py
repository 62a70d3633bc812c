"""Leakage check for ``--train``/``--test``: the same image on both sides, found by content.

Files are compared by the SHA-256 of their bytes (plus the frame of a multi-frame file),
so a copy under another name or in another folder counts, and the same folder given
twice is caught; a source whose files hold several arrays gives each sample's own key
(``Source.content_key``: the ``train`` and ``test`` arrays of one ``.npz``). Only index-time reads happen here; nothing is decoded. The refusal comes
before decoding, so it counts the indexed samples; the count a report holds
(:meth:`Overlap.scored`) is over the samples actually scored (decoded and labelled).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from sslkit.errors import UsageError


def content_keys(refs: Sequence, ids: Sequence[str] | None = None, source: Any = None) -> dict[str, str]:
    """``{sample id: sha256(file bytes)#frame}`` of every sample of ``refs`` (``ids``: their sample
    ids, default ``ref.id``; each file read once; unreadable: left out), or ``sample:KEY`` where the
    ``source``'s ``content_key(ref)`` gives one (a file holding several arrays)."""
    digests: dict[str, str] = {}
    out = {}
    own = getattr(source, "content_key", None)
    for ref, sample in zip(refs, ids if ids is not None else [r.id for r in refs]):
        try:
            key = own(ref) if own is not None else None
        except Exception:  # noqa: BLE001 - a damaged file: reported as skipped when decoded
            continue
        if key is not None:
            out[sample] = f"sample:{key}"
            continue
        if ref.path not in digests:
            h = hashlib.sha256()
            try:
                with open(ref.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError:
                continue  # unreadable here: reported as skipped when decoded
            digests[ref.path] = h.hexdigest()
        out[sample] = f"{digests[ref.path]}#{ref.frame}"
    return out


@dataclass
class Overlap:
    """Content keys of both sides (sample id -> key) and the indexed test samples found in training."""

    train: dict[str, str]
    test: dict[str, str]
    indexed: int

    def scored(self, train_ids: Sequence[str], test_ids: Sequence[str]) -> int:
        """How many of the scored test samples ``test_ids`` have the content of a scored training sample."""
        seen = {self.train[i] for i in train_ids if i in self.train}
        return sum(self.test.get(i) in seen for i in test_ids)


def check_overlap(train_refs: Sequence, test_refs: Sequence, allow: bool, train_ids: Sequence[str] | None = None,
                  test_ids: Sequence[str] | None = None, sources: tuple[Any, Any] = (None, None)) -> Overlap:
    """The test samples that also occur in the training set; refused unless ``allow`` (before decoding:
    the indexed samples are counted, files that will not decode included). ``sources``: the two
    sides' sources, whose ``content_key`` is used where they give one."""
    train, test = content_keys(train_refs, train_ids, sources[0]), content_keys(test_refs, test_ids, sources[1])
    seen = set(train.values())
    shared = sum(key in seen for key in test.values())
    if shared and not allow:
        raise UsageError(f"--train and --test share {shared} of the {len(test_refs)} test images indexed (same "
                         f"file content, counted before decoding): scores would be inflated; use separate data, or "
                         f"one labelled folder with --data DIR --split group:5, or pass --allow-overlap to evaluate "
                         f"anyway")
    return Overlap(train, test, shared)
