"""Write a benchmark DICOM corpus from ../shared/data/pneumonia-train.tar.gz.

Each chest X-ray (8-bit JPEG, 160 px) becomes a CR file the way an archive holds it:
upsampled to ``--size`` px, 12 bits stored in 16-bit words with a little detector noise,
a VOI window in the header, every 4th file MONOCHROME1 (inverted stored values), and
transfer syntaxes cycling uncompressed (explicit VR LE) / RLE Lossless / JPEG 2000
Lossless. Patients are made up (an ID per 3 images), so patient-level splits have
something to group. Nothing is downloaded.

    .venv/bin/python benchmarks/make_dicom_corpus.py --out /tmp/cr-corpus --count 300
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_factory import write_dicom  # noqa: E402

TAR = REPO.parent / "shared" / "data" / "pneumonia-train.tar.gz"
SYNTAXES = ("explicit", "rle", "j2k")


def make_corpus(out: Path, count: int = 300, size: int = 512, seed: int = 0) -> list[Path]:
    """Write ``count`` CR files below ``out`` (skipped when ``out/.complete`` says so)."""
    marker = out / ".complete"
    if marker.exists() and marker.read_text().strip() == f"{count} {size} {seed}":
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
                syntax=SYNTAXES[i % len(SYNTAXES)], bits_stored=12, window=(4096.0, 2048.0),
            ))
    marker.write_text(f"{count} {size} {seed}")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    files = make_corpus(args.out, args.count, args.size)
    mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} CR files, {mb:.0f} MB, in {args.out}")


if __name__ == "__main__":
    main()
