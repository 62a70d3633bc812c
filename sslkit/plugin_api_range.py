"""A plugin's declared ``sslkit_api`` range, read from its entry point's module source before importing it
(a plugin for another API may import names this one lacks), or from the loaded module."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def api_incompatibility(plugin: Any) -> str | None:
    """Why ``plugin`` (an entry point's module or object) cannot load with this sslkit's
    :data:`sslkit.api.API_VERSION`, from its ``sslkit_api`` specifier (e.g. ``">=1,<2"``),
    or None when it declares none or a range that includes it."""
    import inspect

    declared = getattr(plugin, "sslkit_api", None)
    if declared is None:
        declared = getattr(inspect.getmodule(plugin), "sslkit_api", None)
    return range_problem(declared)


def range_problem(declared: Any) -> str | None:
    """Why a plugin declaring the ``sslkit_api`` range ``declared`` cannot load here, or None."""
    if declared is None:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from sslkit.api import API_VERSION

    try:
        ok = str(API_VERSION) in SpecifierSet(str(declared))
    except InvalidSpecifier:
        return f"declares an invalid sslkit_api range {declared!r} (write e.g. '>=1,<2'); not loaded"
    return None if ok else f"needs sslkit API {declared} but this sslkit provides API {API_VERSION}; not loaded"


def module_file(module: str) -> Path | None:
    """The source file of ``module``, found without importing it (nor its packages); None when no such module
    is installed, or, for a module found some other way (a namespace, an extension), the path ``Path()``."""
    import importlib.util

    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else Path()
    for folder in spec.submodule_search_locations or ():
        base = Path(folder, *rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return Path() if spec.submodule_search_locations else None


def source_api_range(module: str) -> str | None:
    """The ``sslkit_api = "..."`` that ``module``'s source declares at top level, read without importing
    it (a docstring or a comment that shows such a line does not count); None where the source does
    not parse (importing it reports that)."""
    import ast

    path = module_file(module)
    try:
        text = path.read_text(encoding="utf-8") if path and path.is_file() else ""
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    found = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) and node.value is not None else []
        if any(isinstance(t, ast.Name) and t.id == "sslkit_api" for t in targets) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found = node.value.value  # the last one wins, as when the module runs
    return found
