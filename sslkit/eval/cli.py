"""``sslkit eval ...``: parses options and delegates to :mod:`sslkit.eval` (no logic here)."""

from __future__ import annotations

import json
import math
import re

import click

from sslkit.cli_types import FiniteFloatRange
from sslkit.errors import UsageError, printable
from sslkit.source_flags import SourceFlagsCommand, flag_values

SEED = click.IntRange(0, 2**32 - 1)  # numpy's seed range


class RunSourceFlagsCommand(SourceFlagsCommand):
    """The source flags of a command that reads data as a trained model did (``embed``, ``eval``).

    An unset flag is the run's option (as the run directory or its ONNX export recorded it) where
    ``--data`` is of the run's source kind (:func:`sslkit.embed.source_options_for`; an embed of a
    run trained at ``--window 400,40`` uses 400,40), so a plugin's "(default: auto)", true of
    ``pretrain``, reads "(default: the run's, else auto)" here."""

    _DEFAULT = re.compile(r"\(default: (?!the run's)([^()]*)\)")

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        for option in self._extra[2]:
            option.help = self._DEFAULT.sub(r"(default: the run's, else \1)", option.help or "")
        return params


#: --max-pixels of every eval command (the data is read as the run read it unless given)
MAX_PIXELS = click.option("--max-pixels", default=None, type=click.IntRange(min=0),
                          help="Skip images larger than this many pixels (width x height), from the header; "
                               "0: no limit (default: the run's --max-pixels).")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated integers, e.g. 20,200; got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} expects positive integers, e.g. 20,200; got {text!r}")
    return values


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, e.g. 0.01,0.1,1; got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{flag} expects positive finite numbers; got {text!r}")
    return values


def _positive_finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A click callback: ``value`` must be a finite number above 0 (nan and inf are refused in one line)."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--{param.name} expects a positive finite number, e.g. 0.07; got {value}")
    return value


def _source_options(kw: dict) -> dict:
    """``--data-opt KEY=VALUE`` and the source plugins' own flags (``--window`` ...), as pretrain takes them."""
    from sslkit.options import parse_pairs

    return {**parse_pairs(kw["data_opts"], "--data-opt"), **flag_values(kw)}


def _data_args(kw: dict, split_only: tuple[str, ...] = ()):
    """The probes' data options; ``split_only``: the flags given that act on ``--data``'s folds only."""
    from sslkit.eval.probes import DataArgs
    from sslkit.options import parse_pairs

    return DataArgs(train=kw["train"], test=kw["test"], labels_csv=kw["labels"], positive=kw["positive"],
                    baseline=not kw["no_baseline"], batch_size=kw["batch_size"], source_options=_source_options(kw),
                    progress=not kw["quiet"], device=kw["device"], data=kw["data"], split=kw["split"],
                    group_by=kw["group_by"], group_pattern=kw["group_pattern"], seed=kw.get("seed", 0),
                    allow_overlap=kw["allow_overlap"], max_pixels=kw["max_pixels"],
                    train_options=parse_pairs(kw["train_opts"], "--train-opt"),
                    test_options=parse_pairs(kw["test_opts"], "--test-opt"), split_only=split_only)


def _print(report: dict, as_json: bool) -> None:
    from sslkit.eval.gain import format_gains
    from sslkit.eval.report import format_table

    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    data = report["data"]
    lines = [f"{report['kind']}: {report['model']['task']} {report['model']['backbone']} ({report['model']['path']})"]
    for split, d in data.items():
        if "samples" not in d:
            continue
        plotted = report["kind"] in ("tsne", "umap")  # unlabelled points are drawn, in grey
        extra = f", {d['unlabelled']} unlabelled {'(grey)' if plotted else 'skipped'}" if d.get("unlabelled") else ""
        extra += f", {d['groups']} groups" if d.get("groups") else ""
        skipped = (d.get("skipped") or {}).get("files")
        extra += f", {skipped} files not decoded ({'; '.join(list(d['skipped']['reasons'])[:3])})" if skipped else ""
        lines.append(f"  {split}: {d['samples']} images{extra}  [{d['source']}]")
    if "overlap" in data:
        lines.append(f"  warning: {data['overlap']['test_samples_in_train']} scored test images are also in --train "
                     f"(--allow-overlap)")
    if "split" in report["settings"]:
        sp = report["settings"]["split"]
        lines.append(f"  split: {sp['folds']}-fold by {sp['group_by']} groups; metrics are mean ± std over folds")
    if report["classes"]:
        positive = report["positive_class"]
        pos = f"; positive class '{printable(str(positive))}' (AUROC)" if positive else ""
        lines.append(f"  classes: {', '.join(printable(str(c)) for c in report['classes'])}{pos}")
    if report["results"]:
        lines += ["", format_table(report)]
        gain = format_gains(report)
        lines += ["", gain] if gain else []
    lines += [""] + [f"wrote {f}" for f in report["files"]] + [f"report: {report['report_file']}"]
    click.echo("\n".join(lines))


def probe_options(f):
    """Options shared by ``knn`` and ``linear``."""
    for deco in reversed([
        click.argument("model", metavar="RUN_OR_ONNX"),
        click.option("--train", default=None, help="Labelled images to fit on (class sub-folders, or --labels)."),
        click.option("--test", default=None, help="Labelled images to score on."),
        click.option("--train-opt", "train_opts", multiple=True, metavar="KEY=VALUE",
                     help="Source option for --train only, over --data-opt (repeatable): e.g. --train npz:m.npz "
                          "--train-opt split=train --test npz:m.npz --test-opt split=test."),
        click.option("--test-opt", "test_opts", multiple=True, metavar="KEY=VALUE",
                     help="Source option for --test only, over --data-opt (repeatable)."),
        click.option("--allow-overlap", is_flag=True,
                     help="Evaluate even if --train and --test share images (by content); the count is reported."),
        click.option("--data", default=None, help="One labelled folder, split into grouped folds (instead of "
                                                  "--train/--test)."),
        click.option("--split", default=None, metavar="group:K", help="Grouped k-fold for --data (default group:5)."),
        click.option("--group-by", default="source", show_default=True, type=click.Choice(["source", "folder"]),
                     help="Split groups: the source's (DICOM patient, --data-opt group=) or the file's folder."),
        click.option("--group-pattern", default=None, metavar="REGEX",
                     help="Split groups from the file name: the regex's first group (e.g. '^(person\\d+|IM-\\d+)')."),
        click.option("--labels", default=None, type=click.Path(dir_okay=False),
                     help="CSV 'path,label' instead of class sub-folders."),
        click.option("--positive", default=None, help="Positive class for AUROC (two classes; default: 2nd sorted)."),
        click.option("--no-baseline", is_flag=True, help="Skip the random-init encoder."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE",
                     help="Source option overriding the run's (repeatable); so do the [source] options below."),
        MAX_PIXELS,
        click.option("--device", default="auto", show_default=True,
                     help="PyTorch encoders (and, for knn and curve, the kNN's scoring): auto, cpu, cuda, cuda:N."),
        click.option("--json", "as_json", is_flag=True, help="Print the report (schema sslkit.eval/1) as JSON."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]):
        f = deco(f)
    return f


@click.group("eval")
def eval_group() -> None:
    """Is the encoder any good? Probes and pictures, beside a random-init baseline.

    Every command writes its report (and pictures) into RUN/eval/, never overwriting one.
    """


@eval_group.command(cls=RunSourceFlagsCommand)
@probe_options
@click.option("--k", "ks", default="20,200", show_default=True, help="Neighbour counts, comma-separated.")
@click.option("--temperature", default=0.07, show_default=True, type=float, callback=_positive_finite,
              help="Vote weight exp(cos / T) (Wu et al. 2018).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="The folds of --split group:K (--data only).")
@click.pass_context
def knn(ctx: click.Context, **kw) -> None:
    """Weighted kNN on L2-normalised embeddings (cosine)."""
    from sslkit.eval.probes import evaluate_knn

    seed_given = ctx.get_parameter_source("seed") not in (click.core.ParameterSource.DEFAULT, None)
    args = _data_args(kw, ("--seed",) if seed_given else ())
    report = evaluate_knn(kw["model"], args, _ints(kw["ks"], "--k"), kw["temperature"])
    _print(report, kw["as_json"])


@eval_group.command(cls=RunSourceFlagsCommand)
@probe_options
@click.option("--C", "c_grid", default="0.001,0.01,0.1,1,10", show_default=True,
              help="Inverse regularisation strengths to choose from on the validation split.")
@click.option("--val-fraction", default=0.2, show_default=True, type=FiniteFloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--finetune", is_flag=True, help="Also fine-tune the whole encoder + a linear head.")
@click.option("--finetune-epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--finetune-lr", default=3e-4, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--finetune-layer-decay", type=FiniteFloatRange(0, 1, min_open=True), default=None,
              help="ViTs: layer-wise LR decay for --finetune (block i of L at D^(L-i) x the LR; MAE fine-tunes "
                   "with 0.75). Default: off.")
@click.pass_context
def linear(ctx: click.Context, **kw) -> None:
    """Linear probe (logistic regression) on frozen features; C chosen on a validation split."""
    from click.core import ParameterSource

    from sslkit.eval.finetune import FinetuneOptions
    from sslkit.eval.probes import evaluate_linear

    unused = [f"--{n.replace('_', '-')}" for n in ("finetune_epochs", "finetune_lr", "finetune_layer_decay")
              if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]
    if unused and not kw["finetune"]:
        raise UsageError(f"{', '.join(unused)} set the fine-tune, which runs with --finetune only; add it, or leave "
                         f"{'them' if len(unused) > 1 else 'it'} out")

    ft = FinetuneOptions(epochs=kw["finetune_epochs"], batch_size=kw["batch_size"], lr=kw["finetune_lr"],
                         seed=kw["seed"], layer_decay=kw["finetune_layer_decay"])
    report = evaluate_linear(kw["model"], _data_args(kw), _floats(kw["c_grid"], "--C"), kw["val_fraction"],
                             kw["seed"], kw["finetune"], ft)
    _print(report, kw["as_json"])


@eval_group.command(cls=RunSourceFlagsCommand)
@click.argument("model", metavar="RUN_OR_ONNX")
@click.option("--data", required=True, help="Images to map (class sub-folders colour the points).")
@click.option("--out", default=None, help="PNG file (default: RUN/eval/tsne-<time>.png).")
@click.option("--umap", "use_umap", is_flag=True, help="UMAP instead of t-SNE (needs umap-learn).")
@click.option("--perplexity", default=30.0, show_default=True, type=FiniteFloatRange(min=1))
@click.option("--max-samples", default=5000, show_default=True, type=click.IntRange(min=3),
              help="Map a random subset of this many images.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False), help="CSV 'path,label'.")
@click.option("--color-by", default="label", show_default=True, metavar="label|folder|FIELD",
              help="Colour points by label, by folder, or by a header field of the source (e.g. Modality).")
@click.option("--no-baseline", is_flag=True, help="Skip the random-init encoder's map.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="Source option overriding the run's (repeatable); so do the [source] options below.")
@MAX_PIXELS
@click.option("--device", default="auto", show_default=True, help="PyTorch encoders: auto, cpu, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def tsne(**kw) -> None:
    """2-D map of the embeddings (t-SNE or UMAP), coloured by label, as a PNG."""
    from sslkit.eval.tsne import evaluate_tsne

    report = evaluate_tsne(kw["model"], kw["data"], kw["out"], kw["labels"], not kw["no_baseline"],
                           "umap" if kw["use_umap"] else "tsne", kw["perplexity"], kw["max_samples"], kw["seed"],
                           kw["overwrite"], kw["batch_size"], _source_options(kw), not kw["quiet"], kw["device"],
                           kw["color_by"], kw["max_pixels"])
    _print(report, kw["as_json"])


@eval_group.command(cls=RunSourceFlagsCommand)
@click.argument("model", metavar="RUN")
@click.option("--data", "--images", "images", required=True,
              help="Images to look at (a folder or any source); --images is the same option.")
@click.option("--out", default=None, help="PNG file (default: RUN/eval/attention-<time>.png).")
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(min=1, max=64))
@click.option("--no-baseline", is_flag=True, help="Skip the random-init encoder's maps.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="Source option overriding the run's (repeatable); so do the [source] options below.")
@MAX_PIXELS
@click.option("--device", default="cpu", show_default=True,
              help="Where the maps are computed: cpu (enough for a few images), auto, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def attention(**kw) -> None:
    """PNG grid: input, last-layer CLS attention per head (ViT) or Grad-CAM (CNN), pretrained vs random."""
    from sslkit.eval.attention import evaluate_attention

    report = evaluate_attention(kw["model"], kw["images"], kw["out"], kw["max_images"], not kw["no_baseline"],
                                kw["overwrite"], _source_options(kw), not kw["quiet"], kw["max_pixels"], kw["device"])
    _print(report, kw["as_json"])


@eval_group.command(cls=RunSourceFlagsCommand)
@probe_options
@click.option("--fractions", default="0.01,0.1,1", show_default=True,
              help="Fractions of the training labels to keep (stratified), comma-separated.")
@click.option("--out", default=None, help="PNG file (default: RUN/eval/curve-<time>.png).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--k", "k", default=20, show_default=True, type=click.IntRange(min=1), help="kNN neighbour count.")
@click.option("--C", "c_grid", default="0.001,0.01,0.1,1,10", show_default=True,
              help="Inverse regularisation strengths to choose from on the validation split.")
@click.option("--val-fraction", default=0.2, show_default=True, type=FiniteFloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=0, show_default=True, type=SEED, help="Folds and label subsets.")
def curve(**kw) -> None:
    """Label-efficiency curve: linear probe and kNN at each label fraction, pretrained vs baselines (PNG + JSON)."""
    from sslkit.eval.curve import evaluate_curve, parse_fractions

    fractions = parse_fractions(kw["fractions"])
    report = evaluate_curve(kw["model"], _data_args(kw), fractions, kw["out"], kw["overwrite"], kw["k"],
                            _floats(kw["c_grid"], "--C"), kw["val_fraction"])
    _print(report, kw["as_json"])
