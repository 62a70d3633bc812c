"""``pretrain --overwrite``: remove the replaced run's own files from its folder, and only those."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence


def clear_own_files(out: Path, files: Sequence[str], folders: Sequence[str]) -> list[str]:
    """Remove the run files ``files`` and, in ``folders`` (``checkpoints/``, ``tensorboard/``), what
    sslkit writes there: checkpoints, a killed save's ``.tmp-*``/``.old-*`` folders, event files; a
    folder goes only once empty. Returns the files of the user's that stay (named on one stderr line),
    and removes sslkit's eval reports on the replaced encoder (not the user's files in ``eval/``)."""
    from sslkit.checkpoint import MANIFEST, MODEL_FILE, PREFIX, STATE_FILE
    from sslkit.eval.report import remove_reports

    for name in files:
        (out / name).unlink(missing_ok=True)
    ours = re.compile(rf"checkpoints/({PREFIX}\d+/({MODEL_FILE}|{STATE_FILE}|{MANIFEST})|\.(tmp|old)-[^/]+/.+)"
                      r"|tensorboard/events\.out\.tfevents\.[^/]+")
    kept = []
    for name in folders:
        for folder, _, names in os.walk(out / name, topdown=False):  # symlinked folders are not entered
            for file in names:
                rel = (Path(folder) / file).relative_to(out).as_posix()
                if ours.fullmatch(rel):
                    os.unlink(out / rel)
                else:
                    kept.append(rel)
            try:
                os.rmdir(folder)
            except OSError:  # the user's files are in it
                pass
    if kept:
        print(f"sslkit: --overwrite kept {len(kept)} file(s) of yours in {' and '.join(folders)}/: "
              f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}", file=sys.stderr)
    remove_reports(out / "eval")
    return kept
