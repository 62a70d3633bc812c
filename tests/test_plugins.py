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


def test_same_name_from_two_plugins_is_an_error_naming_both(tmp_path, monkeypatch):
    fake_dist(tmp_path, "clash-plugin", "sslkit_clash_plugin", """
        import sslkit

        @sslkit.hookimpl
        def register_tasks(register):
            register("simclr", object)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    with pytest.raises(UsageError) as info:
        registry.list_tasks()
    message = str(info.value)
    assert "'simclr'" in message and "'clash-plugin'" in message and "'simclr'" in message.split("plugins")[1]


def test_cli_reports_plugin_conflict_in_one_line(tmp_path, monkeypatch):
    from tests.conftest import run_sslkit

    fake_dist(tmp_path, "clash-plugin", "sslkit_clash_plugin", """
        import sslkit

        @sslkit.hookimpl
        def register_sources(register):
            register("dicom", object)
    """)
    proc = run_sslkit("list", "sources", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "clash-plugin" in lines[0] and "dicom" in lines[0]
    assert "Traceback" not in proc.stderr
