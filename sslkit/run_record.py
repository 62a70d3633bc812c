"""Parts of a run's record (``run.json``, ``config.toml``) that say how to repeat it: the settings
without the per-session flags, their hash, the command line as a shell takes it back, the
launcher, and the run folder's ``config.toml``."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

CONFIG_TOML = "config.toml"
#: the first line of the ``config.toml`` sslkit writes (a file without it is the user's, never replaced)
CONFIG_MARK = ("# sslkit: the resolved settings of the run in this folder; rerun it: "
               "sslkit pretrain --config THIS_FILE --out NEW_DIR")
#: settings of one session, not of the run: never in run.json's config, config.toml or the config hash
SESSION_ONLY = ("resume", "overwrite", "allow_data_change")


def recorded_config(config: dict[str, Any]) -> dict[str, Any]:
    """``RunConfig.to_dict()`` as ``run.json`` records it: without :data:`SESSION_ONLY` (a copy then
    starts a new run wherever it is used, not a resume)."""
    return {k: v for k, v in config.items() if k not in SESSION_ONLY}


def split_data(data: str) -> tuple[str, str]:
    """``--data`` as ``(scheme, location)``; ``""`` for a bare path (or one with a drive letter)."""
    scheme, sep, where = data.partition(":")
    return (scheme, where) if sep and len(scheme) > 1 else ("", data)


def located(data: str | None) -> str | None:
    """``--data`` with its location made absolute where it names an existing relative path
    (``folder:img`` -> ``folder:/work/img``, a bare ``img`` -> ``/work/img``): the same data
    whatever folder a config file is later used from. Other text is returned as it is."""
    if not data:
        return data
    scheme, where = split_data(data)
    if not where or os.path.isabs(os.path.expanduser(where)) or not os.path.exists(where):
        return data
    return f"{scheme}:{os.path.abspath(where)}" if scheme else os.path.abspath(where)


def _rerun_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that repeat a run from any folder, what ``config.toml`` holds and
    :func:`config_sha256` hashes: :func:`recorded_config` without ``out``, the data's location
    absolute (:func:`located`)."""
    kept = {k: v for k, v in recorded_config(config).items() if k != "out"}
    if "data" in kept:
        kept["data"] = located(kept["data"])
    return kept


def config_sha256(config: dict[str, Any]) -> str:
    """The SHA-256 of a run's resolved settings: ``run.json``'s ``config`` without ``out`` and
    :data:`SESSION_ONLY`, the data's location absolute (:func:`_rerun_settings`), as JSON with sorted
    keys and no spaces (the same settings in any folder give the same hash)."""
    text = json.dumps(_rerun_settings(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def command(argv: list[str] | None = None) -> str | None:
    """The command line, quoted so a shell takes it back (``shlex.join``); the program is ``sslkit``
    whether started so, as ``python -m sslkit`` or by torchrun (``-m sslkit``)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return None
    program = Path(argv[0]).name
    ours = program == "sslkit" or (program == "__main__.py" and Path(argv[0]).parent.name == "sslkit")
    return shlex.join(["sslkit" if ours else program, *argv[1:]])


def launcher() -> dict[str, Any] | None:
    """torchrun's (torch.distributed.elastic's) settings of this process group, else None."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and "LOCAL_WORLD_SIZE" not in env:
        return None

    def number(name: str) -> int | None:
        return int(env[name]) if env.get(name, "").isdigit() else None

    world, local = number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE")
    nnodes = number("GROUP_WORLD_SIZE") or (world // local if world and local and world % local == 0 else None)
    return {"name": "torchrun", "world_size": world, "local_world_size": local, "nnodes": nnodes,
            "restart_count": number("TORCHELASTIC_RESTART_COUNT")}


def is_own_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.toml`` sslkit wrote (its first line is :data:`CONFIG_MARK`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == CONFIG_MARK
    except OSError:
        return False


def write_config_toml(out: Path, config: dict[str, Any], last: str | None = None) -> tuple[str | None, str | None]:
    """Write ``out/config.toml``: the run's resolved settings (``run.json``'s ``config`` without ``out``,
    the data's location absolute), which ``sslkit pretrain --config`` loads back to the same run from any
    folder. A ``config.toml`` of the user's, or sslkit's edited since it was written (its sha256 is not
    ``last``, the one run.json recorded), is kept. Returns ``(why nothing was written, the sha256 of
    the file sslkit's record now names)``."""
    from sslkit.config_toml import setting_help, source_options_of, to_toml
    from sslkit.config_values import FIELDS, REQUIRED
    from sslkit.errors import UsageError
    from sslkit.output_file import file_sha256, write_text_atomic

    file = Path(out) / CONFIG_TOML
    if file.exists():
        if not is_own_config(file):
            return f"{file} is not sslkit's: kept, not replaced (the run's settings are in run.json)", None
        if last is not None and file_sha256([file]) != last:
            return (f"{file} was edited since sslkit wrote it: kept, not replaced (the run's settings are in "
                    f"run.json)", last)
    kept = _rerun_settings(config)
    values = {k: kept[k] for k in (*REQUIRED, *FIELDS) if k in kept}  # in a config file's order
    values.setdefault("data", None)
    try:
        try:
            notes = setting_help(values, source_options_of(values.get("data")))
        except UsageError:
            notes = {}
        text = to_toml(values, notes)
    except UsageError as exc:  # a value TOML cannot hold: run.json still has it
        return f"{CONFIG_TOML} not written: {exc}", None
    write_text_atomic(file, CONFIG_MARK + "\n" + text, overwrite=True)
    return None, file_sha256([file])


def with_legacy_options(path: Path, file_values: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """``file_values`` (read from the ``--config`` file ``path``) with each option its run's task or source
    gained since sslkit wrote the file at the value that run used (as ``--resume`` does:
    :func:`sslkit.config_resume.fill_legacy_options`), so the file reruns its run as its first line
    promises; one note on stderr names them. Only a file of sslkit's (:func:`is_own_config`), for its own
    task: a task option it lacks is one the task gained (such a file lists every task option, defaults
    included). Its source options are those given only, so one it lacks is told gained only by the run.json
    beside it that names this file by its sha256 (its ``source_options_resolved``), and for the same
    source; else they keep today's defaults. A user's file is returned as it is."""
    from sslkit.config_resume import fill_legacy_options
    from sslkit.config_values import OPTION_GROUPS

    task = file_values.get("task")
    if not task or cli.get("task", task) != task or not is_own_config(path):
        return file_values
    info = _run_beside(path)
    if info is not None and "data" in cli and not _same_source(cli["data"], file_values.get("data")):
        info = None
    values = {**file_values, **{k: dict(file_values[k]) for k in OPTION_GROUPS if isinstance(file_values.get(k), dict)}}
    filled = fill_legacy_options(values, info)
    if not filled:
        return file_values
    shown = ", ".join(f"{name} = {values[name.split('.')[0]][name.split('.')[1]]!r}" for name in filled)
    print(f"note: {path} was written before {'this option' if len(filled) == 1 else 'these options'} existed; "
          f"using the value its run had, as --resume does: {shown}", file=sys.stderr)
    return values


def _run_beside(path: Path) -> dict[str, Any] | None:
    """The ``run.json`` beside ``path`` where its ``config_toml_sha256`` names that very file, else None."""
    from sslkit.output_file import read_json
    from sslkit.run import RUN_JSON

    info = read_json(Path(path).parent / RUN_JSON)  # {}: none there, or not a JSON object
    return info if names_config(info, Path(path)) else None


def names_config(info: dict[str, Any], file: Path) -> bool:
    """Whether run.json's ``info`` names ``file`` by its ``config_toml_sha256`` (the config.toml written
    with that run, unedited); False where it records none or the file cannot be read."""
    from sslkit.output_file import file_sha256

    try:
        return bool(info.get("config_toml_sha256")) and file_sha256([file]) == info["config_toml_sha256"]
    except OSError:
        return False


def _same_source(data: Any, recorded: Any) -> bool:
    """Whether ``--data`` ``data`` is read by the source that read ``recorded``."""
    from sslkit.config_toml import source_options_of
    from sslkit.errors import UsageError

    try:
        return source_options_of(data)[0] == source_options_of(recorded)[0]
    except UsageError:  # an unknown scheme: the run says so
        return False
