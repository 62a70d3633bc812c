#!/usr/bin/env python
"""Embed a folder of images with an encoder exported by ``sslkit export``: no sslkit, no torch.

Needs only onnxruntime, numpy, pillow and (for DICOM files) pydicom; compressed DICOM
also needs pydicom's codec packages, as sslkit itself installs them::

    pip install onnxruntime numpy pillow pydicom \
        pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle

(pylibjpeg-libjpeg: JPEG baseline/extended incl. 12-bit, JPEG lossless, JPEG-LS;
pylibjpeg-openjpeg: JPEG 2000; pylibjpeg-rle: fast RLE). Without them such files are
skipped, and the script says how many, why, and (only when a decoder is missing, not when
the data is corrupt) which packages to install. DICOM objects that are not images (SEG,
SR, RTSTRUCT...: sslkit's dicom source's rule) are skipped and named. Everything else
comes from the ``sslkit`` JSON in the ONNX file's metadata: input name and dtype, channels,
image size, and the preprocessing the graph does not do itself.

    python examples/onnx_inference.py encoder.onnx FOLDER --out embeddings.npz

Per image, as in pretraining:

1. read pixels: 8/16-bit PNG/JPEG/TIFF with pillow (float and 32-bit integer TIFFs scaled
   to [0, 1] by their own min-max, NaN/inf skipped: sslkit's rule, copied in ``own_range``);
   DICOM with pydicom, through the modality LUT (RescaleSlope/Intercept: Hounsfield units for CT);
   colour DICOM as RGB in [0, 1] (YBR converted, PALETTE COLOR through its colour tables);
2. map to what the graph takes (``input.raw.kind`` in the metadata):
   ``uint8`` / ``uint16`` raw pixels, ``window`` modality values (MONOCHROME1 reflected in
   the window; clipped to a single window before resizing, as the run windowed, then resized;
   a colour file, which the run saw as luma in [0, 1], as the value the window maps to that
   luma; refused by a stack of windows), ``unit`` [0, 1] after the run's DICOM
   window (``auto``: the file's first VOI window, else min-max), or ``normalized`` ``(x - mean) / std``;
3. convert channels (RGB -> luma 0.2989 R + 0.587 G + 0.114 B, gray -> repeated);
4. resize the shorter side to ``image_size`` (bilinear, antialiased) and centre-crop.

Writes ``embeddings`` (N, D) float32 and ``ids`` (file paths, ``#frame`` for frames).
Pillow's resampling is close to, not bit-identical with, PyTorch's antialiased bilinear
resize used in training; images already at ``image_size`` give identical embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
CODECS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
LUMA = (0.2989, 0.587, 0.114)
UNIT_SCALE = {"uint8": 255.0, "uint16": 65535.0}  # [0, 1] -> what a graph taking 8 / 16-bit pixels takes


def refuse(message: str) -> NoReturn:
    """A user error, as sslkit's: one line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_metadata(session: ort.InferenceSession) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if "sslkit" not in meta:
        refuse("this ONNX file has no 'sslkit' metadata; export it with `sslkit export`")
    return json.loads(meta["sslkit"])


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def list_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p)):
                files.append(p)
    return files


# --- 1-2: pixels as the graph takes them ------------------------------------------------
def image_pixels(path: Path, raw: dict) -> np.ndarray:
    """A pillow image -> (C, H, W) in the graph's raw kind (before channel conversion)."""
    with Image.open(path) as opened:
        opened.load()
        # a JPEG is turned upright by its EXIF orientation, as sslkit's folder source reads it
        img = ImageOps.exif_transpose(opened) if opened.format in ("JPEG", "MPO") else opened
        # a MINISWHITE TIFF (tag 262 = 0) is read as displayed, inverted, as sslkit does; pillow inverts
        # only its 1- and 8-bit pages
        white = opened.format == "TIFF" and getattr(opened, "tag_v2", {}).get(262) == 0
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            x, top = np.asarray(img, dtype=np.uint16).astype(np.float32), 65535.0
            if white:
                bits = opened.tag_v2.get(258, 16)
                x = min(65535.0, float(2 ** int(bits[0] if isinstance(bits, tuple) else bits) - 1)) - x
        elif img.mode == "F" or (img.mode == "I" and img.format == "TIFF"):  # float / 32-bit integer pixels
            x, top = own_range(np.asarray(img)), 1.0
            x = 1.0 - x if white else x
        elif img.mode == "I":  # e.g. a 16-bit PNG that pillow opens as 32-bit, as sslkit's folder source reads it
            a = np.asarray(img, dtype=np.float32)
            x, top = a, 65535.0 if a.max() > 255 else 255.0
        else:
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            x, top = np.asarray(img, dtype=np.float32), 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    kind = raw["kind"]
    if kind == "uint8":
        return x * (255.0 / top)  # a 16-bit image given to an 8-bit graph loses its low bits
    if kind == "uint16":
        return x * (65535.0 / top)
    if kind == "window":
        raise ValueError("this graph takes DICOM modality values, not a regular image")
    return x / top


def own_range(a: np.ndarray) -> np.ndarray:
    """Float and 32-bit integer pixels -> float32 in [0, 1] by the image's own min-max (a constant
    image: 0); NaN or inf: the file is skipped. A copy of sslkit's one pixels-to-[0, 1] rule
    (``sslkit.api.unit_floats``: uint8 / 255, uint16 / 65535, other numbers by their own min-max),
    carried here because this script does not import sslkit; keep the two the same."""
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("holds NaN or inf values")
    if not hi > lo:
        return np.zeros(a.shape, np.float32)
    return ((a.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)


#: objects that carry Rows/Columns (or even pixels) but are not images to learn from: sslkit's dicom
#: source passes them over (its NON_IMAGE_MODALITIES, copied here; keep the two the same)
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "DOC", "ECG"}


class NotAnImage(ValueError):
    """A DICOM object that is not an image (a segmentation, a report...): passed over, as sslkit does."""


def not_an_image(ds) -> str | None:
    """Why ``ds`` is not an image, as sslkit's dicom source decides it: a non-image modality, or
    no Rows/Columns, no pixel data and an SOP class that is not an image storage class."""
    import pydicom

    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"not an image (Modality {modality}; sslkit skips these too)"
    if any(k in ds for k in ("Rows", "Columns", "PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if sop and pydicom.uid.UID(str(sop)).name.endswith("Image Storage"):
        return None  # an image cut short: the decoder's error says so
    return "not an image (no Rows, Columns or pixel data; sslkit skips these too)"


def missing_codec(ds) -> str | None:
    """The compressed transfer syntax whose decoder package is not installed (why its pixels could
    not be decoded), as sslkit's dicom source tells it; None where a decoder is there (then the data
    is at fault, and the decoder's own message says how)."""
    import pydicom
    from pydicom.pixels import get_decoder

    ts = pydicom.uid.UID(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")))
    if not ts or not ts.is_encapsulated:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:  # no pydicom decoder exists for it: no package would help
        return None
    if not decoder.is_available:  # pydicom's error lists what each of its plugins requires
        return ts.name
    if ts == pydicom.uid.JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8 \
            and "pylibjpeg" not in decoder.available_plugins:  # Pillow decodes 8-bit JPEG only
        return f"12-bit {ts.name}"
    return None


def dicom_frames(path: Path) -> list[tuple[int | None, np.ndarray]]:
    """Every frame of a DICOM file as (frame or None, float32 modality values or RGB in [0, 1]).

    Raises :class:`NotAnImage` for segmentations, reports etc.; a decoding failure caused by a
    missing codec package carries ``missing_codec`` (:func:`missing_codec`)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path)
    if why := not_an_image(ds):
        raise NotAnImage(why)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        try:
            exc.missing_codec = missing_codec(ds)
        except Exception:  # the decoder's own error is the one to report
            pass
        raise
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    palette = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR"
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    out = []
    for i in range(frames):
        a = arr[i] if frames > 1 else arr
        if palette:  # stored values index the file's colour tables: RGB, as sslkit's dicom source reads it
            top = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
            rgb = np.clip(apply_color_lut(a, ds).astype(np.float32) / top, 0.0, 1.0)
            out.append((i if frames > 1 else None, ("rgb", rgb.transpose(2, 0, 1), ds)))
        elif colour:
            top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
            rgb = np.clip(a.astype(np.float32) / top, 0.0, 1.0)
            out.append((i if frames > 1 else None, ("rgb", rgb.transpose(2, 0, 1), ds)))
        else:
            out.append((i if frames > 1 else None, ("gray", apply_modality_lut(a, ds).astype(np.float32), ds)))
    return out


def _linear(values: np.ndarray, lower: float, upper: float) -> np.ndarray:
    return np.clip((values - lower) / (upper - lower), 0.0, 1.0)


def _file_window(ds, values: np.ndarray) -> np.ndarray:
    """``auto``: the file's first window (DICOM LINEAR function), else the image's min-max."""
    from pydicom.multival import MultiValue

    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c not in (None, "") and w not in (None, ""):
        c = float(c[0] if isinstance(c, MultiValue) else c)
        w = float(w[0] if isinstance(w, MultiValue) else w)
        if w > 1:
            return _linear(values, c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
    lo, hi = float(values.min()), float(values.max())
    return _linear(values, lo, hi) if hi > lo else np.zeros_like(values)


def dicom_pixels(item, raw: dict, spec: dict) -> np.ndarray:
    """One DICOM frame -> (C, H, W) in the graph's raw kind."""
    what, values, ds = item
    if what == "rgb":  # RGB in [0, 1] (palette colour already through its tables): no window applies
        if raw["kind"] != "window":
            return values * UNIT_SCALE.get(raw["kind"], 1.0)
        if len(raw["window"]) > 1:
            raise ValueError("colour DICOM cannot be given to a graph that stacks windows (no single modality "
                             "value gives every channel its colour)")
        # the run saw it as luma in [0, 1]: the value the graph's window takes back to that, as `sslkit embed` does
        lower, upper = raw["window"][0]["lower"], raw["window"][0]["upper"]
        return lower + to_channels(values, 1) * (upper - lower)
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if raw["kind"] == "window":
        if monochrome1 and len(raw["window"]) > 1:
            raise ValueError("MONOCHROME1 cannot be reflected into a stack of windows")
        lower, upper = raw["window"][0]["lower"], raw["window"][0]["upper"]
        values = lower + upper - values if monochrome1 else values
        if len(raw["window"]) == 1:  # clipped to the window before resizing, as the run windowed then resized
            values = np.nan_to_num(np.clip(values, lower, upper), nan=lower)  # (NaN: 0 after the window)
        return values[None]
    windows = spec.get("preprocessing", {}).get("window") or ["auto"]
    channels = []
    for w in windows if isinstance(windows, list) else [windows]:
        m = re.search(r"W\s*([-+\d.e]+),\s*L\s*([-+\d.e]+)", str(w))
        if m:
            width, level = float(m.group(1)), float(m.group(2))
            x = _linear(values, level - width / 2, level + width / 2)
        elif str(w).startswith("minmax"):
            lo, hi = float(values.min()), float(values.max())
            x = _linear(values, lo, hi) if hi > lo else np.zeros_like(values)
        else:
            x = _file_window(ds, values)
        channels.append(1.0 - x if monochrome1 else x)
    return np.stack(channels) * UNIT_SCALE.get(raw["kind"], 1.0)


# --- 3-4: channels and size -----------------------------------------------------------
def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    if x.shape[0] in (2, 4):
        x = x[:-1]
    if x.shape[0] == channels:
        return x
    if channels == 1 and x.shape[0] == 3:
        return (LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2])[None]
    return np.repeat(x[:1], channels, axis=0)


def resize_square(x: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size): shorter side to ``size`` (antialiased bilinear), centre crop."""
    c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = [np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR))
           for ch in x]
    return np.stack(out)[:, top: top + size, left: left + size]


def prepare(x: np.ndarray, meta: dict) -> np.ndarray:
    inp, raw = meta["input"], meta["input"]["raw"]
    x = resize_square(to_channels(x, inp["channels"]), inp["image_size"])
    if raw["kind"] == "normalized":
        mean = np.asarray(inp["mean"], np.float32).reshape(-1, 1, 1)
        std = np.asarray(inp["std"], np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    if inp["dtype"] in ("uint8", "uint16"):
        x = np.clip(np.rint(x), 0, np.iinfo(inp["dtype"]).max)
    return x.astype(inp["dtype"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("model", help="encoder.onnx exported by sslkit")
    parser.add_argument("folder", help="folder of images (PNG, JPEG, TIFF, DICOM)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if Path(args.out).exists():  # the file is left as it is
        refuse(f"{args.out} already exists; give another --out or move it away")
    if not Path(args.model).is_file():
        refuse(f"model {args.model!r} does not exist; give the encoder.onnx of `sslkit export`")

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    name, output = meta["input"]["name"], meta["output"]["name"]
    raw, spec = meta["input"]["raw"], meta["spec"]
    if meta["input"].get("sample", "slice") != "slice":  # K neighbouring slices, or a whole series
        refuse(f"this encoder takes {meta['input']['sample']} samples assembled from series (slices "
               f"ordered in space); this example reads single images: embed with `sslkit embed {args.model} "
               f"--data {spec.get('source') or 'dicom'}:{args.folder} --out {args.out}`")

    ids, batch, embeddings, skipped = [], [], [], {}  # skipped: reason -> files
    no_codec = set()  # what a missing codec package left undecoded
    files = list_files(Path(args.folder))

    def flush():
        if batch:
            embeddings.append(session.run([output], {name: np.stack(batch)})[0])
            batch.clear()

    for n, path in enumerate(files, 1):
        try:
            if is_dicom(path):
                items = [(f, dicom_pixels(item, raw, spec)) for f, item in dicom_frames(path)]
            else:
                items = [(None, image_pixels(path, raw))]
        except Exception as exc:
            reason = why_skipped(exc)
            print(f"\nskipped {path}: {reason}", file=sys.stderr)
            skipped[reason] = skipped.get(reason, 0) + 1
            if getattr(exc, "missing_codec", None):
                no_codec.add(exc.missing_codec)
            continue
        for frame, x in items:
            ids.append(str(path) if frame is None else f"{path}#{frame}")
            batch.append(prepare(x, meta))
            if len(batch) == args.batch_size:
                flush()
        if sys.stderr.isatty():  # a progress line on a terminal, not in a log file
            print(f"\r{n}/{len(files)} files", end="", file=sys.stderr)
    flush()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    n_skipped = report_skipped(skipped, no_codec)
    if not embeddings:
        refuse("no image could be embedded")
    result = np.concatenate(embeddings).astype(np.float32)
    np.savez(args.out, embeddings=result, ids=np.array(ids, dtype=str))
    print(f"embedded {len(ids)} images ({result.shape[1]}-d); {n_skipped} files skipped; saved to {args.out}")
    return 0


def report_skipped(skipped: dict[str, int], no_codec: set[str]) -> int:
    """The skip reasons with their counts, and the codec packages only where a decoder is missing
    (a corrupt stream is the decoder's own line); returns how many files were skipped."""
    n_skipped = sum(skipped.values())
    if n_skipped:
        print(f"{n_skipped} file(s) skipped: " + "; ".join(f"{n} x {r}" for r, n in skipped.items()), file=sys.stderr)
    if no_codec:
        print(f"no decoder installed for {', '.join(sorted(no_codec))}: {CODECS}", file=sys.stderr)
    return n_skipped


def why_skipped(exc: Exception) -> str:
    """One line: the exception type and the first line of its message (pydicom names the
    transfer syntax and the packages a missing codec needs)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, NotAnImage) else f"{type(exc).__name__}: {text[:300]}"


if __name__ == "__main__":
    sys.exit(main())
