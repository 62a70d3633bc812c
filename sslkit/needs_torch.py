"""sslkit installed without PyTorch: a command that needs it is one line and exit code 2, not a traceback.

sslkit's dependencies pin torch, but a CPU-only install puts it in by hand first (README: "Install") and
can leave it out. The help screens, ``sslkit plugins``, ``sslkit list``, ``sslkit new-plugin``,
``sslkit data inspect`` and ``sslkit data cache`` work without it; every other command is refused once,
where the CLI dispatches it (:func:`guard`), after its arguments are parsed (so its ``--help`` still shows).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import sys

import click

from sslkit.errors import UsageError, say

#: the pin of pyproject.toml and the README's install line
TORCH_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1"
MESSAGE = f"sslkit needs PyTorch, which is not installed here: {TORCH_INSTALL}"

#: command paths that cannot run without torch (a group's path: every command in it)
NEEDS_TORCH = ("pretrain", "export", "embed", "eval", "data preview", "data dump")
#: commands that list plugins: what loads, then one line for those that need torch
LISTINGS = ("plugins", "list")

_TORCH_MODULES = ("torch", "torchvision")


def torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or blocked torch
        return False


def exit_if_missing_torch(exc: BaseException) -> None:
    """``exc`` is an ``import torch`` (or torchvision) failing because torch is not installed: :data:`MESSAGE`,
    exit code 2 (a command :data:`NEEDS_TORCH` lacks, or a plugin's import of torch where it runs)."""
    if (isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in _TORCH_MODULES
            and not torch_installed()):
        say(f"error: {MESSAGE}")
        sys.exit(2)


def guard(ctx: click.Context, name: str, cmd: click.Command) -> click.Command:
    """The command to run for ``name``: ``cmd`` itself where torch is installed. Without torch, plugins load
    with one line for those that need it, and a command of :data:`NEEDS_TORCH` is refused once parsed."""
    if cmd is None or torch_installed():  # None: an unknown name while completing
        return cmd
    skipped = _load_plugins_without_torch()
    if skipped and name in LISTINGS:
        ctx.call_on_close(lambda: say(f"sslkit: {skipped} plugin(s) not loaded: {MESSAGE}"))
    return _refusing(cmd, name)


def _refusing(cmd: click.Command, path: str) -> click.Command:
    """A copy of ``cmd`` that parses as it does and then raises :data:`MESSAGE` where ``path`` needs torch."""
    if path in NEEDS_TORCH and not isinstance(cmd, click.Group):
        refused = copy.copy(cmd)
        refused.callback = _refuse
        return refused
    if isinstance(cmd, click.Group) and any(p == path or p.startswith(f"{path} ") for p in NEEDS_TORCH):
        group = copy.copy(cmd)
        whole = path in NEEDS_TORCH
        group.commands = {n: _refusing(c, path if whole else f"{path} {n}") for n, c in cmd.commands.items()}
        return group
    return cmd


def _refuse(*_args, **_kwargs) -> None:
    raise UsageError(MESSAGE)


def _load_plugins_without_torch() -> int:
    """Load the plugins (once), keeping a plugin's failure line unless the failure is torch's absence; those
    plugins are left out of the listing. Returns how many were."""
    from sslkit.plugins import get_plugins

    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        loaded = get_plugins()
    torch_lines = [line for line in loaded.failures if _is_torch_line(line)]
    for line in printed.getvalue().splitlines():
        if line not in torch_lines:
            print(line, file=sys.stderr)
    loaded.failures = [line for line in loaded.failures if line not in torch_lines]
    missing = [name for name, info in loaded.infos.items() if info.error and _is_torch_line(info.error)]
    for name in missing:
        del loaded.infos[name]
    return len(missing)


def _is_torch_line(text: str) -> bool:
    return any(f"ModuleNotFoundError: No module named '{m}" in text for m in _TORCH_MODULES)
