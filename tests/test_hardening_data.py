"""Issue 13, the data side: hostile inputs meet the CLI as one line and exit 2, or as one
reported row per file; nothing outside sslkit's own cache entries is deleted; no path
below the data root, no hash of a patient identifier, reaches a report or the cache.

The CLI runs in-process (``cli``, ``_invoke``) unless the process itself is under test (another
user, a private tmpfs, a file-size limit, codecs that cannot be imported)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from sslkit.cli import main
from sslkit.errors import UsageError
from sslkit.pseudonym import file_key
from tests.conftest import PYDICOM_FILES, REPO, run_sslkit
from tests.dicom_factory import write_dicom

PATIENT_DIR = "DOE^JOHN_MRN12345"
IDS = [f"MRN12345-{i}" for i in range(3)]
TRAIN = ("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "4",
         "--max-steps", "1", "--epochs", "1", "--quiet")


def _invoke(*args) -> Result:
    """``sslkit ARGS`` in-process (for module-scoped fixtures, which cannot use ``cli``)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(proc: subprocess.CompletedProcess | Result, *words: str) -> str:
    """``proc`` failed with exit 2 and exactly one line on stderr (no traceback), naming ``words``."""
    lines = proc.stderr.strip().splitlines()
    code = proc.returncode if isinstance(proc, subprocess.CompletedProcess) else proc.exit_code
    assert code == 2, (code, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _edit(path: Path, **values) -> Path:
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return path


def _good_dicoms(root: Path, n: int = 6, size: int = 40) -> list[Path]:
    rng = np.random.default_rng(0)
    return [write_dicom(root / f"p{i}.dcm", (rng.random((size, size)) * 3000 + i * 50).astype(np.uint16),
                        patient_id=IDS[i % 3], patient_name="DOE^JOHN", modality="CT", slope=1.0,
                        intercept=-1024.0) for i in range(n)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """One pretrain run (cache on) over a DICOM folder holding every hostile input at once."""
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "scans"
    _good_dicoms(root / PATIENT_DIR)
    bad = root / "bad"
    one = _good_dicoms(bad, 1)[0]
    _edit(shutil.copy(one, bad / "frames_max.dcm"), NumberOfFrames=2147483647)  # 2^31-1 frames in ~4 KB
    _edit(shutil.copy(one, bad / "frames_100k.dcm"), NumberOfFrames=100000)
    _edit(shutil.copy(one, bad / "huge.dcm"), Rows=20000, Columns=20000)  # a 400-megapixel header
    raw = one.read_bytes()
    (bad / "truncated.dcm").write_bytes(raw[: len(raw) - 700])
    one.unlink()
    os.mkfifo(bad / "fifo.dcm")  # opening it would block forever
    os.symlink(".", root / "self")  # `ln -s . data/self`
    (root / "loop").mkdir()
    os.symlink("../loop", root / "loop" / "parent")  # a second loop
    (root / "jpeg").mkdir()
    shutil.copy(PYDICOM_FILES / "JPGExtended.dcm", root / "jpeg" / "ext12.dcm")  # 12-bit, libjpeg decodes it
    shutil.copy(PYDICOM_FILES / "JPEG-lossy.dcm", root / "jpeg" / "lossy12.dcm")  # 12-bit, no codec here can
    run, cache = tmp / "run", tmp / "cache"
    proc = _invoke(*TRAIN, "--data", f"dicom:{root}", "--out", run, "--cache", cache)
    assert proc.exit_code == 0, proc.stderr[-3000:]
    report = json.loads((run / "data_report.json").read_text())
    inspect = _invoke("data", "inspect", f"dicom:{root}", "--json")
    assert inspect.exit_code == 0, inspect.stderr[-2000:]
    return {"root": root, "run": run, "cache": cache, "proc": proc, "report": report,
            "reasons": {f["file"]: f["reason"] for f in report["skipped_files"]},
            "inspect": json.loads(inspect.stdout), "inspect_output": inspect.stdout + inspect.stderr}


def test_frame_count_bomb_is_one_row_per_file(hostile):
    """Item 2: NumberOfFrames 2^31-1 / 100000 in a 4 KB file: no MemoryError, one row each."""
    rows = [f["file"] for f in hostile["report"]["skipped_files"]]
    assert len(rows) == len(set(rows))  # one row per file, never per frame
    for name, n in (("frames_max.dcm", 2147483647), ("frames_100k.dcm", 100000)):
        assert f"NumberOfFrames {n} does not fit the file" in hostile["reasons"][file_key(f"bad/{name}")]
    assert hostile["report"]["samples"] == 7  # 6 images + the 12-bit JPEG


def test_inspect_counts_a_frame_bomb_as_one_unreadable_file(hostile):
    rep = hostile["inspect"]
    assert rep["images"] == 9  # 6 + 2 JPEG files + the truncated one (its header reads); nothing from the bombs
    assert rep["estimated_bytes"]["decoded_full_resolution_float32"] < 10 * 2**20  # not 22 GB
    unreadable = {u["path"] for u in rep["unreadable"]}
    assert {"bad/frames_max.dcm", "bad/frames_100k.dcm", "bad/huge.dcm", "bad/fifo.dcm"} <= unreadable


def test_folder_walk_follows_each_directory_once_and_skips_a_fifo(hostile):
    """Item 11: `ln -s . self` and a parent loop add nothing; a FIFO is skipped unopened."""
    assert not any(p.startswith(("self/", "loop/")) for p in hostile["reasons"])
    assert "not a regular file (a FIFO)" in hostile["reasons"][file_key("bad/fifo.dcm")]


def test_pixel_limit_applies_to_dicom_headers(hostile):
    """Item 3 (pydicom): a 20000x20000 header is refused before its pixels are read."""
    assert "20000x20000 = 400,000,000 exceeds the limit of 178,956,970" in hostile["reasons"][file_key("bad/huge.dcm")]


def test_jpeg_extended_12bit_decodes_or_names_the_syntax(hostile):
    """Item 23: the 12-bit JPEG Extended file libjpeg can decode is trained on; the one it
    cannot is reported with the transfer syntax, the bit depth and the decoders tried."""
    assert "jpeg/ext12.dcm" not in hostile["reasons"]
    why = hostile["reasons"][file_key("jpeg/lossy12.dcm")]
    assert "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51), 12-bit" in why
    assert "installed decoders (pillow, pylibjpeg) failed" in why and "libjpeg error" in why


def test_skip_summary_is_printed_once_and_adds_up(hostile):
    """Item 20: every skipped file is counted in the one summary line (or in "and N more")."""
    lines = [ln for ln in hostile["proc"].stderr.splitlines() if "files skipped" in ln]
    assert len(lines) == 1, hostile["proc"].stderr
    line = lines[0]
    assert "7 images; 6 files skipped" in line
    tail = line.split("(reasons in data_report.json): ", 1)[1]
    counts = [int(n) for n in re.findall(r"(?:^|, )(\d+) x ", tail)]
    more = int(re.search(r"and (\d+) more", tail).group(1)) if "more (" in tail else 0
    assert sum(counts) + more == 6, line


def test_no_path_below_the_root_in_reports_or_cache(hostile):
    """Item 6: the patient-named folder below the data root appears nowhere sslkit writes;
    reports hold paths relative to the root."""
    needle = b"DOE^JOHN"
    assert all(p.startswith("file:") for p in hostile["reasons"])  # keyed paths, not names
    for folder in (hostile["run"], hostile["cache"]):
        for f in folder.rglob("*"):
            if f.is_file():
                assert needle not in f.read_bytes(), f
    out = hostile["inspect_output"]
    assert needle.decode() not in out
    assert '"bad/truncated.dcm"' in out and str(hostile["root"]) + "/bad" not in out
    from sslkit.data.inspect import format_report

    text = format_report(hostile["inspect"])  # the text form shows the same relative paths
    assert f"  bad/truncated.dcm [{file_key('bad/truncated.dcm')}]: " in text and needle.decode() not in text


def test_cache_holds_no_group_hash_and_is_private(hostile):
    """Item 4: no salted hash of a PatientID (the old persisted form) in any cache file,
    and every cache file is 0600."""
    hashes = [hashlib.sha256(b"sslkit-group-v1" + f"patient:{i}".encode()).hexdigest()[:16].encode() for i in IDS]
    files = [f for f in hostile["cache"].rglob("*") if f.is_file()]
    assert any(f.parent.name == "headers" for f in files)  # the header index is there...
    for f in files:
        data = f.read_bytes()
        assert not any(h in data for h in hashes), f  # ...without any group hash
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))
        assert not any(i.encode() in data for i in IDS)


def test_second_run_gives_the_same_split_from_the_header_index(tmp_path):
    """Groups come back from the index as numbers, and the split is the same as on a fresh read."""
    from sslkit.data.pipeline import load_data

    root = tmp_path / "d"
    for i in range(12):
        write_dicom(root / f"{i:02d}.dcm", np.full((16, 16), i * 10, np.uint16), patient_id=f"P{i % 4}")
    fresh = load_data(f"dicom:{root}", 16, cache_dir="", val_fraction=0.3, progress=False)
    kw = dict(cache_dir=tmp_path / "c", val_fraction=0.3, progress=False)
    first, second = load_data(f"dicom:{root}", 16, **kw), load_data(f"dicom:{root}", 16, **kw)
    write_dicom(root / "12.dcm", np.full((16, 16), 5, np.uint16), patient_id="P1")  # a new file, old patient
    third = load_data(f"dicom:{root}", 16, **kw)
    paths = lambda d: sorted(r.path for r in d.prepared.refs)  # noqa: E731
    assert paths(fresh) == paths(first) == paths(second)
    assert fresh.split == second.split and fresh.split["val_groups"] == 2  # 2 patients of 3 files: >= 30 %
    p1 = {str(root / f"{i:02d}.dcm") for i in (1, 5, 9)}  # patient P1's files: one side, with the new one
    assert p1 <= set(paths(third)) or p1.isdisjoint(paths(third))
    assert (str(root / "12.dcm") in paths(third)) == (p1 <= set(paths(third)))
    assert third.split["val_groups"] == 2 and len(third.prepared) + third.split["val_samples"] == 13


def test_cache_clear_refuses_a_foreign_folder_and_keeps_what_is_not_sslkits(tmp_path):
    """Item 1: `--clear` on a folder without sslkit's marker deletes nothing; on a cache it
    deletes only sslkit's entries, never a user's `headers/` file or `notes/index.json`."""
    proj = tmp_path / "proj"
    (proj / "headers").mkdir(parents=True)
    (proj / "notes").mkdir()
    (proj / "notes" / "index.json").write_text("{}")
    (proj / "headers" / "mine.txt").write_text("keep")
    before = sorted(str(p) for p in proj.rglob("*"))
    _one_line_error(run_sslkit("data", "cache", "--cache", proj, "--clear"), "not an sslkit cache")
    assert sorted(str(p) for p in proj.rglob("*")) == before
    # a real cache, with a user's folder and file inside it
    from sslkit.data.pipeline import load_data

    _good_dicoms(tmp_path / "d", 2, 16)
    load_data(f"dicom:{tmp_path / 'd'}", 16, cache_dir=proj, progress=False)
    entries = [p for p in proj.iterdir() if len(p.name) == 32]
    assert len(entries) == 1 and list((proj / "headers").glob("dicom-*.json"))
    proc = run_sslkit("data", "cache", "--cache", proj, "--clear")
    assert proc.returncode == 0 and "removed: 1" in proc.stdout, proc.stderr
    assert not entries[0].exists() and not list((proj / "headers").glob("dicom-*.json"))
    assert (proj / "notes" / "index.json").read_text() == "{}" and (proj / "headers" / "mine.txt").exists()


def _png_16bit_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width x height`` (16-bit gray), with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _tiff_claiming(path: Path, width: int, height: int) -> Path:
    """A zlib 16-bit TIFF of 16x16 pixels whose header is patched to claim ``width x height``."""
    import tifffile

    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        spots = [(tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for (offset, dtype), value in zip(spots, (width, height)):
        fmt = 2 if int(dtype) == 3 else 4  # SHORT or LONG
        data[offset:offset + fmt] = value.to_bytes(fmt, "little")
    path.write_bytes(bytes(data))
    return path


def test_one_pixel_limit_for_pil_tifffile_and_pydicom(tmp_path, cli):
    """Item 3: a 20000x20000 TIFF header is refused like the same PNG, from the header; one
    limit for all three decoders, and --max-pixels moves it for all of them."""
    big = tmp_path / "big"
    big.mkdir()
    _tiff_claiming(big / "bomb.tif", 20000, 20000)
    _png_16bit_header(big / "bomb.png", 20000, 20000)
    Image.fromarray(np.full((20, 20), 99, np.uint8)).save(big / "ok.png")
    proc = cli("data", "inspect", f"folder:{big}", "--json")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    why = {u["path"]: u["reason"] for u in json.loads(proc.stdout)["undecodable"]}
    assert set(why) == {"bomb.tif", "bomb.png"}
    assert all("20000x20000 = 400,000,000 exceeds the limit of 178,956,970" in r for r in why.values())
    # the same limit, lowered, for a 40x40 PNG, TIFF and DICOM alike
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(small / "a.png")
    import tifffile

    tifffile.imwrite(small / "b.tif", np.zeros((40, 40), np.uint16))
    write_dicom(small / "c.dcm", np.zeros((40, 40), np.uint16))
    proc = cli("data", "inspect", f"folder:{small}", "--json", "--max-pixels", "1000")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert sorted(u["path"] for u in rep["undecodable"]) == ["a.png", "b.tif"]
    assert all("40x40" in u["reason"] and "--max-pixels" in u["reason"] for u in rep["undecodable"])
    from sslkit.data.inspect import inspect_data

    rep = inspect_data(f"dicom:{small}", max_pixels=1000)
    reasons = {u["path"]: u["reason"] for u in rep["unreadable"]}  # the images are reported as not DICOM
    assert sorted(reasons) == ["a.png", "b.tif", "c.dcm"] and "40x40" in reasons["c.dcm"]
    assert reasons["a.png"].startswith("not DICOM") and reasons["b.tif"].startswith("not DICOM")
    assert inspect_data(f"folder:{small}")["decoded_ok"] == 2 and inspect_data(f"dicom:{small}")["decoded_ok"] == 1


def _nobody() -> list[str]:
    """A prefix that runs a command as an unprivileged user (root reads chmod 000 files)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a chmod 000 file stays readable")
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def test_unreadable_file_and_folder_are_skipped_with_reasons_when_caching(tmp_path):
    """Item 12: a chmod 000 file with the cache on is skipped with a reason (was a
    PermissionError traceback); an unreadable subfolder is reported, not dropped."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"sslkit-perm-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    base.chmod(0o777)
    try:
        data = base / "data"
        _good_dicoms(data, 6, 24)
        locked = data / "p1.dcm"
        locked.chmod(0)
        (data / "private").mkdir()
        write_dicom(data / "private" / "x.dcm", np.zeros((24, 24), np.uint16))
        (data / "private").chmod(0)
        os.chmod(data, 0o777)
        proc = subprocess.run([*_nobody(), str(Path(sys.executable).parent / "sslkit"), *TRAIN,
                               "--data", f"dicom:{data}", "--out", base / "run", "--cache", base / "cache"],
                              capture_output=True, text=True, timeout=900, cwd=base,
                              env={**os.environ, "HOME": str(base), "TMPDIR": str(base)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        reasons = {f["file"]: f["reason"] for f in json.loads((base / "run" / "data_report.json").read_text())
                   ["skipped_files"]}
        assert "PermissionError" in reasons[file_key("p1.dcm")] and "unreadable" in reasons[file_key("p1.dcm")]
        assert "unreadable folder" in reasons[file_key("private")]
    finally:
        for p in (data / "private", data / "p1.dcm"):
            if p.exists():
                p.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_disk_full_while_writing_the_cache_is_one_line(tmp_path):
    """Item 7: a full disk under the decoded cache: one line, exit 2, no SIGBUS, no .tmp-*."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-r", "-m", "true"]).returncode:
        pytest.skip("needs unshare (a private tmpfs for a small disk)")
    _good_dicoms(tmp_path / "d", 6, 64)
    cache = tmp_path / "cache"
    cache.mkdir()
    exe = Path(sys.executable).parent / "sslkit"
    args = " ".join(f"'{a}'" for a in (*TRAIN, "--image-size", "256", "--data", f"dicom:{tmp_path / 'd'}",
                                       "--out", tmp_path / "run", "--cache", cache))
    # 6 x 256 x 256 x 2 bytes = 768 KB of pixels on a 512 KB disk; then list what the disk holds
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                           f"mount -t tmpfs -o size=512k tmpfs '{cache}' && {{ '{exe}' {args}; echo rc=$?; "
                           f"ls -A '{cache}'; }}"], capture_output=True, text=True, timeout=900)
    lines = proc.stderr.strip().splitlines()
    assert "rc=2" in proc.stdout and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "decoded-pixel cache" in lines[0] and ".tmp-" not in proc.stdout


def test_file_size_limit_while_writing_the_cache_is_one_line(tmp_path):
    """Item 7: the cache's space is allocated before the memory map is written; a write that
    fails (here: RLIMIT_FSIZE, EFBIG) is one line and leaves no .tmp-* folder."""
    import resource

    _good_dicoms(tmp_path / "d", 6, 64)
    cache = tmp_path / "cache"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = subprocess.run([str(Path(sys.executable).parent / "sslkit"), *TRAIN, "--image-size", "256",
                           "--data", f"dicom:{tmp_path / 'd'}", "--out", tmp_path / "run", "--cache", cache],
                          capture_output=True, text=True, timeout=900, preexec_fn=limit)
    _one_line_error(proc, "decoded-pixel cache")
    assert not list(cache.glob(".tmp-*")) and not list(cache.glob("*/pixels.npy"))


def test_image_size_too_large_is_refused_before_decoding(tmp_path, cli):
    """Item 14: an image size whose cache or working memory cannot exist is one line."""
    _good_dicoms(tmp_path / "d", 6, 16)
    proc = cli(*TRAIN[:-1], "--image-size", "100000", "--data", f"dicom:{tmp_path / 'd'}",
                      "--out", tmp_path / "run", "--cache", tmp_path / "cache")
    _one_line_error(proc, "--image-size 100000", "GiB")
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("*/pixels.npy"))
    from sslkit.data.prepare import check_room

    for root in (tmp_path / "cache", None):  # the disk cache and the in-memory array are both estimated
        with pytest.raises(UsageError, match="GiB"):
            check_room(root, 10**15, (20, 3, 4_000_000, 4_000_000), 1, 8)  # 1 PB: no disk, no RAM


def test_resume_refuses_changed_data_and_keeps_the_input_spec(tmp_path, cli):
    """Item 10: images replaced (same names and sizes) after a run started: --resume is one
    line and run.json is untouched; --allow-data-change continues with the run's InputSpec."""
    data, run = tmp_path / "d", tmp_path / "run"
    _good_dicoms(data, 8, 24)
    result = cli(*TRAIN, "--data", f"dicom:{data}", "--out", run, "--checkpoint-every", "1")  # in-process: setup
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    info["status"] = "running"  # as a killed run leaves it
    (run / "run.json").write_text(json.dumps(info))
    saved = (run / "run.json").read_bytes()
    rng = np.random.default_rng(9)
    for i in range(4):  # replace 4 images: same names, same sizes, other pixels
        write_dicom(data / f"p{i}.dcm", (rng.random((24, 24)) * 4000).astype(np.uint16), patient_id=IDS[i % 3],
                    patient_name="DOE^JOHN", modality="CT", slope=1.0, intercept=-1024.0)
    _one_line_error(cli("pretrain", "--resume", run, "--quiet"), "data changed", "--allow-data-change")
    assert (run / "run.json").read_bytes() == saved
    proc = cli("pretrain", "--resume", run, "--quiet", "--allow-data-change")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    assert "data changed" in proc.stderr
    assert json.loads((run / "run.json").read_text())["input_spec"] == info["input_spec"]
    from sslkit.config import resolve

    assert resolve({"resume": True, "out": str(run)}).allow_data_change is False  # per resume, not inherited
    # the same files, decoded differently by a newer sslkit (the source's description changed): said so
    info = json.loads((run / "run.json").read_text())
    info["input_spec"]["preprocessing"]["decoder"] = "an older one"
    info["dataset"]["fingerprint"] = "0" * 16
    (run / "run.json").write_text(json.dumps(info))
    _one_line_error(cli("pretrain", "--resume", run, "--quiet", "--max-steps", 99),
                    "this sslkit decodes them differently: decoder in the source's description changed",
                    "--allow-data-change")


def _blocked_codecs(*argv: str) -> list[str]:
    """A python command line running ``argv`` (sslkit's CLI, or a script) with pydicom's
    pylibjpeg codecs made impossible to import, as on a machine without them."""
    code = ("import runpy, sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle'):\n"
            "            raise ImportError('blocked in this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.argv = {list(argv)!r}\n"
            "if sys.argv[0] == 'sslkit':\n"
            "    from sslkit.cli import main\n"
            "    main()\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return [sys.executable, "-c", code]


def test_12bit_jpeg_without_libjpeg_names_the_missing_capability(tmp_path):
    """Item 23: with Pillow the only JPEG decoder, the reason names the transfer syntax,
    the 12 bits and the packages that decode it (was "Pillow does not support '…'")."""
    data = tmp_path / "d"
    data.mkdir()
    shutil.copy(PYDICOM_FILES / "JPGExtended.dcm", data / "ext12.dcm")
    proc = subprocess.run(_blocked_codecs("sslkit", "data", "inspect", f"dicom:{data}", "--json"),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (why,) = [u["reason"] for u in json.loads(proc.stdout)["undecodable"]]
    assert "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51), 12-bit" in why
    assert "12-bit JPEG needs pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg" in why


def test_example_client_says_how_many_files_it_skipped_and_why(tmp_path):
    """Item 21: the torch-free client lists the codec packages and summarises its skips."""
    from sslkit.registry import create_backbone, get_exporter
    from sslkit.spec import InputSpec

    data = tmp_path / "d"
    _good_dicoms(data, 3, 32)
    shutil.copy(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm", data / "jls.dcm")  # JPEG-LS: libjpeg only
    encoder = create_backbone("timm:resnet10t", in_chans=1, image_size=32).eval()
    spec = InputSpec(1, 32, (0.5,), (0.25,), "dicom", {"window": ["auto"]})
    get_exporter("onnx")(encoder, spec, {"task": "t", "backbone": "timm:resnet10t", "embedding_dim": 512},
                         tmp_path / "m.onnx")
    example = REPO / "examples" / "onnx_inference.py"
    proc = subprocess.run(_blocked_codecs(str(example), str(tmp_path / "m.onnx"), str(data), "--out",
                                          str(tmp_path / "e.npz")), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embedded 3 images" in proc.stdout and "1 files skipped" in proc.stdout
    assert "1 file(s) skipped: 1 x RuntimeError" in proc.stderr and "JPEG-LS" in proc.stderr
    assert "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle" in proc.stderr
    assert "pylibjpeg-libjpeg" in example.read_text().split('"""')[1]  # the docstring lists them too


def test_npz_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path, cli):
    """Item 3 (arrays): a compressed .npz whose images exceed --max-pixels is one line,
    decided from the .npy header before np.load decompresses anything."""
    np.savez_compressed(tmp_path / "a.npz", train_images=np.zeros((2, 300, 200), np.uint8))
    _one_line_error(cli("data", "inspect", f"npz:{tmp_path / 'a.npz'}", "--max-pixels", "1000"),
                    "200x300 = 60,000 exceeds the limit of 1,000")
    from sslkit.registry import create_source

    src = create_source(f"npz:{tmp_path / 'a.npz'}")
    assert src.image_shape() == (2, 300, 200) and len(src.index()) == 2  # the default limit lets it through


@pytest.mark.timeout(300)  # a hang (as reported) fails the test
def test_folder_source_link_loops_and_a_fifo_named_png(tmp_path, cli):
    """Item 11, as reported: 10 images with `ln -s . data/self` (was counted as 410), a
    second loop (hung) and a FIFO named x.png (hung): 10 images, the FIFO reported."""
    from tests.conftest import make_images

    data = make_images(tmp_path / "data", n_per_class=5, size=16)
    os.symlink(".", data / "self")
    (data / "selfloop").mkdir()
    os.symlink("../selfloop", data / "selfloop" / "parent")
    os.mkfifo(data / "x.png")
    proc = cli("data", "inspect", f"folder:{data}", "--json")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert rep["images"] == 10 and rep["decoded_ok"] == 10
    assert [u["path"] for u in rep["unreadable"]] == ["x.png"] and "FIFO" in rep["unreadable"][0]["reason"]


def test_a_decoder_out_of_memory_or_silent_is_a_named_reason_not_an_empty_one(tmp_path, monkeypatch):
    """A MemoryError (a decoder asked for more than is free) and an error without a message
    each give a row that says what happened, not ``MemoryError:`` with nothing after it."""
    from sslkit.data.pipeline import load_data
    from sslkit_plugins.sources.folder import FolderSource
    from tests.conftest import make_images

    root = make_images(tmp_path / "img", n_per_class=3, size=16)
    files = sorted(str(p) for p in root.rglob("*.png"))
    original = FolderSource.load

    def load(self, ref):
        if ref.path == files[0]:
            raise MemoryError()
        if ref.path == files[1]:
            raise RuntimeError("")
        return original(self, ref)

    monkeypatch.setattr(FolderSource, "load", load)
    data = load_data(f"folder:{root}", 16, cache_dir="", progress=False, workers=1)
    reasons = dict(data.prepared.skipped)
    first, second = (str(Path(f).relative_to(root)) for f in files[:2])  # reports name files below the root
    assert reasons == {first: "MemoryError: decoding it needs more memory than is free", second: "RuntimeError"}


def test_resume_finds_an_array_edited_in_place_between_unchanged_ends(tmp_path, cli):
    """An uncompressed array (or volume) edited in its interior keeps its header and its first and
    last 4 KiB: the fingerprint of those alone (``content-v2``) let ``--resume`` go on silently. A
    run recorded under ``content-v2`` still resumes on unchanged data."""
    from sslkit.data.prepare import fingerprint
    from sslkit.registry import create_source

    a = np.random.default_rng(2).integers(0, 255, (40, 64, 64)).astype(np.uint8)  # 160 KiB
    data, run = tmp_path / "a.npy", tmp_path / "run"
    np.save(data, a)
    result = cli(*TRAIN, "--data", f"npz:{data}", "--out", run, "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"]["fingerprint_scheme"] == "content-v3"
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    before = data.read_bytes()
    edited = a.copy()
    edited[10:30] = 255 - edited[10:30]
    np.save(data, edited)
    after = data.read_bytes()
    assert len(after) == len(before) and after[:4096] == before[:4096] and after[-4096:] == before[-4096:]
    _one_line_error(cli("pretrain", "--resume", run, "--quiet"), "data changed", "--allow-data-change")
    np.save(data, a)  # the data as it was, and the run as an older sslkit recorded it
    refs = create_source(f"npz:{data}").index()
    info["dataset"].pop("fingerprint_scheme")
    info["dataset"]["fingerprint"] = fingerprint(refs, info["input_spec"]["preprocessing"], "content-v2")
    (run / "run.json").write_text(json.dumps(info))
    proc = cli("pretrain", "--resume", run, "--quiet")
    assert proc.exit_code == 0 and "data changed" not in proc.stderr, proc.stderr[-2000:]


def test_resume_notes_data_that_decodes_to_other_values(tmp_path, cli):
    """A newer sslkit decoding the same files otherwise (MINISWHITE TIFFs now inverted: mean 0.155 then,
    0.845 now), or an edit between the fingerprint's blocks, resumed without a word."""
    a = np.random.default_rng(2).integers(0, 255, (12, 24, 24)).astype(np.uint8)
    data, run = tmp_path / "a.npy", tmp_path / "run"
    np.save(data, a)
    assert cli(*TRAIN, "--data", f"npz:{data}", "--out", run, "--checkpoint-every", "1").exit_code == 0
    info = json.loads((run / "run.json").read_text())
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    same = cli("pretrain", "--resume", run, "--quiet")
    assert same.exit_code == 0 and "note" not in same.stderr, same.stderr
    info = json.loads((run / "run.json").read_text())
    mean, std = info["input_spec"]["mean"][0], info["input_spec"]["std"][0]
    info["status"], info["input_spec"]["mean"] = "running", [mean + 0.3]  # as if decoded otherwise then
    (run / "run.json").write_text(json.dumps(info))
    proc = cli("pretrain", "--resume", run, "--quiet", "--max-steps", "3")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    assert (f"note: the data decoded now has mean {mean:.3f} where this run recorded {mean + 0.3:.3f} (std {std:.3f}): "
            "files changed in place, or this sslkit decodes them otherwise") in proc.stderr
    assert json.loads((run / "run.json").read_text())["input_spec"]["mean"] == [mean + 0.3]  # the run's own kept
