"""Run configuration: defaults < the task's engine defaults < a config file < the CLI.

A config file (TOML, or YAML when PyYAML is installed) takes every option name of
``sslkit pretrain`` at the top level (``-`` may stand for ``_``): the :class:`RunConfig`
fields, ``cache``, ``no_cache``, ``quiet`` and the flags that loaded source plugins
declare (``window = "lung"`` sets the source option ``window``, as ``--window`` does). The
repeatable ``--task-opt`` / ``--backbone-opt`` / ``--data-opt`` / ``--augment-opt`` are
tables instead, ``[task_options]``, ``[backbone_options]``, ``[source_options]`` and
``[augment_options]``::

    task = "simclr"
    data = "folder:/images"
    out = "runs/simclr1"
    batch_size = 256
    optimizer = "lars"
    base_lr = 0.3
    lr_scaling = "linear"

    [task_options]
    temperature = 0.2

A task class may carry ``engine_defaults`` (a dict of RunConfig fields, e.g. the
optimizer its paper used); they sit between the built-in defaults and the file.
``sslkit pretrain --print-config`` prints the result as a TOML file, each setting under
a comment with its help, that loads back to the same configuration. Task options are
resolved in full (every field of the task's ``Options`` with its default), so
``run.json`` records every value the run used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from sslkit.config_backbone import run_backbone
from sslkit.errors import UsageError, first_line, unknown_name_message
from sslkit.run import RESUMABLE_OVERRIDES, RUN_JSON, RunConfig

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
HINTS = typing.get_type_hints(RunConfig)
OPTION_GROUPS = ("backbone_options", "task_options", "source_options", "augment_options")
REQUIRED = ("task", "data", "out")


def defaults() -> dict[str, Any]:
    """RunConfig's built-in default for every field that has one."""
    out = {}
    for name, f in FIELDS.items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict of checked RunConfig values (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                         f"save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path.name} is YAML but PyYAML is not installed; pip install pyyaml "
                             f"or write the config as TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: invalid YAML: {first_line(exc)}") from None
    elif path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: invalid TOML: {exc}") from None
    else:
        raise UsageError(f"config file {path.name!r} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a table of settings")
    return check_values(data, str(path))


# Option names of ``sslkit pretrain`` that are not RunConfig fields, as config keys.
_ALIASES = {"cache": "cache_dir"}
_TABLES = {"task_opt": "task_options", "backbone_opt": "backbone_options", "data_opt": "source_options",
           "augment_opt": "augment_options"}
_COMMAND_ONLY = ("config", "config_file", "print_config")


def check_values(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Normalise keys (option names included) and check every value against RunConfig's types.

    ``cache``, ``no_cache`` and ``quiet`` map to the fields they set; a key named like a
    source plugin's flag (``window``) becomes that source option, over ``[source_options]``.
    """
    from sslkit.source_flags import flag_fields

    out: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = _ALIASES.get(name, name)
        if name in ("no_cache", "quiet"):
            if not isinstance(value, bool):
                raise UsageError(f"{origin}: {name} must be true or false, got {value!r}")
            if name == "quiet":
                out["progress"] = not value
            elif value:
                out["cache_dir"] = ""
        elif name in FIELDS:
            out[name] = _check_range(name, _check(name, value, HINTS[name], origin), origin)
        elif name in flag_fields():
            if not isinstance(value, (str, int, float, bool)):
                raise UsageError(f"{origin}: {name} must be a string or a number, got {value!r}")
            flags[name] = value
        elif name in _TABLES:
            raise UsageError(f"{origin}: {key!r} is a command-line option; in a config file write these "
                             f"options as a [{_TABLES[name]}] table of key = value")
        elif name in _COMMAND_ONLY:
            raise UsageError(f"{origin}: {key!r} is a command-line option only, not a setting")
        else:
            known = [*FIELDS, *_ALIASES, "no_cache", "quiet", *sorted(flag_fields())]
            raise UsageError(f"{origin}: " + unknown_name_message("setting", key, known, listed=len(known)))
    if flags:
        out["source_options"] = {**out.get("source_options", {}), **flags}
    return out


def _check(name: str, value: Any, hint: Any, origin: str) -> Any:
    def bad(expected: str) -> UsageError:
        return UsageError(f"{origin}: {name} must be {expected}, got {value!r}")

    origin_t, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_t in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin_t, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_t is typing.Literal:
        if value not in args:
            raise bad("one of " + ", ".join(map(str, args)))
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin_t is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} numbers")
        return tuple(_check(name, v, a, origin) for v, a in zip(value, args))
    if origin_t is dict:
        if not isinstance(value, dict):
            raise bad("a table of key = value")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    return value


#: what settings their type does not bound must be: seed (numpy's and torch's generators), momentum (SGD, LARS)
_RANGES = {"seed": (lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]"),
           "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
           "init": (lambda v: v is None or bool(str(v).strip()), "weights to start from, not empty")}


def _check_range(name: str, value: Any, origin: str) -> Any:
    if name == "backbone_options":  # what sslkit passes to every backbone factory itself (in_chans, ...)
        from sslkit.registry import check_backbone_options

        check_backbone_options(value)
    ok, expected = _RANGES.get(name, (None, ""))
    if ok is not None and not ok(value):
        raise UsageError(f"{origin}: {name} must be {expected}, got {value!r}")
    return value


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; option groups are merged key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in OPTION_GROUPS and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def _task_layer(values: dict[str, Any]) -> dict[str, Any]:
    """The task's ``engine_defaults``, with its ``token_engine_defaults`` over them when the
    backbone the run will build (``values`` or the task's default) is ViT-like."""
    from sslkit.registry import get_task, is_token_backbone_name

    task_cls = get_task(values["task"])
    engine = dict(getattr(task_cls, "engine_defaults", None) or {})
    token = getattr(task_cls, "token_engine_defaults", None)
    if token:
        size = values.get("image_size") or defaults()["image_size"]
        name, options = run_backbone(task_cls, {**values, "image_size": size})
        if is_token_backbone_name(name, values.get("channels") or 3, size, **options):
            engine.update(token)
    engine = check_values(engine, f"task {values['task']!r} engine_defaults")
    made_for = engine.get("optimizer", defaults()["optimizer"])
    chosen = values.get("optimizer")
    if chosen and chosen != made_for and "base_lr" in engine and not {"base_lr", "lr"} & values.keys():
        raise UsageError(f"the default base_lr of task {values['task']!r} ({engine['base_lr']:g}) is for {made_for}; "
                         f"with --optimizer {chosen} give --base-lr (or --lr) too")
    return engine


def _complete(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the backbone and every task option from the task's defaults (validated)."""
    from sslkit.options import build_options, to_dict
    from sslkit.registry import get_task

    task_cls = get_task(values["task"])
    values = dict(values)
    values["backbone"], values["backbone_options"] = run_backbone(task_cls, values)
    options = build_options(task_cls.Options, values.get("task_options") or {}, f"task {values['task']!r}")
    values["task_options"] = _plain(to_dict(options))
    return values


def _plain(obj: Any) -> Any:
    """Tuples to lists, so a config survives JSON and TOML unchanged."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def resolve(cli: dict[str, Any], config_file: str | None = None) -> RunConfig:
    """The RunConfig for ``sslkit pretrain``: defaults < task < file < ``cli`` (given options only)."""
    file_values = read_file(config_file) if config_file else {}
    cli = check_values(cli, "command line")
    given = merge(file_values, cli)
    if given.get("resume"):
        return resume_config(given)
    if given.get("task") and not given.get("out"):
        given["out"] = default_out(given["task"])
    missing = [k for k in REQUIRED if not given.get(k)]
    if missing:
        raise UsageError("missing " + ", ".join(f"--{k}" for k in missing) + " (on the command line or in --config)")
    values = merge(defaults(), _task_layer(given), given)
    if given.get("max_steps") is not None and "epochs" not in given:  # --max-steps alone sets the length
        values["epochs"] = None
    return RunConfig(**_complete(values))


def default_out(task: str, root: Path = Path("runs")) -> str:
    """The run directory of a run started without ``--out``: ``runs/<task>-<YYYYmmdd-HHMMSS>``
    (local time), with ``-2``, ``-3``, ... appended while that folder exists, so an earlier
    run is never reused. Under torchrun every process must name the same folder: refused."""
    import os
    import time

    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise UsageError("--out is required under torchrun (every process must name the same run directory)")
    base = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return str(root / name)


def resume_config(given: dict[str, Any]) -> RunConfig:
    """The saved config of run ``given["out"]``; only settings that keep the run exact may change."""
    out = given.get("out")
    if not out:
        raise UsageError("--resume needs the run directory: --resume RUN_DIR")
    file = Path(out) / RUN_JSON
    if not file.is_file():
        raise UsageError(f"--resume: {out!r} holds no sslkit run to continue (no {RUN_JSON})")
    try:
        saved = json.loads(file.read_text())["config"]
    except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bytes that are not UTF-8
        saved = None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {file} is not a readable sslkit run.json")
    saved = check_values({k: v for k, v in saved.items() if k in FIELDS}, str(file))
    _fill_legacy_options(saved)
    for key, value in given.items():
        if key in RESUMABLE_OVERRIDES:
            continue
        now = saved.get(key)
        if key in OPTION_GROUPS:
            now = {k: now.get(k) for k in value} if isinstance(now, dict) else now
        if _plain(value) != _plain(now):
            raise UsageError(
                f"--resume continues the run exactly as it was configured: {key} was {_plain(now)!r}, "
                f"not {_plain(value)!r}; start a new run to change it"
            )
    values = {**saved, **{k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES}}
    values.update(resume=True, overwrite=False, out=out,
                  allow_data_change=bool(given.get("allow_data_change")))  # per resume, never inherited
    return RunConfig(**values)


def _fill_legacy_options(saved: dict[str, Any]) -> None:
    """Options the task gained after ``saved`` was recorded take the values that run used
    (``Task.legacy_option_values``), so it resumes exactly as it started."""
    from sslkit.registry import get_task

    legacy = getattr(get_task(saved["task"]), "legacy_option_values", None) or {}
    if legacy:
        saved["task_options"] = {**legacy, **(saved.get("task_options") or {})}


def print_config(cli: dict[str, Any], config_file: str | None = None) -> str:
    """TOML of the resolved config for the task (and backbone) given; loads back unchanged."""
    file_values = read_file(config_file) if config_file else {}
    given = merge(file_values, check_values(cli, "command line"))
    given.pop("resume", None)
    if not given.get("task"):
        raise UsageError("--print-config needs --task (on the command line or in --config)")
    values = _complete(merge(defaults(), _task_layer(given), given))
    if given.get("max_steps") is not None and "epochs" not in given:  # as resolve(): --max-steps alone
        values["epochs"] = None
    ordered = {k: values.get(k) for k in (*REQUIRED, *FIELDS) if k not in ("resume", "overwrite")}
    from sslkit.config_toml import setting_help, to_toml

    return to_toml(ordered, setting_help(values))


# --- the command line -------------------------------------------------------------------
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
    for name in given:
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

                out.update(auto_resume(kw.get("out") if "out" in given else None))
                continue
            out["resume"] = True
            if value:  # --resume RUN_DIR (bare --resume continues --out)
                if kw.get("out") and "out" in given and Path(kw["out"]) != Path(value):
                    raise UsageError(f"--resume {value!r} and --out {kw['out']!r} name different runs; give one")
                out["out"] = value
        elif name in FIELDS:
            out[name] = value
    return out
