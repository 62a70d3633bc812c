"""No patient identifier in any output: run dir, checkpoints, exported model, reports, logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sslkit.pseudonym import file_key
from tests.dicom_factory import write_dicom

SECRETS = {"name": "ZZTOPSECRET^WINIFRED", "id": "PIDX-88472913", "birth": "19310417"}


def _needles() -> list[bytes]:
    out = []
    for value in SECRETS.values():
        for v in {value, value.split("^")[0]}:
            out += [v.encode(), v.encode("utf-16-le")]
    return out


def _scan(root: Path) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n!r}" for n in _needles() if n in data]
    return hits


def test_no_identifier_in_any_output(tmp_path, cli):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for i in range(6):
        write_dicom(data / f"s{i}.dcm", (rng.random((36, 36)) * 4000).astype(np.uint16),
                    patient_id=f"{SECRETS['id']}{i % 3}", patient_name=SECRETS["name"], birth_date=SECRETS["birth"],
                    syntax=("explicit", "rle", "j2k")[i % 3], photometric=("MONOCHROME1", "MONOCHROME2")[i % 2],
                    series_description=f"CXR for {SECRETS['name']}")  # free text that names the patient
    # a broken file with identifiers in its header must be reported without them
    good = (data / "s0.dcm").read_bytes()
    (data / "s9.dcm").write_bytes(good[: len(good) - 500])
    run, cache = tmp_path / "run", tmp_path / "cache"
    logs = []
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"dicom:{data}",
            "--out", run, "--epochs", "2",
            "--batch-size", "2", "--image-size", "32", "--cache", cache, "--val-fraction", "0.34", "--quiet")
    assert r.exit_code == 0, r.output
    logs.append(r.output)
    r = cli("export", run, "--out", run / "encoder.onnx")
    assert r.exit_code == 0, r.output
    logs.append(r.output)
    r = cli("data", "inspect", f"dicom:{data}", "--json")
    assert r.exit_code == 0, r.output
    logs.append(r.output)
    report = json.loads(r.output)
    assert report["groups"] == 3  # patients are counted, never named
    r = cli("data", "inspect", f"dicom:{data}")
    logs.append(r.output)
    # a filter on that free text still works once the header index exists (it reads those headers again)
    assert list((cache / "headers").glob("*.json"))
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"dicom:{data}", "--out",
            tmp_path / "run2", "--max-steps", "1", "--batch-size", "2", "--image-size", "32", "--cache", cache,
            "--series-description", "CXR*", "--quiet")
    filtered = json.loads((tmp_path / "run2" / "run.json").read_text())["dataset"]
    assert r.exit_code == 0 and filtered["samples"] == 6  # the six whole files (s9 is cut short)
    r = cli("data", "inspect", f"dicom:{data}", "--series-description", "MR*", "--json")
    assert json.loads(r.output)["images"] == 0, r.output
    (tmp_path / "logs.txt").write_text("\n".join(logs))
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"]["val_groups"] == 1 and info["dataset"]["val_samples"] in (2, 3)  # one patient
    assert (run / "encoder.onnx").exists() and any((run / "checkpoints").iterdir())
    skipped = json.loads((run / "data_report.json").read_text())["skipped_files"]
    assert any(s["file"] == file_key("s9.dcm") for s in skipped) or info["dataset"]["val_samples"]
    assert _scan(run) == [] and _scan(cache) == [] and _scan(Path(os.environ["SSLKIT_CACHE_DIR"])) == []
    assert not any(n in (tmp_path / "logs.txt").read_bytes() for n in _needles())


def test_error_reasons_drop_quoted_values():
    from sslkit_plugins.sources.dicom import safe_reason

    reason = safe_reason(ValueError(f"Invalid value for VR PN: '{SECRETS['name']}'"))
    assert SECRETS["name"] not in reason and reason.startswith("ValueError: Invalid value")


def test_decoder_messages_lose_their_quoted_paths(tmp_path, cli):
    """PIL quotes the whole path of a file it cannot read ('.../ZZTOPSECRET_WINIFRED/scan.png'): the
    reason in data_report.json drops quoted values, as DICOM reasons do; the file is named by a keyed hash
    of its path below the root (names there can carry patient names)."""
    from tests.conftest import make_images

    data = make_images(tmp_path / "hospital" / "ZZTOPSECRET_WINIFRED", n_per_class=3, size=32)
    (data / "a" / "scan.png").write_bytes(b"not a png")
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"folder:{data}",
            "--out", tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--image-size", "32", "--quiet")
    assert r.exit_code == 0, r.output
    skipped = json.loads((tmp_path / "run" / "data_report.json").read_text())["skipped_files"]
    assert skipped == [{"file": file_key("a/scan.png"), "reason": "UnidentifiedImageError: cannot identify image file '…'"}]
    r = cli("data", "inspect", f"folder:{data}", "--json")  # where the user finds the file behind a key
    assert {"path": "a/scan.png", "key": file_key("a/scan.png")}.items() <= json.loads(r.output)["undecodable"][0].items()
