"""``pretrain --overwrite``: remove the replaced run's own files from its folder, and only those."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

from sslkit.errors import UsageError


def _own_pattern() -> re.Pattern[str]:
    """What sslkit writes in a run's folders: checkpoints (``checkpoints/step-<8 digits>/`` files), a
    killed save's ``.tmp-*``/``.old-*`` folders, TensorBoard event files."""
    from sslkit.checkpoint import MANIFEST, MODEL_FILE, PREFIX, STATE_FILE

    files = f"({MODEL_FILE}|{STATE_FILE}|{MANIFEST})"
    return re.compile(rf"checkpoints/({PREFIX}[0-9]{{8}}/{files}|\.tmp-[^/]+/{files}|\.old-[^/]+/{PREFIX}[0-9]{{8}}/{files})"
                      r"|tensorboard/events\.out\.tfevents\.[^/]+")


def _survey(out: Path, folders: Sequence[str], follow: bool = False) -> tuple[list[str], list[str], list[str]]:
    """``(sslkit's files, the user's files, symlinked folders)`` under ``out``'s ``folders`` (relative
    paths); a symlinked folder is not entered (``follow``: a top-level one is, to see what it holds)."""
    ours, theirs, links, own = [], [], [], _own_pattern()
    for name in folders:
        if (out / name).is_symlink() and not follow:
            links.append(name)
            continue
        for folder, subdirs, names in os.walk(out / name):  # os.walk enters no symlinked subfolder
            links += [(Path(folder) / d).relative_to(out).as_posix() for d in subdirs if (Path(folder) / d).is_symlink()]
            for file in names:
                rel = (Path(folder) / file).relative_to(out).as_posix()
                (ours if own.fullmatch(rel) else theirs).append(rel)
    return ours, theirs, links


def clear_own_files(out: Path, files: Sequence[str], folders: Sequence[str]) -> list[str]:
    """Remove the run files ``files`` and, in ``folders`` (``checkpoints/``, ``tensorboard/``), what
    sslkit writes there (:func:`_own_pattern`); a folder goes only once empty, a symlinked one is
    never entered. A file of the user's inside a checkpoint folder, which the new run's checkpoints
    would replace, is refused before anything is deleted; others stay, named on one stderr line.
    Returns the user's files kept. sslkit's eval reports on the replaced encoder go too."""
    from sslkit.eval.report import remove_reports

    ours, theirs, links = _survey(out, folders)
    linked = [name for name in links if "/" not in name and _survey(out.resolve(), [name], follow=True)[0]]
    if linked:  # another run's files may be there; left, a resume would take the old checkpoints
        raise UsageError(f"--overwrite: {linked[0]} is a link to {os.path.realpath(out / linked[0])!r}, which holds "
                         f"sslkit's files of a run; --overwrite never deletes through a link: remove the link or "
                         f"those files first")
    inside = [rel for rel in theirs + links if re.match(r"checkpoints/step-[0-9]{8}(/|$)", rel)]
    if inside:
        more = f" (and {len(inside) - 1} more)" if len(inside) > 1 else ""
        raise UsageError(f"--overwrite: {inside[0]}{more} is not sslkit's, and the new run's checkpoint of that step "
                         f"would replace its folder; move it first")
    try:
        if not (out / "eval").is_symlink():  # reports elsewhere are another run's
            remove_reports(out / "eval")  # sslkit's reports on the replaced encoder
        for rel in ours:
            os.unlink(out / rel)
        for name in folders:
            if not (out / name).is_symlink():
                for folder, _, _ in os.walk(out / name, topdown=False):
                    try:
                        os.rmdir(folder)
                    except OSError:  # the user's files are in it
                        pass
        from sslkit.run_record import CONFIG_TOML, is_own_config

        for name in files:  # last: a failure above leaves the old run recognisable
            if name != CONFIG_TOML or is_own_config(out / name):  # a config.toml of the user's stays
                (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise UsageError(f"--overwrite: cannot remove {exc.filename or out}: {exc.strerror or exc}; the old run "
                         f"is partly removed") from None
    kept = theirs + [f"{rel} (a link, not followed)" for rel in links]
    if kept:
        print(f"sslkit: --overwrite kept {len(kept)} file(s) of yours in {' and '.join(folders)}/: "
              f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}", file=sys.stderr)
    return kept
