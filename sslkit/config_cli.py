"""The options of ``sslkit pretrain`` as RunConfig values (:func:`cli_values`): only the
options the user actually gave, so that they override the task's defaults and a config
file and nothing else (:func:`sslkit.config.resolve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.config_values import ALIASES, FIELDS, SETS
from sslkit.errors import UsageError

# CLI options whose name differs from the RunConfig field they set.
_CLI_ONLY = {"config_file", "print_config"}


def cli_values(kw: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """RunConfig values from the options of ``sslkit pretrain`` the user actually gave.

    Options named like a RunConfig field map to it directly, so a new option only needs
    a field of the same name.
    """
    from sslkit.options import parse_pairs, parse_values
    from sslkit.source_flags import flag_fields

    out: dict[str, Any] = {}
    _refuse_two_for_one_field(kw, given)
    for name in sorted(given):
        value = kw[name]
        if name in _CLI_ONLY:
            continue
        if name == "task_opts":
            out["task_options"] = parse_pairs(value, "--task-opt")
        elif name == "backbone_opts":
            out["backbone_options"] = parse_values(parse_pairs(value, "--backbone-opt"))
        elif name == "data_opts":
            out["source_options"] = {**parse_pairs(value, "--data-opt"), **out.get("source_options", {})}
        elif name in flag_fields():  # a source option with its own flag (from a source plugin)
            out["source_options"] = {**out.get("source_options", {}), name: value}
        elif name == "augment_opts":
            out["augment_options"] = parse_pairs(value, "--augment-opt")
        elif name == "no_cache":
            out["cache_dir"] = ""
        elif name == "quiet":
            out["progress"] = not value
        elif name == "channels":
            out["channels"] = int(value) if value else None
        elif name == "resume":
            if kw.get("overwrite"):
                raise UsageError("--resume continues a run and --overwrite replaces it; give one of them")
            if value == "auto":  # resume when --out holds a checkpoint, else start (sslkit.run.auto_resume)
                from sslkit.run import auto_resume

                got = auto_resume(kw.get("out") if "out" in given else _file_out(kw.get("config_file")))
                out.update(got)
                if not got.get("resume"):  # it starts: --allow-data-change waits for the requeue that resumes
                    out.pop("allow_data_change", None)  # (sorted: set above)
                continue
            out["resume"] = True
            if value:  # --resume RUN_DIR (bare --resume continues --out)
                if kw.get("out") and "out" in given and Path(kw["out"]) != Path(value):
                    raise UsageError(f"--resume {value!r} and --out {kw['out']!r} name different runs; give one")
                out["out"] = value
        elif name in FIELDS:
            out[name] = value
    return out


def _refuse_two_for_one_field(kw: dict[str, Any], given: set[str]) -> None:
    """``--cache DIR --no-cache`` set one field twice: which won depended on a set's order (the hash
    seed), so the same command did or did not use the disk cache. Refused in one line."""
    by_field: dict[str, str] = {}
    for name in sorted(given):
        field = SETS.get(name, name if name in FIELDS else None)
        if name == "no_cache" and not kw[name]:
            continue
        if field in by_field:
            option = {v: k for k, v in ALIASES.items()}  # cache_dir is --cache
            flags = sorted(f"--{option.get(n, n).replace('_', '-')}" for n in (by_field[field], name))
            raise UsageError(f"{flags[0]} and {flags[1]} both set {field}; give one of them")
        if field is not None:
            by_field[field] = name


def _file_out(config_file: str | None) -> str | None:
    """The ``out`` of the ``--config`` file (None without one): ``--resume auto`` continues that run
    when the command line names none, as the run itself would be written there."""
    if not config_file:
        return None
    from sslkit.config import read_file

    return read_file(config_file).get("out")
