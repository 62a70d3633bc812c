"""The plugin manager: entry points, allow/deny lists, broken and conflicting plugins."""

from __future__ import annotations

import json
import textwrap

import pytest

from sslkit import plugins, registry
from sslkit.errors import UsageError

BUILTINS = {"timm": "backbones", "folder": "sources", "dicom": "sources", "mae": "tasks",
            "simclr": "tasks", "onnx": "exporters"}


def fake_dist(root, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    """An installed distribution on ``root`` with one ``sslkit`` entry point."""
    info = root / f"{dist}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[sslkit]\n{ep_name or dist} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_builtins_are_found_through_entry_points(cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0
    infos = {p["name"]: p for p in json.loads(result.output)}
    for name, kind in BUILTINS.items():
        assert name in infos, name
        info = infos[name]
        assert set(info) >= {"name", "version", "tasks", "backbones", "sources", "exporters"}
        assert info["version"] and name in info[kind]


def test_disable_and_allow_list(monkeypatch):
    monkeypatch.setenv("SSLKIT_DISABLE_PLUGINS", "mae, onnx")
    plugins.reset()
    assert "mae" not in registry.list_tasks() and "simclr" in registry.list_tasks()
    assert "onnx" not in registry.list_exporters()
    monkeypatch.delenv("SSLKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "timm,folder")
    plugins.reset()
    assert registry.list_tasks() == [] and registry.list_sources() == ["folder"]
    assert set(plugins.get_plugins().infos) == {"timm", "folder"}


def test_plugin_that_fails_to_import_is_reported_and_others_work(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "broken-plugin", "sslkit_broken_plugin", "import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    loaded = plugins.get_plugins()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken-plugin" in err[0] and "ModuleNotFoundError" in err[0]
    assert loaded.infos["broken-plugin"].error
    assert "mae" in registry.list_tasks()  # the rest keeps working


def test_plugin_whose_hook_raises_is_reported(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "raising-plugin", "sslkit_raising_plugin", """
        import sslkit

        @sslkit.hookimpl
        def register_tasks(register):
            raise RuntimeError("boom")

        @sslkit.hookimpl
        def register_exporters(register):
            register("fancy", lambda *a, **k: {})
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert "fancy" in registry.list_exporters()
    assert "simclr" in registry.list_tasks()
    err = capsys.readouterr().err
    assert "raising-plugin" in err and "register_tasks raised RuntimeError: boom" in err


CLASH_TASK = """
    from sslkit.api import hookimpl, Task

    class Other(Task):
        pass

    @hookimpl
    def register_tasks(register):
        register("simclr", Other)
"""


def test_same_name_from_two_plugins_is_listed_and_an_error_only_where_used(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "clash-plugin", "sslkit_clash_plugin", CLASH_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert "simclr" in registry.list_tasks() and "mae" in registry.list_tasks()  # listing works
    assert registry.get_task("mae").__name__  # other names work
    with pytest.raises(UsageError) as info:
        registry.get_task("simclr")
    message = str(info.value)
    assert "\n" not in message and "'simclr'" in message
    assert "'simclr'" in message.split("plugins")[1] and "'clash-plugin'" in message  # both named
    loaded = plugins.get_plugins()
    assert loaded.infos["clash-plugin"].conflicts == ["task 'simclr' is also registered by 'simclr'"]
    assert loaded.infos["simclr"].conflicts == ["task 'simclr' is also registered by 'clash-plugin'"]
    assert capsys.readouterr().err == ""  # nothing printed until the name is used


def test_plugins_json_lists_every_plugin_and_the_conflict_despite_a_duplicate(tmp_path, monkeypatch, cli):
    fake_dist(tmp_path, "clash-plugin", "sslkit_clash_plugin", CLASH_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))  # the fake distribution is installed, as far as discovery sees
    plugins.reset()
    proc = cli("plugins", "--json")
    assert proc.exit_code == 0, proc.output
    infos = {p["name"]: p for p in json.loads(proc.stdout)}
    assert infos["clash-plugin"]["tasks"] == ["simclr"] and infos["clash-plugin"]["builtin"] is False
    assert infos["clash-plugin"]["conflicts"] == ["task 'simclr' is also registered by 'simclr'"]
    assert {"mae", "timm", "folder", "onnx"} <= set(infos)
    text = cli("plugins")
    assert text.exit_code == 0 and "[conflict: task 'simclr' is also registered by 'clash-plugin']" in text.stdout
    # Using the ambiguous name is one line, exit 2; every other task still runs.
    proc = cli("pretrain", "--task", "simclr", "--data", tmp_path, "--out", tmp_path / "r")
    lines = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(lines) == 1, proc.stderr
    assert "'clash-plugin'" in lines[0] and "'simclr'" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_builtins_are_marked_builtin(cli):
    infos = json.loads(cli("plugins", "--json").output)
    assert infos and all(p["builtin"] is True for p in infos)  # this environment has only sslkit's own
    assert "(built-in)" in cli("plugins").output.splitlines()[0]


@pytest.mark.parametrize("declared,loads", [(">=1,<2", True), (">=1", True), ("==1", True), (">=2,<3", False),
                                            ("<1", False), ("one", False)])
def test_plugin_declaring_an_api_range_is_loaded_only_if_compatible(declared, loads, tmp_path, monkeypatch, capsys):
    module = f"sslkit_ranged_plugin_{abs(hash(declared))}"  # a fresh module per case (sys.modules)
    fake_dist(tmp_path, "ranged-plugin", module, f"""
        from sslkit.api import hookimpl
        sslkit_api = {declared!r}

        @hookimpl
        def register_exporters(register):
            register("ranged", lambda *a, **k: {{}})
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert ("ranged" in registry.list_exporters()) is loads
    assert "mae" in registry.list_tasks()  # the rest keeps working
    err = capsys.readouterr().err.strip().splitlines()
    if loads:
        assert err == [] and plugins.get_plugins().infos["ranged-plugin"].error is None
    else:
        assert len(err) == 1 and "'ranged-plugin'" in err[0] and "not loaded" in err[0]
        assert plugins.get_plugins().infos["ranged-plugin"].error in err[0]


def test_incompatible_plugin_is_an_error_line_in_sslkit_plugins(tmp_path, monkeypatch, cli):
    fake_dist(tmp_path, "future-plugin", "sslkit_future_plugin", """
        from sslkit.api import hookimpl
        sslkit_api = ">=2,<3"

        @hookimpl
        def register_exporters(register):
            register("future", lambda *a, **k: {})
    """)
    monkeypatch.syspath_prepend(str(tmp_path))  # installed, as far as discovery sees (in-process: ~8 s less)
    plugins.reset()
    proc = cli("plugins")
    assert proc.exit_code == 0
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("future-plugin")]
    assert len(line) == 1 and "[error: needs sslkit API >=2,<3 but this sslkit provides API 1" in line[0]
    assert proc.stderr.strip().splitlines() == [
        "sslkit: plugin 'future-plugin' needs sslkit API >=2,<3 but this sslkit provides API 1; not loaded"]
    plugins.reset()
    assert "future" not in cli("list", "exporters").stdout


def test_source_whose_scheme_differs_from_its_name_is_refused(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "scheme-plugin", "sslkit_scheme_plugin", """
        from sslkit.api import hookimpl, Source

        class Good(Source):
            scheme = "good"

        class Bad(Source):
            scheme = "other"

        @hookimpl
        def register_sources(register):
            register("bad", Bad)
            register("good", Good)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    sources = registry.list_sources()
    assert "good" in sources and "bad" not in sources and "folder" in sources
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sslkit: plugin 'scheme-plugin' registered source 'bad' whose class has scheme 'other'; "
                   "set scheme = 'bad' (skipped)"]


def test_plugin_whose_hook_raises_usage_error_is_refused_and_every_command_works(tmp_path, monkeypatch, cli):
    fake_dist(tmp_path, "refusing-plugin", "sslkit_refusing_plugin", """
        from sslkit.api import Task, UsageError, hookimpl

        @hookimpl
        def register_tasks(register):
            register("refusedtask", Task)

        @hookimpl
        def register_sources(register):
            raise UsageError("needs the licensed SDK; set ACME_SDK")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    line = "sslkit: plugin 'refusing-plugin' refused to load (register_sources): needs the licensed SDK; " \
           "set ACME_SDK; not loaded"
    for args in (("plugins",), ("list", "tasks"), ("new-plugin", "demo", "--kind", "task", "--out", tmp_path / "n")):
        plugins.reset()
        proc = cli(*args)
        assert proc.exit_code == 0, (args, proc.output)
        assert proc.stderr.strip().splitlines() == [line], args
    assert (tmp_path / "n" / "sslkit_demo.py").is_file()
    plugins.reset()
    listed = cli("list", "tasks").stdout.split()
    assert "simclr" in listed and "refusedtask" not in listed  # nothing of the refused plugin is kept
    row = [ln for ln in cli("plugins").stdout.splitlines() if ln.startswith("refusing-plugin")]
    assert len(row) == 1 and "[error: refused to load (register_sources): needs the licensed SDK" in row[0]
    assert plugins.get_plugins().infos["refusing-plugin"].registered["tasks"] == []


def test_misspelled_hook_name_is_reported_with_the_real_one(tmp_path, monkeypatch, cli):
    fake_dist(tmp_path, "typo-plugin", "sslkit_typo_plugin", """
        from sslkit.api import Task, hookimpl

        @hookimpl
        def register_task(register):
            register("typotask", Task)

        @hookimpl
        def register_exporters(register):
            register("typoexport", lambda *a, **k: {})
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    proc = cli("plugins")
    assert proc.exit_code == 0, proc.output
    message = ("has an @hookimpl that sslkit never calls: unknown hook 'register_task' (did you mean "
               "'register_tasks'?); choose from: register_backbones, register_callbacks, register_exporters, "
               "register_sources, register_tasks")
    assert proc.stderr.strip().splitlines() == [f"sslkit: plugin 'typo-plugin' {message}"]
    row = [ln for ln in proc.stdout.splitlines() if ln.startswith("typo-plugin")]
    assert len(row) == 1 and f"[error: {message}]" in row[0] and "exporters: typoexport" in row[0]
    assert "typoexport" in registry.list_exporters() and "typotask" not in registry.list_tasks()


def test_docs_list_exactly_the_reserved_metric_keys():
    """docs/plugins.md, the Task docstring and the hook's docstring name the engine's reserved keys, all of them."""
    import re
    from pathlib import Path

    from sslkit import hookspecs
    from sslkit.engine.loop import RESERVED_METRICS
    from sslkit.task import Task

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    rule = docs[docs.index("* **Tasks.**"):docs.index("`views(spec)` returns")]
    texts = {"docs/plugins.md": rule, "Task": Task.__doc__, "Task.forward": Task.forward.__doc__,
             "register_tasks": hookspecs.register_tasks.__doc__}
    for where, text in texts.items():
        part = text[text.index("``step``" if "``step``" in text else "`step`"):]
        named = set(re.findall(r"`+(\w+)`+", part.split(" are ")[0].split(" (")[0].split(".\n")[0]))
        assert named == set(RESERVED_METRICS), (where, sorted(named ^ RESERVED_METRICS))


def test_api_range_is_read_before_importing_so_the_friendly_line_wins(tmp_path, monkeypatch, cli):
    fake_dist(tmp_path, "api2-plugin", "sslkit_api2_plugin", """
        from sslkit.api import hookimpl, OnlyInApiTwo  # a name API 1 does not have

        sslkit_api = ">=2"

        @hookimpl
        def register_exporters(register):
            register("api2", OnlyInApiTwo)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    proc = cli("plugins")
    assert proc.exit_code == 0, proc.output
    assert proc.stderr.strip().splitlines() == [
        "sslkit: plugin 'api2-plugin' needs sslkit API >=2 but this sslkit provides API 1; not loaded"]
    assert "sslkit_api2_plugin" not in __import__("sys").modules  # refused before its import
