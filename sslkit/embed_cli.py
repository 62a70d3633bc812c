"""``sslkit embed``: parse the arguments and delegate (:func:`sslkit.embed.embed_to_file`)."""

from __future__ import annotations

import click

from sslkit.data.cli import IDS_OPTION
from sslkit.eval.cli import RunSourceFlagsCommand  # embed reads data as the run did: its source flags say so
from sslkit.source_flags import flag_values


@click.command(cls=RunSourceFlagsCommand)
@click.argument("model", type=click.Path())
@click.option("--data", required=True, help="Images to embed: dicom:PATH, folder:PATH or a bare path.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz file.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--data-opt", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="Source option overriding the run's (repeatable); so do the [source] options below.")
@click.option("--max-pixels", default=None, type=click.IntRange(min=0),
              help="Skip images larger than this many pixels (width x height), from the header; "
                   "0: no limit (default: the run's --max-pixels).")
@click.option("--device", default="auto", show_default=True,
              help="Torch device for a run directory: auto (CUDA when available), cpu, cuda, cuda:N.")
@IDS_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def embed(model: str, data: str, out: str, batch_size: int, data_opts: tuple[str, ...], max_pixels: int | None,
          device: str, ids: str, overwrite: bool, quiet: bool, **source_flags) -> None:
    """Embed images with a run directory (PyTorch) or an exported .onnx file (onnxruntime).

    A run's checkpoint (RUN/checkpoints/step-N) embeds with that step's encoder. The .npz holds
    embeddings, ids (file keys; --ids path: file paths) and labels where the folders give them.
    """
    from sslkit.embed import embed_to_file
    from sslkit.options import parse_pairs

    source_options = {**parse_pairs(data_opts, "--data-opt"), **flag_values(source_flags)}
    summary = embed_to_file(model, data, out, batch_size=batch_size, source_options=source_options,
                            device=device, overwrite=overwrite, progress=not quiet, max_pixels=max_pixels, ids=ids)
    click.echo(f"embedded {summary['n']} images ({summary['dim']}-d, {summary['engine']}); "
               f"{summary['skipped']} skipped; saved to {out}")
