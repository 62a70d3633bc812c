"""Write a benchmark DICOM corpus from ../shared/data/pneumonia-train.tar.gz.

Each chest X-ray (8-bit JPEG, 160 px) becomes a CR file the way an archive holds it:
upsampled to ``--size`` px, 12 bits stored in 16-bit words with a little detector noise,
a VOI window in the header, every 4th file MONOCHROME1 (inverted stored values), and
transfer syntaxes cycling uncompressed (explicit VR LE) / RLE Lossless / JPEG 2000
Lossless (``--syntax mixed``, the default), or all in one of them (``--syntax rle``: an RLE
Lossless corpus). Patients are made up (an ID per 3 images), so patient-level splits have
something to group. Nothing is downloaded.

    .venv/bin/python benchmarks/make_dicom_corpus.py --out /tmp/cr-corpus --count 300
    .venv/bin/python benchmarks/make_dicom_corpus.py --out /tmp/rle-corpus --count 300 --syntax rle
"""

from __future__ import annotations

import argparse
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_factory import write_dicom  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import refuse  # noqa: E402

TAR = REPO.parent / "shared" / "data" / "pneumonia-train.tar.gz"
SYNTAXES = ("explicit", "rle", "j2k")
#: ``--syntax`` choices: ``mixed`` cycles :data:`SYNTAXES` file by file; any other writes every file in it
CORPUS_SYNTAXES = ("mixed", *SYNTAXES)
#: a corpus folder's markers: ``.complete`` (its settings, written last) and ``.partial`` (written
#: first, removed with ``.complete`` written): either one says the folder is a corpus script's own
COMPLETE, PARTIAL = ".complete", ".partial"


def start_corpus(out: Path, settings: str, made: str) -> bool:
    """True when ``out`` already holds the corpus of ``settings`` (its ``.complete`` says so). Else
    ``out`` is readied for a new one: empty, with ``.partial`` in it. Files are removed only from a
    folder a corpus script made (a marker in it), and only those whose path below ``out`` matches
    ``made`` (a regular expression: the folders and files the script writes): a folder without a
    marker that holds anything, or a marked one that holds anything else, is refused in one line and
    nothing is removed."""
    marker = out / COMPLETE
    if marker.is_file() and marker.read_text().strip() == settings:
        return True
    if out.exists() and not out.is_dir():
        refuse(f"error: --out {out} is a file, not a folder")
    entries = sorted(out.rglob("*")) if out.exists() else []
    if entries and not (marker.exists() or (out / PARTIAL).exists()):
        refuse(f"error: {out} is not empty and holds no corpus this script wrote (no {COMPLETE} or {PARTIAL} in it): "
               f"name a new or empty folder")
    own = re.compile(made)
    entries = [p for p in entries if p.parent != out or p.name not in (COMPLETE, PARTIAL)]
    strays = [p for p in entries if p.is_symlink() or not (p.is_file() or p.is_dir())
              or not own.fullmatch(p.relative_to(out).as_posix())]
    if strays:
        refuse(f"error: {out} holds {len(strays)} path(s) this script did not write (e.g. "
               f"{strays[0].relative_to(out)}): move them out or name another folder; nothing was removed")
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL).write_text(settings)
    marker.unlink(missing_ok=True)
    for p in entries:
        if p.is_file():
            p.unlink()
    for d in sorted((p for p in entries if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    return False


def finish_corpus(out: Path, settings: str) -> None:
    """Mark ``out``'s corpus complete with ``settings`` (:func:`start_corpus` reuses it)."""
    (out / COMPLETE).write_text(settings)
    (out / PARTIAL).unlink(missing_ok=True)


def make_corpus(out: Path, count: int = 300, size: int = 512, seed: int = 0, syntax: str = "mixed") -> list[Path]:
    """Write ``count`` CR files below ``out`` (skipped when ``out/.complete`` says so; another corpus
    there is removed first, :func:`start_corpus`), in transfer syntax ``syntax`` (:data:`CORPUS_SYNTAXES`)."""
    if syntax not in CORPUS_SYNTAXES:
        refuse(f"error: unknown --syntax {syntax!r}: one of {', '.join(CORPUS_SYNTAXES)}")
    settings = f"{count} {size} {seed}" + ("" if syntax == "mixed" else f" {syntax}")
    if start_corpus(out, settings, r"patient\d+(/cr\d+\.dcm)?"):
        return sorted(out.rglob("*.dcm"))
    rng = np.random.default_rng(seed)
    written = []
    with tarfile.open(TAR) as tar:
        members = [m for m in tar if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        members = [members[i] for i in sorted(rng.choice(len(members), size=min(count, len(members)), replace=False))]
        for i, m in enumerate(members):
            img = Image.open(tar.extractfile(m)).convert("L").resize((size, size), Image.BICUBIC)
            v = np.asarray(img, dtype=np.float32) / 255.0 * 4095 + rng.normal(0, 6, (size, size))
            stored = np.clip(np.rint(v), 0, 4095).astype(np.uint16)
            mono1 = i % 4 == 3
            if mono1:
                stored = 4095 - stored  # MONOCHROME1: the detector's "white is low"
            written.append(write_dicom(
                out / f"patient{i // 3:04d}" / f"cr{i:05d}.dcm", stored, patient_id=f"BENCH{i // 3:04d}",
                modality="CR", photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
                syntax=SYNTAXES[i % len(SYNTAXES)] if syntax == "mixed" else syntax, bits_stored=12,
                window=(4096.0, 2048.0),
            ))
    finish_corpus(out, settings)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--syntax", choices=CORPUS_SYNTAXES, default="mixed",
                    help="transfer syntax: mixed cycles explicit / rle / j2k; any other, every file in it")
    args = ap.parse_args()
    files = make_corpus(args.out, args.count, args.size, syntax=args.syntax)
    mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} CR files ({args.syntax}), {mb:.0f} MB, in {args.out}")


if __name__ == "__main__":
    main()
