"""The plugin manager against faulty plugins: shared entry-point names, SystemExit, hooks that
register nothing, wrong objects, raising sniffs, a docstring's ``sslkit_api``, channels-last sources."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sslkit import plugin_api_range, plugins, registry
from sslkit.errors import UsageError
from sslkit_plugins.sources.folder import FolderSource
from tests.test_plugins import fake_dist

THIRD_FOLDER = """
    from sslkit.api import Source, hookimpl

    class Third(Source):
        scheme = "thirdsrc"

    @hookimpl
    def register_sources(register):
        register("thirdsrc", Third)
"""


def test_a_third_party_entry_point_named_like_a_builtin_loads_beside_it(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "third-folder", "sslkit_third_folder", THIRD_FOLDER, ep_name="folder")
    monkeypatch.syspath_prepend(str(tmp_path))  # first on sys.path: seen before sslkit's own `folder`
    plugins.reset()
    assert {"folder", "thirdsrc"} <= set(registry.list_sources())
    infos = plugins.get_plugins().infos
    assert infos["folder"].builtin and infos["folder"].registered["sources"] == ["folder"]
    assert infos["folder@third-folder"].registered["sources"] == ["thirdsrc"]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SSLKIT_DISABLE_PLUGINS", "folder")  # the entry-point name still selects both
    plugins.reset()
    assert not {"folder", "thirdsrc"} & set(registry.list_sources())
    monkeypatch.setenv("SSLKIT_DISABLE_PLUGINS", "")
    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "folder")
    plugins.reset()
    assert registry.list_sources() == ["folder", "thirdsrc"]


def test_new_plugin_refuses_an_installed_entry_point_name_of_another_kind(tmp_path):
    from sslkit.new_plugin import write_plugin

    for name, kind in (("folder", "task"), ("simclr", "exporter")):
        with pytest.raises(UsageError) as info:
            write_plugin(name, kind, tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and f"{name!r}" in message and "entry-point name" in message
        assert not (tmp_path / name).exists()
    assert write_plugin("brandnew", "exporter", tmp_path / "b").is_dir()


BROKEN_IMPORT = "import does_not_exist_anywhere_xyz\n"
REFUSED_RANGE = """
    from sslkit.api import Callback, hookimpl
    sslkit_api = ">=2,<3"

    @hookimpl
    def register_callbacks(register):
        register("futurecb", Callback)
"""


@pytest.mark.parametrize("source,said", [(BROKEN_IMPORT, "ModuleNotFoundError"), (REFUSED_RANGE, "needs sslkit API")])
def test_registered_fails_for_a_plugin_that_did_not_load(source, said, tmp_path, monkeypatch):
    from sslkit.testing import registered

    module = f"sslkit_kitfail_{abs(hash(source))}"
    fake_dist(tmp_path, "kitfail-plugin", module, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    with pytest.raises(AssertionError) as info:
        registered("callbacks", "kitfail-plugin")
    assert said in str(info.value) and "kitfail-plugin" in str(info.value)


def test_registered_fails_when_the_distribution_registers_nothing_of_that_kind(tmp_path, monkeypatch):
    from sslkit.testing import registered

    fake_dist(tmp_path, "third-src", "sslkit_third_src", THIRD_FOLDER, ep_name="thirdsrc")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert registered("sources", "third-src") == ["thirdsrc"]
    with pytest.raises(AssertionError, match="kind must be one of backbones, .*, got 'task'"):  # was a KeyError
        registered("task", "third-src")
    with pytest.raises(AssertionError) as info:
        registered("tasks", "third-src")
    assert "tasks" in str(info.value) and "third-src" in str(info.value)


@pytest.mark.parametrize("where", ["import", "hook"])
def test_system_exit_in_a_plugin_is_reported_and_others_work(where, tmp_path, monkeypatch, capsys):
    source = 'import sys\nsys.exit("plugin refuses")\n' if where == "import" else """
        import sys
        from sslkit.api import hookimpl

        @hookimpl
        def register_tasks(register):
            sys.exit("plugin refuses")
    """
    fake_dist(tmp_path, "exiting-plugin", f"sslkit_exiting_{where}", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert "simclr" in registry.list_tasks()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'exiting-plugin'" in err[0] and "SystemExit: plugin refuses" in err[0]


SNIFFY = """
    from sslkit.api import Source, hookimpl

    class Sniffy(Source):
        scheme = "sniffy"

        @classmethod
        def sniff(cls, path):
            with open(path, "rb") as f:  # forgets that a path can be a folder
                return 1.0 if f.read(4) == b"SNIF" else 0.0

    @hookimpl
    def register_sources(register):
        register("sniffy", Sniffy)
"""


def test_a_raising_sniff_scores_zero_with_one_line(tmp_path, monkeypatch, capsys, gray_folder):
    fake_dist(tmp_path / "site", "sniffy-plugin", "sslkit_sniffy", SNIFFY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plugins.reset()
    getattr(registry, "_sniff_failed", set()).clear()  # once per process: this test sees its line
    assert registry.resolve_data(str(gray_folder)) == ("folder", str(gray_folder))
    assert registry.resolve_data(str(gray_folder))[0] == "folder"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'sniffy'" in err[0] and "'sniffy-plugin'" in err[0] and "Error" in err[0]


WRONG_TYPES = """
    from sslkit.api import Callback, Source, Task, hookimpl

    class NotDataclassOptions(Task):
        class Options:
            scale = 0.5

    class Good(Task):
        pass

    @hookimpl
    def register_tasks(register):
        register("inttask", 42)
        register("functask", lambda backbone, options, spec: None)
        register("nodc", NotDataclassOptions)
        register("goodtask", Good)

    @hookimpl
    def register_sources(register):
        class S:
            scheme = "objsrc"
        register("objsrc", S)

    @hookimpl
    def register_exporters(register):
        register("strexp", "not callable")

    @hookimpl
    def register_backbones(register):
        register("nonebb", None)

    @hookimpl
    def register_callbacks(register):
        register("my cb", Callback)
        register("a,b", Callback)
        register("-x", Callback)
        register("goodcb", Callback)
"""


def test_registered_objects_of_the_wrong_type_are_skipped_in_one_line_each(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "wrongtype-plugin", "sslkit_wrongtype", WRONG_TYPES)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    loaded = plugins.get_plugins()
    assert loaded.infos["wrongtype-plugin"].registered == {
        "tasks": ["goodtask"], "backbones": [], "sources": [], "exporters": [], "callbacks": ["goodcb"]}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 9 and all(line.startswith("sslkit: plugin 'wrongtype-plugin' ") for line in err)
    text = "\n".join(err)
    assert "task 'inttask'" in text and "sslkit.api.Task" in text and "task 'nodc'" in text and "dataclass" in text
    assert "source 'objsrc'" in text and "sslkit.api.Source" in text
    assert "exporter 'strexp'" in text and "backbone 'nonebb'" in text and "callable" in text
    assert "'my cb'" in text and "'a,b'" in text and "'-x'" in text
    assert "simclr" in registry.list_tasks()  # the rest keeps working


def test_every_builtin_registers_without_a_failure(capsys):
    loaded = plugins.get_plugins()
    assert loaded.failures == [] and capsys.readouterr().err == ""
    assert all(n in registry.list_tasks() for n in ("simclr", "mae", "dino"))
    assert {"folder", "dicom", "npz", "nifti"} <= set(registry.list_sources())
    assert {"timm", "monai"} <= set(registry.list_backbones())


def test_check_task_on_options_that_are_not_a_dataclass_is_an_assertion(tmp_path):
    from sslkit.api import Task
    from sslkit.testing import check_task

    class NoDataclass(Task):
        class Options:
            scale = 0.5

    with pytest.raises(AssertionError) as info:
        check_task(NoDataclass, tmp_path=tmp_path)
    assert "NoDataclass.Options" in str(info.value) and "dataclass" in str(info.value)


def test_options_named_like_create_parameters_reach_the_options(gray_folder):
    from sslkit.api import Source, Task
    from sslkit.testing.registry import registered_as

    @dataclasses.dataclass
    class TaskOptions:
        name: str = "x"
        backbone: str = "y"
        spec: str = "z"

    class Named(Task):
        Options = TaskOptions

        @classmethod
        def check(cls, backbone, spec):
            return None

        def __init__(self, backbone, options, spec):
            self.options = options

    @dataclasses.dataclass
    class SourceOptions:
        data: str = "raw"

    class DataSource(Source):
        scheme = "datasrc"
        Options = SourceOptions

    with registered_as("tasks", "named", Named):
        task = registry.create_task("named", None, None, name="n", backbone="b", spec="s")
    assert (task.options.name, task.options.backbone, task.options.spec) == ("n", "b", "s")
    with registered_as("sources", "datasrc", DataSource):
        source = registry.create_source(f"datasrc:{gray_folder}", data="other")
    assert source.options.data == "other"


UNMARKED_AND_RETURNING = """
    from sslkit.api import Callback, Task, hookimpl

    class RT(Task):
        pass

    def register_tasks(register):  # forgot @hookimpl
        register("unmarked", RT)

    @hookimpl
    def register_callbacks(register):
        return {"retcb": Callback}
"""


def test_a_hook_without_hookimpl_or_returning_a_value_is_reported(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "silent-plugin", "sslkit_silent", UNMARKED_AND_RETURNING)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    assert "unmarked" not in registry.list_tasks() and "retcb" not in registry.list_callbacks()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("sslkit: plugin 'silent-plugin' ") for line in err)
    assert any("register_tasks" in line and "@hookimpl" in line for line in err)
    assert any("register_callbacks returned a value; call register(name, obj) instead" in line for line in err)


def test_api_range_is_read_from_the_top_level_assignment_not_a_docstring(tmp_path):
    (tmp_path / "sslkit_docstr_range.py").write_text(
        '"""Declare it like this when you move to API 2:\n\nsslkit_api = ">=2,<3"\n"""\n'
        'import os\nsslkit_api: str = ">=1,<2"\n')
    (tmp_path / "sslkit_broken_syntax.py").write_text('sslkit_api = ">=1"\ndef (:\n')
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert plugin_api_range.source_api_range("sslkit_docstr_range") == ">=1,<2"
        assert plugin_api_range.source_api_range("sslkit_broken_syntax") is None
    finally:
        sys.path.remove(str(tmp_path))


class HWC(FolderSource):
    """A folder source whose ``load`` forgets to put the channel axis first: (H, W, 3)."""

    scheme = "hwcsrc"

    def load(self, ref):
        return np.ascontiguousarray(super().load(ref).transpose(1, 2, 0))

    def channels_of(self, ref):
        return None


def test_check_source_refuses_channels_last_samples(tmp_path, rgb_folder):
    from sslkit.testing import check_source

    with pytest.raises(AssertionError) as info:
        check_source(HWC, str(rgb_folder), tmp_path=tmp_path)
    assert "(C, H, W)" in str(info.value) and "channels" in str(info.value)


def test_the_run_refuses_a_source_whose_samples_have_many_channels(rgb_folder):
    from sslkit.data.prepare import majority_channels

    source = HWC(str(rgb_folder), None)
    with pytest.raises(UsageError) as info:
        majority_channels(source, source.index())
    assert "\n" not in str(info.value) and "(C, H, W)" in str(info.value)
    assert majority_channels(FolderSource(str(rgb_folder), None), source.index()) == 3


CLASH = """
    from sslkit.api import Source, Task, hookimpl

    class Other(Task):
        pass

    class Folder(Source):
        scheme = "folder"

    @hookimpl
    def register_tasks(register):
        register("simclr", Other)

    @hookimpl
    def register_sources(register):
        register("folder", Folder)
"""


def test_the_conflict_line_suggests_disabling_the_third_party_plugin(tmp_path, monkeypatch):
    fake_dist(tmp_path / "a", "aaa-clash", "sslkit_aaa_clash", CLASH)  # loads before sslkit's `simclr`
    fake_dist(tmp_path / "b", "third-folder", "sslkit_third_folder_clash", CLASH.replace("simclr", "simclr2"),
              ep_name="folder")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    plugins.reset()
    message = plugins.get_plugins().conflict_message("tasks", "simclr")
    assert message.endswith("; uninstall one or set SSLKIT_DISABLE_PLUGINS=aaa-clash"), message
    message = plugins.get_plugins().conflict_message("sources", "folder")  # aaa-clash, sslkit and third-folder
    assert message.endswith("; uninstall one (pip uninstall third-folder)"), message
