"""What a user sees when a third-party plugin's own code fails at run time: one line naming the plugin
(and what of it was running), exit 1, the traceback with SSLKIT_TRACEBACK=1; an exporter that writes
nothing or returns no report; a NaN loss on the first batch; a task's default backbone that does not
exist; a source's describe() that JSON cannot hold; a name whose plugin SSLKIT_LOAD_PLUGINS leaves out."""

from __future__ import annotations

import pytest

from sslkit import plugins
from tests.conftest import install_plugin, make_images, tiny_run


BUGS = """
    import numpy as np
    import torch
    from torch import nn
    from PIL import Image
    from sslkit.api import MultiView, SampleRef, Source, Task, check_dir, ema_update, hookimpl, recipe, walk_files

    class Tiny(nn.Module):
        def __init__(self, in_chans):
            super().__init__()
            self.in_chans, self.num_features = in_chans, 8
            self.conv = nn.Conv2d(in_chans, 8, 3, 2, 1)
        def forward(self, x):
            return self.conv(x).mean((2, 3))

    def tiny(model, in_chans=3, image_size=224, **options):
        return Tiny(in_chans)

    def nosize(model, in_chans=3):  # no image_size keyword: sslkit's call fails before it runs
        return Tiny(in_chans)

    class Base(Task):
        Options = None
        default_backbone = "tinys40:x"
        def __init__(self, backbone, options, spec):
            super().__init__(backbone, options, spec)
            self.head = nn.Linear(backbone.num_features, 4)
        def views(self, spec):
            return MultiView([recipe("crop", spec.image_size, scale=(0.5, 1.0))], spec.mean, spec.std)
        def forward(self, views):
            (x,) = views
            return {"loss": self.head(self.encoder(x)).pow(2).mean()}

    class FwdBug(Base):
        def forward(self, views):
            raise RuntimeError("forward bug")

    class ApiBug(Base):
        def forward(self, views):  # sslkit's own helper raises below the plugin's frame
            ema_update(nn.Linear(1, 1), nn.Linear(2, 2), 0.5)

    class NanLoss(Base):
        def forward(self, views):
            out = super().forward(views)
            return {"loss": out["loss"] * float("nan")}

    class BadDefault(Base):
        default_backbone = "timm:resnet_does_not_exist"

    class Images(Source):
        scheme = "imgs40"
        Options = None
        @classmethod
        def sniff(cls, path):
            return 0.0
        def index(self):
            return [SampleRef(str(p)) for p in walk_files(check_dir(self.location, self.scheme),
                                                          lambda p: p.suffix == ".png")]
        def load(self, ref):
            return np.asarray(Image.open(ref.path).convert("L"), np.float32)[None] / 255

    class IndexBug(Images):
        scheme = "idxbug40"
        def index(self):
            raise TypeError("index bug")

    class DescribeBug(Images):
        scheme = "descbug40"
        def describe(self):
            return {"x": object()}

    def half_written(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        with open(out, "wb") as f:  # not atomic
            f.write(b"half")
            raise OSError("disk full")

    def writes_nothing(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        return {"ok": True}

    def reports_none(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        with open(out, "wb") as f:
            f.write(b"x")

    @hookimpl
    def register_tasks(register):
        register("fwdbug40", FwdBug)
        register("nanloss40", NanLoss)
        register("apibug40", ApiBug)
        register("baddefault40", BadDefault)

    @hookimpl
    def register_backbones(register):
        register("tinys40", tiny)
        register("nosize40", nosize)

    @hookimpl
    def register_sources(register):
        register("imgs40", Images)
        register("idxbug40", IndexBug)
        register("descbug40", DescribeBug)

    @hookimpl
    def register_exporters(register):
        register("half40", half_written)
        register("nothing40", writes_nothing)
        register("none40", reports_none)
"""


@pytest.fixture
def bugs(tmp_path, monkeypatch):
    """The plugin ``bugs40`` (distribution ``sslkit-bugs40``) installed, as discovery sees it."""
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "site", "sslkit_bugs40", "bugs40", BUGS)))
    monkeypatch.delenv("SSLKIT_TRACEBACK", raising=False)
    plugins.reset()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-errors")
    return tiny_run(str(make_images(root / "images", n_per_class=4, size=32)), root / "run")


def _pretrain(cli, tmp_path, data: str, *extra: str):
    return cli("pretrain", "--data", data, "--out", tmp_path / "out", "--image-size", 32, "--batch-size", 4,
               "--max-steps", 1, "--epochs", 1, "--no-cache", "--quiet", *extra)


def _one_line(result, code: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1, result.stderr
    return lines[0]


# --- 1. an exception in a third-party plugin's own code ------------------------------------------
def test_a_task_whose_forward_raises_is_one_line_naming_the_plugin(bugs, cli, gray_folder, tmp_path, monkeypatch):
    result = _pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "fwdbug40")
    line = _one_line(result, 1)
    assert line.startswith("error: plugin 'bugs40' (sslkit-bugs40 0.1) failed in task 'fwdbug40': "
                           "RuntimeError: forward bug (in FwdBug.forward, sslkit_bugs40.py line ")
    assert line.endswith("; report it to the plugin's authors (SSLKIT_TRACEBACK=1 prints the traceback)")
    assert not (tmp_path / "out" / "encoder.safetensors").exists()
    monkeypatch.setenv("SSLKIT_TRACEBACK", "1")  # the traceback on request: the exception as it was raised
    with pytest.raises(RuntimeError, match="forward bug"):
        _pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "fwdbug40", "--overwrite")


def test_a_source_whose_index_raises_is_one_line_naming_the_plugin(bugs, cli, gray_folder, tmp_path):
    line = _one_line(_pretrain(cli, tmp_path, f"idxbug40:{gray_folder}", "--task", "simclr",
                               "--backbone", "tinys40:x"), 1)
    assert line.startswith("error: plugin 'bugs40' (sslkit-bugs40 0.1) failed in source 'idxbug40': "
                           "TypeError: index bug (in IndexBug.index, sslkit_bugs40.py line ")


def test_a_backbone_factory_of_the_wrong_signature_is_one_line_naming_the_plugin(bugs, cli, gray_folder, tmp_path):
    line = _one_line(_pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "simclr",
                               "--backbone", "nosize40:x"), 1)
    assert line.startswith("error: plugin 'bugs40' (sslkit-bugs40 0.1) failed in backbone prefix 'nosize40': "
                           "TypeError: nosize() got an unexpected keyword argument 'image_size' (sslkit called it "
                           "with the documented arguments); ")


def test_an_error_of_sslkits_own_code_keeps_its_traceback(bugs, cli, gray_folder, tmp_path, monkeypatch):
    """Not a plugin's: our bug, the traceback as before (the test runner re-raises it)."""
    from sslkit.engine import loop

    def broken(s, batches):
        raise ZeroDivisionError("engine bug")

    monkeypatch.setattr(loop, "accumulate", broken)
    with pytest.raises(ZeroDivisionError, match="engine bug"):
        _pretrain(cli, tmp_path, f"imgs40:{gray_folder}", "--task", "simclr", "--backbone", "tinys40:x")


def test_an_error_raised_in_sslkits_code_below_a_plugins_call_keeps_its_traceback(bugs, cli, gray_folder, tmp_path):
    """The plugin called an sslkit.api helper, which raised: not blamed on the plugin (it may be our bug)."""
    with pytest.raises(RuntimeError):
        _pretrain(cli, tmp_path, f"imgs40:{gray_folder}", "--task", "apibug40", "--backbone", "tinys40:x")


def test_an_exporter_that_raises_leaves_no_half_written_file_but_keeps_the_users(bugs, cli, run, tmp_path):
    out = tmp_path / "enc.half40"
    line = _one_line(cli("export", run, "--format", "half40", "--out", out, "--check-data", "none"), 1)
    assert line.startswith("error: plugin 'bugs40' (sslkit-bugs40 0.1) failed in export format 'half40': "
                           "OSError: disk full (in half_written, sslkit_bugs40.py line ")
    assert not out.exists()
    out.write_bytes(b"the user's")  # replaced by --overwrite (the exporter wrote it), never removed
    assert _one_line(cli("export", run, "--format", "half40", "--out", out, "--check-data", "none",
                         "--overwrite"), 1) == line
    assert out.read_bytes() == b"half"


# --- 2. an exporter's return ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,problem", [
    ("nothing40", "wrote no file to --out 'enc.x'"),
    ("none40", "returned NoneType, not a dict report"),
])
def test_an_exporter_that_writes_nothing_or_reports_nothing_fails_in_one_line(fmt, problem, bugs, cli, run, tmp_path):
    out = tmp_path / "enc.x"
    line = _one_line(cli("export", run, "--format", fmt, "--out", out, "--check-data", "none"), 1)
    assert line == (f"error: export format {fmt!r} (plugin 'bugs40') {problem}; an exporter writes --out and "
                    f"returns a dict (its report); nothing was exported")
    assert not out.exists()


# --- 3. a NaN loss on the first batch -------------------------------------------------------------
def test_a_nan_loss_at_step_1_blames_the_task_or_the_data_not_the_lr(bugs, cli, gray_folder, tmp_path):
    line = _one_line(_pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "nanloss40"), 2)
    assert line == ("error: loss became nan at step 1, on the first batch, before any optimizer update (the LR "
                    "cannot be the cause); training stopped. Suspect the loss of task 'nanloss40' (plugin "
                    "'bugs40'), or the data (non-finite or extreme pixel values: sslkit data inspect)")


# --- 4. a task's default backbone -----------------------------------------------------------------
def test_a_tasks_default_backbone_that_does_not_exist_says_it_is_the_tasks(bugs, cli, gray_folder, tmp_path):
    line = _one_line(_pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "baddefault40"), 2)
    assert line.startswith("error: task 'baddefault40' (plugin 'bugs40') has the default backbone "
                           "'timm:resnet_does_not_exist', which cannot be built: unknown timm model "
                           "'resnet_does_not_exist'")
    assert line.endswith("; give --backbone prefix:model")
    given = _one_line(_pretrain(cli, tmp_path, f"folder:{gray_folder}", "--task", "simclr",
                                "--backbone", "timm:resnet_does_not_exist"), 2)
    assert given.startswith("error: unknown timm model 'resnet_does_not_exist'")  # the user's own: as it was


# --- 5. a source's describe() ---------------------------------------------------------------------
def test_a_describe_that_json_cannot_hold_is_refused_naming_the_plugin(bugs, cli, gray_folder, tmp_path):
    line = _one_line(_pretrain(cli, tmp_path, f"descbug40:{gray_folder}", "--task", "simclr",
                               "--backbone", "tinys40:x"), 1)
    assert line == ("error: source 'descbug40' (plugin 'bugs40'): describe() returned a value JSON cannot hold "
                    "(Object of type object is not JSON serializable); it must return a dict of JSON values (str, "
                    "int, float, bool, None, list, dict), stored in run.json and the cache key")
    assert not (tmp_path / "out" / "run.json").exists()
    cache = tmp_path / "cache"  # with the cache on: the same line, from the cache key, before any decoding
    cached = cli("pretrain", "--data", f"descbug40:{gray_folder}", "--out", tmp_path / "out2", "--image-size", 32,
                 "--batch-size", 4, "--max-steps", 1, "--epochs", 1, "--cache", cache, "--quiet", "--task", "simclr",
                 "--backbone", "tinys40:x")
    assert _one_line(cached, 1) == line
    entries = [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".sslkit-cache")]
    assert entries == []  # nothing decoded (only the cache folder's own marker and lock)


# --- 6. SSLKIT_LOAD_PLUGINS leaving out what is asked for -----------------------------------------
def test_a_name_whose_plugin_is_not_loaded_says_so(cli, run, gray_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "simclr,timm")
    plugins.reset()
    line = _one_line(cli("export", run, "--out", tmp_path / "e.onnx"), 2)
    assert line == ("error: export format 'onnx' comes from the plugin 'onnx', which is installed but not loaded "
                    "(SSLKIT_LOAD_PLUGINS); add it there, or unset SSLKIT_LOAD_PLUGINS")
    bare = _one_line(_pretrain(cli, tmp_path, str(gray_folder), "--task", "simclr",
                               "--backbone", "timm:resnet10t"), 2)
    assert bare.startswith(f"error: cannot tell what kind of data {str(gray_folder)!r} holds; no data source is "
                           f"loaded; installed, not loaded (SSLKIT_LOAD_PLUGINS): autoencoder, ")
    assert not bare.rstrip().endswith(":")
