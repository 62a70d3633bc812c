"""Series keys are HMAC-SHA256 under a per-user secret: stable, and not recomputable from the UID."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
import sys

import pytest

from sslkit import pseudonym
from sslkit.errors import UsageError
from tests.conftest import REPO

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
PRINT_KEY = "from sslkit.pseudonym import keyed_hash; print(keyed_hash({uid!r}, 'dicom-series'))"


def _key_in_process(env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("SSLKIT_KEY", "SSLKIT_KEY_FILE")}
    return subprocess.Popen([sys.executable, "-c", PRINT_KEY.format(uid=UID)], env={**full, **env}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _out(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_key_is_hmac_under_the_secret_file_created_0600_once(tmp_path):
    key_file = tmp_path / "config" / "sslkit" / "key"
    missing = _key_in_process({"SSLKIT_KEY_FILE": str(key_file)})  # a named key file's folder must exist
    err = missing.communicate(timeout=60)[1]
    assert missing.returncode != 0 and "its folder does not exist" in err, err
    assert not key_file.parent.exists()
    key_file.parent.mkdir(parents=True)
    # two processes starting together create one secret between them, and agree
    procs = [_key_in_process({"SSLKIT_KEY_FILE": str(key_file)}) for _ in range(2)]
    first, second = (_out(p) for p in procs)
    assert first == second and len(first) == 16
    secret = key_file.read_bytes()
    assert len(secret) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["key"]  # no temporary file left
    # by hand: HMAC-SHA256(secret, "dicom-series\0" + UID), first 16 hex digits
    assert first == hmac.new(secret, f"dicom-series\0{UID}".encode(), hashlib.sha256).hexdigest()[:16]
    # not the constant-salt hash anyone holding the UID could recompute
    assert first != hashlib.sha256(b"sslkit-series-v1" + UID.encode()).hexdigest()[:16]
    # a later process (a resumed run, sslkit embed) reads the same secret: the same key
    assert _out(_key_in_process({"SSLKIT_KEY_FILE": str(key_file)})) == first
    assert key_file.read_bytes() == secret


def test_another_secret_gives_other_keys_and_env_overrides(tmp_path, monkeypatch):
    shared = "0123456789abcdef" * 4  # what every node of a multi-node run would export
    a = _out(_key_in_process({"SSLKIT_KEY": shared, "SSLKIT_KEY_FILE": str(tmp_path / "a")}))
    b = _out(_key_in_process({"SSLKIT_KEY": shared, "SSLKIT_KEY_FILE": str(tmp_path / "b")}))
    assert a == b == hmac.new(shared.encode(), f"dicom-series\0{UID}".encode(), hashlib.sha256).hexdigest()[:16]
    assert not (tmp_path / "a").exists()  # the env secret is used as is, nothing written
    other = _out(_key_in_process({"SSLKIT_KEY": "f" * 64}))
    assert other != a
    monkeypatch.setenv("SSLKIT_KEY", "short")
    with pytest.raises(UsageError, match="at least 32"):
        pseudonym.keyed_hash(UID)


def test_series_keys_follow_the_secret_even_through_the_header_index(tmp_path, monkeypatch):
    """The header index stores keyed series keys: another secret must not read the old ones."""
    from pydicom import dcmread

    from sslkit.registry import create_source
    from sslkit_plugins.sources.dicom_series import series_key
    from tests.test_series import write_series

    paths = write_series(tmp_path / "ct", n=3)
    uid = str(dcmread(paths[0]).SeriesInstanceUID)

    def ids(secret: str) -> list[str]:
        monkeypatch.setenv("SSLKIT_KEY", secret)
        src = create_source(f"dicom:{tmp_path / 'ct'}", workers=1, sample="volume", volume_size="3,6,5")
        src.header_cache = tmp_path / "headers"
        return [src.sample_id(r) for r in src.index()]

    a, b = "a" * 32, "b" * 32
    assert ids(a) == [f"series:{series_key(uid)}"]  # series_key under secret a (still set)
    assert ids(a) == ids(a)  # the index answers, same key
    assert ids(b) != ids(a) and ids(b) == [f"series:{series_key(uid)}"]
    assert series_key(uid) == pseudonym.keyed_hash(uid, "dicom-series") != pseudonym.keyed_hash(uid, "other")
    stored = "".join(p.read_text() for p in (tmp_path / "headers").glob("*.json"))
    assert uid not in stored and hashlib.sha256(b"sslkit-series-v1" + uid.encode()).hexdigest()[:16] not in stored
