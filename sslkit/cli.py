"""The ``sslkit`` command line. It parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from sslkit import needs_torch
from sslkit.cli_types import FiniteFloatRange
from sslkit.errors import CheckFailed, PluginError, UsageError, printable, say
from sslkit.new_plugin import KINDS as NEW_PLUGIN_KINDS
from sslkit.plugins import KINDS as PLUGIN_KINDS
from sslkit.preempt import EXIT_TERMINATED, Preempted, Terminated, requeue_exit, terminable
from sslkit.run import remove_unused_run_dir
from sslkit.source_flags import SourceFlagsCommand


class Group(click.Group):
    """Every user error (ours or click's) becomes one line on stderr and exit code 2. Under
    torchrun rank 0 alone prints it (:func:`~sslkit.errors.reports_here`); every rank exits so.
    An exception raised in a third-party plugin's code is one line naming the plugin, exit code 1
    (:func:`~sslkit.plugin_fault.plugin_fault`; ``SSLKIT_TRACEBACK=1``: the traceback)."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        return name, needs_torch.guard(ctx, name, cmd), rest  # without torch: one line, not a traceback

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            with terminable():  # SIGTERM unwinds: a half-written output's temporary file is removed
                rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__context__, Preempted):  # SIGTERM before the loop
                say(_stopped_before_training(str(exc.__context__)))
                sys.exit(requeue_exit())
            if isinstance(exc.__context__, Terminated):
                say(f"{exc.__context__}: stopped; nothing half-written was left")
                sys.exit(EXIT_TERMINATED)
            say("aborted")
            sys.exit(130)
        except click.ClickException as exc:  # bad option, missing argument, ...
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "sslkit: "
            message = " ".join(exc.format_message().split())  # click's choices come as "\n\t" lines
            say(printable(f"error: {where}{message}"))
            sys.exit(2)
        except (UsageError, CheckFailed, PluginError) as exc:
            say(printable(f"error: {exc}".replace("\n", " ")))
            sys.exit(exc.exit_code)
        except Exception as exc:  # a third-party plugin's bug: one line naming it, exit 1
            from sslkit.plugin_fault import exit_if_plugin_fault

            needs_torch.exit_if_missing_torch(exc)  # torch imported where it is not installed: one line, exit 2
            exit_if_plugin_fault(exc)
            raise  # sslkit's own code or a built-in plugin's (our bug), or SSLKIT_TRACEBACK=1: the traceback
        sys.exit(rv if isinstance(rv, int) else 0)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sslkit")
def main() -> None:
    """Self-supervised pretraining of image encoders on your own images, exported to ONNX."""
    from sslkit.host_malloc import tune_host_malloc

    tune_host_malloc()  # glibc: reuse large tensors' pages instead of faulting them in every step


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins and what each registers."""
    from sslkit.plugins import get_plugins

    loaded = get_plugins()
    if loaded.env_error:  # listed all the same: this is where a user looks for the plugin they meant
        click.echo(f"sslkit: {loaded.env_error}", err=True)
    infos = [i.to_json() for i in sorted(loaded.infos.values(), key=lambda i: i.name)]
    if as_json:
        _echo_json(infos)
        return
    for info in infos:
        parts = [f"{k}: {', '.join(info[k])}" for k in PLUGIN_KINDS if info[k]]
        status = f"  [error: {info['error']}]" if info.get("error") else ""
        status += "".join(f"  [conflict: {c}]" for c in info.get("conflicts", []))
        origin = " (built-in)" if info["builtin"] else ""
        click.echo(f"{info['name']} {info['version'] or ''}{origin}  " + "; ".join(parts) + status)


@main.command("list")
@click.argument("kind", type=click.Choice(PLUGIN_KINDS))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(kind: str, as_json: bool) -> None:
    """List registered tasks, backbones, sources, exporters or callbacks."""
    from sslkit import registry

    names = getattr(registry, f"list_{kind}")()
    if as_json:
        _echo_json(names)
    else:
        width = max(map(len, names), default=0)
        click.echo("\n".join(f"{n:<{width}}  {registry.summary(kind, n)}".rstrip() for n in names))


def _default(name: str, by_task: bool = False) -> str:
    """`` (default: V)`` for an option's help; ``by_task``: a field that tasks' ``engine_defaults`` set."""
    from sslkit.config import defaults

    if by_task:
        return f" (default: the task's, see --print-config; else {defaults()[name]})"
    return f" (default: {defaults()[name]})"


@main.command(cls=SourceFlagsCommand)
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML (or YAML) file of settings; options given here override it.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved settings for --task/--backbone as TOML and exit.")
@click.option("--task", default=None, help="Pretext task (sslkit list tasks).")
@click.option("--data", default=None, help="dicom:PATH, folder:PATH, another source, or a bare path.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run directory (default: runs/<task>-<timestamp>, a new folder).")
@click.option("--backbone", default=None, help="prefix:model, e.g. timm:resnet18 (default: the task's, fitted to --image-size; "
                   "with --init RUN_DIR, that run's).")
@click.option("--init", default=None, metavar="FILE|DIR|ORG/NAME|timm:MODEL.TAG",
              help="Start the backbone from these weights instead of random init: a weights file or training "
                   "checkpoint, a run (or RUN/checkpoints/step-N), a Hugging Face model folder, a Hub id (from the "
                   "local cache only) or a timm tag.")
@click.option("--allow-download", is_flag=True, default=None, help="Let --init fetch Hub weights missing from the cache.")
@click.option("--init-freeze-steps", default=None, type=click.IntRange(min=0),
              help="With --init: keep the encoder at LR 0 for these first steps while the task's new heads "
                   "warm up (default: 10 % of the run when a head starts from random, else 0).")
@click.option("--init-lr-scale", default=None, type=FiniteFloatRange(0, 1, min_open=True),
              help="With --init: the encoder's LR as a fraction of the heads' (default 0.1).")
@click.option("--layer-decay", default=None, type=FiniteFloatRange(0, 1, min_open=True),
              help="With --init: layer-wise LR decay over a ViT encoder's blocks, as in MAE fine-tuning "
                   "(default: off).")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Passes over the data" + _default("epochs"))
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Images per forward pass, summed over all processes" + _default("batch_size"))
@click.option("--image-size", default=None, type=click.IntRange(min=8),
              help="Side in pixels of 2D samples (--sample volume: --volume-size)" + _default("image_size"))
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after this many optimizer steps.")
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1),
              help="Seed of everything random, 0 to 2**32 - 1" + _default("seed"))
@click.option("--channels", default=None, type=click.Choice(["1", "3"]), help="Default: what most images have.")
@click.option("--optimizer", default=None, type=click.Choice(["adamw", "sgd", "lars"]),
              help="Optimizer" + _default("optimizer", by_task=True))
@click.option("--lr", default=None, type=FiniteFloatRange(min=0, min_open=True),
              help="Learning rate, taken as is, not with --base-lr or --lr-scaling (default: --base-lr scaled "
                   "by --lr-scaling).")
@click.option("--base-lr", default=None, type=FiniteFloatRange(min=0, min_open=True),
              help="LR for 256 images per step" + _default("base_lr", by_task=True))
@click.option("--lr-scaling", default=None, type=click.Choice(["linear", "sqrt", "none"]),
              help="base-lr x (effective batch / 256), x its square root, or as is (another --optimizer: its own)"
                   + _default("lr_scaling", by_task=True))
@click.option("--weight-decay", default=None, type=FiniteFloatRange(min=0),
              help="Not applied to norms, biases, tokens and position embeddings (another --optimizer: its own)"
                   + _default("weight_decay", by_task=True))
@click.option("--warmup-epochs", default=None, type=FiniteFloatRange(min=0),
              help="Linear warm-up (at most half the run), then --schedule, by step" + _default("warmup_epochs"))
@click.option("--schedule", default=None, type=click.Choice(["cosine", "constant", "step"]),
              help="LR after the warm-up: cosine decay, constant, or x0.1 at 60 % and 80 % of the steps after it"
                   + _default("schedule"))
@click.option("--grad-clip", default=None, type=FiniteFloatRange(min=0, min_open=True),
              help="Clip the global gradient norm to this value (default: no clipping).")
@click.option("--accumulate", default=None, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step (same update as a K x larger batch)" + _default("accumulate"))
@click.option("--precision", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Autocast precision; fp16 uses a gradient scaler (CUDA)" + _default("precision"))
@click.option("--compile", "compile", is_flag=True, default=None, help="torch.compile the model (opt-in).")
@click.option("--capture", default=None, type=click.Choice(["off", "auto", "graphs"]),
              help="Replay the whole step as one CUDA graph: graphs (says once when it cannot), auto "
                   "(where it can), off" + _default("capture"))
@click.option("--channels-last/--no-channels-last", default=None,
              help="Channels-last memory format (default: on for 2D CNNs, off for ViTs; not for 3D backbones).")
@click.option("--sync-bn", is_flag=True, default=None, help="SyncBatchNorm across processes (torchrun).")
@click.option("--deterministic", is_flag=True, default=None,
              help="Deterministic algorithms only (bit-exact repeats; slower on GPU).")
@click.option("--checkpoint-every", default=None, type=click.IntRange(min=1),
              help="Checkpoint every N optimizer steps instead of at every epoch end (and at the last step).")
@click.option("--keep-checkpoints", default=None, type=click.IntRange(min=0),
              help="Keep the newest N checkpoints, 0 for all" + _default("keep_checkpoints"))
@click.option("--backbone-opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
              help="Backbone option (repeatable), e.g. cifar_stem=true, patch_size=8.")
@click.option("--task-opt", "task_opts", multiple=True, metavar="KEY=VALUE", help="Task option (repeatable).")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE", help="Source option (repeatable).")
@click.option("--augment-opt", "augment_opts", multiple=True, metavar="KEY=VALUE",
              help="Override a view-recipe field of the task's augmentation (repeatable), e.g. rotate_p=0.5.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Decoded-pixel cache folder (default: $SSLKIT_CACHE_DIR, else $XDG_CACHE_HOME/sslkit, "
                   "else ~/.cache/sslkit).")
@click.option("--no-cache", is_flag=True, default=None, help="Keep decoded pixels in memory only.")
@click.option("--cache-size", default=None, type=click.IntRange(min=8),
              help="Store decoded pixels at this side length (>= --image-size; resized on the device), "
                   "so runs at several image sizes share one cache (default: --image-size; 2D samples only).")
@click.option("--val-fraction", default=None, type=FiniteFloatRange(0, 1, max_open=True),
              help="Hold out this fraction of patients (DICOM) / groups, never trained on (default 0).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=0),
              help="Skip images larger than this many pixels (width x height), checked from the header "
                   "before decoding; 0: no limit (default: 178956970, PIL's decompression-bomb limit).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N" + _default("device"))
@click.option("--resume", default=None, is_flag=False, flag_value="", metavar="[RUN_DIR]",
              help="Continue RUN_DIR (or --out) from its last checkpoint, exactly as configured; 'auto': "
                   "resume --out when it has a checkpoint, else start it.")
@click.option("--allow-data-change", is_flag=True, default=None,
              help="With --resume: continue although the data's content changed (keeps the run's normalisation).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace the run in a non-empty --out.")
@click.option("--callbacks", default=None, metavar="NAME[,NAME...]",
              help="Run callbacks that log metrics (sslkit plugins lists them), e.g. csv,tensorboard"
                   + _default("callbacks"))
@click.option("--quiet", is_flag=True, default=None,
              help="No progress bar in this session (a --resume shows it unless given --quiet again).")
@click.pass_context
def pretrain(ctx: click.Context, **kw) -> None:
    """Pretrain an encoder with a self-supervised task.

    Settings come from the defaults, the task's recommended engine settings, --config
    and the options given here, in that order. Options in [brackets] come from the
    source plugin named there and set its --data-opt of that name.
    """
    from sslkit.preempt import pending, preemptible

    with preemptible():  # first thing: a pre-emption while torch imports or data decodes exits 75 too
        started = _start_pretrain(ctx, kw)
        early = pending()  # under torchrun: the signal this process got before the first step
    if started is None:
        return
    cfg, summary = started
    requeue = summary.get("interrupted") and summary.get("requeue")
    if not summary.get("main", True):
        ctx.exit(requeue_exit() if requeue else 0)
    from sslkit.data.pipeline import report_summary

    if line := report_summary(cfg.out):  # before the summary, which is the last line
        click.echo(f"data: {line}", err=True)
    if summary.get("already_finished"):
        click.echo(f"run {cfg.out} already finished ({summary.get('steps', '?')} steps); nothing to resume")
    elif requeue and not summary.get("steps_this_session"):  # torchrun: a process had one before the first step
        click.echo(_stopped_before_training(early or "a pre-emption signal to another process"), err=True)
    elif summary.get("interrupted"):
        click.echo(f"interrupted: checkpoint at step {summary['steps']} saved in {cfg.out}; continue with: "
                   f"{_resume_hint(ctx, cfg.out)}" + (f" ({_requeue_words()})" if requeue else ""))
    else:
        from sslkit.engine.log import done_line

        click.echo(done_line(summary, cfg.out))
    ctx.exit(requeue_exit() if requeue else 0)


def _requeue_words() -> str:
    code = requeue_exit()
    return f"exit {code}: requeue me" if code else "exit 0 under torchrun, so it does not restart the group: requeue me"


def _stopped_before_training(signal_name: str) -> str:
    return f"{signal_name}: stopped before training started, nothing to checkpoint ({_requeue_words()})"


def _resume_hint(ctx: click.Context, out: str) -> str:
    """The command that continues run ``out`` exactly. Under torchrun it is the same torchrun command
    (with ``--resume``): ``sslkit pretrain --resume`` alone would continue on one process, its
    augmentations re-seeded."""
    from click.core import ParameterSource

    from sslkit.preempt import in_group

    if not (in_group() or os.environ.get("TORCHELASTIC_RUN_ID")):
        return f"sslkit pretrain --resume {out}"
    given = {k for k in ("resume", "overwrite") if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if "resume" in given:
        return "the same torchrun command"
    instead = " instead of --overwrite" if "overwrite" in given else ""
    return f"the same torchrun command with --resume {out}{instead}"


def _start_pretrain(ctx: click.Context, kw: dict):
    """``(cfg, summary)`` of the run ``kw`` asks for; None for ``--print-config``. A run folder this
    command made (no ``--out``) is removed again when the run fails before writing anything."""
    from click.core import ParameterSource

    from sslkit import config
    from sslkit.engine import pretrain as run_pretrain

    given = {k for k in kw if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    values = config.cli_values(kw, given)
    if kw["print_config"]:
        click.echo(config.print_config(values, kw["config_file"]), nl=False)
        return None
    cfg = config.resolve(values, kw["config_file"])
    made = cfg.out in config.MADE_RUN_DIRS  # no --out, here or in --config: config.default_out made it
    if made:
        click.echo(f"run directory: {cfg.out}")
    try:
        return cfg, run_pretrain(cfg)
    except BaseException:
        if made:
            remove_unused_run_dir(Path(cfg.out))
        raise


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option("--format", "fmt", default="onnx", show_default=True, help="Export format (sslkit list exporters).")
@click.option("--opset", default=None, type=int, help="ONNX opset (default 18).")
@click.option("--with-preprocessing", is_flag=True,
              help="ONNX graph takes raw pixels and applies the run's scaling / window and normalisation.")
@click.option("--input-dtype", default=None, type=click.Choice(["uint8", "uint16", "float32"]),
              help="Raw input dtype with --with-preprocessing (default: image files follow the run's data: uint8 "
                   "for 8-bit, uint16 for 16-bit, float32 for float images; float32 values where the graph "
                   "applies the source's window, e.g. DICOM).")
@click.option("--fp16", is_flag=True, help="Half-precision weights (checked with a looser tolerance).")
@click.option("--check-data", default=None, metavar="SRC|none",
              help="Data for the real-input parity check (default: the run's own data).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the verification report as JSON.")
def export(run_dir: str, out: str, fmt: str, opset: int | None, with_preprocessing: bool, input_dtype: str | None,
           fp16: bool, check_data: str | None, overwrite: bool, as_json: bool) -> None:
    """Export a run's encoder (the backbone alone) and verify it.

    RUN_DIR is a run directory, or one of its checkpoints (RUN/checkpoints/step-N) for that step's encoder.
    """
    from sslkit.export import export_run, report_lines

    given = {"opset": opset, "with_preprocessing": with_preprocessing or None, "input_dtype": input_dtype,
             "fp16": fp16 or None}
    options = {k: v for k, v in given.items() if v is not None}
    report = export_run(run_dir, out, fmt, overwrite=overwrite, check_data=check_data,
                        log=None if as_json else click.echo, **options)
    if as_json:
        _echo_json(report)
        return
    for line in report_lines(report):
        click.echo(line)


@main.command("new-plugin")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(NEW_PLUGIN_KINDS),
              help="What the plugin registers.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder to create (default: ./sslkit-NAME).")
def new_plugin(name: str, kind: str, out: str | None) -> None:
    """Write a ready plugin package: pyproject, module, README, tests using sslkit.testing."""
    from sslkit.new_plugin import write_plugin

    folder = write_plugin(name, kind, out)
    click.echo(f"wrote {kind} plugin {name!r} to {folder}; next: pip install -e '{folder}[test]' && "
               f"python -m pytest {folder}")


from sslkit.eval.cli import eval_group  # noqa: E402  (`sslkit eval knn|linear|tsne|attention`)
from sslkit.data.cli import data_group  # noqa: E402  (`sslkit data inspect`)
from sslkit.embed_cli import embed  # noqa: E402  (`sslkit embed`)

main.add_command(eval_group)
main.add_command(data_group)
main.add_command(embed)


if __name__ == "__main__":
    main()
