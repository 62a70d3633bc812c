"""What the first decoding pass and the start-up passes cost per file, where data sets are large.

* The ``dicom`` source keeps a few facts a file once indexed (:mod:`sslkit_plugins.sources.dicom_facts`),
  and every decoding worker gets a pickled copy: bytes and memory per file are bounded here, and
  the pixels loaded through the copy equal a full read of each file.
* A source whose ``loads_whole_file`` is true (``nifti``: a compressed volume is read whole for
  any slice) has each file decoded by one process: each file is opened once, same pixels.
* The dataset fingerprint reads a small file once (and its value is the one runs recorded
  before: ``--resume`` compares it), and large passes say so on stderr.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import sys
import tracemalloc
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from sslkit.data import digest
from sslkit.data import prepare as prep
from sslkit.data.source import SampleRef
from sslkit.registry import create_source
from sslkit_plugins.sources.dicom import read_header
from sslkit_plugins.sources.dicom_decode import decode, read_dataset
from sslkit_plugins.sources.nifti import NiftiSource
from tests.conftest import force_decode_pool, make_images
from tests.dicom_factory import write_dicom
from tests.test_series import WINDOW, write_series


def _dicom_folder(root: Path, n: int = 40) -> Path:
    """``n`` CT slices of 7 patients in 2 class folders (every 10th: RLE, its own window) and a
    compressed multi-frame file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 4000, (24, 20)).astype(np.uint16)
        write_dicom(root / f"class{i % 2}" / f"patient{i % 7:03d}" / "study" / f"img{i:03d}.dcm", pixels,
                    patient_id=f"P{i % 7}", modality="CT", bits_stored=12, slope=1.0, intercept=-1024.0,
                    window=(400.0 + (i if i % 10 == 0 else 0), 40.0), syntax="rle" if i % 10 == 0 else "explicit")
    frames = rng.integers(0, 4000, (3, 16, 16)).astype(np.uint16)  # a compressed multi-frame file: read in full
    write_dicom(root / "class0" / "cine.dcm", frames, patient_id="P9", syntax="rle")
    return root


def _copied_bytes(folder: Path) -> tuple[int, int, int]:
    """A ``dicom`` source of ``folder`` once indexed and a multi-frame file loaded: (its files, the
    bytes of its pickled copy besides the paths, what unpickling it allocates besides the paths)."""
    src = create_source(f"dicom:{folder}", workers=1)
    src.load(next(r for r in src.index() if r.path.endswith("cine.dcm")))  # its data set is kept for the next frame
    assert src._last is not None
    blob = pickle.dumps(src)
    gc.collect()
    tracemalloc.start()
    copy = pickle.loads(blob)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert copy._last is None  # here only
    return (len(src.headers), len(blob) - sum(len(p.encode()) for p in src.headers),
            held - sum(sys.getsizeof(p) for p in src.headers))


def test_dicom_source_copied_into_each_worker_takes_little_a_file(tmp_path):
    """Was 530 pickled bytes and 5.3 KB unpickled a file besides its path (20 k files: 110 MB in every
    decoding worker); a file's header dict is now a slotted record of shared values (57 and 415 here)."""
    few, many = _copied_bytes(_dicom_folder(tmp_path / "few", 10)), _copied_bytes(_dicom_folder(tmp_path / "many", 60))
    files = many[0] - few[0]
    assert files == 50
    assert (many[1] - few[1]) / files < 150, (many[1] - few[1]) / files
    assert (many[2] - few[2]) / files < 1000, (many[2] - few[2]) / files


def test_kept_facts_answer_as_the_headers_did_and_the_copy_loads_the_same_pixels(tmp_path):
    src = create_source(f"dicom:{_dicom_folder(tmp_path / 'd', n=12)}", workers=1)
    refs = src.index()
    copy = pickle.loads(pickle.dumps(src))
    for ref in refs:
        header = read_header(ref.path)
        kept = copy.headers[ref.path]
        for key in ("modality", "transfer_syntax", "photometric", "bits_stored", "rows", "columns", "frames",
                    "samples_per_pixel", "named_levels", "pixel_spacing", "pixels"):
            assert json.loads(json.dumps(kept[key])) == json.loads(json.dumps(header[key])), key
        assert kept.get("position") is None and kept.get("mosaic", 0) == 0  # geometry: not kept
        assert copy.properties(ref) == {"modality": "CT" if "cine" not in ref.path else "CR",
                                        "transfer_syntax": header["transfer_syntax"],
                                        "photometric": "MONOCHROME2", "bits_stored": header["bits_stored"],
                                        "size": f"{header['columns']}x{header['rows']}",
                                        "frames": header["frames"], "samples_per_pixel": 1}
        full = decode(read_dataset(ref.path), ref.frame, src.windows)  # the file read in full, here
        np.testing.assert_array_equal(copy.load(ref), full)
    ref = next(r for r in refs if r.frame is None and "rle" not in copy.headers[r.path]["transfer_syntax"].lower())
    kept = copy.headers[ref.path]
    assert kept["pixels"]["native"]  # plain grayscale: read from its located bytes with numpy
    kept["pixels"] = None  # as tests that force a full read do
    assert kept["pixels"] is None and kept.get("pixels") is None
    np.testing.assert_array_equal(copy.load(ref), decode(read_dataset(ref.path), None, src.windows))


def test_kept_facts_give_back_every_pydicom_file_s_pixel_facts(pydicom_dir):
    from sslkit_plugins.sources.dicom_facts import FileFacts

    located = 0
    for path in sorted(str(p) for p in pydicom_dir.rglob("*") if p.is_file()):
        header = read_header(path)
        if header["kind"] != "image":
            continue
        kept = pickle.loads(pickle.dumps(FileFacts(header)))
        assert json.loads(json.dumps(kept["pixels"])) == json.loads(json.dumps(header["pixels"])), path
        assert [kept[k] for k in ("rows", "columns", "frames")] == [header[k] for k in ("rows", "columns", "frames")]
        located += header["pixels"] is not None
    assert located > 20


def test_slab_source_leaves_its_decoded_slices_out_of_the_workers_copy(tmp_path):
    write_series(tmp_path / "s", n=6)
    src = create_source(f"dicom:{tmp_path / 's'}", workers=1, window=WINDOW, sample="slab:3")
    refs = src.index()
    before = len(pickle.dumps(src))
    loaded = [src.load(r) for r in refs]
    assert len(src.sampler._files) == 6  # kept here for the next slabs
    assert len(pickle.dumps(src)) == before
    copy = pickle.loads(pickle.dumps(src))
    for ref, x in zip(refs, loaded):
        np.testing.assert_array_equal(copy.load(ref), x)


def test_plan_takes_turns_by_chunk_and_keeps_a_whole_file_source_s_files_on_one_process():
    depths = {"a": 7, "b": 2, "c": 1, "d": 5}
    refs = [SampleRef(f"/d/{name}", z) for name, depth in depths.items() for z in range(depth)]
    plain = prep._plan(refs, 3, 3, by_file=False)
    assert [(owner, len(part)) for owner, part in plain] == [(0, 3), (1, 3), (2, 3), (0, 3), (1, 3)]  # chunk k: k % n
    assert [r for _, part in plain for r in part] == refs
    whole = prep._plan(refs, 3, 3, by_file=True)
    assert [(owner, "".join(r.path[-1] for r in part)) for owner, part in whole] == [
        (0, "aaa"), (0, "aaa"), (0, "a"), (1, "bbc"), (2, "ddd"), (2, "dd")]
    assert [r for _, part in whole for r in part] == refs


class _InProcess:
    """A worker pool stand-in that decodes in this process at once."""

    def submit(self, fn, arg):
        done = Future()
        done.set_result(fn(arg))
        return done

    def shutdown(self, cancel_futures=False):
        pass


class _WholeFiles:
    loads_whole_file = True

    def load(self, ref):
        return np.full((1, 4, 4), int(ref.path[-1]) / 10 + (ref.frame or 0) / 100, np.float32)


def test_a_whole_file_source_of_one_sample_a_file_shares_one_pool_as_any_source(monkeypatch):
    """Pinning files to processes pays only where a file holds several samples (slices); a volume a
    file (nifti --sample volume) keeps one shared pool and the usual chunks in flight (4 x as many,
    of whole volumes, in every worker, was the pinned plan's)."""
    made = []
    monkeypatch.setattr(prep, "_pool", lambda source, channels, size, workers: made.append(workers) or _InProcess())
    source = _WholeFiles()
    monkeypatch.setitem(prep._WORKER, "source", source)
    monkeypatch.setitem(prep._WORKER, "channels", 1)
    monkeypatch.setitem(prep._WORKER, "size", 4)
    volumes = [SampleRef(f"/d/v{i}") for i in range(9)]
    slices = [SampleRef(f"/d/v{i}", z) for i in range(3) for z in range(4)]
    for refs, pools in ((volumes, [2]), (slices, [1, 1])):
        made.clear()
        got = list(prep._shared(source, refs, 1, 4, 3))
        assert made == pools
        assert len(got) == len(refs)
        for ref, x in zip(refs, got):  # in order, whichever process decoded it
            np.testing.assert_array_equal(x, prep._decode_one(ref))


class CountingNifti(NiftiSource):
    """The nifti source, writing a line to ``opens_log`` each time a process reads a volume (a class
    of this module: the spawned workers unpickle it by name)."""

    opens_log = ""

    def _volume(self, path):
        if self._last is None or self._last[0] != path:
            with open(self.opens_log, "a") as f:
                f.write(f"{os.getpid()} {Path(path).name}\n")
        return super()._volume(path)


def test_each_nifti_file_is_decoded_by_one_process(tmp_path, monkeypatch):
    """Was: chunks of adjacent slices round-robin over the processes, every process meeting a file
    decompressed it (6 volumes of 256^3, 8 workers: one opened by 7)."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    for i in range(3):
        img = nib.Nifti1Image(rng.integers(0, 1000, (12, 10, 40)).astype(np.int16), np.eye(4))
        nib.save(img, tmp_path / f"v{i}.nii.gz")
    source = CountingNifti(str(tmp_path))
    source.opens_log = str(tmp_path / "opens.log")
    refs = source.index()
    assert len(refs) == 120
    serial = prep.prepare(source, refs, 1, 16, cache_dir=False, progress=False, workers=1)
    os.remove(source.opens_log)
    source._last = None
    force_decode_pool(monkeypatch, 3)  # the first slice here, the rest shared by 3 processes
    shared = prep.prepare(source, refs, 1, 16, cache_dir=False, progress=False, workers=3)
    assert [r.id for r in shared.refs] == [r.id for r in serial.refs]
    np.testing.assert_array_equal(shared.pixels, serial.pixels)
    opens = [line.split() for line in Path(source.opens_log).read_text().splitlines()]
    assert Counter(name for _, name in opens) == {"v0.nii.gz": 1, "v1.nii.gz": 1, "v2.nii.gz": 1}, opens
    assert len({pid for pid, _ in opens}) == 3  # each file on a process of its own


class DyingNifti(CountingNifti):
    """A worker that meets ``v1`` dies at once (out of memory, a crashing codec)."""

    def _volume(self, path):
        import multiprocessing

        if multiprocessing.current_process().name != "MainProcess" and path.endswith("v1.nii.gz"):
            os._exit(3)
        return super()._volume(path)


def test_a_worker_dying_on_its_file_leaves_the_rest_to_this_process(tmp_path, monkeypatch):
    """Each file's pool of one worker: the one that dies breaks its own pool, and this process decodes
    the rest (what the other worker had decoded ahead is decoded again): every sample once, in order,
    as one process decodes them."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(2)
    for i in range(3):
        nib.save(nib.Nifti1Image(rng.integers(0, 1000, (12, 10, 40)).astype(np.int16), np.eye(4)),
                 tmp_path / f"v{i}.nii.gz")
    source = DyingNifti(str(tmp_path))
    source.opens_log = str(tmp_path / "opens.log")
    refs = source.index()
    serial = prep.prepare(source, refs, 1, 16, cache_dir=False, progress=False, workers=1)
    os.remove(source.opens_log)
    source._last = None
    force_decode_pool(monkeypatch, 3)
    shared = prep.prepare(source, refs, 1, 16, cache_dir=False, progress=False, workers=3)
    assert [r.id for r in shared.refs] == [r.id for r in serial.refs] and len(serial.refs) == 120
    np.testing.assert_array_equal(shared.pixels, serial.pixels)
    opens = [line.split() for line in Path(source.opens_log).read_text().splitlines()]
    assert {name for pid, name in opens if int(pid) != os.getpid()} == {"v2.nii.gz"}, opens  # v1's worker died
    assert {name for pid, name in opens if int(pid) == os.getpid()} >= {"v0.nii.gz", "v1.nii.gz"}, opens


def _reference_digest(path: str, interior: int, block: int = 4096) -> str:
    """The digest as sslkit computed it before (one seek and read per block): runs recorded it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.blake2b(str(size).encode(), digest_size=16)
        if size <= block * (2 + interior):
            starts = list(range(0, size, block)) or [0]
        else:
            step = (size - block) / (interior + 1)
            starts = [0, *(int(step * (i + 1)) for i in range(interior)), size - block]
        for start in starts:
            f.seek(start)
            h.update(f.read(block))
    return h.hexdigest()


SIZES = [0, 100, 4096, 5000, 12288, 65536, 65537, 300_000, digest.WHOLE_READ, digest.WHOLE_READ + 1, 2_000_003]


def _files(root: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    root.mkdir()
    out = []
    for size in SIZES:
        path = root / f"f{size}.bin"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        out.append(path)
    return out


def test_digests_and_the_fingerprint_are_the_values_runs_recorded(tmp_path):
    files = _files(tmp_path / "d")
    refs = [SampleRef(str(f), frame) for f in files for frame in (None, 1)]
    for scheme, interior in digest.FINGERPRINT_SCHEMES.items():
        digest._DIGESTS.clear()
        h = hashlib.sha256(json.dumps([scheme, {"w": 1}], sort_keys=True, default=str).encode())
        for ref in sorted(refs, key=lambda r: (r.path, r.frame or 0)):
            h.update(f"{ref.frame}\0{_reference_digest(ref.path, interior)}\n".encode())
        assert prep.fingerprint(refs, {"w": 1}, scheme) == h.hexdigest()[:16]
        for f in files:  # each scheme's digest, whichever was read first
            assert digest.content_digest(str(f), interior=0) == _reference_digest(str(f), 0)
            assert digest.content_digest(str(f), interior=14) == _reference_digest(str(f), 14)


class _Reads:
    """``open`` as the digest module calls it, counting the files opened and the reads made."""

    def __init__(self):
        self.opened, self.reads = Counter(), Counter()

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        self.opened[Path(path).name] += 1
        reads, name = self.reads, Path(path).name

        class Counted:
            def __getattr__(self, attr):
                return getattr(f, attr)

            def read(self, *a):
                reads[name] += 1
                return f.read(*a)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Counted()


def test_the_fingerprint_reads_a_file_up_to_half_a_mib_in_one_call_a_small_one_with_the_check(tmp_path, monkeypatch):
    """Was: 2 reads for the readability check, then 16 seeks and reads for the fingerprint (cold
    cache, 4000 files of 256 KiB: 4.6 s for the fingerprint where reading them whole took 2). A
    file of 64 KiB or less is read once for both; one larger than WHOLE_READ as before."""
    files = _files(tmp_path / "d")
    counter = _Reads()
    monkeypatch.setattr(digest, "open", counter, raising=False)
    digest._DIGESTS.clear()
    refs = [SampleRef(str(f)) for f in files]
    digest.readable(refs)
    prep.fingerprint(refs)
    prep.fingerprint(refs, scheme="content-v2")
    small = [f.name for f in files if f.stat().st_size <= 16 * 4096]  # read whole for the check: both digests
    mid = [f.name for f in files if 16 * 4096 < f.stat().st_size <= digest.WHOLE_READ]
    large = [f.name for f in files if f.stat().st_size > digest.WHOLE_READ]
    assert {n: (counter.opened[n], counter.reads[n]) for n in small} == dict.fromkeys(small, (1, 1))
    assert {n: (counter.opened[n], counter.reads[n]) for n in mid} == dict.fromkeys(mid, (2, 3))  # 2 + whole
    assert {n: (counter.opened[n], counter.reads[n]) for n in large} == dict.fromkeys(large, (2, 18))  # 2 + 16


def test_long_passes_say_so_and_short_or_quiet_ones_do_not(tmp_path, monkeypatch, capsys):
    files = _files(tmp_path / "d")
    refs = [SampleRef(str(f)) for f in files]
    prep.fingerprint(refs, progress=True)
    assert capsys.readouterr().err == ""  # fewer than PROGRESS_FROM samples
    monkeypatch.setattr(digest, "PROGRESS_FROM", len(refs))
    monkeypatch.setattr(prep, "PROGRESS_FROM", len(refs))
    prep.fingerprint(refs, progress=False)
    assert capsys.readouterr().err == ""
    prep.fingerprint(refs, progress=True)
    assert capsys.readouterr().err == f"dataset fingerprint: 0/{len(refs)} samples\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it
    prep.fingerprint(refs, progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    root = tmp_path / "img"
    make_images(root, n_per_class=3, size=20)
    source = create_source(f"folder:{root}")
    images = source.index()
    monkeypatch.setattr(prep, "PROGRESS_FROM", len(images))
    prep.prepare(source, images, 3, 16, cache_dir=False, progress=True, workers=1)
    assert capsys.readouterr().err.splitlines()[0] == f"checking files: 0/{len(images)} samples"
