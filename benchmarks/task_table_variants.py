"""``task_table.py``'s tasks and their setup, and its ``--variant`` / ``--xray-variant`` specs: parsed,
planned and checked before any work."""

from __future__ import annotations

import shlex

from _common import SharedStages, check_settings, refuse

TASKS = ("simclr", "moco", "byol", "dino", "barlowtwins", "vicreg", "mae", "simmim", "inpainting", "denoising",
         "autoencoder", "vae", "rotation", "jigsaw")


def setup(task: str, dataset: str) -> tuple[str, dict, int, int]:
    """(backbone, backbone options, image size, channels) of ``task`` on ``dataset``: the task's
    default backbone for the image size as ``sslkit pretrain`` builds it (``default_backbone_for``, fitted by
    ``default_backbone_options``)."""
    from sslkit.registry import get_task

    size, channels = (64 if task == "jigsaw" else 32, 3) if dataset == "cifar" else (64, 1)
    cls = get_task(task)
    return cls.default_backbone_for(size), cls.default_backbone_options(size), size, channels


def parse_variant(spec: str) -> tuple[str, str, float | None, list[str], dict, dict]:
    """``"NAME=TASK[@BUDGET] FLAGS..."`` -> (name, task, budget, flags without --backbone-opt,
    backbone options, task options)."""
    from sslkit.options import parse_pairs, parse_values

    head, _, rest = spec.strip().partition(" ")
    name, _, target = head.partition("=")
    task, _, budget = target.partition("@")
    if not name or task not in TASKS:
        refuse(f"error: --variant {spec!r}: write NAME=TASK[@BUDGET] FLAGS..., TASK one of {', '.join(TASKS)}")
    words, flags, pairs = shlex.split(rest), [], {"--backbone-opt": [], "--task-opt": []}
    while words:
        w = words.pop(0)
        if w in pairs and words:
            pairs[w].append(words.pop(0))
            if w == "--task-opt":  # --backbone-opt is passed merged with the benchmark's own
                flags += [w, pairs[w][-1]]
        else:
            flags.append(w)
    bopts = parse_values(parse_pairs(pairs["--backbone-opt"], "--backbone-opt"))
    topts = parse_values(parse_pairs(pairs["--task-opt"], "--task-opt"))
    return name, task, float(budget) if budget else None, flags, bopts, topts


def variant_plan(a, spec: str, dataset: str) -> dict:
    """What one ``--variant`` (``dataset`` "cifar") or ``--xray-variant`` ("xray") runs: its name, task,
    budget (the table's unless ``@BUDGET``), batch, backbone (None: the table's), the flags left,
    backbone and task options, and ``shown``: all its flags as the report shows them."""
    name, task, budget, flags, bopts, topts = parse_variant(spec)
    cifar = dataset == "cifar"
    budget = (a.budget_min if cifar else a.xray_budget_min) if budget is None else budget
    default_batch = a.batch_size if cifar else a.xray_batch_size
    batch, flags = variant_batch(flags, default_batch)
    backbone, flags = variant_flag(flags, "--backbone")
    shown = (flags + ([f"--batch-size {batch}"] if batch != default_batch else [])
             + ([f"--backbone {backbone}"] if backbone else []) + [f"--backbone-opt {k}={v}" for k, v in bopts.items()])
    return {"name": name, "task": task, "budget": budget, "batch": batch, "backbone": backbone, "flags": flags,
            "bopts": bopts, "topts": topts, "shown": " ".join(shown)}


def check_variants(st: SharedStages, a) -> None:
    """Before any work, every ``--variant`` and ``--xray-variant``: its flags (:func:`check_variant_flags`),
    and its spec the one its name ran with in this work dir (``spec-<run name>``: the stages carry the
    name only, so another spec would be reported over the first one's numbers). Else refused in one line."""
    st._reload()
    for flag, dataset, specs in (("--variant", "cifar", a.variant), ("--xray-variant", "xray", a.xray_variant)):
        for spec in specs:
            v = variant_plan(a, spec, dataset)
            if not a.report_only:
                check_variant_flags(flag, spec, v, dataset)
            run = f"{dataset}-var-{v['name']}"
            check_settings(st, f"spec-{run}", {run: f"{v['task']}@{v['budget']:g} {v['shown']}".strip()},
                           record=not a.report_only,
                           hint=f"give the {flag} another NAME, or pass the flags it ran with")


def check_variant_flags(flag: str, spec: str, v: dict, dataset: str) -> None:
    """``sslkit pretrain --print-config`` (in this process) of the variant's run: an unknown flag, a bad
    value or options its backbone or task cannot take are refused in one line, as sslkit words them."""
    import contextlib
    import io

    from sslkit.cli import main as sslkit

    default, bopts, size, ch = setup(v["task"], dataset)
    other = bool(v["backbone"]) and v["backbone"] != default  # as task_table.pretrain() builds the run
    args = ["pretrain", "--task", v["task"], "--backbone", v["backbone"] if other else default, "--image-size",
            str(size), "--channels", str(ch), "--batch-size", str(v["batch"]), "--print-config", *v["flags"],
            *(w for k, x in {**({} if other else bopts), **v["bopts"]}.items() for w in ("--backbone-opt", f"{k}={x}"))]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            sslkit.main(args=args, prog_name="sslkit")
            code = 0
        except SystemExit as exc:
            code = exc.code
    if code:
        said = (err.getvalue().strip().splitlines() or [f"exit status {code}"])[-1].removeprefix("error: ")
        refuse(f"error: {flag} {spec!r}: {said}")


def variant_flag(flags: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` in a variant's flags (None if absent) and the flags without it."""
    if flag not in flags[:-1]:
        return None, flags
    i = flags.index(flag)
    return flags[i + 1], flags[:i] + flags[i + 2:]


def variant_batch(flags: list[str], default: int) -> tuple[int, list[str]]:
    """The batch a variant's flags ask for (``--batch-size N``) and the flags without it: a step
    of another batch costs another CPU time, so ``pretrain`` calibrates it apart; likewise
    ``--backbone`` (``variant_flag``)."""
    value, flags = variant_flag(flags, "--batch-size")
    return (default if value is None else int(value)), flags


if __name__ == "__main__":
    from _common import not_a_script

    not_a_script("task_table_variants.py", "task_table.py (--variant, --xray-variant)")
