"""``sslkit data ...`` commands: parse the arguments and delegate."""

from __future__ import annotations

import json

import click

from sslkit.source_flags import SourceFlagsCommand, flag_values


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
@click.option("--workers", default=0, type=click.IntRange(min=0), help="Processes (0: one per CPU).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=0),
              help="Report images larger than this many pixels as unusable (0: no limit; as sslkit pretrain).")
def inspect(src: str, as_json: bool, data_opts: tuple[str, ...], image_size: int, no_decode: bool, workers: int,
            max_pixels: int | None, **source_flags) -> None:
    """Counts by header facts, unusable files with reasons, decoded size. No identifiers."""
    from sslkit.data.inspect import format_report, inspect_data
    from sslkit.options import parse_pairs

    options = {**parse_pairs(data_opts, "--data-opt"), **flag_values(source_flags)}
    report = inspect_data(src, options, decode=not no_decode, image_size=image_size, workers=workers,
                          progress=not as_json, max_pixels=max_pixels)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@data_group.command("cache")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Cache folder (default: $SSLKIT_CACHE_DIR, else ~/.cache/sslkit).")
@click.option("--clear", is_flag=True,
              help="Delete every entry and header index (only what sslkit wrote; a folder without its marker is refused).")
@click.option("--clear-older-than", default=None, type=click.FloatRange(min=0), metavar="DAYS",
              help="Delete entries not used for DAYS days.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache(cache_dir: str | None, clear: bool, clear_older_than: float | None, as_json: bool) -> None:
    """List the decoded-pixel cache entries, or delete them."""
    from sslkit.data.cache import cache_entries, clear_cache

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
        click.echo(f"{e['key']}  {e['bytes'] / 2**20:9.1f} MB  {e['samples']:7d} samples  shape {e['shape']}  "
                   f"last used {e['last_used']}  {e['source']}")
    total = sum(e["bytes"] for e in entries)
    click.echo(f"{verb}: {len(entries)} ({total / 2**20:.1f} MB)")
