"""``sslkit new-plugin NAME --kind task|source|backbone|exporter|callback``: a ready plugin package.

Writes ``pyproject.toml`` (the ``sslkit`` entry point, a pytest config), the plugin
module (declaring the ``sslkit_api`` range it is written for, importing only
:mod:`sslkit.api`), a README and ``tests/`` that run :mod:`sslkit.testing` on what the
package registers. Templates live in ``sslkit/new_plugin_templates/`` (package data).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from sslkit.errors import UsageError
from sslkit.output_file import created_mode, temp_prefix

KINDS = ("task", "source", "backbone", "exporter", "callback")
USAGE = {
    "task": "sslkit pretrain --task {name} --data folder:IMAGES --out runs/{name}",
    "source": "sslkit pretrain --task simclr --data {name}:NPY_FOLDER --out runs/{name}",
    "backbone": "sslkit pretrain --task simclr --backbone {name}:small --data folder:IMAGES --out runs/{name}",
    "exporter": "sslkit export runs/RUN --format {name} --out encoder.npz",
    "callback": "sslkit pretrain --task simclr --data folder:IMAGES --out runs/{name} --callbacks csv,{name}",
}


def api_range() -> str:
    """The ``sslkit_api`` specifier a new plugin declares: this API version up to the next."""
    from sslkit.api import API_VERSION

    return f">={API_VERSION},<{API_VERSION + 1}"


def files_for(name: str, kind: str) -> dict[str, str]:
    """``relative path -> text`` of the package for plugin ``name`` of ``kind``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        fixed = re.sub(r"[^a-z0-9_]", "_", name.lower()).lstrip("0123456789_")  # a valid name, or none at all
        raise UsageError(f"plugin name {name!r}: use lower-case letters, digits and _, starting with a letter (it "
                         f"becomes a Python module and the registered name{f', e.g. --task {fixed}' if fixed else ''})")
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    module, dist = f"sslkit_{name}", f"sslkit-{name.replace('_', '-')}"
    values = dict(name=name, kind=kind, module=module, dist=dist, api_range=api_range(),
                  cls="".join(part.title() for part in name.split("_")) + kind.title())
    values["usage"] = "Use it:\n\n```bash\n" + USAGE[kind].format(**values) + "\n```"
    values.update(source_flags="", py_modules=f'"{module}"', flags_note="")
    if kind == "source":  # its flags: a plain dict, read without importing the plugin
        values.update(source_flags=f'\n# `--scale` on `sslkit pretrain` / `embed` / `eval` (sslkit.source_flags).\n'
                                   f'[project.entry-points."sslkit.source_flags"]\n{name} = "{module}_flags:FLAGS"\n',
                      py_modules=f'"{module}", "{module}_flags"',
                      flags_note=f"`{module}_flags.py` gives the option `scale` its own flag, `--scale` (listed by "
                                 f"`sslkit pretrain --help`).\n")
    templates = resources.files("sslkit") / "new_plugin_templates"

    def render(template: str) -> str:
        return (templates / template).read_text().format(**values)

    files = {
        "pyproject.toml": render("pyproject.toml.tmpl"),
        "README.md": render("README.md.tmpl"),
        f"{module}.py": render(f"{kind}.py.tmpl"),
        f"tests/test_{name}.py": render(f"test_{kind}.py.tmpl"),
    }
    if kind == "source":
        files[f"{module}_flags.py"] = render("source_flags.py.tmpl")
    return files


def write_plugin(name: str, kind: str, out: str | Path | None = None) -> Path:
    """Write the package for plugin ``name`` into ``out`` (default ``./sslkit-NAME``).

    ``out`` must not exist or be empty: nothing is ever overwritten. The package is written into a
    temporary folder and moved into place when complete: a failed write (a full disk) or an interrupt
    leaves nothing, and the same command can be run again. A missing ``out`` is the temporary folder
    (made beside it) renamed; an existing empty one (``.``, a mount point, a link to a folder) stays
    itself, with its owner, mode and ACLs: the package is made inside it and its entries moved out.
    """
    files = files_for(name, kind)
    _check_name_is_free(name, kind)
    _check_modules_are_free(name, [rel[:-3] for rel in files if "/" not in rel and rel.endswith(".py")])
    folder = Path(out) if out else Path(f"sslkit-{name.replace('_', '-')}")
    exists = folder.exists() or folder.is_symlink()  # a dangling link is not replaced either
    if exists and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{str(folder)!r} already exists and is not empty; choose another --out")
    tmp = None
    try:
        home = folder if exists else folder.absolute().parent  # the existing folder's own filesystem
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=home))
        if not exists:  # mkdtemp's 0700 would hide the package from the team (an existing folder keeps its own)
            os.chmod(tmp, created_mode(directory=True))
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if exists:
            _move_into(tmp, folder)
        else:
            os.replace(tmp, folder)  # onto a missing folder only
    except OSError as exc:
        raise UsageError(f"cannot write the plugin into {str(folder)!r}: {exc.strerror or exc}; "
                         f"nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # gone when renamed into place
    return folder


def _move_into(tmp: Path, folder: Path) -> None:
    """Move ``tmp``'s top-level entries into the existing (empty) ``folder``; on a failure or an interrupt
    the entries moved so far are removed again, and nothing of the package stays."""
    moved: list[Path] = []
    try:
        for entry in sorted(tmp.iterdir()):
            target = folder / entry.name
            if os.path.lexists(target):  # made there since the check: never replaced
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            os.replace(entry, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise


def _check_name_is_free(name: str, kind: str) -> None:
    """A name an installed plugin already registers for ``kind``, or already uses as its entry-point
    name, is refused: installed beside it, the new plugin would make that name ambiguous (an error
    wherever it is used), or share its plugin name (``SSLKIT_DISABLE_PLUGINS`` would select both)."""
    from sslkit.plugins import get_plugins
    from sslkit.registry import _names, plugin_of

    group = f"{kind}s"
    if name in _names(group):
        raise UsageError(f"plugin name {name!r}: the plugin {plugin_of(group, name)!r} already registers a {kind} "
                         f"of that name (sslkit list {group}); choose another name")
    owners = sorted(i.distribution or i.name for i in get_plugins().infos.values() if i.entry_point == name)
    if owners:
        raise UsageError(f"plugin name {name!r}: the installed distribution {owners[0]!r} already uses the "
                         f"entry-point name {name!r} (sslkit plugins); choose another name")


def _check_modules_are_free(name: str, modules: list[str]) -> None:
    """A module name the package would install that is already importable is refused: installed, one of
    the two would shadow the other (``plugins`` gives ``sslkit_plugins``, sslkit's own built-ins)."""
    import importlib.util

    for module in modules:
        try:
            taken = importlib.util.find_spec(module) is not None  # located, not imported
        except (ImportError, ValueError):
            taken = True
        if taken:
            whose = "sslkit's own built-in plugins" if module == "sslkit_plugins" else "an installed module"
            raise UsageError(f"plugin name {name!r}: its module {module!r} is already importable ({whose}); the "
                             f"new package would shadow it or be shadowed by it; choose another name")
