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
a comment with its help, that loads back to the same configuration; what the task chose
rather than the user (the backbone fitted to the image size, the engine and optimizer defaults)
is written commented out, so that the file used at another image size or optimizer chooses it
again (:func:`_chosen`). Task options are resolved in full (every field of the task's ``Options`` with its default), so
``run.json`` records every value the run used.

This module reads the file and merges the layers (:func:`resolve`, :func:`print_config`);
the parts beside it: :mod:`sslkit.config_values` (the fields, their defaults and the check
of every value), :mod:`sslkit.config_cli` (the options given on the command line),
:mod:`sslkit.config_resume` (``--resume``: the config a run recorded),
:mod:`sslkit.config_backbone` (the backbone a run builds) and :mod:`sslkit.config_toml`
(``--print-config``'s TOML).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from sslkit.config_backbone import run_backbone
from sslkit.config_cli import cli_values  # noqa: F401 (re-exported)
from sslkit.config_resume import resume_config
from sslkit.config_values import FIELDS, OPTION_GROUPS, REQUIRED, check_values, defaults, plain
from sslkit.errors import UsageError, first_line
from sslkit.run import RunConfig
from sslkit.preempt import in_group
from sslkit.sample_modes import PLANAR_SIZES, check_planar_sizes


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict of checked RunConfig values (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a FIFO, /dev/zero, a socket: never read (it could block or never end)
            raise UsageError(f"config file {str(path)!r} is not a regular file")
        raise UsageError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                         f"save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise UsageError(f"config file {path.name!r} must end in .toml, .yaml or .yml")
    kind = "TOML" if suffix == ".toml" else "YAML"
    try:
        data = _parse_toml(path, text) if kind == "TOML" else _parse_yaml(path, text)
    except (RecursionError, MemoryError):  # [[[[...]]]] 100,000 deep: the parsers recurse
        raise UsageError(f"{path}: invalid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a table of settings")
    return check_values(data, str(path))


def _parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {first_line(exc)}") from None
    except ValueError:  # Python's own words name sys.set_int_max_str_digits(), no help to a CLI user
        raise UsageError(f"{path}: invalid TOML: an integer of more than 4300 digits") from None


def _parse_yaml(path: Path, text: str) -> Any:
    """The YAML file's data, read with PyYAML's safe loader that also refuses aliases (``*name``): a
    config needs none, and nine nested aliases expand to 9**9 values (a "billion laughs")."""
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{path.name} is YAML but PyYAML is not installed; pip install pyyaml "
                         f"or write the config as TOML") from None

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise UsageError(f"{path}: line {line}: the config file uses YAML aliases (&/*), which sslkit "
                                 f"does not read; write the value out")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliasLoader) or {}  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {first_line(exc)}") from None
    except ValueError:  # an integer of more than 4300 digits (Python's words name sys.set_int_max_str_digits())
        raise UsageError(f"{path}: invalid YAML: an integer of more than 4300 digits") from None


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
    """The task's ``engine_defaults``, with its ``backbone_engine_defaults`` over them for the
    backbone the run will build (``values`` or the task's default; e.g. ``token_engine_defaults``
    when it is ViT-like)."""
    from sslkit.registry import get_task, meta_backbone
    from sslkit.task import Task

    task_cls = get_task(values["task"])
    engine = dict(getattr(task_cls, "engine_defaults", None) or {})
    own = getattr(task_cls, "backbone_engine_defaults", Task.backbone_engine_defaults).__func__
    if getattr(task_cls, "token_engine_defaults", None) or own is not Task.backbone_engine_defaults.__func__:
        size = values.get("image_size") or defaults()["image_size"]
        name, options = run_backbone(task_cls, {**values, "image_size": size})
        engine.update(task_cls.backbone_engine_defaults(meta_backbone(name, values.get("channels") or 3, size,
                                                                      **options)) or {})
    engine = check_values(engine, f"task {values['task']!r} engine_defaults")
    made_for = engine.get("optimizer", defaults()["optimizer"])
    chosen = values.get("optimizer")
    if chosen and chosen != made_for:
        if "base_lr" in engine and not {"base_lr", "lr"} & values.keys():
            raise UsageError(f"the default base_lr of task {values['task']!r} ({engine['base_lr']:g}) is for "
                             f"{made_for}; with --optimizer {chosen} give --base-lr (or --lr) too")
        engine.update(OPTIMIZER_DEFAULTS[chosen])  # the task's weight decay and LR rule were for made_for
    return engine


#: an optimizer's own weight decay and LR scaling rule, used when ``--optimizer`` is not the task's:
#: AdamW's as the engine's defaults; LARS's as SimCLR's (1e-6, √(batch/256) for small batches);
#: SGD's as MoCo v2's and torchvision's ImageNet recipes (1e-4, linear)
OPTIMIZER_DEFAULTS = {"adamw": {"weight_decay": 0.05, "lr_scaling": "linear"},
                      "lars": {"weight_decay": 1e-6, "lr_scaling": "sqrt"},
                      "sgd": {"weight_decay": 1e-4, "lr_scaling": "linear"}}


def _lr_layers(file_values: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """``--lr`` is the LR as is; ``--base-lr`` and ``--lr-scaling`` make it. Both on the command
    line: refused. ``--base-lr`` or ``--lr-scaling`` on the command line over a file's ``lr``: the
    command line wins (the file's ``lr`` is dropped, said on stderr); it was silently ignored."""
    rule = sorted(k for k in ("base_lr", "lr_scaling") if k in cli)
    if "lr" in cli and rule:
        raise UsageError(f"--lr is the learning rate as is; {' and '.join('--' + k.replace('_', '-') for k in rule)} "
                         f"would be ignored: give --lr, or --base-lr with --lr-scaling")
    if rule and "lr" in file_values:
        import sys

        print(f"note: {' and '.join('--' + k.replace('_', '-') for k in rule)} on the command line "
              f"{'replace' if len(rule) > 1 else 'replaces'} the config file's lr = {file_values['lr']:g}",
              file=sys.stderr)
        return {k: v for k, v in file_values.items() if k != "lr"}
    return file_values


def _complete(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the backbone and every task option from the task's defaults (validated)."""
    from sslkit.options import build_options, to_dict
    from sslkit.registry import get_task

    task_cls = get_task(values["task"])
    values = dict(values)
    values["backbone"], values["backbone_options"] = run_backbone(task_cls, values)
    options = build_options(task_cls.Options, values.get("task_options") or {}, f"task {values['task']!r}")
    values["task_options"] = plain(to_dict(options))
    return values


def _given(cli: dict[str, Any], config_file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config file's settings (none without one) and the settings given: the file's under the
    command line's, both checked."""
    file_values = read_file(config_file) if config_file else {}
    cli = check_values(cli, "command line")
    if config_file:  # a run's config.toml written before its task or source gained an option: that run's value
        from sslkit.run_record import with_legacy_options

        file_values = with_legacy_options(Path(config_file), file_values, cli)
    return file_values, merge(_lr_layers(file_values, cli), cli)


def _check_sizes(cli: dict[str, Any], file_values: dict[str, Any], config_file: str | None,
                 base: dict[str, Any], values: dict[str, Any]) -> None:
    """A 2D sample's side (:data:`~sslkit.sample_modes.PLANAR_SIZES`) on a volume run: refused on the
    command line (:func:`~sslkit.sample_modes.check_planar_sizes`), and in the config file where it is
    not the value the run has without it (``base``, the defaults and the task's): the file's would be
    dropped silently. The default is kept: sslkit writes it in every ``--print-config`` and run
    ``config.toml``, which load back for volume runs."""
    data, options = values.get("data"), values.get("source_options") or {}
    check_planar_sizes(cli, data, options)
    dropped = {k: file_values[k] for k in PLANAR_SIZES
               if k in file_values and k not in cli and file_values[k] != base.get(k)}
    if not dropped:
        return
    try:
        check_planar_sizes(dropped, data, options)  # raises only where the source gives volumes
    except UsageError:
        keys = " and ".join(dropped)
        raise UsageError(f"{config_file}: {', '.join(f'{k} = {v}' for k, v in dropped.items())} "
                         f"{'sets' if len(dropped) == 1 else 'set'} the side of 2D samples; a --sample volume "
                         f"run's samples are --volume-size D,H,W voxels: drop {keys}") from None


def resolve(cli: dict[str, Any], config_file: str | None = None) -> RunConfig:
    """The RunConfig for ``sslkit pretrain``: defaults < task < file < ``cli`` (given options only)."""
    file_values, given = _given(cli, config_file)
    if given.get("resume"):
        return resume_config(given)
    missing = [k for k in REQUIRED if not given.get(k) and not (k == "out" and given.get("task"))]
    if missing:
        raise UsageError("missing " + ", ".join(f"--{k}" for k in missing) + " (on the command line or in --config)")
    base = merge(defaults(), _task_layer(given))
    values = merge(base, given)
    if given.get("max_steps") is not None and "epochs" not in given:  # --max-steps alone sets the length
        values["epochs"] = None
    _check_sizes(cli, file_values, config_file, base, values)  # a 2D side for volumes
    cfg = RunConfig(**_complete({**values, "out": values.get("out") or "-"}))
    if given.get("out"):
        return cfg
    import dataclasses  # no --out: the folder is made only once everything else is known to be right

    return dataclasses.replace(cfg, out=default_out(cfg.task))


#: the run folders :func:`default_out` made in this process (``sslkit pretrain`` removes one again when
#: its run fails before writing anything; a folder the user named is never removed)
MADE_RUN_DIRS: set[str] = set()


def default_out(task: str, root: Path = Path("runs")) -> str:
    """The run directory of a run started without ``--out``: ``runs/<task>-<YYYYmmdd-HHMMSS>``
    (local time), with ``-2``, ``-3``, ... appended while that folder exists, so an earlier
    run is never reused. The folder is made here, empty, so two runs started in the same second
    (array jobs) take two folders. Under torchrun every process must name the same folder: refused."""
    import os
    import time

    if in_group():
        raise UsageError("--out is required under torchrun (every process must name the same run directory)")
    base = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / name).mkdir()
                MADE_RUN_DIRS.add(str(root / name))
                return str(root / name)
            except FileExistsError:  # an earlier run's, or a run started beside this one
                n += 1
                name = f"{base}-{n}"
    except OSError as exc:
        raise UsageError(f"cannot make the run directory under {str(root)!r}: {first_line(exc)}; "
                         f"give --out") from None


def print_config(cli: dict[str, Any], config_file: str | None = None) -> str:
    """TOML of the resolved config for the task (and backbone) given; loads back unchanged."""
    file_values, given = _given(cli, config_file)
    if given.pop("resume", None):  # the task's defaults with out = RUN would pass for the run's own settings
        from sslkit.run_record import CONFIG_TOML

        run = Path(given.get("out") or "RUN_DIR")
        raise UsageError(f"--print-config prints a new run's settings, not those of run {str(run)!r} (--resume): "
                         f"they are in {str(run / CONFIG_TOML)!r}; print them with --config "
                         f"{run / CONFIG_TOML} --print-config")
    if not given.get("task"):
        raise UsageError("--print-config needs --task (on the command line or in --config)")
    layer = _task_layer(given)
    values = _complete(merge(defaults(), layer, given))
    if given.get("max_steps") is not None and "epochs" not in given:  # as resolve(): --max-steps alone
        values["epochs"] = None
    _check_sizes(cli, file_values, config_file, merge(defaults(), layer), values)
    _check_printed(values)
    from sslkit.run_record import SESSION_ONLY  # a per-session flag in a printed file would act on every later run

    ordered = {k: values.get(k) for k in (*REQUIRED, *FIELDS) if k not in SESSION_ONLY}
    from sslkit.config_toml import setting_help, source_options_of, to_toml, unset_source_options

    source = source_options_of(values.get("data"))  # once: a bare path is sniffed
    unset = unset_source_options(source, values.get("source_options") or {})
    return to_toml(ordered, setting_help(values, source), {"source_options": unset},
                   chosen=_chosen(given, layer, values))


#: the settings a task's engine defaults (and another optimizer's, :data:`OPTIMIZER_DEFAULTS`) choose
REFITTED = ("optimizer", "base_lr", "lr_scaling", "weight_decay")


def _chosen(given: dict[str, Any], layer: dict[str, Any], values: dict[str, Any]) -> set[str]:
    """The settings ``--print-config`` writes commented out (with their value): those the task chose and
    the user did not give, which depend on the image size, the backbone or the optimizer (the backbone
    and the options fitted to it, the engine defaults, the optimizer's weight decay and LR rule). Left
    commented, a file used with another ``--image-size`` or ``--optimizer`` chooses them again, as a run
    without the file would; set, they would override that choice silently."""
    from sslkit.registry import get_task

    task_cls = get_task(values["task"])
    engine_keys = {*REFITTED, *layer}
    for name in ("engine_defaults", "token_engine_defaults"):  # what another backbone would take
        engine_keys.update(getattr(task_cls, name, None) or {})
    chosen = {k for k in engine_keys if k in FIELDS and k not in given}
    if "backbone" not in given:
        chosen.add("backbone")
    mine = given.get("backbone_options") or {}
    chosen.update(f"backbone_options.{k}" for k in values.get("backbone_options") or {} if k not in mine)
    return chosen


def _check_printed(values: dict[str, Any]) -> None:
    """Refuse, in the run's own line, what the run refuses of these settings before decoding: its own
    checks (:mod:`sslkit.engine.model_setup`: ``--precision fp16`` on ``--device cpu``, ``--cache-size``,
    ``--allow-download``, the sample's memory, the task/backbone pairing and image size, the batch,
    ``--augment-opt``, ``--channels-last``) on the probes it builds
    (no image is read, nor the ``--init`` weights), so the printed file loads back and runs."""
    import dataclasses

    from sslkit.engine.model_setup import (check_cache_size, check_channels_last, check_pairing, check_precision,
                                           check_sample_memory, with_init_flags)

    cfg = RunConfig(**{**values, "data": values.get("data") or "", "out": values.get("out") or "-"})
    if cfg.device == "cpu":  # "auto" and "cuda" are the machine's that runs it, not known here
        check_precision(cfg.precision, "cpu")
    check_cache_size(cfg)
    with_init_flags(cfg)  # refuses --allow-download without --init
    data = _probe_data(cfg)
    if data is None:
        return
    cfg = dataclasses.replace(cfg, data=data, init=None, init_freeze_steps=None, init_lr_scale=None,
                              layer_decay=None)  # the continued-pretraining flags go with --init
    check_sample_memory(cfg)
    check_channels_last(cfg, check_pairing(cfg.backbone, cfg))


def _probe_data(cfg: RunConfig) -> str | None:
    """The ``--data`` the checks plan the samples from: ``cfg.data`` where its source can be made (from
    its options, no file read; one that is there but refuses them: the run's line), ``""`` (2D samples,
    every source's default) with none or one not there yet, None where that one's options name a sample
    mode (a volume's size is then the source's, unknown here)."""
    from sslkit.config_toml import source_options_of
    from sslkit.engine.model_setup import planned_volume
    from sslkit.registry import resolve_data
    from sslkit.sample_modes import SAMPLE_OPTIONS

    if not cfg.data:
        return ""
    try:
        planned_volume(cfg)
        return cfg.data
    except UsageError:
        scheme = source_options_of(cfg.data)[0]  # an unknown scheme: the run's line
        if scheme and Path(resolve_data(cfg.data)[1]).exists():
            raise
    return None if set(cfg.source_options) & set(SAMPLE_OPTIONS) else ""
