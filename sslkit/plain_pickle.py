"""Reading a torch pickle as plain data only: ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor, a number, a string or a container of them, so
nothing in the file runs. A refusal is reported as what was refused (``Unsupported global:
GLOBAL os.system ...``; ``Unsupported operand 80`` for a damaged file), not as torch's
preface, which suggests ``weights_only=False``: the one thing not to do with a file of
unknown origin."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from sslkit.errors import first_line


class NotPlainData(ValueError):
    """The file is not a plain-data torch pickle (damaged, or it holds code); the message says why."""


def load_plain(path: Path) -> Any:
    """The plain data pickled in ``path`` (tensors on the CPU); :class:`NotPlainData` otherwise."""
    check_archive(path)
    return _load(path)


def _load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol it was not written for
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NotPlainData(refusal_reason(exc)) from None


ZIP_MAGIC = b"PK\x03\x04"


def check_archive(path: Path) -> None:
    """Refuse a torch zip whose records could unpack to more than the file holds, before torch
    reads it (torch allocates a record's declared size, then inflates it): ``torch.save`` stores
    its records uncompressed, one after the other, so no record is compressed and together they
    are no larger than the file. A deflated record (1.5 MB on disk, 1.6 GB inside) or records that
    overlap (one span of the file read as many records) is a zip bomb: :class:`NotPlainData`."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:  # the legacy format, or not a torch file: torch.load says so
                return
            size = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as archive:
                records = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise NotPlainData(f"{path.name} is not a readable zip archive ({first_line(exc)})") from None
    packed = next((r for r in records if r.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise NotPlainData(f"{path.name}: record {packed.filename[:80]!r} is compressed ({packed.compress_size:,} "
                           f"bytes unpacking to {packed.file_size:,}); torch.save never compresses, so this is "
                           f"not a file torch.save wrote")
    total = sum(r.file_size for r in records)
    if total > size:
        raise NotPlainData(f"{path.name}: its records declare {total:,} bytes, more than the file's {size:,}; "
                           f"not a file torch.save wrote")


PREFACE = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")


def refusal_reason(exc: Exception) -> str:
    """The first sentence of what torch's weights-only unpickler refused, past its preface
    (the wording differs between refusals); else the error's first line."""
    lines = (line.strip() for line in str(exc).splitlines())
    reasons = [r for r in (line.removeprefix("WeightsUnpickler error:").strip() for line in lines
                           if line and not line.startswith(PREFACE)) if r]
    reason = reasons[0].split(". ")[0].rstrip(".")[:200] if reasons else first_line(exc)
    if reason.isdigit():  # the unpickler's KeyError on a byte that is no pickle opcode: not a pickle at all
        reason = f"not a torch weights file (byte {int(reason)} is no pickle opcode)"
    return reason



class Inert:
    """What a pickled object that is not data becomes in :func:`load_weights`: built from nothing,
    holding nothing, calling nothing (``Inert(*args)`` and ``__setstate__`` ignore their arguments)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load_weights(path: Path) -> tuple[Any, list[str]]:
    """A weights pickle read as plain data, its other objects made :class:`Inert`: ``(data, names)``.

    Training checkpoints hold more than tensors: a PyTorch Lightning ``.ckpt`` (solo-learn,
    lightly) pickles its hyper-parameters as ``argparse.Namespace`` or OmegaConf objects, which
    ``weights_only=True`` refuses. Here each global that the weights-only unpickler does not allow
    is mapped to :class:`Inert`, so the file's tensors are read and nothing in it runs; ``names``
    lists what was not read (``['argparse.Namespace', ...]``). torch's blocked modules (``os``,
    ``sys``) stay refused, as do files that are damaged or that the unpickler cannot walk:
    :class:`NotPlainData`.
    """
    check_archive(path)
    try:
        return _load(path), []
    except NotPlainData as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip-format torch file (damaged, or the legacy format)
            raise first from None
        if not names:
            raise
    try:
        with torch.serialization.safe_globals([(Inert, name) for name in names]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True), sorted(names)
    except Exception as exc:
        raise NotPlainData(refusal_reason(exc)) from None
