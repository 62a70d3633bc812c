"""``--resume``: the augmentation a run recorded (``run.json``'s ``views``,
:func:`sslkit.views.views_record`) against the one this session builds. A task's recipe that
changed since the run started (a default retuned) would train the remaining steps on other views
and leave run.json claiming them for the whole run; :func:`check_resumed_views` refuses that in
one line, naming what differs and, where ``--augment-opt`` restores it, the flags that do. A resume
given ``--augment-opt`` is held to the record before any image is decoded
(:func:`check_views_before_decoding`): its views are built from the task and run.json's input spec."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sslkit.errors import UsageError
from sslkit.output_file import read_json
from sslkit.run import RUN_JSON
from sslkit.views import views_record

#: the views record of a --compile run before views_record looked through the compile wrapper: no recipes
COMPILED_ONLY = ({".": {"class": "CompiledOrEager"}}, {".": {"class": "OptimizedModule"}})
#: the most field changes a refusal names (the rest are counted)
SHOWN_CHANGES = 4


def check_resumed_views(cfg: Any, augment: Any) -> None:
    """On a resume of ``cfg.out``: nothing when its ``views`` record equals ``augment``'s; a note
    when run.json has none (a run before views were recorded: today's are used); else a
    :class:`UsageError` naming the differences and how to continue exactly, or that it cannot."""
    info = read_json(Path(cfg.out) / RUN_JSON)
    if not info:  # the resume's config read it; a file gone since is the run's own error
        return
    recorded = info.get("views")
    if recorded is None or recorded in COMPILED_ONLY:
        why = "run.json before views records" if recorded is None else "a --compile run recorded its wrapper alone"
        print(f"sslkit: note: this run's augmentation was not recorded ({why}); its remaining steps use today's "
              f"{cfg.task} views", file=sys.stderr)
        return
    now = views_record(augment)
    if recorded == now:
        return
    changes, structural = view_changes(recorded, now)
    what = f"{cfg.task}'s augmentation changed since this run started ({described(changes, structural)})"
    flags = None if structural else restoring_flags(cfg, augment, changes, recorded)
    if flags is not None:
        raise UsageError(f"{what}; to continue it exactly: {flags}")
    raise UsageError(f"{what}; this sslkit cannot continue it exactly: start a new run (or resume it with the "
                     f"sslkit it was started with)")


def check_views_before_decoding(cfg: Any, info: dict[str, Any]) -> None:
    """:func:`check_resumed_views` on the views a resume of ``cfg.out`` (run.json ``info``) will build: the
    task around a backbone of the recorded input spec (``info["input_spec"]``, which the resume keeps), so that
    an ``--augment-opt`` changing the recorded views is refused before the data is decoded. Without a usable
    spec, or where the model cannot be built (the run's own checks say why, in their words), nothing here:
    the views check after decoding stays."""
    import dataclasses

    import torch

    from sslkit.engine.model_setup import create_model, views_on_device, with_backbone
    from sslkit.spec import InputSpec

    try:
        spec = InputSpec.from_dict(info["input_spec"])
    except (KeyError, TypeError, ValueError, AttributeError):  # a run.json before input specs, or a damaged one
        return
    cfg = with_backbone(cfg)
    with torch.random.fork_rng(devices=[]):  # the run's own model must not depend on this one
        try:  # the run's own model builder, without its --init weights (the views do not depend on them)
            _, task = create_model(dataclasses.replace(cfg, init=None), cfg.backbone, spec)
        except UsageError:
            return
        augment = views_on_device(cfg, task, spec, torch.device("cpu"))  # a bad --augment-opt: its one line
    check_resumed_views(cfg, augment)


def _holders(record: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``(module path, attribute) -> [recipe fields, ...]`` of a views record."""
    out = {}
    for path, entry in record.items():
        for name, value in (entry.items() if isinstance(entry, dict) else ()):
            if name != "class":
                out[(path, name)] = value if isinstance(value, list) else [value]
    return out


def _recipes(record: dict[str, Any]) -> list[Any]:
    """Every recipe of a views record, in module order (the engine's wrapper's path left out)."""
    return [r for _, value in sorted(_holders(record).items(), key=lambda kv: kv[0][0].count(".")) for r in value]


def view_changes(recorded: dict[str, Any], now: dict[str, Any]) -> tuple[list[tuple], list[str]]:
    """The differences of two views records: ``[(label, field, recorded, now)]`` of recipes in both,
    and the structural ones (a module, class, recipe or field one side lacks) as phrases."""
    structural = [f"{p or '.'}: {recorded.get(p, {}).get('class', 'none')} -> {now.get(p, {}).get('class', 'none')}"
                  for p in sorted(set(recorded) | set(now))
                  if not isinstance(recorded.get(p), dict) or not isinstance(now.get(p), dict)
                  or recorded[p].get("class") != now[p].get("class")]
    old, new = _holders(recorded), _holders(now)
    single = len(set(old) | set(new)) == 1
    changes = []
    for key in sorted(set(old) | set(new)):
        where = "view" if single else f"{key[1]} view" if key[0] == "." else f"{key[0]}.{key[1]} view"
        a, b = old.get(key, []), new.get(key, [])
        if len(a) != len(b):
            structural.append(f"{len(a)} -> {len(b)} {where}s")
            continue
        for i, (ra, rb) in enumerate(zip(a, b), 1):
            if not isinstance(ra, dict) or not isinstance(rb, dict) or ra.keys() != rb.keys():
                structural.append(f"the fields of {where} {i}")
                continue
            changes += [(f"{where} {i}", f, ra[f], rb[f]) for f in ra if ra[f] != rb[f]]
    return changes, structural


def _value(v: Any) -> str:
    """A recorded field value as ``--augment-opt`` takes it."""
    if isinstance(v, list):
        return ",".join(map(_value, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def described(changes: list[tuple], structural: list[str]) -> str:
    """``saturation 0.4 -> 0.2 in view 1 and 2``: each field's change once, with the views it is in."""
    grouped: dict[tuple, list[str]] = {}
    for label, field, a, b in changes:
        grouped.setdefault((field, _value(a), _value(b)), []).append(label)
    parts = list(structural)
    for (field, a, b), labels in grouped.items():
        common = labels[0].rsplit(" ", 1)[0]
        where = (f"{common} " + " and ".join(lb.rsplit(" ", 1)[1] for lb in labels)
                 if all(lb.rsplit(" ", 1)[0] == common for lb in labels) else " and ".join(labels))
        parts.append(f"{field} {a} -> {b} in {where}")
    shown = "; ".join(parts[:SHOWN_CHANGES])
    return shown + (f"; {len(parts) - SHOWN_CHANGES} more" if len(parts) > SHOWN_CHANGES else "")


def _overridable(augment: Any) -> Any:
    """The views object ``--augment-opt`` overrides (inside the engine's value-range wrapper), or None."""
    for obj in (augment, getattr(augment, "views", None)):
        if hasattr(obj, "override"):
            return obj
    return None


def restoring_flags(cfg: Any, augment: Any, changes: list[tuple], recorded: dict) -> str | None:
    """The ``--augment-opt`` flags that give back the recorded views, or None: where a field changed
    to different values in different views, where the views refuse the override, where the result
    does not record as the run did, or where a resume does not take them."""
    fix: dict[str, str] = {}
    for _, field, a, _ in changes:
        if fix.setdefault(field, _value(a)) != _value(a) or a is None or field == "size":
            return None
    views = _overridable(augment)
    if views is None:
        return None
    try:
        restored = views.override(**fix)
    except (UsageError, TypeError, ValueError):
        return None
    if _recipes(views_record(restored)) != _recipes(recorded):  # (the classes are the run's: no structural change)
        return None
    options = {**{k: _value(v) for k, v in dict(cfg.augment_options).items()}, **fix}
    if not _resume_takes(cfg, options):
        return None
    return " ".join(f"--augment-opt {k}={v}" for k, v in options.items())


def _resume_takes(cfg: Any, options: dict[str, str]) -> bool:
    """Whether ``sslkit pretrain --resume`` accepts ``--augment-opt`` ``options`` for this run."""
    from sslkit.config_resume import resume_config

    try:
        resume_config({"out": cfg.out, "data": cfg.data, "augment_options": options}, views_check=False)
    except UsageError:
        return False
    return True
