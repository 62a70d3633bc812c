"""The public API: every name documented, built-in plugins import nothing else from sslkit."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import sslkit.api as api
from tests.conftest import REPO

PLUGINS = REPO / "plugins"


def attribute_docstrings(module_file: Path) -> dict[str, str]:
    """``name -> docstring`` for module-level ``name = ...`` followed by a string literal."""
    body = ast.parse(module_file.read_text()).body
    out = {}
    for stmt, nxt in zip(body, body[1:]):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            out.update({t.id: nxt.value.value for t in targets if isinstance(t, ast.Name)})
    return out


def where_defined(name: str) -> Path:
    """The module file that binds ``name`` for sslkit.api (api.py itself, or the module it imports it from)."""
    for stmt in ast.walk(ast.parse(Path(api.__file__).read_text())):  # also the lazy (TYPE_CHECKING) imports
        if isinstance(stmt, ast.ImportFrom) and any(a.name == name for a in stmt.names):
            return Path(importlib.import_module(stmt.module).__file__)
    return Path(api.__file__)


@pytest.mark.parametrize("name", api.__all__)
def test_every_public_name_has_its_own_docstring(name):
    obj = getattr(api, name)
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")  # its own, not inherited
    elif inspect.isfunction(obj):
        doc = obj.__doc__
    else:  # constants, aliases, markers: an attribute docstring where the name is bound
        doc = attribute_docstrings(where_defined(name)).get(name)
    assert doc and len(doc.strip()) > 20, f"sslkit.api.{name} has no docstring of its own"
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__.startswith("sslkit"), f"{name} is not sslkit's own ({obj.__module__})"


def test_api_names_cover_the_plugin_platform():
    required = {"hookimpl", "API_VERSION", "Task", "Views", "Source", "SampleRef", "NotAnImage", "Undecodable",
                "InputSpec", "UsageError", "ViewRecipe", "MultiView", "recipe", "byol_recipes", "mlp", "DINOHead",
                "reconstruction_views", "ProjectedPairTask", "walk_files", "check_dir", "is_token_backbone",
                "Backbone", "TokenBackbone"}
    assert required <= set(api.__all__)
    assert len(set(api.__all__)) == len(api.__all__) and all(hasattr(api, n) for n in api.__all__)
    assert isinstance(api.API_VERSION, int) and api.API_VERSION >= 1


def sslkit_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of an ``sslkit`` or ``sslkit_plugins`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the plugin's package
            package = ".".join(("sslkit_plugins", *path.relative_to(PLUGINS).parent.parts))
            found += [(node.lineno, importlib.util.resolve_name("." * node.level + (node.module or ""), package))]
    return [(line, m) for line, m in found if m.split(".")[0] in ("sslkit", "sslkit_plugins")]


def allowed(path: Path, module: str) -> bool:
    """sslkit.api, or a helper module of the same plugin: same folder, same name before the
    first ``_`` (dicom.py / dicom_volume.py -> dicom_decode.py; never timm.py from an exporter)."""
    if module == "sslkit.api":
        return True
    parts = module.split(".")
    sibling = parts[:-1] == ["sslkit_plugins", *path.relative_to(PLUGINS).parent.parts]
    return sibling and parts[-1].split("_")[0] == path.stem.split("_")[0]


PLUGIN_FILES = sorted(p for p in PLUGINS.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(PLUGINS)))
def test_builtin_plugins_import_only_the_public_api(path):
    bad = [f"{path.relative_to(REPO)}:{line} imports {m}" for line, m in sslkit_imports(path) if not allowed(path, m)]
    assert not bad, "; ".join(bad)


def test_the_import_scan_catches_private_imports(tmp_path):
    """The scanner itself: a private import, a cross-plugin import and a lazy one are all caught."""
    probe = PLUGINS / "tasks" / "probe_for_the_scan.py"
    source = ("import sslkit.engine\nfrom sslkit.api import Task\n"
              "def f():\n    from sslkit_plugins.backbones.timm import create\n"
              "from sslkit_plugins.tasks.probe_for_the_scan_helpers import x\n")
    try:
        probe.write_text(source)
        found = sslkit_imports(probe)
        assert [m for _, m in found if not allowed(probe, m)] == ["sslkit.engine", "sslkit_plugins.backbones.timm"]
    finally:
        probe.unlink()
    assert len(PLUGIN_FILES) >= 20


def test_first_line_quotes_one_line_of_a_library_error():
    assert api.first_line(ValueError("bad shape\n  at layer 3\n")) == "bad shape"
    assert api.first_line(ValueError("\n  indented first line\nmore")) == "indented first line"
    assert api.first_line(KeyError()) == "KeyError"  # no message: the type's name
    assert api.first_line(RuntimeError("x" * 500)) == "x" * 199 + "…"  # a cut line says it was cut
    assert api.first_line(RuntimeError("x" * 200)) == "x" * 200  # 200 characters: whole
    # the audit's Hub message: cut mid-sentence ("... make sure your Internet connection") read as whole
    text = ("An error happened while trying to locate the file on the Hub and we cannot find the requested files "
            "in the local cache. Please check your connection and try again or make sure your Internet connection "
            "is on.")
    assert len(api.first_line(OSError(text))) == 200 and api.first_line(OSError(text)).endswith(" connectio…")
