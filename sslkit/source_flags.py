"""Command-line flags that source plugins declare for their options (``--window`` ...).

A source's options are the fields of its ``Options`` dataclass, each settable with
``--data-opt key=value``. A plugin may give some of them a flag of their own: an entry
point of group ``sslkit.source_flags``, named like the plugin's ``sslkit`` entry point,
names a dict ``{field: help}`` (or ``{field: {"help": ..., "choices": [...]}}``) kept in
a module that imports nothing heavy::

    [project.entry-points."sslkit.source_flags"]
    nifti = "sslkit_nifti.flags:FLAGS"

    # sslkit_nifti/flags.py
    FLAGS = {"spacing": "NIfTI: resample to this voxel spacing in mm."}

sslkit reads these dicts without importing any plugin (so ``sslkit pretrain --help``
stays fast), offers ``--spacing`` on the commands that take a source (``pretrain``,
``embed``, ``data inspect``) and as a top-level config key, and hands the value to the
source as its option ``spacing``: ``--window lung`` is ``--data-opt window=lung``. The
flags of a plugin switched off with ``SSLKIT_DISABLE_PLUGINS`` / ``SSLKIT_LOAD_PLUGINS``
are not offered, nor those of a plugin sure not to load (its module missing, or its
``sslkit_api`` range excluding this sslkit). A flag that would shadow one of sslkit's own
options is left out, with one warning line naming the plugin, and has no effect at all.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import click

GROUP = "sslkit.source_flags"


@dataclass(frozen=True)
class SourceFlag:
    """One declared flag: ``--field-name`` sets the source option ``field``.

    Several source plugins may declare the same option (``window`` of ``dicom`` and
    ``nifti``): ``helps`` holds each one's ``(plugin, help)``.
    """

    field: str
    helps: tuple[tuple[str, str], ...]
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def plugins(self) -> tuple[str, ...]:
        return tuple(plugin for plugin, _ in self.helps)

    @property
    def help(self) -> str:
        """``[dicom] help``; ``[dicom, nifti] help`` when they agree, else each plugin's own."""
        texts = dict.fromkeys(text for _, text in self.helps)
        if len(texts) == 1:
            return f"[{', '.join(self.plugins)}] {next(iter(texts))}"
        return " ".join(f"[{plugin}] {text}" for plugin, text in self.helps)

    def option(self) -> click.Option:
        """The click option (``None`` when not given, so the source's default applies)."""
        return click.Option([self.flag, self.field], default=None, metavar=None if self.choices else "TEXT",
                            type=click.Choice(self.choices) if self.choices else None, help=self.help)


def _warn(line: str) -> None:
    print(f"sslkit: {line}".replace("\n", " "), file=sys.stderr)


def _parse(plugin: str, declared: Any) -> list[SourceFlag]:
    if not isinstance(declared, Mapping):
        raise TypeError(f"expected a dict {{option: help}}, got {type(declared).__name__}")
    out = []
    for field, spec in declared.items():
        if not isinstance(field, str) or not field.isidentifier():
            raise TypeError(f"option name {field!r} is not an identifier")
        spec = {"help": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, Mapping) or not isinstance(spec.get("help"), str):
            raise TypeError(f"option {field!r}: expected a help string or {{'help': ..., 'choices': [...]}}")
        out.append(SourceFlag(field, ((plugin, spec["help"]),), tuple(str(c) for c in spec.get("choices") or ())))
    return out


@lru_cache(maxsize=8)
def _declared(allow: tuple[str, ...] | None, deny: tuple[str, ...]) -> tuple[SourceFlag, ...]:
    by_field: dict[str, SourceFlag] = {}
    plugins = {ep.name: ep for ep in entry_points(group="sslkit")}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if (allow is not None and ep.name not in allow) or ep.name in deny or _not_loadable(plugins.get(ep.name)):
            continue
        try:
            flags = _parse(ep.name, ep.load())
        except Exception as exc:  # a broken declaration must not take the command line down
            _warn(f"plugin {ep.name!r}: its {GROUP} entry ({ep.value}) is ignored: {type(exc).__name__}: {exc}")
            continue
        for f in flags:  # one flag per field; free text where any plugin takes free text (its own check stays)
            seen = by_field.get(f.field)
            choices = () if seen is None or not (seen.choices and f.choices) else seen.choices + f.choices
            by_field[f.field] = f if seen is None else SourceFlag(
                f.field, seen.helps + f.helps, tuple(dict.fromkeys(choices)))
    return tuple(by_field.values())


def _not_loadable(plugin: Any) -> bool:
    """Whether the ``sslkit`` entry point ``plugin`` is sure not to load, known without importing it: its
    module is not installed, or its source declares an ``sslkit_api`` range this sslkit is outside of."""
    from sslkit.plugin_api_range import module_file, range_problem, source_api_range

    if plugin is None or (plugin.dist is not None and (plugin.dist.metadata["Name"] or "").lower() == "sslkit"):
        return False  # flags without a plugin of that name, or sslkit's own
    return module_file(plugin.module) is None or range_problem(source_api_range(plugin.module)) is not None


def declared_flags() -> tuple[SourceFlag, ...]:
    """The flags of every enabled source plugin, by option name (read once per environment)."""
    from sslkit.plugins import _env_list as env_list  # the same switches as plugin loading

    allow = env_list("SSLKIT_LOAD_PLUGINS")
    return _declared(None if allow is None else tuple(allow), tuple(env_list("SSLKIT_DISABLE_PLUGINS") or ()))


def current_flags() -> tuple[SourceFlag, ...]:
    """The flags the running command offers (a flag that would shadow one of its own options is
    left out: it has no effect at all); outside a :class:`SourceFlagsCommand`, every declared one."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None and not isinstance(ctx.command, SourceFlagsCommand):
        ctx = ctx.parent
    return ctx.command.source_flags() if ctx is not None else declared_flags()


def flag_fields() -> set[str]:
    """The source option names that have a flag on the running command (and may be top-level config keys)."""
    return {f.field for f in current_flags()}


def flag_values(kw: dict[str, Any]) -> dict[str, Any]:
    """The source options set by flags among a command's parsed ``kw`` (unset ones left out)."""
    return {f.field: kw[f.field] for f in current_flags() if kw.get(f.field) is not None}


class SourceFlagsCommand(click.Command):
    """A click command that also takes the flags the enabled source plugins declare.

    The callback receives them as keyword arguments named after the source option;
    :func:`flag_values` picks them out.
    """

    #: (the declared flags, those offered here, their click options), for the current environment
    _extra: tuple[tuple[SourceFlag, ...], tuple[SourceFlag, ...], list[click.Option]] | None = None

    def _path(self) -> str:
        """``sslkit eval linear``: the command as typed below the program (its own name outside a context)."""
        names, ctx = [], click.get_current_context(silent=True)
        while ctx is not None and ctx.parent is not None:
            names.append(ctx.info_name)
            ctx = ctx.parent
        return "sslkit " + (" ".join(reversed(names)) or self.name)

    def source_flags(self) -> tuple[SourceFlag, ...]:
        """The declared flags this command offers: those shadowing none of its own options."""
        flags = declared_flags()
        if self._extra is None or self._extra[0] is not flags:
            taken = {name for p in self.params for name in (p.name, *getattr(p, "opts", ()))}
            offered = []
            for f in flags:
                if f.field in taken or f.flag in taken:
                    _warn(f"plugin {', '.join(map(repr, f.plugins))}: flag {f.flag} would shadow "
                          f"`{self._path()}`'s own option; use --data-opt {f.field}=VALUE")
                else:
                    offered.append(f)
            self._extra = (flags, tuple(offered), [f.option() for f in offered])
        return self._extra[1]

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        rest = super().get_params(ctx)[len(self.params):]  # the --help option stays last
        self.source_flags()
        return [*self.params, *self._extra[2], *rest]
