"""Leakage check for ``--train``/``--test``: the same image on both sides, found by content.

Files are compared by the SHA-256 of their bytes (plus the frame of a multi-frame file),
so a copy under another name or in another folder counts, and the same folder given
twice is caught. Only index-time reads happen here; nothing is decoded.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from sslkit.errors import UsageError


def content_keys(refs: Iterable) -> list[str]:
    """``sha256(file bytes)#frame`` of every sample of ``refs`` (each file read once; unreadable: left out)."""
    digests: dict[str, str] = {}
    out = []
    for ref in refs:
        if ref.path not in digests:
            h = hashlib.sha256()
            try:
                with open(ref.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError:
                continue  # unreadable here: reported as skipped when decoded
            digests[ref.path] = h.hexdigest()
        out.append(f"{digests[ref.path]}#{ref.frame}")
    return out


def check_overlap(train_refs: list, test_refs: list, allow: bool) -> int:
    """How many test samples also occur in the training set; refused unless ``allow``."""
    seen = set(content_keys(train_refs))
    shared = sum(key in seen for key in content_keys(test_refs))
    if shared and not allow:
        raise UsageError(f"--train and --test share {shared} of the {len(test_refs)} test images (same file "
                         f"content): scores would be inflated; use separate data, or one labelled folder with "
                         f"--data DIR --split group:5, or pass --allow-overlap to evaluate anyway")
    return shared
