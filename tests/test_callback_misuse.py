"""The callback contract, enforced: a misspelled event method is refused when ``--callbacks``
builds the callback (and by the kit); a callback that changes sslkit's own run files is
reported, disabled and, where sslkit kept a copy, undone (and failed by the kit); a callback's
``sys.exit()`` is a raising callback while Ctrl-C and sslkit's stop signals still go through;
the default ``csv`` left out by SSLKIT_LOAD_PLUGINS is said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sslkit import plugins
from tests.conftest import install_plugin


PLUGIN = '''
import json
import os
import sys

from sslkit.api import Callback, hookimpl


def note(*event):
    with open(os.environ["SSLKIT_TEST_EVENTS"], "a") as f:
        f.write(json.dumps(event) + "\\n")


class Typo(Callback):
    def on_step_ended(self, step, metrics):
        note("typo", step)


class Clobber(Callback):
    """Overwrites sslkit's metrics.csv and config.toml at a checkpoint (noting what config.toml held)."""

    def on_run_start(self, run):
        self.out = run.out

    def on_checkpoint(self, path):
        note("clobber", path.name, (self.out / "config.toml").read_text())
        (self.out / "metrics.csv").write_text("step,loss\\n")
        (self.out / "config.toml").write_text("")


class Exits(Callback):
    def on_step_end(self, step, metrics):
        note("exits", step)
        if step == 2:
            sys.exit(3)


@hookimpl
def register_callbacks(register):
    register("typo", Typo)
    register("clobber", Clobber)
    register("exits", Exits)
'''


@pytest.fixture
def noted(tmp_path, monkeypatch) -> Path:
    """The test callbacks installed as plugin ``cbfaults``; the file their notes go to."""
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "plugins", "sslkit_cbfaults", "cbfaults", PLUGIN)))
    monkeypatch.setenv("SSLKIT_TEST_EVENTS", str(tmp_path / "notes.jsonl"))
    plugins.reset()
    return tmp_path / "notes.jsonl"


def notes(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pretrain_args(tmp_path: Path, out: str, *extra: object) -> list:
    from sslkit.testing.data import image_folder

    data = image_folder(tmp_path / "img", 12, 32, 1)
    return ["pretrain", "--data", f"folder:{data}", "--out", tmp_path / out, "--task", "simclr",
            "--backbone", "timm:resnet10t", "--image-size", 32, "--batch-size", 4, "--channels", 1, "--seed", 0,
            "--no-cache", "--quiet", "--device", "cpu", *extra]


def lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line]


def test_a_misspelled_event_method_is_refused_when_the_callback_is_built(tmp_path, noted, cli):
    bad = cli(*pretrain_args(tmp_path, "run", "--max-steps", 2, "--callbacks", "csv,typo"))
    assert bad.exit_code == 2 and len(lines(bad.stderr)) == 1, bad.stderr
    assert "callback 'typo' (plugin 'cbfaults')" in bad.stderr
    assert "unknown event 'on_step_ended' (did you mean 'on_step_end'?)" in bad.stderr
    assert not (tmp_path / "run").exists() and notes(noted) == []  # refused before anything ran


def test_the_kit_fails_a_misspelled_event_method(tmp_path, noted):
    from sslkit.testing import check_callback

    with pytest.raises(AssertionError, match=r"unknown event 'on_step_ended' \(did you mean 'on_step_end'\?\)"):
        check_callback("typo", tmp_path=tmp_path)


def test_a_callback_writing_sslkits_own_files_is_reported_disabled_and_undone(tmp_path, noted, cli):
    result = cli(*pretrain_args(tmp_path, "run", "--max-steps", 3, "--checkpoint-every", 1,
                                "--callbacks", "csv,clobber"))
    assert result.exit_code == 0, result.stderr
    said = [line for line in lines(result.stderr) if "clobber" in line]
    assert len(said) == 1, result.stderr
    assert said[0].startswith("sslkit: callback 'clobber' (plugin 'cbfaults') changed sslkit's own config.toml, "
                              "metrics.csv in on_checkpoint") and "disabled" in said[0], said
    assert "put back: config.toml" in said[0] and "not put back (sslkit keeps no copy): metrics.csv" in said[0]
    got = notes(noted)
    assert [n[:2] for n in got] == [["clobber", "step-00000001"]]  # 3 checkpoints: not called again
    assert got[0][2] and (tmp_path / "run" / "config.toml").read_text() == got[0][2]  # as sslkit wrote it
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["config_toml_sha256"]


def test_the_kit_fails_a_callback_writing_sslkits_own_files(tmp_path, noted):
    from sslkit.testing import check_callback

    with pytest.raises(AssertionError, match="callback 'clobber' changed sslkit's own config.toml, metrics.csv "
                                             "in on_checkpoint during a new run"):
        check_callback("clobber", tmp_path=tmp_path)


def test_sys_exit_in_a_callback_is_a_raising_callback(tmp_path, noted, cli):
    result = cli(*pretrain_args(tmp_path, "run", "--max-steps", 3, "--callbacks", "csv,exits"))
    assert result.exit_code == 0, result.stderr  # was: exit 3, not one line
    said = [line for line in lines(result.stderr) if "exits" in line]
    assert said == ["sslkit: callback 'exits' (plugin 'cbfaults') raised SystemExit in on_step_end: 3; "
                    "disabled for the rest of this run"], result.stderr
    assert notes(noted) == [["exits", 1], ["exits", 2]]
    assert len(lines((tmp_path / "run" / "metrics.csv").read_text())) == 4  # header and every step
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "Preempted", "Terminated"])
def test_ctrl_c_and_sslkits_stop_signals_still_go_through_a_callback(raised, capsys):
    from sslkit import preempt
    from sslkit.engine.events import Events

    cls = getattr(preempt, raised, KeyboardInterrupt)

    class Raises:
        def on_step_end(self, step, metrics):
            raise cls("stop")

    events = Events([("'r' (plugin 'p')", Raises())])
    with pytest.raises(cls):
        events.emit("on_step_end", 1, {})
    assert len(events.active) == 1 and capsys.readouterr().err == ""


def test_own_files_are_watched_around_each_call_and_put_back(tmp_path, capsys):
    """Unit: the csv callback may append to metrics.csv; another callback that rewrites run.json
    (same size) in a watched on_step_end (every STEP_WATCH_EVERY-th) is reported once, disabled, and
    run.json is put back byte for byte."""
    from sslkit.engine.events import Events, RunInfo

    (tmp_path / "run.json").write_text('{"status": "running"}')
    (tmp_path / "config.toml").write_text("task = 'simclr'\n")
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"weights")
    calls = []

    class Csv:
        def on_step_end(self, step, metrics):
            with open(tmp_path / "metrics.csv", "a") as f:
                f.write(f"{step}\n")

    class Rewrites:
        def on_step_end(self, step, metrics):
            calls.append(step)
            if step == 50:
                (tmp_path / "run.json").write_text('{"status": "finished"}')
                (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"WEIGHTS")

    events = Events([("'csv' (plugin 'csv')", Csv(), True), ("'w' (plugin 'p')", Rewrites())])
    events.emit("on_run_start", RunInfo(tmp_path, {}, 0, 3, 0, 1))
    for step in (49, 50, 51):
        events.emit("on_step_end", step, {})
    err = capsys.readouterr().err.splitlines()
    assert err == ["sslkit: callback 'w' (plugin 'p') changed sslkit's own checkpoints/step-00000001/"
                   "model.safetensors, run.json in on_step_end, which no callback may write; disabled for the "
                   "rest of this run; put back: run.json; not put back (sslkit keeps no copy): "
                   "checkpoints/step-00000001/model.safetensors"]
    assert calls == [49, 50] and (tmp_path / "run.json").read_text() == '{"status": "running"}'
    assert (tmp_path / "metrics.csv").read_text() == "49\n50\n51\n"  # the csv callback's own file: never reported


def test_the_default_csv_left_out_by_sslkit_load_plugins_is_said_so(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "simclr,timm,folder")
    plugins.reset()
    bad = cli(*pretrain_args(tmp_path, "run", "--max-steps", 1))
    assert bad.exit_code == 2 and len(lines(bad.stderr)) == 1, bad.stderr
    assert lines(bad.stderr)[0] == (
        "error: callback 'csv' (the default --callbacks) is not loaded: SSLKIT_LOAD_PLUGINS='simclr,timm,folder' "
        "leaves out its plugin 'csv'; add csv to SSLKIT_LOAD_PLUGINS, or give --callbacks with the callbacks you "
        "want ('' for none)")
    assert not (tmp_path / "run").exists()


def test_methods_of_another_frameworks_base_or_the_instance_are_not_taken_for_misspelled_events():
    """Only the methods of the callback's own classes are checked: an adapter that also subclasses
    another framework's callback (its ``on_train_batch_end``), or an ``on_error`` set on the instance, is
    fine; a misspelled event in a subclass of sslkit's Callback is not."""
    from sslkit.api import Callback
    from sslkit.engine.events import unknown_event_message

    class OtherFramework:
        def on_train_batch_end(self, *args):
            pass

    class Adapter(Callback, OtherFramework):
        def __init__(self):
            self.on_error = print

        def on_step_end(self, step, metrics):
            pass

    class Typo(Adapter):
        def on_checkpointed(self, step, path):
            pass

    assert unknown_event_message("'a'", Adapter()) is None
    line = unknown_event_message("'t'", Typo())
    assert line is not None and "unknown event 'on_checkpointed' (did you mean 'on_checkpoint'?)" in line
