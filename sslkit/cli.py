"""The ``sslkit`` command line. It parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import json
import sys

import click

from sslkit.errors import CheckFailed, UsageError


class Group(click.Group):
    """Every user error (ours or click's) becomes one line on stderr and exit code 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:  # bad option, missing argument, ...
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "sslkit: "
            click.echo(f"error: {where}{exc.format_message()}".replace("\n", " "), err=True)
            sys.exit(2)
        except (UsageError, CheckFailed) as exc:
            click.echo(f"error: {exc}".replace("\n", " "), err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sslkit")
def main() -> None:
    """Self-supervised pretraining of image encoders on your own images, exported to ONNX."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins and what each registers."""
    from sslkit.plugins import get_plugins

    infos = [i.to_json() for i in sorted(get_plugins().infos.values(), key=lambda i: i.name)]
    if as_json:
        _echo_json(infos)
        return
    for info in infos:
        parts = [f"{k}: {', '.join(info[k])}" for k in ("tasks", "backbones", "sources", "exporters") if info[k]]
        status = f"  [error: {info['error']}]" if info.get("error") else ""
        click.echo(f"{info['name']} {info['version'] or ''}  " + "; ".join(parts) + status)


@main.command("list")
@click.argument("kind", type=click.Choice(["tasks", "backbones", "sources", "exporters"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(kind: str, as_json: bool) -> None:
    """List registered tasks, backbones, sources or exporters."""
    from sslkit import registry

    names = getattr(registry, f"list_{kind}")()
    if as_json:
        _echo_json(names)
    else:
        click.echo("\n".join(names))


@main.command()
@click.option("--task", required=True, help="Pretext task (sslkit list tasks).")
@click.option("--data", required=True, help="dicom:PATH, folder:PATH, another source, or a bare path.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--backbone", default=None, help="prefix:model, e.g. timm:resnet18 (default: the task's).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8))
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate (default: 1e-3 x batch-size / 256).")
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--channels", default=None, type=click.Choice(["1", "3"]), help="Default: what most images have.")
@click.option("--backbone-opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
              help="Backbone option (repeatable), e.g. cifar_stem=true, patch_size=8.")
@click.option("--task-opt", "task_opts", multiple=True, metavar="KEY=VALUE", help="Task option (repeatable).")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE", help="Source option (repeatable).")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Keep decoded pixels in this folder for later epochs and runs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run in a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pretrain(**kw) -> None:
    """Pretrain an encoder with a self-supervised task."""
    from sslkit.engine import pretrain as run_pretrain
    from sslkit.options import parse_pairs, parse_values
    from sslkit.run import RunConfig

    cfg = RunConfig(
        task=kw["task"], data=kw["data"], out=kw["out"], backbone=kw["backbone"], epochs=kw["epochs"],
        batch_size=kw["batch_size"], image_size=kw["image_size"], lr=kw["lr"], max_steps=kw["max_steps"],
        seed=kw["seed"], channels=int(kw["channels"]) if kw["channels"] else None,
        backbone_options=parse_values(parse_pairs(kw["backbone_opts"], "--backbone-opt")),
        task_options=parse_pairs(kw["task_opts"], "--task-opt"),
        source_options=parse_pairs(kw["data_opts"], "--data-opt"),
        cache_dir=kw["cache_dir"], device=kw["device"], progress=not kw["quiet"],
        overwrite=kw["overwrite"], resume=kw["resume"],
    )
    summary = run_pretrain(cfg)
    click.echo(
        f"done: {summary['steps']} steps in {summary['seconds']:.1f}s, {summary['img_per_s']} img/s, "
        f"final loss {summary['final_loss']:.4f}; run saved in {cfg.out}"
    )


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option("--format", "fmt", default="onnx", show_default=True, help="Export format (sslkit list exporters).")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the verification report as JSON.")
def export(run_dir: str, out: str, fmt: str, opset: int, overwrite: bool, as_json: bool) -> None:
    """Export a run's encoder (the backbone alone) and verify it."""
    from sslkit.export import export_run

    options = {"opset": opset} if fmt == "onnx" else {}
    report = export_run(run_dir, out, fmt, overwrite=overwrite, **options)
    if as_json:
        _echo_json(report)
        return
    for check in report.get("checks", []):
        click.echo(f"parity batch {check['batch']}: max abs diff {check['max_abs_diff']:.2e}, "
                   f"min cosine {check['min_cosine']:.6f}")
    click.echo(f"exported {report['format']} to {report['out']}")


if __name__ == "__main__":
    main()
