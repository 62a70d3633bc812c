"""Checkpoints: atomic, keep-last-N, damaged ones skipped, malicious pickles refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from sslkit import checkpoint
from sslkit.errors import UsageError


def save(folder: Path, step: int, keep: int = 3) -> Path:
    tensors = {"w": torch.full((4, 4), float(step)), "buf": torch.arange(3)}
    state = {"step": step, "rng": [{"torch": torch.get_rng_state()}], "data": {"epoch": 0, "step_in_epoch": step}}
    return checkpoint.save(folder, step, tensors, state, keep=keep)


def test_save_load_and_keep_last_n(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    path, tensors, state, skipped = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000004" and state["step"] == 4 and not skipped
    assert torch.equal(tensors["w"], torch.full((4, 4), 4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    save(tmp_path, 4, keep=2)  # saving the same step again replaces it
    assert len(checkpoint.list_checkpoints(tmp_path)) == 2


def test_rotation_after_a_resume_that_skipped_a_damaged_checkpoint_keeps_the_good_ones(tmp_path):
    """step-10 damaged, the resume trains on from step-5: rotation counted step-10 as the newest and
    deleted every new checkpoint as soon as it was written; with --keep-checkpoints 1 a kill then left
    only the damaged one, and the run could not be resumed."""
    save(tmp_path, 5)
    save(tmp_path, 10)
    (tmp_path / "step-00000010" / checkpoint.MODEL_FILE).write_bytes(b"truncated")
    assert checkpoint.load_latest(tmp_path)[0].name == "step-00000005"
    for step in (6, 7):
        save(tmp_path, step, keep=1)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000007", "step-00000010"]  # the damaged later one is left alone, not counted
    path, _, state, skipped = checkpoint.load_latest(tmp_path)
    assert state["step"] == 7 and [p.name for p, _ in skipped] == ["step-00000010"]
    save(tmp_path, 10, keep=2)  # the run reaches that step again: the damaged one is replaced
    assert checkpoint.load_latest(tmp_path)[2]["step"] == 10


def test_tied_tensors_are_saved(tmp_path):
    w = torch.randn(3, 3)
    checkpoint.save(tmp_path, 1, {"a": w, "b": w}, {"step": 1})
    _, tensors, _, _ = checkpoint.load_latest(tmp_path)
    assert torch.equal(tensors["a"], tensors["b"])


@pytest.mark.parametrize("victim", [checkpoint.MODEL_FILE, checkpoint.STATE_FILE])
def test_truncated_checkpoint_is_never_taken_as_latest(tmp_path, victim):
    save(tmp_path, 1)
    save(tmp_path, 2)
    f = tmp_path / "step-00000002" / victim
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a crash in the middle of writing this file
    path, _, state, skipped = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000001" and state["step"] == 1
    assert skipped[0][0].name == "step-00000002" and "truncated" in skipped[0][1]


def test_unfinished_writes_are_ignored(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-crashed").mkdir()  # killed before the rename
    (tmp_path / ".tmp-crashed" / checkpoint.MODEL_FILE).write_bytes(b"partial")
    half = tmp_path / "step-00000009"  # a folder without its manifest (written last)
    half.mkdir()
    (half / checkpoint.MODEL_FILE).write_bytes((tmp_path / "step-00000001" / checkpoint.MODEL_FILE).read_bytes())
    path, _, state, skipped = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and [p.name for p, _ in skipped] == ["step-00000009"]


def test_only_damaged_checkpoints_is_a_usage_error(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "step-00000001" / checkpoint.STATE_FILE).write_bytes(b"")
    with pytest.raises(UsageError, match="no usable checkpoint"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path / "missing") is None


class Exploit:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    save(tmp_path, 1)
    ckpt = save(tmp_path, 2)
    # the attacker replaces state.pt and even writes a matching manifest
    torch.save({"step": 2, "payload": Exploit(marker)}, ckpt / checkpoint.STATE_FILE, pickle_protocol=2)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    raw = (ckpt / checkpoint.STATE_FILE).read_bytes()
    manifest["files"][checkpoint.STATE_FILE] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    # sanity: an unrestricted load really would run the payload
    assert pickle.loads(pickle.dumps(Exploit(marker))) == 0 and marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match=r"refused: [^.]*GLOBAL (posix|os)\.system") as err:
        checkpoint.load(ckpt)
    assert "weights_only` set to `False`" not in str(err.value)  # torch's preface is not passed on as advice
    path, _, state, skipped = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000001" and skipped[0][0] == ckpt
    assert not marker.exists()


@pytest.mark.parametrize("damage", [
    b"[1, 2]",  # JSON, not an object
    b'{"step": 2, "files": []}',
    b'{"step": 2, "files": {"model.safetensors": 7, "state.pt": 8}}',
    b'{"step": 2, "files": {}}',  # lists nothing, so it would vouch for nothing
    b"\xff\xfe not utf-8",
])
def test_a_damaged_manifest_is_a_skip_reason_not_a_crash(tmp_path, damage):
    save(tmp_path, 1)
    (save(tmp_path, 2) / checkpoint.MANIFEST).write_bytes(damage)
    with pytest.raises(ValueError, match=checkpoint.MANIFEST):
        checkpoint.verify(tmp_path / "step-00000002")
    path, _, state, skipped = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000001" and state["step"] == 1
    assert skipped[0][0].name == "step-00000002" and checkpoint.MANIFEST in skipped[0][1]
