"""Sources own their options, their CLI flags and their in-graph preprocessing; the core
knows no source by name (issue 12, item 5)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sslkit.raw_input import GraphPreprocessing, RawInput, legacy_graph_preprocessing, raw_input_for, resize_order
from sslkit.spec import InputSpec
from tests.conftest import REPO, one_line_error, run_sslkit
from tests.dicom_factory import write_dicom

DICOM_FLAGS = ("--window", "--modality", "--series-description")


def _imports(proc) -> set[str]:
    """Top-level package names imported, from ``python -X importtime`` output."""
    return {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("command", [("pretrain",), ("embed",), ("data", "inspect")])
def test_dicom_flags_only_while_the_plugin_is_loaded(command):
    on = run_sslkit(*command, "--help")
    off = run_sslkit(*command, "--help", env={"SSLKIT_DISABLE_PLUGINS": "dicom"})
    only = run_sslkit(*command, "--help", env={"SSLKIT_LOAD_PLUGINS": "folder,simclr"})
    assert on.returncode == off.returncode == only.returncode == 0, on.stderr + off.stderr
    for flag in DICOM_FLAGS:
        assert flag in on.stdout and flag not in only.stdout
    assert "--modality" not in off.stdout and "--series-description" not in off.stdout
    assert "[dicom] Intensity window: auto" in on.stdout and "[dicom" not in off.stdout
    assert "--data-opt" in off.stdout  # other sources' flags (nifti's --window) may remain, as theirs


def test_help_and_listing_import_neither_torch_nor_pydicom_needlessly():
    cmd = [sys.executable, "-X", "importtime", "-m", "sslkit"]
    import subprocess

    help_ = subprocess.run([*cmd, "pretrain", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0 and "--window" in help_.stdout
    assert not {"torch", "pydicom"} & _imports(help_)  # flags are read without importing plugins
    listing = subprocess.run([*cmd, "list", "tasks"], capture_output=True, text=True, cwd=REPO,
                             env={**__import__("os").environ, "SSLKIT_DISABLE_PLUGINS": "dicom"})
    assert listing.returncode == 0 and "simclr" in listing.stdout
    assert "torch" in _imports(listing) and "pydicom" not in _imports(listing)
    # timm (with torchvision, which imports torch._dynamo: half the start-up) waits for a model to be built
    assert not {"timm", "torchvision"} & _imports(listing)


def _ct_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_dicom(root / f"{i}.dcm", rng.integers(0, 4000, (16, 16)), modality="CT", slope=1.0,
                    intercept=-1024.0, series_description="axial")
    return root


def test_window_flag_reaches_the_dicom_source(tmp_path, cli):
    data = _ct_folder(tmp_path / "ct")
    r = cli("data", "inspect", f"dicom:{data}", "--window", "lung", "--modality", "MR", "--no-decode", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["preprocessing"]["window"] == ["lung (W 1500, L -600)"]
    assert report["preprocessing"]["modality_filter"] == "MR" and report.get("filtered_out") == 3
    one_line_error(cli("data", "inspect", f"dicom:{data}", "--window", "lungs", "--no-decode"), "lungs")
    r = cli("data", "inspect", f"folder:{data}", "--window", "lung", "--no-decode")
    assert r.exit_code == 2 and "unknown option 'window'" in r.output
    r = cli("data", "inspect", f"dicom:{data}", "--data-opt", "workers=-3", "--no-decode")
    assert r.exit_code == 2 and r.output.strip() == "error: dicom option workers=-3: give 0 (one per CPU) or a " \
                                                    "number of processes"


def _third_party(root: Path, flags: str) -> dict[str, str]:
    """An installed distribution (on PYTHONPATH) that declares source flags, nothing else."""
    dist = root / "demo_counts-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-counts\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sslkit.source_flags]\ndemo = demo_counts_flags:FLAGS\n")
    (root / "demo_counts_flags.py").write_text(f"FLAGS = {flags}\n")
    return {"PYTHONPATH": str(root)}


@pytest.fixture
def installed(monkeypatch):
    """Make a :func:`_third_party` folder installed in this process too."""
    import importlib

    from sslkit import source_flags

    def install(env: dict[str, str]) -> None:
        monkeypatch.syspath_prepend(env["PYTHONPATH"])
        importlib.invalidate_caches()
        source_flags._declared.cache_clear()

    yield install
    source_flags._declared.cache_clear()


def test_a_third_party_source_gets_flags_without_core_edits(tmp_path, cli, installed):
    env = _third_party(tmp_path / "site", '{"count_scale": "Divide photon counts by this.", '
                                          '"detector": {"help": "Detector model.", "choices": ["A1", "B2"]}, '
                                          '"seed": "Shadows a core option."}')
    proc = run_sslkit("pretrain", "--help", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--count-scale" in proc.stdout and "[demo] Divide photon" in proc.stdout and "[A1|B2]" in proc.stdout
    assert "--window" in proc.stdout  # the built-in source's flags are still there
    assert proc.stderr.strip() == ("sslkit: plugin 'demo': flag --seed would shadow `sslkit pretrain`'s own "
                                   "option; use --data-opt seed=VALUE")
    off = run_sslkit("pretrain", "--help", env={**env, "SSLKIT_DISABLE_PLUGINS": "demo"})
    assert "--count-scale" not in off.stdout and "--window" in off.stdout and not off.stderr
    installed(env)
    r = cli("pretrain", "--print-config", "--task", "simclr", "--count-scale", "1.5", "--detector", "B2")
    assert r.exit_code == 0, r.output
    assert 'count_scale = "1.5"' in r.output and 'detector = "B2"' in r.output
    assert "# [demo] Divide photon counts by this. (--count-scale)" in r.output
    r = cli("pretrain", "--print-config", "--task", "simclr", "--detector", "XYZ")
    assert r.exit_code == 2 and "'XYZ' is not one of 'A1', 'B2'" in r.output


def test_a_broken_flag_declaration_is_one_line_and_the_rest_works(tmp_path):
    env = _third_party(tmp_path / "site", "3")
    proc = run_sslkit("pretrain", "--help", env=env)
    assert proc.returncode == 0 and "--window" in proc.stdout
    assert proc.stderr.startswith("sslkit: plugin 'demo': its sslkit.source_flags entry")
    assert len(proc.stderr.strip().splitlines()) == 1 and "is ignored: TypeError" in proc.stderr


def test_a_flag_left_out_for_shadowing_a_core_option_has_no_effect(tmp_path, cli, installed, monkeypatch):
    """``--batch-size`` stays sslkit's own: it is not handed to the source too (audit item 1)."""
    from tests.conftest import make_images

    monkeypatch.delitem(sys.modules, "demo_counts_flags", raising=False)  # another test's declaration
    installed(_third_party(tmp_path / "site", '{"batch_size": "Shadows a core option.", "count_scale": "Counts."}'))
    r = cli("pretrain", "--print-config", "--task", "simclr", "--batch-size", "4", "--count-scale", "2")
    assert r.exit_code == 0, r.output
    assert "\nbatch_size = 4\n" in r.output and 'count_scale = "2"' in r.output
    assert "batch_size = \"4\"" not in r.output  # not a source option
    assert "flag --batch-size would shadow `sslkit pretrain`'s own option" in r.stderr
    data = make_images(tmp_path / "images", n_per_class=4, size=32)
    r = cli("pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", tmp_path / "run", "--backbone",
            "timm:resnet10t", "--image-size", "32", "--batch-size", "4", "--max-steps", "1", "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["config"]["batch_size"] == 4 and "batch_size" not in info["config"]["source_options"]


def test_flags_of_a_plugin_sure_not_to_load_are_hidden(tmp_path, cli, installed):
    """A plugin whose module is not installed, or whose sslkit_api excludes this sslkit, offers no flags."""
    site = tmp_path / "site"
    for name, module, source in (("gone", "sslkit_gone_plugin", None),
                                 ("future", "sslkit_future_src", 'sslkit_api = ">=2,<3"\n'),
                                 ("fine", "sslkit_fine_src", 'sslkit_api = ">=1,<2"\n')):
        info = site / f"{module}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[sslkit]\n{name} = {module}\n[sslkit.source_flags]\n"
                                               f"{name} = {module}_flags:FLAGS\n")
        (site / f"{module}_flags.py").write_text(f"FLAGS = {{'{name}_level': 'Level.'}}\n")
        if source is not None:
            (site / f"{module}.py").write_text(source)
    installed({"PYTHONPATH": str(site)})
    r = cli("pretrain", "--help")
    assert r.exit_code == 0, r.output
    assert "--fine-level" in r.output and "--gone-level" not in r.output and "--future-level" not in r.output


def test_builtin_flags_name_options_of_the_source_that_declares_them():
    from importlib.metadata import entry_points

    from sslkit import registry
    from sslkit.plugins import get_plugins

    eps = {ep.name: ep for ep in entry_points(group="sslkit.source_flags")}
    assert "dicom" in eps
    for name, ep in eps.items():
        if name not in get_plugins().infos:
            continue
        sources = get_plugins().infos[name].registered["sources"]
        fields = {f for s in sources for f in registry.get_source(s).Options.__dataclass_fields__}
        assert set(ep.load()) <= fields, name


# --- in-graph preprocessing: declared by the source, stored in the InputSpec ------------------
@pytest.mark.parametrize("window, bounds", [
    ("lung", [(-1350.0, 150.0)]),
    ("400,40", [(-160.0, 240.0)]),
    ("lung,mediastinum,bone", [(-1350.0, 150.0), (-125.0, 225.0), (-500.0, 1300.0)]),
    ("1500:-600,350:50,1800:400", [(-1350.0, 150.0), (-125.0, 225.0), (-500.0, 1300.0)]),
])
def test_dicom_declares_its_fixed_windows_as_before(tmp_path, window, bounds):
    from sslkit.registry import create_source

    source = create_source(f"dicom:{_ct_folder(tmp_path / 'ct', 1)}", window=window)
    declared = source.graph_preprocessing()
    assert declared.kind == "window" and list(zip(declared.lower, declared.upper)) == bounds
    assert declared.options == ("window",)
    c = len(bounds)
    new = InputSpec(c, 32, (0.5,) * c, (0.25,) * c, "dicom", source.describe(),
                    graph_preprocessing=declared.to_json())
    old = InputSpec.from_dict({k: v for k, v in new.to_dict().items() if k != "graph_preprocessing"})
    assert old.graph_preprocessing is None  # a run.json written before this change
    # the graph of a new run equals the graph an old run.json of the same run gives (today's numbers)
    assert raw_input_for(new, True) == raw_input_for(old, True) == (
        RawInput("window", 1, tuple(lo for lo, _ in bounds), tuple(hi for _, hi in bounds)),
        declared.client + resize_order(declared, new))
    assert ("; clip the values to the window" in resize_order(declared, new)) == (c == 1)
    assert InputSpec.from_dict(json.loads(json.dumps(new.to_dict()))) == new


def test_per_file_windows_and_pixel_sources(tmp_path, gray_folder):
    from sslkit.registry import create_source

    auto = create_source(f"dicom:{_ct_folder(tmp_path / 'ct', 1)}").graph_preprocessing()
    assert auto.kind == "unit" and "per-file" in auto.client
    assert legacy_graph_preprocessing({"window": ["auto"]}).kind == "unit"
    folder = create_source(f"folder:{gray_folder}")
    assert folder.graph_preprocessing() == GraphPreprocessing()  # pixels: uint8 by default
    spec = InputSpec(1, 32, (0.5,), (0.25,), "folder", folder.describe(),
                     graph_preprocessing=folder.graph_preprocessing().to_json())
    assert raw_input_for(spec, True)[0] == RawInput("uint8", 1)
    assert raw_input_for(spec, True, "uint16")[0] == RawInput("uint16", 1)


def test_a_source_of_any_name_gets_a_window_graph():
    """What decides the graph is the declaration, not the name: a made-up source does it too."""
    from sslkit.errors import UsageError

    declared = GraphPreprocessing("window", (0.0,), (2000.0,), client="client passes counts", options=("scale",))
    spec = InputSpec(1, 32, (0.5,), (0.25,), "npy-counts", {}, graph_preprocessing=declared.to_json())
    assert raw_input_for(spec, True) == (RawInput("window", 1, (0.0,), (2000.0,)),
                                         "client passes counts" + resize_order(declared, spec))
    with pytest.raises(UsageError, match="float32 the values its window applies to"):
        raw_input_for(spec, True, "uint8")
    with pytest.raises(ValueError):
        GraphPreprocessing("window", (1.0,), (1.0,))


def _string_constants(tree: ast.AST):
    """(node, inside a help= keyword) for every str constant that is not a docstring."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    help_ = {id(c) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "help" for c in ast.walk(k.value)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n, id(n) in help_


def test_the_core_knows_no_source_by_name():
    """No string in sslkit/ names DICOM outside help texts, no comparison of a source's name
    or scheme with a constant, no pydicom import (docstrings and comments may explain)."""
    found = []
    for path in sorted((REPO / "sslkit").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, in_help in _string_constants(tree):
            if "dicom" in node.value.lower() and not in_help:
                found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr in ("source", "scheme") for s in sides) and any(
                        isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                    found.append(f"{path.name}:{node.lineno}: compares a source name with a constant")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] == "pydicom" for m in mods):
                    found.append(f"{path.name}:{node.lineno}: imports pydicom")
    assert not found, found


@pytest.mark.slow
def test_an_old_run_json_exports_the_same_window_graph(tmp_path):
    """A DICOM run whose run.json predates ``graph_preprocessing`` (as written before this
    change) exports --with-preprocessing exactly as the same run with the new record."""
    import shutil

    import onnx

    from tests.conftest import tiny_run

    run = tiny_run(f"dicom:{_ct_folder(tmp_path / 'ct', 8)}", tmp_path / "run", 32, "--window", "lung,mediastinum,bone")
    info = json.loads((run / "run.json").read_text())
    assert info["input_spec"]["graph_preprocessing"]["kind"] == "window"
    old = tmp_path / "old"
    shutil.copytree(run, old)
    del info["input_spec"]["graph_preprocessing"]
    (old / "run.json").write_text(json.dumps(info))
    metas = []
    for src in (run, old):
        proc = run_sslkit("export", src, "--out", tmp_path / f"{src.name}.onnx", "--with-preprocessing")
        assert proc.returncode == 0, proc.stderr
        props = {p.key: p.value for p in onnx.load(str(tmp_path / f"{src.name}.onnx")).metadata_props}
        metas.append(json.loads(props["sslkit"])["input"])
    assert metas[0]["raw"] == metas[1]["raw"] and metas[0]["client_steps"] == metas[1]["client_steps"]
    assert [(w["lower"], w["upper"]) for w in metas[0]["raw"]["window"]] == [
        (-1350.0, 150.0), (-125.0, 225.0), (-500.0, 1300.0)]


def test_nifti_declares_its_window_and_the_graph_reproduces_its_pixels(tmp_path):
    """The declaration is right, not just present: the window graph applied to the source's
    raw values gives exactly what the source's load() gave the encoder."""
    nib = pytest.importorskip("nibabel")
    from sslkit.registry import create_source

    rng = np.random.default_rng(0)
    volume = rng.uniform(-1200, 1500, (12, 10, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "ct.nii")
    source = create_source(f"nifti:{tmp_path / 'ct.nii'}", window="400,40")
    declared = source.graph_preprocessing()
    assert declared == GraphPreprocessing("window", (-160.0,), (240.0,), declared.client, ("window",))
    spec = InputSpec(1, 16, (0.5,), (0.25,), "nifti", source.describe(), graph_preprocessing=declared.to_json())
    raw, _ = raw_input_for(spec, True)
    ref = source.index()[2]
    np.testing.assert_allclose(raw.to_unit(source.load_raw(ref)[None])[0], source.load(ref), atol=1e-6)
    assert create_source(f"nifti:{tmp_path / 'ct.nii'}").graph_preprocessing().kind == "unit"  # minmax: per volume


def test_the_window_flag_names_every_ct_preset_the_source_takes():
    """dicom_flags is read without importing the source, so its help lists the presets by hand: every one."""
    from sslkit_plugins.sources.dicom_window import PRESETS
    from sslkit_plugins.sources.dicom_flags import FLAGS

    listed = FLAGS["window"].split("a CT preset (")[1].split(")")[0].split(", ")
    assert listed == list(PRESETS)


def test_one_plugins_choices_do_not_narrow_anothers_flag_of_the_same_name(tmp_path, cli, installed, monkeypatch):
    """A second plugin declaring ``max_value`` with choices made the first plugin's free-text
    ``--max-value 100`` an error ("'100' is not one of '255', '4095'") once both were installed."""
    root = tmp_path / "site"
    for name, flags in (("free", '{"max_value": "Divide by this."}'),
                        ("narrow", '{"max_value": {"help": "Bit depth.", "choices": ["255", "4095"]}}')):
        dist = root / f"{name}_flags-0.1.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-flags\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[sslkit.source_flags]\n{name} = {name}_flags:FLAGS\n")
        (root / f"{name}_flags.py").write_text(f"FLAGS = {flags}\n")
    installed({"PYTHONPATH": str(root)})
    r = cli("pretrain", "--print-config", "--task", "simclr", "--max-value", "100")
    assert r.exit_code == 0, r.output
    assert 'max_value = "100"' in r.output and "[free] Divide by this." in r.output and "[narrow] Bit depth." in r.output
