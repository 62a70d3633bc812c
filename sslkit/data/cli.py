"""``sslkit data ...`` commands: parse the arguments and delegate."""

from __future__ import annotations

import json

import click

from sslkit.cli_types import FiniteFloatRange
from sslkit.progress import human_bytes
from sslkit.source_flags import SourceFlagsCommand, flag_values


#: ``--ids`` of ``data preview`` and ``data dump`` (``sslkit embed``'s says the same)
IDS_OPTION = click.option(
    "--ids", default="key", show_default=True, type=click.Choice(["key", "path"]),
    help="Name samples by file key (file: and a keyed hash of the path below the data root, as data_report.json; "
         "'sslkit data inspect' prints unusable files' paths with their keys) or by path: folder and file names "
         "can carry patient names.")


@click.group("data")
def data_group() -> None:
    """Look at a data source before training on it."""


@data_group.command("inspect", cls=SourceFlagsCommand)
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="Source option (repeatable); so are the [source] options below.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8),
              help="Side used for the cache-size estimate.")
@click.option("--no-decode", is_flag=True, help="Headers only: skip the decode check of every file.")
@click.option("--every-sample", is_flag=True,
              help="Decode every sample (each frame of a multi-frame file or array), not the first of each file.")
@click.option("--workers", default=0, type=click.IntRange(min=0), help="Processes (0: one per CPU).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=0),
              help="Report images larger than this many pixels as unusable (0: no limit; as sslkit pretrain).")
def inspect(src: str, as_json: bool, data_opts: tuple[str, ...], image_size: int, no_decode: bool,
            every_sample: bool, workers: int, max_pixels: int | None, **source_flags) -> None:
    """Counts by header facts, unusable files with reasons, decoded size.

    Prints no header identifiers (patient names or IDs, UIDs) and counts patients without naming them, but
    names each unusable file by its path relative to the data root, beside its [file:KEY]: folder and file
    names can carry patient names, so the output is a view of your own files, not for sharing as it is."""
    from sslkit.data.inspect import format_report, inspect_data
    from sslkit.options import parse_pairs

    if no_decode and every_sample:
        from sslkit.errors import UsageError
        raise UsageError("--every-sample decodes samples and --no-decode reads headers only: give one")
    options = {**parse_pairs(data_opts, "--data-opt"), **flag_values(source_flags)}
    report = inspect_data(src, options, decode=not no_decode, image_size=image_size, workers=workers,
                          progress=not as_json, max_pixels=max_pixels, every_sample=every_sample)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@data_group.command("preview", cls=SourceFlagsCommand)
@click.argument("src")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE", help="Source option (repeatable).")
@click.option("--samples", default=6, show_default=True, type=click.IntRange(1, 64), help="Rows of the sheet.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8),
              help="Side the 2D samples are resized to (as in pretraining).")
@click.option("--recipe", "recipe_name", default="simclr", show_default=True,
              help="2D augmentation recipe of the two views (simclr, crop, xray, ...).")
@IDS_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def preview(src: str, out: str, data_opts: tuple[str, ...], samples: int, image_size: int, recipe_name: str,
            ids: str, overwrite: bool, **source_flags) -> None:
    """A sheet of decoded samples and two augmented views of each (volumes: three mid-planes)."""
    from sslkit.data.preview import preview as draw
    from sslkit.options import parse_pairs

    options = {**parse_pairs(data_opts, "--data-opt"), **flag_values(source_flags)}
    result = draw(src, out, options, samples, image_size, recipe_name, overwrite=overwrite, ids=ids)
    click.echo(f"drew {result['samples']} samples ({result['sample']}) to {result['out']}")


@data_group.command("dump", cls=SourceFlagsCommand)
@click.argument("src")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=".npz file to write.")
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE", help="Source option (repeatable).")
@click.option("--raw", is_flag=True, help="Values before windowing (modality values, e.g. HU), float32.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most this many samples.")
@IDS_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def dump(src: str, out: str, data_opts: tuple[str, ...], raw: bool, limit: int | None, ids: str, overwrite: bool,
         **source_flags) -> None:
    """Write the decoded arrays, one per sample keyed by its file key (--ids path: its path), with spacing and
    axis order."""
    from sslkit.data.dump import dump as write_dump
    from sslkit.options import parse_pairs

    options = {**parse_pairs(data_opts, "--data-opt"), **flag_values(source_flags)}
    result = write_dump(src, out, options, raw, limit, overwrite, ids)
    click.echo(f"wrote {result['samples']} arrays{' (raw)' if raw else ''} to {result['out']}"
               + (f"; {result['skipped']} undecodable" if result["skipped"] else ""))


@data_group.command("cache")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Cache folder (default: $SSLKIT_CACHE_DIR, else $XDG_CACHE_HOME/sslkit, else ~/.cache/sslkit).")
@click.option("--clear", is_flag=True,
              help="Delete every entry and header index (only what sslkit wrote; a folder without its marker is refused).")
@click.option("--clear-older-than", default=None, type=FiniteFloatRange(min=0), metavar="DAYS",
              help="Delete entries not used for DAYS days.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache(cache_dir: str | None, clear: bool, clear_older_than: float | None, as_json: bool) -> None:
    """List the decoded-pixel cache entries, or delete them."""
    from sslkit.data.cache import cache_entries, clear_cache

    if clear and clear_older_than is not None:  # --clear won: every entry went, the recent ones too
        from sslkit.errors import UsageError

        raise UsageError("--clear deletes every entry and --clear-older-than only the unused ones; give one of them")
    if clear or clear_older_than is not None:
        entries = clear_cache(cache_dir, None if clear else clear_older_than)
        verb = "removed"
    else:
        entries = cache_entries(cache_dir)
        verb = "entries"
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        what = (f"{e['samples']:7d} samples  shape {e['shape']}  last used {e['last_used']}  {e['source']}"
                if e["usable"] else "unusable (damaged, or another sslkit version's format; never read)")
        click.echo(f"{e['key']}  {human_bytes(e['bytes']):>10}  {what}")
    total = sum(e["bytes"] for e in entries)
    click.echo(f"{verb}: {len(entries)} ({human_bytes(total)})")
