"""What a plugin author (or a user of one) sees when a plugin is off the documented path: a plugin
exporter's own report, a backbone without ``num_features``, a task without ``views``/``forward`` or
whose loss ignores the encoder, a source name two plugins register with a bare ``--data PATH``, a
typo in SSLKIT_LOAD_PLUGINS / SSLKIT_DISABLE_PLUGINS, a ``new-plugin`` name that shadows sslkit's
own package, and the worked source example's labels and groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sslkit import plugins, registry
from sslkit.api import MultiView, Task, recipe
from sslkit.errors import UsageError
from tests.conftest import install_plugin, make_images, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-step run on 3-channel class folders (a, b)."""
    root = tmp_path_factory.mktemp("user-errors")
    return tiny_run(str(make_images(root / "images", n_per_class=6, size=32)), root / "run")


def _installed(monkeypatch, tmp_path, module: str, entry: str, source: str) -> None:
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "site", module, entry, source)))
    plugins.reset()


# --- 1. a plugin exporter's report ----------------------------------------------------------------
TORCHSAVE = """
    import torch
    from pathlib import Path
    from sslkit.api import UsageError, hookimpl, write_atomic

    def export_pt(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        if options:
            raise UsageError("torchsave: no options")
        state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        write_atomic(Path(out), lambda tmp: torch.save(state, tmp))
        return {"tensors": len(state), "max_abs_diff": 0.0}

    @hookimpl
    def register_exporters(register):
        register("torchsave", export_pt)
"""


def test_export_prints_a_plugin_exporters_own_report(run, cli, tmp_path, monkeypatch):
    """Was a KeyError 'tolerance' after the file was written: the CLI assumed the ONNX exporter's keys."""
    _installed(monkeypatch, tmp_path, "sslkit_torchsave", "torchsave", TORCHSAVE)
    out = tmp_path / "enc.pt"
    result = cli("export", run, "--format", "torchsave", "--out", out)
    assert result.exit_code == 0, result.output
    tensors = len(torch.load(out, weights_only=True))
    assert result.stdout.splitlines() == ["check: max abs diff 0.00e+00", f"report: tensors={tensors}",
                                          f"exported torchsave to {out}"]


def test_export_report_lines_of_the_builtin_reports_and_of_odd_values():
    from sslkit.export import report_lines as _report_lines

    onnx = {"format": "onnx", "out": "e.onnx", "tolerance": 1e-4, "max_abs_diff": 1.5e-4, "limit": 3.2e-4,
            "min_cosine": 1.0, "real_inputs": "4 real samples", "opset": 18, "checks": [], "dynamic_hw": True,
            "input_kind": "x", "client_note": "client resizes",
            "fp16": {"tolerance": "max abs diff <= 0.01", "max_abs_diff": 1.57e-4, "min_cosine": 0.9999996,
                     "checks": []}}
    assert _report_lines(onnx) == [  # the limit applied to the difference shown, not the bare 1e-4 it is below
        "float32: max abs diff 1.50e-04 (limit 3.20e-04 = 0.0001 x max |embedding| 3.2), min cosine 1.000000; "
        "real inputs: 4 real samples",
        "float16: max abs diff 1.57e-04, min cosine 1.000000 (tolerance: max abs diff <= 0.01)",
        "client: client resizes", "exported onnx to e.onnx"]
    small = {**onnx, "max_abs_diff": 5.96e-08, "limit": 1e-4}  # embeddings within [-1, 1]: the absolute floor
    assert _report_lines(small)[0] == ("float32: max abs diff 5.96e-08 (limit 1.00e-04 = 0.0001, max |embedding| "
                                       "<= 1), min cosine 1.000000; real inputs: 4 real samples")
    older = {k: v for k, v in small.items() if k != "limit"}  # a report without the limit: the tolerance as it was
    assert _report_lines(older)[0].startswith("float32: max abs diff 5.96e-08 (tolerance 0.0001), min cosine")
    assert _report_lines({"format": "x", "out": "o", "tolerance": 1e-4, "max_abs_diff": 5.96e-08, "limit": "high"}) == [
        "float32: max abs diff 5.96e-08 (tolerance 0.0001)", "report: limit='high'", "exported x to o"]
    assert _report_lines({"format": "safetensors", "out": "w", "verified_by": "timm reload", "max_abs_diff": 0.0,
                          "data_config": {}}) == [
        "verified: timm reload gives the encoder's features (max abs diff 0.00e+00)", "exported safetensors to w"]
    # a plugin's report: values of any JSON type, known keys with unexpected values, no known key at all
    assert _report_lines({"format": "x", "out": "o", "verified_by": "reload", "fp16": True, "n": [1, 2]}) == [
        "verified: reload gives the encoder's features", "report: n=[1, 2]", "exported x to o"]
    assert _report_lines({"format": "x", "out": "o", "min_cosine": "high", "max_abs_diff": None}) == [
        "check: max abs diff None, min cosine 'high'", "exported x to o"]


def test_export_prints_the_limit_its_parity_check_applied(tmp_path):
    """Large embeddings pass with a difference above 1e-4: the line names the limit that was applied."""
    from plugins.exporters.onnx import GraphModule, example_input, export_onnx
    from sslkit.api import InputSpec, raw_input_for
    from sslkit.export import report_lines

    spec = InputSpec(channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8)).eval()
    with torch.no_grad():
        encoder[3].weight.mul_(1e6)
    report = export_onnx(encoder, spec, {"backbone": "tiny", "embedding_dim": 8}, tmp_path / "big.onnx")
    # the limit of each check, recomputed: the checks' random inputs again, in order, through the same graph
    raw, _ = raw_input_for(spec, False, None)
    module, gen = GraphModule(encoder, raw, spec).eval(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        peaks = [float(module(example_input(raw, c["batch"], tuple(c["size"]), gen)).abs().max())
                 for c in report["checks"]]
    assert [c["limit"] for c in report["checks"]] == pytest.approx([1e-4 * max(1.0, p) for p in peaks], rel=1e-6)
    worst = max(range(len(peaks)), key=lambda i: report["checks"][i]["max_abs_diff"])
    diff, limit = report["max_abs_diff"], report["limit"]
    assert 1e-4 < diff <= limit == report["checks"][worst]["limit"]
    assert report_lines({"format": "onnx", "out": "o", **report})[0].startswith(
        f"float32: max abs diff {diff:.2e} (limit {limit:.2e} = 0.0001 x max |embedding| {peaks[worst]:.3g}), ")


# --- 2. a backbone without num_features -----------------------------------------------------------
NONF = """
    from torch import nn
    from sslkit.api import UsageError, hookimpl

    class NoNF(nn.Module):
        def __init__(self, in_chans):
            super().__init__()
            self.in_chans = in_chans
            self.net = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.net(x)

    def make(model, in_chans=3, image_size=224, **options):
        if model != "x":
            raise UsageError(f"nonf: unknown model {model!r}")
        return NoNF(in_chans)

    @hookimpl
    def register_backbones(register):
        register("nonf", make)
"""


def test_a_backbone_without_num_features_is_one_line_naming_its_plugin(cli, tmp_path, monkeypatch, gray_folder):
    _installed(monkeypatch, tmp_path, "sslkit_nonf", "nonfplugin", NONF)
    out = tmp_path / "run"
    result = cli("pretrain", "--task", "rotation", "--backbone", "nonf:x", "--data", f"folder:{gray_folder}",
                 "--max-steps", 1, "--image-size", 32, "--batch-size", 4, "--out", out, "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: backbone 'nonf:x' (plugin 'nonfplugin') has no num_features: a backbone factory returns an "
        "nn.Module with in_chans and num_features, the embedding size D (a positive int)"]
    assert not out.exists()


# --- 3. a task without views() / forward() --------------------------------------------------------
NOVIEWS = """
    from sslkit.api import Task, hookimpl

    class NoViews(Task):
        '''Forgot views and forward.'''

    @hookimpl
    def register_tasks(register):
        register("noviews", NoViews)
"""


def test_a_task_without_views_is_one_line_in_the_cli(cli, tmp_path, monkeypatch, gray_folder):
    _installed(monkeypatch, tmp_path, "sslkit_noviews", "noviewsplugin", NOVIEWS)
    result = cli("pretrain", "--task", "noviews", "--data", f"folder:{gray_folder}", "--max-steps", 1,
                 "--image-size", 32, "--batch-size", 4, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: task 'noviews' (plugin 'noviewsplugin') does not implement views(spec) and forward(views); "
        "the plugin's Task subclass must define both"]


class NoViews(Task):
    def forward(self, views):
        return {"loss": self.encoder(views[0]).mean()}


def test_check_task_says_which_method_a_task_lacks(tmp_path):
    from sslkit.testing import check_task

    with pytest.raises(AssertionError, match=r"^NoViews does not implement views\(spec\): a Task subclass returns"):
        check_task(NoViews, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


# --- 4. a loss that ignores the encoder -----------------------------------------------------------
class NoEnc(Task):
    """Its loss never reaches the encoder: a run would train (and export) nothing."""

    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.w = nn.Parameter(torch.ones(4))

    def views(self, spec):
        return MultiView([recipe("crop", spec.image_size, scale=(0.3, 1.0))], spec.mean, spec.std)

    def forward(self, views):
        return {"loss": (self.w ** 2).sum() * 0.1}


class Detached(NoEnc):
    """The encoder runs, but its output is detached from the loss."""

    def forward(self, views):
        return {"loss": (self.encoder(views[0]).detach().mean() - self.w).square().sum()}


class UsesEncoder(NoEnc):
    def forward(self, views):
        return {"loss": (self.encoder(views[0]).mean() - self.w).square().sum()}


@pytest.mark.parametrize("cls", [NoEnc, Detached])
def test_check_task_refuses_a_loss_that_ignores_the_encoder(cls, tmp_path):
    from sslkit.testing import check_task

    name = f"kit-{cls.__name__.lower()}"
    with pytest.raises(AssertionError, match=rf"^task '{name}': no parameter of self.encoder is in the loss's "
                                             rf"autograd graph; the loss must depend on the encoder"):
        check_task(cls, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


class ZeroHead(NoEnc):
    """A zero-initialised head on the encoder (a common choice): the encoder's first gradient is exactly
    zero, yet the loss depends on it and the head's first step makes it train."""

    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.head = nn.Linear(backbone.num_features, 1)
        nn.init.zeros_(self.head.weight)

    def forward(self, views):
        return {"loss": (self.head(self.encoder(views[0])) - 1).square().mean()}


def test_check_task_passes_a_zero_initialised_head_on_the_encoder(tmp_path):
    from sslkit.testing import check_task
    from sslkit.testing.tasks import _check_views, kit_backbone

    backbone, options = kit_backbone(ZeroHead)
    task, views, _ = _check_views(ZeroHead, backbone, options, {}, 32)
    torch.manual_seed(0)
    task(views(torch.rand(4, 1, 32, 32)))["loss"].backward()
    grads = [p.grad for p in task.encoder.parameters() if p.grad is not None]
    assert grads and all(bool(g.eq(0).all()) for g in grads)  # a non-zero-gradient test would refuse it
    report = check_task(ZeroHead, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)
    assert report["task"] == "kit-zerohead" and len(report["losses"][1]) == 1


def test_check_task_passes_a_loss_through_the_encoder(tmp_path):
    from sslkit.testing import check_task

    report = check_task(UsesEncoder, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)
    assert report["task"] == "kit-usesencoder" and len(report["losses"][1]) == 1


DETACHED = """
    import torch
    from torch import nn
    from sslkit.api import MultiView, Task, hookimpl, recipe

    class Detached(Task):
        '''Runs the encoder but detaches its output: the loss trains only ``w``.'''

        def __init__(self, backbone, options, spec):
            super().__init__(backbone, options, spec)
            self.w = nn.Parameter(torch.ones(1))

        def views(self, spec):
            return MultiView([recipe("crop", spec.image_size, scale=(0.3, 1.0))], spec.mean, spec.std)

        def forward(self, views):
            return {"loss": (self.encoder(views[0]).detach().mean() - self.w).square().sum()}

    @hookimpl
    def register_tasks(register):
        register("detached", Detached)
"""


def test_pretrain_refuses_a_loss_that_ignores_the_encoder(cli, tmp_path, monkeypatch, gray_folder):
    """Trained (and exported an unchanged encoder) with exit 0 before: the check was in the kit only."""
    _installed(monkeypatch, tmp_path, "sslkit_detached", "detachedplugin", DETACHED)
    out = tmp_path / "run"
    result = cli("pretrain", "--task", "detached", "--data", f"folder:{gray_folder}", "--max-steps", 2,
                 "--image-size", 32, "--batch-size", 4, "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: task 'detached' (plugin 'detachedplugin'): its loss gives no parameter of the encoder a gradient, "
        "so pretraining would not change it; the loss must depend on self.encoder's output"]
    assert not (out / "encoder.safetensors").exists()


# --- 5. a source name two plugins register, and a bare --data PATH ------------------------------------
IMPOSTOR = """
    from sslkit.api import Source, hookimpl

    class Folder2(Source):
        '''An impostor folder (its sniff claims nothing).'''
        scheme = "folder"

    @hookimpl
    def register_sources(register):
        register("folder", Folder2)
"""


def test_a_bare_path_that_a_conflicting_source_claims_gives_the_conflict(tmp_path, monkeypatch, gray_folder, cli):
    _installed(monkeypatch, tmp_path, "sslkit_aaa_dup", "aaa_dup", IMPOSTOR)  # sorted first: its entry is kept
    assert plugins.get_plugins().entries["sources"]["folder"].plugin == "aaa_dup"
    with pytest.raises(UsageError) as info:
        registry.resolve_data(str(gray_folder))
    assert str(info.value) == ("source 'folder' is registered by 2 plugins, 'aaa_dup' and 'folder'; uninstall one "
                               "or set SSLKIT_DISABLE_PLUGINS=aaa_dup")
    result = cli("data", "inspect", gray_folder)
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"error: {info.value}"]


# --- 6. a typo in SSLKIT_LOAD_PLUGINS / SSLKIT_DISABLE_PLUGINS -------------------------------------------
def test_a_typo_in_load_plugins_is_the_error_of_a_lookup(monkeypatch, cli, capsys):
    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "simclr,fodler,timm")
    plugins.reset()
    assert registry.list_tasks() == ["simclr"] and capsys.readouterr().err == ""
    with pytest.raises(UsageError) as info:
        registry.get_task("simclr")
    message = str(info.value)
    assert message.startswith("unknown plugin 'fodler' (did you mean 'folder'?); choose from: ")
    assert message.endswith(" (in SSLKIT_LOAD_PLUGINS)") and "\n" not in message
    result = cli("export", "no-such-run", "--out", "x.onnx")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"error: {message}"]
    listed = cli("plugins", "--json")
    assert listed.exit_code == 0 and sorted(p["name"] for p in json.loads(listed.stdout)) == ["simclr", "timm"]
    assert listed.stderr.strip().splitlines() == [f"sslkit: {message}"]  # was silent: the list just lacked it


def test_a_typo_in_disable_plugins_is_one_warning_line(monkeypatch, capsys):
    monkeypatch.setenv("SSLKIT_DISABLE_PLUGINS", "mae,dicm")
    plugins.reset()
    assert "dicom" in registry.list_sources() and "mae" not in registry.list_tasks()
    registry.get_task("simclr")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslkit: unknown plugin 'dicm' (did you mean 'dicom'?); choose from: ")
    assert err[0].endswith(" (in SSLKIT_DISABLE_PLUGINS); ignored")


# --- 7. new-plugin names whose module is already importable ------------------------------------------
@pytest.mark.parametrize("kind", ["callback", "source"])
def test_new_plugin_refuses_a_name_that_shadows_sslkits_own_package(kind, cli, tmp_path):
    out = tmp_path / "pkg"
    result = cli("new-plugin", "plugins", "--kind", kind, "--out", out)
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        "error: plugin name 'plugins': its module 'sslkit_plugins' is already importable (sslkit's own built-in "
        "plugins); the new package would shadow it or be shadowed by it; choose another name"]


def test_new_plugin_refuses_the_module_of_an_installed_package(cli, tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", "sslkit_taken", "unrelated", "")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = cli("new-plugin", "taken", "--kind", "exporter", "--out", tmp_path / "pkg")
    assert result.exit_code == 2 and "its module 'sslkit_taken' is already importable (an installed module)" \
        in result.stderr and not (tmp_path / "pkg").exists()
    assert cli("new-plugin", "free_name", "--kind", "exporter", "--out", tmp_path / "ok").exit_code == 0


# --- 8. the worked source example: labels and groups ----------------------------------------------
def _arrays(root, rng) -> None:
    """``<class>/<patient>/k.npy`` (3-channel, class a smooth, b striped) and one file per class level."""
    xx = np.mgrid[0:32, 0:32][1] / 32
    for ci, cls in enumerate("ab"):
        for patient in ("p1", "p2", "p3"):
            (root / cls / patient).mkdir(parents=True)
            for k in range(2):
                img = (np.sin((xx * (2 + 6 * ci) + rng.random()) * np.pi * 2) + 1) / 2
                np.save(root / cls / patient / f"{k}.npy", np.stack([img, img.T, 1 - img]).astype(np.float32))
        np.save(root / cls / "loose.npy", rng.random((3, 32, 32)).astype(np.float32))


def test_worked_source_example_labels_by_class_and_groups_by_patient(tmp_path, monkeypatch, run, cli):
    from tests.test_api_docs import example

    code, _ = example("sslkit_npyfolder.py")
    _installed(monkeypatch, tmp_path, "sslkit_npyfolder_doc", "npyfolderdoc", code)
    train, test = tmp_path / "train", tmp_path / "test"
    _arrays(train, np.random.default_rng(0))
    _arrays(test, np.random.default_rng(1))
    refs = registry.create_source(f"npyfolder:{train}").index()
    got = sorted((str(r.path)[len(str(train)) + 1:], r.label, r.group) for r in refs)
    assert got[:3] == [("a/loose.npy", "a", ""), ("a/p1/0.npy", "a", "a/p1"), ("a/p1/1.npy", "a", "a/p1")]
    assert {r.label for r in refs} == {"a", "b"} and len({r.group for r in refs if r.group}) == 6
    result = cli("eval", "knn", run, "--train", f"npyfolder:{train}", "--test", f"npyfolder:{test}", "--k", 3,
                 "--no-baseline", "--json", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == ["a", "b"] and report["results"]["pretrained"]["k=3"]["n"] == 14
