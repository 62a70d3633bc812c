"""Leakage check for ``--train``/``--test``: the same image on both sides, found by content.

Files are compared by the SHA-256 of their bytes (plus the frame of a multi-frame file),
so a copy under another name or in another folder counts, and the same folder given
twice is caught; a source whose files hold several arrays gives each sample's own key
(``Source.content_key``: the ``train`` and ``test`` arrays of one ``.npz``). Only index-time reads
happen here; nothing is decoded. Only files that can be equal are read in full: a file whose
quick digest (its size and first and last 4 KiB, :func:`~sslkit.data.digest.content_digest`, read
again for the decoded cache's key anyway) no file on the other side has cannot hold the same bytes.
The refusal comes before decoding, so it counts the indexed samples; the count a report holds
(:meth:`Overlap.scored`) is over the samples actually scored (decoded and labelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Sequence

from sslkit.data.digest import content_digest
from sslkit.errors import UsageError
from sslkit.output_file import file_sha256
from sslkit.progress import counted

Entry = tuple[str, "str | None", Any]  # (sample id, the source's content key or None, ref)


def content_keys(refs: Sequence, ids: Sequence[str] | None = None, source: Any = None) -> dict[str, str]:
    """``{sample id: sha256(file bytes)#frame}`` of every sample of ``refs`` (``ids``: their sample
    ids, default ``ref.id``; each file read once; unreadable: left out), or ``sample:KEY`` where the
    ``source``'s ``content_key(ref)`` gives one (a file holding several arrays)."""
    entries = _entries(refs, ids, source)
    quick = _quick(entries)
    return _keys(entries, quick, _sha256(sorted(quick)), set(quick), "")


def _entries(refs: Sequence, ids: Sequence[str] | None, source: Any) -> list[Entry]:
    """``(sample id, the source's content key or None, ref)`` of every sample whose content key does
    not fail (a damaged file: left out here, reported as skipped when decoded)."""
    own = getattr(source, "content_key", None)
    out = []
    for ref, sample in zip(refs, ids if ids is not None else [r.id for r in refs]):
        try:
            out.append((sample, own(ref) if own is not None else None, ref))
        except Exception:  # noqa: BLE001 - a damaged file: reported as skipped when decoded
            continue
    return out


def _quick(entries: Sequence[Entry]) -> dict[str, str]:
    """``{path: content_digest}`` of the files keyed by their bytes; unreadable: left out."""
    out: dict[str, str] = {}
    for _, key, ref in entries:
        if key is None and ref.path not in out:
            try:
                out[ref.path] = content_digest(ref.path)
            except OSError:
                continue  # unreadable here: reported as skipped when decoded
    return out


def _sha256(paths: Sequence[str], progress: bool = False) -> dict[str, str]:
    """``{path: sha256 of the file's bytes}``; unreadable: left out."""
    out = {}
    for path in counted(paths, len(paths), "overlap check", "file", progress and bool(paths)):
        try:
            out[path] = file_sha256([path])
        except OSError:
            continue  # unreadable here: reported as skipped when decoded
    return out


def _keys(entries: Sequence[Entry], quick: dict[str, str], full: dict[str, str], hashed: Collection[str],
          side: str) -> dict[str, str]:
    """``{sample id: key}``: ``sample:KEY`` (the source's), ``sha256#frame`` (a file read in full) or,
    for a file not read in full (its quick digest is on one side only), ``side:path#frame``, which
    no sample of the other side has. A file unreadable at either stage is left out."""
    out = {}
    for sample, key, ref in entries:
        if key is not None:
            out[sample] = f"sample:{key}"
        elif ref.path in full:
            out[sample] = f"{full[ref.path]}#{ref.frame}"
        elif ref.path in quick and ref.path not in hashed:
            out[sample] = f"{side}:{ref.path}#{ref.frame}"
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
                  test_ids: Sequence[str] | None = None, sources: tuple[Any, Any] = (None, None),
                  progress: bool = False) -> Overlap:
    """The test samples that also occur in the training set; refused unless ``allow`` (before decoding:
    the indexed samples are counted, files that will not decode included). ``sources``: the two
    sides' sources, whose ``content_key`` is used where they give one. Only files whose quick digest
    both sides have are read in full (``progress``: a line on stderr while they are)."""
    sides = _entries(train_refs, train_ids, sources[0]), _entries(test_refs, test_ids, sources[1])
    quick = _quick(sides[0]), _quick(sides[1])
    both = set(quick[0].values()) & set(quick[1].values())
    hashed = {path for q in quick for path, digest in q.items() if digest in both}
    full = _sha256(sorted(hashed), progress)
    train, test = (_keys(e, q, full, hashed, side) for e, q, side in zip(sides, quick, ("train", "test")))
    seen = set(train.values())
    shared = sum(key in seen for key in test.values())
    if shared and not allow:
        raise UsageError(f"--train and --test share {shared} of the {len(test_refs)} test images indexed (same "
                         f"file content, counted before decoding): scores would be inflated; use separate data, or "
                         f"one labelled folder with --data DIR --split group:5, or pass --allow-overlap to evaluate "
                         f"anyway")
    return Overlap(train, test, shared)
