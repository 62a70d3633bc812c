"""NIfTI split groups are keyed by each file's path below the data root: the same folder named relative,
absolute or through a link gives the same groups, so the same ``--val-fraction`` split and eval folds
(they hashed the path as ``--data`` spelled it). ``group_key=as-given`` keeps the earlier key, for runs
recorded with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from sslkit.data.pipeline import open_source  # noqa: E402
from sslkit.data.splits import split_refs  # noqa: E402
from sslkit.eval.split import group_folds, group_keys  # noqa: E402

PATIENT = "DOE_JOHN_19610301"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Ten tiny volumes, five in each of the class folders a and b, one below a patient-named folder."""
    root = tmp_path_factory.mktemp("groups") / "vols"
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "ab"[i % 2] / (PATIENT if i == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 100, (4, 4, 3)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"vol{i}.nii.gz")
    return root


def _index(data: str, **options: str) -> dict[str, tuple[str, str | None]]:
    """``{path relative to the root: (split group, label)}`` of the volumes of ``data``."""
    source = open_source(data, {"sample": "volume", "volume_size": "3,4,4", **options}, False)
    return {source.relative(r.path): (r.group, r.label) for r in source.index()}


def _spellings(root: Path, monkeypatch) -> list[str]:
    """The same folder as ``nifti:`` data four ways: relative, ``./``-relative, absolute, through a link."""
    link = root.parent / "link"
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    monkeypatch.chdir(root.parent)
    return ["nifti:vols", "nifti:./vols", f"nifti:{root}", f"nifti:{link}/"]


def test_every_spelling_of_the_root_gives_the_same_groups_split_and_folds(root, monkeypatch):
    seen = []
    for data in _spellings(root, monkeypatch):
        groups = _index(data)
        source = open_source(data, {"sample": "volume", "volume_size": "3,4,4"}, False)
        refs = source.index()
        _, val = split_refs(refs, 0.3, seed=0)
        rel = [source.relative(r.path) for r in refs]
        keys = group_keys([r.id for r in refs], {r.id: r.group for r in refs})
        folds = group_folds(np.array([r.label == "b" for r in refs], int), keys, 2, seed=0)
        seen.append((groups, sorted(source.relative(r.path) for r in val),
                     [sorted(rel[i] for i in test) for _, test in folds]))
    assert len(seen[0][0]) == 10 and len(seen[0][1]) == 3
    assert all(s == seen[0] for s in seen[1:]), seen
    # the key is a hash of the path below the root (pinned: another one would move every earlier split)
    rel = f"a/{PATIENT}/vol0.nii.gz"
    group, label = seen[0][0][rel]
    assert group == hashlib.sha256(b"sslkit-nifti-v2\0" + rel.encode()).hexdigest()[:16] and label == "a"
    assert PATIENT not in group and "vol0" not in group


def test_as_given_keeps_the_key_runs_recorded_before_had(root, monkeypatch):
    """``group_key=as-given``: the earlier hash of the path as spelled (what a resumed earlier run splits by)."""
    monkeypatch.chdir(root.parent)
    for data, spelled in (("nifti:vols", "vols"), (f"nifti:{root}", str(root))):
        groups = _index(data, group_key="as-given")
        for rel, (group, _) in groups.items():
            path = f"{spelled}/{rel}".encode()
            assert group == hashlib.sha256(b"sslkit-nifti-v1" + path).hexdigest()[:16], (data, rel)


def test_an_unknown_group_key_is_one_line(cli, root):
    result = cli("data", "inspect", f"nifti:{root}", "--data-opt", "group_key=relativ")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "unknown group_key 'relativ' (did you mean 'relative'?)" in lines[0]


def _rows(run: Path) -> list[str]:
    """metrics.csv's step, epoch, loss and lr (not its timings)."""
    return [",".join(line.split(",")[:4]) for line in (run / "metrics.csv").read_text().splitlines()]


def test_a_run_recorded_with_the_earlier_key_resumes_with_its_split(root, tmp_path, cli):
    """A ``--val-fraction`` run recorded before ``group_key`` existed held out by the earlier key: its
    ``--resume`` keeps that split (``Source.legacy_option_values``), so the data fingerprint still matches
    and the resumed run repeats the uninterrupted one; today's key would hold out other files."""
    import json
    import shutil

    run = tmp_path / "run"
    args = ["--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "16", "--batch-size", "4",
            "--max-steps", "6", "--checkpoint-every", "3", "--val-fraction", "0.3", "--seed", "1", "--deterministic",
            "--quiet", "--no-cache", "--task-opt", "proj_hidden_dim=16", "--task-opt", "proj_dim=8"]
    data = ["--data", f"nifti:{root}", "--data-opt", "group_key=as-given"]
    assert cli("pretrain", *data, "--out", run, *args).exit_code == 0
    reference = _rows(run)
    for ckpt in (run / "checkpoints").glob("step-*"):  # as if stopped after step 3 by a version without the key
        if int(ckpt.name.split("-")[1].split(".")[0]) > 3:
            ckpt.unlink() if ckpt.is_file() else shutil.rmtree(ckpt)
    rows = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(rows[:4]) + "\n")
    info = json.loads((run / "run.json").read_text())
    assert info["source_options_resolved"]["group_key"] == "as-given"
    del info["source_options_resolved"]["group_key"]
    del info["config"]["source_options"]["group_key"]
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    resumed = cli("pretrain", "--resume", run, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert _rows(run) == reference
    fresh = tmp_path / "fresh"  # today's key: another held-out part, so another training fingerprint
    assert cli("pretrain", "--data", f"nifti:{root}", "--out", fresh, *args).exit_code == 0
    now = json.loads((fresh / "run.json").read_text())["dataset"]
    assert now["val_fingerprint"] != info["dataset"]["val_fingerprint"]
