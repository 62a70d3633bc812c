"""`sslkit export` on one tiny trained run: ONNX contract, metadata, preprocessing graphs, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sslkit.errors import UsageError
from sslkit.run import load_run
from tests.conftest import make_images, run_sslkit, tiny_run
from tests.test_hardening_export import assert_no_machine_paths

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A gray 8-bit image folder and a 1-step SimCLR run of resnet10t on it."""
    root = tmp_path_factory.mktemp("export")
    data = make_images(root / "gray", n_per_class=6, size=40, channels=1)
    run_dir = tiny_run(f"folder:{data}", root / "run", SIZE)
    return {"root": root, "data": data, "run": run_dir}


def _meta(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["sslkit"])


def _encoder_on_unit(run_dir: Path, unit: np.ndarray) -> np.ndarray:
    """The run's PyTorch encoder on pixels in [0, 1], normalised here from run.json."""
    run = load_run(run_dir)
    mean = np.array(run.spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.array(run.spec.std, np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        return run.build_encoder()(torch.from_numpy((unit - mean) / std)).numpy()


def test_onnx_export_contract(trained, tmp_path, cli):
    out = tmp_path / "encoder.onnx"
    proc = cli("export", trained["run"], "--out", out, "--json")  # in-process: ~5 s of imports less
    assert proc.exit_code == 0, proc.stderr
    report = json.loads(proc.stdout)
    # verified on random and real inputs, batch 1 and 8, at the run's size and a second (non-square) one
    seen = {(c["inputs"], c["batch"], tuple(c["size"])) for c in report["checks"]}
    assert {("random", 1, (32, 32)), ("random", 8, (32, 32)), ("random", 8, (64, 48)),
            ("real", 1, (32, 32)), ("real", 8, (32, 32))} <= seen
    assert report["max_abs_diff"] <= 1e-4 and report["min_cosine"] > 0.9999

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    meta = _meta(out)
    assert meta["input"]["name"] == "pixels" and meta["input"]["dtype"] == "float32"
    assert meta["input"]["shape"] == ["batch", 1, "height", "width"]
    assert meta["input"]["dynamic_axes"] == {"0": "batch", "2": "height", "3": "width"}
    assert meta["input"]["image_size"] == SIZE and meta["input"]["channels"] == 1
    assert meta["input"]["preprocessing_in_graph"] is False
    info = json.loads((trained["run"] / "run.json").read_text())
    assert meta["input"]["mean"] == info["input_spec"]["mean"] and meta["input"]["std"] == info["input_spec"]["std"]
    assert meta["task"] == "simclr" and meta["backbone"] == "timm:resnet10t" and meta["embedding_dim"] == 512
    assert meta["dataset_fingerprint"] == info["dataset"]["fingerprint"] and meta["run_id"]
    assert meta["sslkit_version"] and meta["precision"] == "float32"
    assert str(trained["data"]) not in json.dumps(meta)  # no paths
    assert_no_machine_paths(out, trained["run"], trained["data"], tmp_path)  # nor anywhere in the file

    # An independent size (neither checked size), straight through onnxruntime vs PyTorch.
    unit = np.random.default_rng(0).random((3, 1, 40, 56), dtype=np.float32)
    mean, std = np.float32(meta["input"]["mean"][0]), np.float32(meta["input"]["std"][0])
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": (unit - mean) / std})[0]
    np.testing.assert_allclose(got, _encoder_on_unit(trained["run"], unit), atol=1e-4)


def test_with_preprocessing_takes_raw_pixels(trained, tmp_path, cli):
    out = tmp_path / "raw.onnx"
    proc = cli("export", trained["run"], "--out", out, "--with-preprocessing", "--fp16",
               "--check-data", "none", "--json")
    assert proc.exit_code == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["input_kind"] == "uint8" and report["max_abs_diff"] <= 1e-4
    assert report["real_inputs"] == "skipped: --check-data none"
    assert report["fp16"]["min_cosine"] >= 0.999 and report["fp16"]["checks"]
    meta = _meta(out)
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["preprocessing_in_graph"] is True
    assert meta["precision"] == "float16" and "float16" in meta["verification"]
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io kept float32

    raw = np.random.default_rng(1).integers(0, 256, (8, 1, SIZE, SIZE), dtype=np.uint8)
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": raw})[0]
    ref = _encoder_on_unit(trained["run"], raw.astype(np.float32) / 255)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999 and np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,scale", [("uint8", 255), ("uint16", 65535), ("float32", 1)])
def test_with_preprocessing_fp32_dtypes(trained, tmp_path, dtype, scale):
    out = tmp_path / f"{dtype}.onnx"
    proc = run_sslkit("export", trained["run"], "--out", out, "--with-preprocessing", "--input-dtype", dtype)
    assert proc.returncode == 0, proc.stderr
    rng = np.random.default_rng(2)
    raw = (rng.integers(0, scale + 1, (4, 1, 48, 40)) if scale > 1 else rng.random((4, 1, 48, 40))).astype(dtype)
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": raw})[0]
    np.testing.assert_allclose(got, _encoder_on_unit(trained["run"], raw.astype(np.float32) / scale), atol=1e-4)


def _assert_one_line_error(result, *fragments):
    """``result``: a subprocess (returncode) or an in-process click result (exit_code)."""
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_bad_inputs_leave_nothing(trained, tmp_path, cli):
    # a run directory without weights (pretraining never finished): the real executable
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(trained["run"] / "run.json", broken / "run.json")
    out = tmp_path / "x.onnx"
    _assert_one_line_error(run_sslkit("export", broken, "--out", out), "encoder.safetensors")
    assert not out.exists() and _leftovers(tmp_path) == []

    # an unwritable location (even for root: /proc takes no new files), a missing folder
    _assert_one_line_error(cli("export", trained["run"], "--out", "/proc/sslkit-x.onnx"), "not writable")
    _assert_one_line_error(cli("export", trained["run"], "--out", tmp_path / "no" / "x.onnx"), "does not exist")

    # an existing file is never replaced silently
    keep = tmp_path / "keep.onnx"
    keep.write_text("precious")
    _assert_one_line_error(cli("export", trained["run"], "--out", keep), "already exists", "--overwrite")
    assert keep.read_text() == "precious"

    # options an exporter does not have, a format nobody registered
    _assert_one_line_error(cli("export", trained["run"], "--out", out.with_suffix(".safetensors"), "--format",
                               "safetensors", "--with-preprocessing"), "no option")
    _assert_one_line_error(cli("export", trained["run"], "--out", out, "--format", "tflite"), "unknown export format")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_parity_failure_exits_1_without_file(trained, tmp_path):
    """A tolerance no export can meet: the check fails (exit 1) and no file appears."""
    from sslkit.errors import CheckFailed
    from sslkit.export import export_run

    out = tmp_path / "strict.onnx"
    with pytest.raises(CheckFailed, match="parity failed"):
        export_run(trained["run"], out, check_data="none", tolerance=1e-12)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_run_is_never_exported_over_its_own_files_nor_from_a_stale_or_broken_encoder(trained, tmp_path, cli):
    """The audit's cases: --overwrite replaced run.json / encoder.safetensors with the export (the run
    was ruined); a resumed run still training exported its earlier session's encoder; NaN weights were
    reported as an ONNX parity failure (exit 1)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for own in ("run.json", "encoder.safetensors", "checkpoints/step-00000001/model.safetensors"):
        fmt = "safetensors" if own.endswith(".safetensors") else "onnx"
        _assert_one_line_error(cli("export", run, "--out", run / own, "--format", fmt, "--overwrite"),
                               f"is the run's own {own}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli("export", run, "--out", run / "encoder.onnx", "--check-data", "none").exit_code == 0  # beside them: fine

    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))  # resumed, training on
    _assert_one_line_error(cli("export", run, "--out", tmp_path / "x.onnx"), "is 'running' in its run.json",
                           "checkpoints/step-")
    (run / "run.json").write_text(json.dumps(info))
    weights = load_file(str(run / "encoder.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, str(run / "encoder.safetensors"))
    _assert_one_line_error(cli("export", run, "--out", tmp_path / "x.onnx", "--check-data", "none"),
                           "encoder.safetensors: changed since the run wrote it")  # run.json records its sha256
    (run / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "encoder_sha256"}))
    _assert_one_line_error(cli("export", run, "--out", tmp_path / "x.onnx", "--check-data", "none"),
                           "holds NaN or inf weights", "nothing was exported")  # a run.json of before the hash
    assert not (tmp_path / "x.onnx").exists() and _leftovers(tmp_path) == []


def test_run_id_is_a_hash_of_the_weights_exported(trained, tmp_path):
    """A run recorded before run.json had a ``run_id``: a checkpoint's export named the final encoder's
    hash (the audit's case); now each export names its own weights, so the same weights give the same
    id and others another."""
    from safetensors.torch import load_file, save_file

    from sslkit.export import export_metadata
    from sslkit.output_file import file_sha256

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    old = json.loads((run / "run.json").read_text())
    assert old.pop("run_id")  # a run made now records its own; this test is about the fallback
    (run / "run.json").write_text(json.dumps(old))
    step = run / "checkpoints" / "step-00000001"
    same = export_metadata(load_run(step), load_run(step).build_encoder())["run_id"]  # 1 step: the final weights
    assert same == export_metadata(load_run(run), load_run(run).build_encoder())["run_id"]
    weights = load_file(str(run / "encoder.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1
    save_file(weights, str(run / "encoder.safetensors"))
    info = json.loads((run / "run.json").read_text())
    info["encoder_sha256"] = file_sha256([run / "encoder.safetensors"])  # as if the run had written these
    (run / "run.json").write_text(json.dumps(info))
    final = export_metadata(load_run(run), load_run(run).build_encoder())["run_id"]
    assert final != same == export_metadata(load_run(step), load_run(step).build_encoder())["run_id"]
    assert len(final) == 16 and int(final, 16) >= 0


def test_a_checkpoint_named_as_the_readme_writes_it_is_found(trained, tmp_path):
    """README's ``RUN/checkpoints/step-N``: ``step-1`` said "run directory ... does not exist" (the folder
    is ``step-00000001``); a step the run has not is one line naming the ones it has."""
    run = trained["run"]
    plain = load_run(Path(run) / "checkpoints" / "step-1")
    assert plain.checkpoint == load_run(Path(run) / "checkpoints" / "step-00000001").checkpoint is not None
    with pytest.raises(UsageError, match=r"checkpoint '.*step-0*7' does not exist; the run has step-00000001$"):
        load_run(Path(run) / "checkpoints" / "step-7")


@pytest.mark.parametrize("when", ["publish", "interrupt"])
def test_an_export_that_loses_a_race_keeps_the_winners_file(trained, tmp_path, monkeypatch, when):
    """Two exports to one name (the interrupts audit): the second's failure removed the file the first had
    just published and reported written -- refused as "written meanwhile by another process" (``publish``),
    or interrupted after the other published (``interrupt``). The file is the winner's, kept byte for byte."""
    import sslkit.output_file as output_file
    from sslkit.export import export_run
    from sslkit.output_file import OutputExists

    out = tmp_path / "enc.safetensors"
    theirs = b"the other process's finished export"
    publish = output_file._publish

    def raced(tmp, dest, overwrite):
        dest.write_bytes(theirs)  # the other export publishes first
        if when == "interrupt":
            raise KeyboardInterrupt
        publish(tmp, dest, overwrite)

    monkeypatch.setattr(output_file, "_publish", raced)
    with pytest.raises(KeyboardInterrupt if when == "interrupt" else OutputExists):
        export_run(trained["run"], out, fmt="safetensors", check_data="none")
    assert out.read_bytes() == theirs
