"""What is evaluated (a run directory) and its embeddings of a labelled dataset.

Embeddings come from :func:`sslkit.embed.embed_run` (the run's own preprocessing,
batched, with a progress bar). The baseline is a randomly initialised encoder of the
same architecture, drawn from a fixed seed so that two evaluations share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslkit.embed import Embeddings, embed_run
from sslkit.errors import UsageError
from sslkit.eval.labels import Labelled, assign_labels, no_labels, read_labels_csv, select_labelled
from sslkit.run import Run, load_run

BASELINE_SEED = 0
ENCODERS = ("pretrained", "random")


@dataclass
class EvalModel:
    """The model under evaluation; reports go to ``report_dir``."""

    path: Path
    run: Run

    @property
    def report_dir(self) -> Path:
        return self.path / "eval"

    def describe(self) -> dict[str, Any]:
        info = self.run.info
        return {"path": str(self.path), "format": "run", "task": info.get("task"),
                "backbone": self.run.backbone_name, "backbone_options": info.get("backbone_options", {}),
                "embedding_dim": info.get("embedding_dim"), "image_size": self.run.spec.image_size,
                "channels": self.run.spec.channels}


def open_model(path: str | Path) -> EvalModel:
    """A run directory (``sslkit pretrain --out``); an ONNX file is refused with a hint."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        raise UsageError(f"{str(path)!r}: evaluating an ONNX file is not supported yet; "
                         f"pass the run directory it was exported from")
    return EvalModel(p, load_run(p))


def embed(model: EvalModel, data: str, *, random_init: bool = False, batch_size: int = 64,
          source_options: dict[str, Any] | None = None, progress: bool = True) -> Embeddings:
    """``data`` -> Embeddings ``(N, D)`` from the pretrained (or a random-init) encoder."""
    if not random_init:
        return embed_run(str(model.path), data, batch_size, source_options, progress, weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASELINE_SEED)
        return embed_run(str(model.path), data, batch_size, source_options, progress, weights=False)


def check_labels(data: str, what: str, labels_csv: str | None,
                 source_options: dict[str, Any] | None = None) -> tuple[dict[str, str] | None, list[str]]:
    """Fail before decoding anything when ``data`` has no labelled image.

    Reads the index only (file names, headers); returns the CSV table and the labels found.
    """
    from sslkit.registry import create_source

    table = read_labels_csv(labels_csv) if labels_csv else None
    refs = create_source(data, **(source_options or {})).index()
    if not refs:
        raise UsageError(f"{what}: no images found in {data!r}")
    labels = assign_labels([r.id for r in refs], [r.label for r in refs], table)
    if all(lab is None for lab in labels):
        raise no_labels(what, data, table is not None)
    return table, [lab for lab in labels if lab is not None]


def labelled_embeddings(model: EvalModel, data: str, what: str, table: dict[str, str] | None = None,
                        baseline: bool = True, **kw: Any) -> dict[str, Labelled]:
    """``{"pretrained": Labelled, "random": Labelled}`` (no ``random`` without ``baseline``).

    ``table`` is a labels CSV read by :func:`check_labels` (None: class folders).
    """
    out = {}
    for name in ENCODERS if baseline else ENCODERS[:1]:
        emb = embed(model, data, random_init=name == "random", **kw)
        labels = assign_labels(emb.ids, emb.labels, table)
        out[name] = select_labelled(emb.embeddings, labels, what, data, table is not None)
    return out
