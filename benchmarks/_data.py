"""The benchmarks' data: the shared archives (extracted once), data records, and class-folder splits of links."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from _common import refuse

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-train.tar.gz"  # train/<class>/*.jpg
XRAY_ARCHIVE = SHARED_DATA / "pneumonia-train.tar.gz"  # train/NORMAL/, train/PNEUMONIA/


def extract(tar: Path, dest: Path, flag: str = "--data") -> Path:
    """Unpack ``tar`` into ``dest`` once (``dest/.complete``), through a temporary folder renamed when whole
    (processes sharing a work dir never read a half-written image; an older cut extraction is completed
    in place). A missing ``tar``: refused in one line naming ``flag``."""
    if (dest / ".complete").exists():
        return dest
    if not tar.is_file():
        refuse(f"error: data archive {tar} does not exist: pass {flag}")
    if dest.exists():
        tmp = dest
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
    (tmp / ".complete").write_text("")
    if tmp != dest:
        try:
            os.rename(tmp, dest)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / ".complete").exists():
                raise
    return dest


def data_folder(flag: str, given: Path | None, archive: Path, dest: Path, needs: str = "train",
                within: str = "") -> Path:
    """The data folder of ``flag``, resolved: ``given``, or when it is None ``archive`` (one of the
    shared archives) extracted into ``dest`` once (:func:`extract`) and its sub-folder ``within``.
    A ``given`` folder without the sub-folder ``needs`` is refused in one line saying how to make it."""
    if given is None:
        return (extract(archive, dest, flag) / within).resolve()
    if not (given / needs).is_dir():
        how = (f"`mkdir -p DIR && tar -xzf {archive} -C DIR` and pass {flag} DIR/{within}" if within
               else f"`mkdir -p {given} && tar -xzf {archive} -C {given}`")
        refuse(f"error: {flag} {given} has no {needs}/ folder: extract the data with {how}, "
               f"or leave {flag} out to have it extracted into --work")
    return given.resolve()


def data_settings(key: str, data: Path) -> dict[str, Any]:
    """The data a work dir's runs read, for :func:`check_settings`: ``{key: resolved path}`` and, for a
    folder, ``{key_files: number of files in it}`` (hidden ones aside), so that a rerun on other
    data (another folder, or the same one holding other images) is refused, not scored as the first."""
    out: dict[str, Any] = {key: str(data.resolve())}
    if data.is_dir():
        out[f"{key}_files"] = sum(1 for _, _, names in os.walk(data, followlinks=True)
                                  for n in names if not n.startswith("."))
    return out


def link_split(files: dict[str, list[Path]], dest: Path) -> Path:
    """``{class: [files]}`` -> ``dest/<class>/<file>`` symbolic links (a class-folder dataset)."""
    if (dest / ".complete").exists():
        return dest
    for cls, paths in files.items():
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            link = dest / cls / p.name
            try:
                link.symlink_to(p.resolve())
            except FileExistsError:  # an earlier, interrupted call or a second process (task_table.py --tasks split)
                if link.resolve() != p.resolve():
                    raise
    (dest / ".complete").write_text("")
    return dest


def stratified_subset(files: dict[str, list[Path]], n: int, seed: int) -> dict[str, list[Path]]:
    """About ``n`` files in all, the same fraction of every class."""
    total = sum(len(v) for v in files.values())
    if n >= total:
        return files
    rng = np.random.default_rng(seed)
    return {c: sorted(rng.permutation(v)[: max(1, round(len(v) * n / total))].tolist()) for c, v in files.items()}


if __name__ == "__main__":
    from _common import not_a_script

    not_a_script("_data.py", "a benchmark that imports it (cifar10.py, task_table.py, init_continue.py, ...)")
