"""Reading one NIfTI file for ``nifti:`` (:mod:`sslkit_plugins.sources.nifti`): nibabel imported on first
use and kept quiet (:func:`quiet`), the header checked against the file's bytes and the pixel limit before
any voxel is read (:func:`check_holds`, :func:`check_working_bytes`), the geometry and the voxels in
closest-canonical (RAS+) axes (:func:`canonical_geometry`, :func:`canonical_volume`)."""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from sslkit.api import Undecodable, UsageError

#: deflate's largest expansion (a run of one byte): a gzip file of N bytes holds at most this x N
GZIP_MAX_RATIO = 1032


def nibabel_module():
    try:
        import nibabel
    except ImportError:
        raise UsageError("nifti: needs nibabel; install it with: pip install nibabel (or '.[volumes]' in the "
                         "sslkit checkout)") from None
    return nibabel


_READING = threading.local()  # .depth: quiet() blocks this thread is in


def _not_reading(record: logging.LogRecord) -> bool:
    return not getattr(_READING, "depth", 0)


@contextlib.contextmanager
def quiet():
    """Nothing of nibabel's on stderr while this thread reads a file: the header fixes its logger prints
    (``pixdim[1,2,3] should be non-zero; setting 0 dims to 1``: sslkit's geometry is the affine's), numpy's
    warnings of a bad affine."""
    log = logging.getLogger("nibabel.global")
    if _not_reading not in log.filters:
        log.addFilter(_not_reading)
    _READING.depth = getattr(_READING, "depth", 0) + 1
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        _READING.depth -= 1


#: a ``.nii.gz`` is inflated this many bytes at a time (:func:`inflate`)
GZIP_STEP = 16 * 2**20
#: read this far past the voxels, to reach the end of the stream (its CRC is checked there)
GZIP_TAIL = 2**20


def read_image(path: str) -> Any:
    """The nibabel image of ``path``; a ``.nii.gz`` is decompressed first up to its header's vox_offset
    + voxel bytes (and :data:`GZIP_TAIL`), so that its CRC is checked where the stream ends there
    (nibabel reads only the bytes it needs: a corrupt stream gave garbage voxels, not an error) and
    data appended past the voxels is never inflated; a shorter stream is the truncated-file skip."""
    nib = nibabel_module()
    head = read_header(path)
    if not path.lower().endswith(".gz"):
        return head
    voxels = math.prod(int(n) for n in head.shape) * int(head.get_data_dtype().itemsize)
    data = inflate(path, int(getattr(head.dataobj, "offset", 0) or 0) + voxels + GZIP_TAIL)
    is_nifti2 = int.from_bytes(data[:4], "little") == 540 or int.from_bytes(data[:4], "big") == 540
    with quiet():
        return (nib.Nifti2Image if is_nifti2 else nib.Nifti1Image).from_bytes(data)


def inflate(path: str, most: int) -> bytes:
    """At most ``most`` bytes of the gzip file ``path``, inflated :data:`GZIP_STEP` at a time
    (``gzip.BadGzipFile``, an OSError, on a bad stream; its CRC checked if it ends within ``most``)."""
    parts, got = [], 0
    with gzip.open(path, "rb") as f:
        while got < most:
            chunk = f.read(min(GZIP_STEP, most - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts)


def read_header(path: str) -> Any:
    """nibabel's image of ``path``, header read, voxels not yet (quietly: :func:`quiet`)."""
    with quiet():
        return nibabel_module().load(path)


def canonical_volume(img: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A nibabel image -> (float32 ``(T, D, H, W)`` in the file's units, spacing (dz, dy, dx) mm):
    the voxel sizes of its affine (sform, else qform), as for :func:`canonical_geometry`. Filled a
    stored slice at a time: one float32 copy of the volume (:func:`check_working_bytes` bounds it)."""
    nib = nibabel_module()
    with quiet():
        img = nib.as_closest_canonical(img)
    if img.get_data_dtype().kind == "c":  # nibabel would drop the imaginary part with a warning
        raise ValueError("complex voxel values: not an image (save the magnitude)")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"a NIfTI image of {len(shape)} dimensions is not a volume")
    x, y, z, t = (*shape, 1)[:4]
    # (x: R, y: A, z: S, t) -> (t, z ascending, y descending = anterior to posterior, x descending = right to left)
    vol = np.empty((t, z, y, x), np.float32)
    finite = False
    with quiet():  # a slope past float32 gives inf (numpy's overflow warning): handled as any inf
        for k in range(z):
            part = np.asarray(img.dataobj[:, :, k, ...], dtype=np.float32).reshape(x, y, t)
            vol[:, k] = part.transpose(2, 1, 0)[:, ::-1, ::-1]
            finite = finite or bool(np.isfinite(part).any())
    if not finite:
        raise ValueError("no finite voxel value (all NaN or inf)")
    zooms = [float(v) for v in nib.affines.voxel_sizes(img.affine)[:3]]
    return vol, (zooms[2], zooms[1], zooms[0])


#: working bytes a volume may take per pixel of the pixel limit: what decoding a 2D image at the
#: limit takes (Pillow's 8-bit RGBA and the float32 RGB of it: 4 + 12 bytes a pixel)
BYTES_PER_LIMIT_PIXEL = 16


def check_working_bytes(img: Any, limit: int | None) -> None:
    """Refuse, from the header, a file whose decoding needs more than :data:`BYTES_PER_LIMIT_PIXEL` x
    ``limit`` bytes: every voxel as stored (a ``.nii.gz`` is decompressed whole in memory) and as
    float32 (:func:`canonical_volume`). ``limit`` None or 0: no limit."""
    itemsize = int(img.get_data_dtype().itemsize)
    need = math.prod(int(n) for n in img.shape) * (itemsize + 4)
    if limit and need > limit * BYTES_PER_LIMIT_PIXEL:
        raise Undecodable(f"too large to decode: {'x'.join(map(str, img.shape))} voxels x ({itemsize} stored + 4 "
                          f"float32) bytes = {need:,} bytes exceeds {BYTES_PER_LIMIT_PIXEL} x the pixel limit of "
                          f"{limit:,} (--max-pixels raises it)")


def check_holds(path: Path, img: Any) -> None:
    """Raise ``ValueError`` when the file at ``path`` cannot hold the voxels ``img``'s header
    declares: from the header and the file's size alone, before anything is read."""
    need = math.prod(int(n) for n in img.shape) * int(img.get_data_dtype().itemsize)
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if need > size * GZIP_MAX_RATIO:
            raise ValueError(f"the header declares {need:,} bytes of voxels ({'x'.join(map(str, img.shape))}); "
                             f"a {size:,}-byte gzip file expands to at most {size * GZIP_MAX_RATIO:,}")
        return
    offset = int(getattr(img.dataobj, "offset", 0) or 0)  # where the voxels start (the header's vox_offset)
    if size < offset + need:
        raise ValueError(f"truncated: the header declares {need:,} bytes of voxels "
                         f"({'x'.join(map(str, img.shape))}) from byte {offset:,}; the file has {size:,}")


def canonical_geometry(img: Any) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """Shape and voxel size (x, y, z) of ``img`` once turned to RAS+, from the header alone
    (``as_closest_canonical`` would read every voxel); sizes from the affine (sform, else qform),
    not the header's pixdim, which a file may contradict."""
    nib = nibabel_module()
    if not np.isfinite(img.affine).all():
        raise Undecodable("its affine (sform, else qform) holds NaN or infinite values: no geometry")
    shape, zooms = list(img.shape), [float(z) for z in nib.affines.voxel_sizes(img.affine)[:3]]
    with quiet():
        ornt = nib.orientations.io_orientation(img.affine)
    if len(shape) < 3 or np.isnan(ornt).any():
        return tuple(shape), (zooms + [1.0] * 3)[:3]
    out_shape, out_zooms = list(shape), [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt[:3]):
        out_shape[int(target)], out_zooms[int(target)] = shape[axis], zooms[axis]
    return tuple(out_shape), (out_zooms[0], out_zooms[1], out_zooms[2])
