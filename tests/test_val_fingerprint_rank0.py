"""Under torchrun the fingerprints run.json records, the dataset's and the ``--val-fraction`` held-out
part's, are read by rank 0 alone and shared (``sslkit.engine.setup.from_rank0``): the held-out part's
was read by every rank, each reading all of its files again."""

from __future__ import annotations

import json
from pathlib import Path

from sslkit.data.digest import fingerprint
from sslkit.data.splits import split_refs
from sslkit.registry import create_source
from tests import test_ddp_faults

#: every rank writes "RANK SAMPLES" to $T_FINGERPRINT_LOG for each fingerprint it computes, under every
#: name the function is imported as
COUNTED = '''
import os
import sslkit.data.digest, sslkit.data.pipeline, sslkit.data.prepare, sslkit.engine.setup
_real = sslkit.data.digest.fingerprint
def _counted(refs, *a, **k):
    with open(os.environ["T_FINGERPRINT_LOG"], "a") as f:
        f.write(f"{os.environ['RANK']} {len(refs)}\\n")
    return _real(refs, *a, **k)
for _m in (sslkit.data.digest, sslkit.data.pipeline, sslkit.data.prepare, sslkit.engine.setup):
    _m.fingerprint = _counted
'''


def test_the_val_splits_fingerprint_is_read_by_rank_0_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(test_ddp_faults, "WRAPPER", COUNTED + test_ddp_faults.WRAPPER)
    log, run = tmp_path / "fingerprints.log", tmp_path / "run"
    r0, r1 = test_ddp_faults.two_ranks(tmp_path, "--max-steps", "1", "--out", str(run), "--val-fraction", "0.25",
                                       "--no-cache", T_FINGERPRINT_LOG=str(log))
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert r1.returncode == 0, r1.stderr[-3000:]
    dataset = json.loads((run / "run.json").read_text())["dataset"]
    assert (dataset["samples"], dataset["val_samples"]) == (6, 2)  # 8 images, each file its own group
    assert sorted(log.read_text().splitlines()) == ["0 2", "0 6"]  # rank 0: the training part, the held-out one
    _, val = split_refs(create_source(f"folder:{tmp_path / 'img'}").index(), 0.25, seed=0)
    assert dataset["val_fingerprint"] == fingerprint(val)
