"""What is evaluated (a run directory or an exported ONNX file) and its embeddings.

Embeddings come from :func:`sslkit.embed.embed` (the model's own preprocessing, batched,
with a progress bar). The baseline is a randomly initialised encoder of the same
architecture (rebuilt from an ONNX file's metadata when that is what is evaluated),
drawn from a fixed seed so that every evaluation shares it. Pretrained and random
encoders embed in one pass over the data, so each image is decoded once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sslkit import embed as embed_mod
from sslkit.data.pipeline import index_refs, load_refs, open_source, sample_format
from sslkit.embed import Embeddings
from sslkit.errors import UsageError
from sslkit.eval.labels import Labelled, assign_labels, no_labels, read_labels_csv, select_labelled
from sslkit.eval.report import check_report_dir
from sslkit.spec import InputSpec

ENCODERS = ("pretrained", "random", "init")  # "init": the --init weights before pretraining, when the run used them


@dataclass
class EvalModel:
    """The model under evaluation. Reports go to ``report_dir``: ``RUN/eval`` for a run,
    ``eval/`` beside an ONNX file (the run's own ``eval/`` when exported into the run)."""

    path: Path
    format: str  # "run" | "onnx"
    info: dict[str, Any]  # task, backbone, backbone_options, embedding_dim
    spec: InputSpec
    run: Any = None  # sslkit.run.Run for a run directory
    device: str = "cpu"
    max_pixels: int | None = None  # --max-pixels: replaces the run's decode limit (None: keep it)
    _pretrained: Any = None
    _init: Any = False  # the --init encoder once built (None: no init row); False: not yet looked for
    _options: dict = field(default_factory=dict)  # (source kind, overrides) -> source options, resolved once

    @property
    def pretrained(self) -> embed_mod.Model:
        """The pretrained encoder as :class:`sslkit.embed.Model` (opened once)."""
        if self._pretrained is None:
            self._pretrained = embed_mod.open_model(self.path, self.device, max_pixels=self.max_pixels)
        return self._pretrained

    @property
    def pixel_limit(self) -> int | None:
        """The decode limit data is read with: ``max_pixels``, else the run's ``--max-pixels``."""
        if self.max_pixels is not None or self.run is None:
            return self.max_pixels
        return self.run.info.get("config", {}).get("max_pixels")

    def source_options(self, data: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """The source options ``data`` is read with: the model's (same source kind), then ``overrides``
        (:func:`sslkit.embed.source_options_for`, which depends on ``data`` by its kind alone). Resolved once
        per source kind and overrides, so what that prints (a ``--spacing`` other than the run's) is printed
        once, however often an evaluation reads data (indexing, embedding, fine-tuning; --train and --test)."""
        from sslkit.registry import resolve_data

        key = (resolve_data(data)[0], json.dumps(overrides or {}, sort_keys=True, default=str))
        if key not in self._options:
            self._options[key] = embed_mod.source_options_for(self.pretrained, data, overrides)
        return dict(self._options[key])

    @property
    def report_dir(self) -> Path:
        """``RUN/eval`` (also for one of its checkpoints), or ``eval/`` beside an ONNX file."""
        return (self.run.path if self.format == "run" else self.path.parent) / "eval"

    def describe(self) -> dict[str, Any]:
        """The report's ``model``: what was evaluated, tied to its run as an export of it names it
        (``run_id``, ``config_sha256``: run.json's, else for a run recorded before them the same
        fallbacks as :func:`sslkit.export.export_metadata`; an ONNX file's metadata) and to its weights:
        ``step``, ``encoder_sha256`` (a run's final encoder as run.json records it, an ONNX file's own
        bytes), or for a checkpoint its ``checkpoint_step`` and ``checkpoint_sha256`` (its manifest's)."""
        from sslkit.export import run_id, weights_record
        from sslkit.output_file import file_sha256
        from sslkit.run_record import config_sha256

        run = self.run
        ckpt = run.checkpoint if run is not None else None
        if run is not None:
            record = weights_record(run)
            weights = {"encoder_sha256": record.get("encoder_sha256"),
                       "checkpoint_step": record["step"] if ckpt is not None else None,
                       **({"checkpoint_sha256": record["checkpoint_sha256"]} if ckpt is not None else {})}
            ids = {"run_id": run_id(run, None if run.info.get("run_id") else run.build_encoder()),
                   "config_sha256": run.info.get("config_sha256") or config_sha256(run.info.get("config", {})),
                   "step": record["step"]}
        else:
            weights = {"encoder_sha256": file_sha256([self.path]), "checkpoint_step": None}
            ids = {k: self.info.get(k) for k in ("run_id", "config_sha256", "step")}
        return {"path": str(self.path), "format": self.format, **ids,
                "checkpoint": ckpt.name if ckpt is not None else None, **weights,
                "task": self.info.get("task"),
                "backbone": self.info.get("backbone"), "backbone_options": self.info.get("backbone_options") or {},
                "embedding_dim": self.info.get("embedding_dim"), "image_size": self.spec.image_size,
                "channels": self.spec.channels}

    def require_run(self, what: str):
        if self.run is None:
            raise UsageError(f"{what} needs the run directory (PyTorch weights), not an ONNX file: "
                             f"pass the run directory {str(self.path)!r} was exported from")
        return self.run

    def build_init_encoder(self) -> torch.nn.Module | None:
        """The run's ``--init`` weights before pretraining (same architecture), or None.

        None when the model is not a run directory, the run did not use ``--init``, or its
        weights cannot be found here or have changed (checked by SHA-256; a note says so).
        Looked for once: ``--train`` and ``--test`` share it (and the note).
        """
        if self._init is False:
            self._init = self._load_init_encoder()
        return self._init

    def _load_init_encoder(self) -> torch.nn.Module | None:
        import sys

        if self.run is None and (self.info.get("init") or {}).get("source"):  # an ONNX export of an --init run
            print("sslkit: note: no 'init' row: an ONNX file does not carry the --init weights; give the run "
                  "directory it was exported from for that row", file=sys.stderr)
            return None
        record = (self.run.info.get("init") if self.run is not None else None) or {}
        source = (self.run.config.get("init") if record else None)
        if not source:
            return None
        from sslkit.init import load_init

        encoder = self.build_random_encoder()
        try:
            got = load_init(source, encoder, allow_download=False)
        except UsageError as exc:
            print(f"sslkit: note: no 'init' row: {exc}", file=sys.stderr)
            return None
        if got["sha256"] != record.get("sha256"):
            print(f"sslkit: note: no 'init' row: {record.get('source')} changed since the run (sha256 differs)",
                  file=sys.stderr)
            return None
        return encoder.eval()

    def build_random_encoder(self) -> torch.nn.Module:
        """A randomly initialised encoder of this architecture (fixed seed), in eval mode."""
        from sslkit.run import build_baseline_encoder

        return build_baseline_encoder(self.info["backbone"], self.spec, self.info.get("backbone_options") or {})


def open_model(path: str | Path, device: str = "auto") -> EvalModel:
    """A run directory (``sslkit pretrain --out``) or an ``.onnx`` file from ``sslkit export``.

    ``device`` (auto, cpu, cuda) runs PyTorch encoders; ONNX files run in onnxruntime. Refused before
    any work when its report folder (:attr:`EvalModel.report_dir`) cannot be created or written in.
    """
    from sslkit.engine import resolve_device
    from sslkit.run import checkpoint_path, load_run

    dev = str(resolve_device(device))
    p = checkpoint_path(Path(path))  # RUN/checkpoints/step-N as its folder step-0000000N
    if p.is_dir():
        run = load_run(p)
        model = EvalModel(p, "run", run.info, run.spec, run, dev)
    elif not p.is_file():
        raise UsageError(f"model {str(path)!r} does not exist; give a run directory or an .onnx file")
    else:
        meta = embed_mod.read_onnx_metadata(p)
        model = EvalModel(p, "onnx", meta, InputSpec.from_dict(meta["spec"]), None, dev)
    check_report_dir(model.report_dir)  # a read-only run: one line now, not after embedding everything
    return model


def _encoders(model: EvalModel, baseline: bool) -> dict[str, embed_mod.Model]:
    """``{"pretrained", "random", "init"}`` encoders (the baselines only with ``baseline``)."""
    pretrained, device = model.pretrained, model.device
    out = {"pretrained": pretrained}
    if not baseline:
        return out
    baselines = {"random": model.build_random_encoder(), "init": model.build_init_encoder()}
    for name, enc in baselines.items():
        if enc is not None:
            encode = embed_mod.torch_encode(enc, model.spec, device)
            out[name] = embed_mod.Model(model.spec, pretrained.source_options, encode, "torch", pretrained.fixed_options,
                                        max_pixels=pretrained.max_pixels)
    return out


def _combined(model: EvalModel, baseline: bool) -> tuple[embed_mod.Model, list[str], list[int]]:
    """One :class:`sslkit.embed.Model` whose embedding is every encoder's side by side (one pass over the data),
    the encoders' names, and their widths (filled by the first batch)."""
    named = _encoders(model, baseline)
    models = list(named.values())
    first = models[0]
    dims: list[int] = []

    def encode(unit: np.ndarray) -> np.ndarray:
        parts = [m.encode(unit) for m in models]
        dims[:] = [p.shape[1] for p in parts]
        return np.concatenate(parts, 1)

    both = embed_mod.Model(first.spec, first.source_options, encode, first.engine, first.fixed_options, first.inexact,
                           first.max_pixels)
    return both, list(named), dims


def _split(emb: Embeddings, names: list[str], dims: list[int], data: str) -> dict[str, Embeddings]:
    """The combined embeddings of :func:`_combined` as one :class:`Embeddings` per encoder, each checked finite."""
    out, start = {}, 0
    for name, d in zip(names, dims):
        out[name] = replace(emb, embeddings=np.ascontiguousarray(emb.embeddings[:, start:start + d]))
        embed_mod.check_finite(out[name].embeddings, f"the {name} encoder on {data!r}", "no report written")
        start += d
    return out


def embed_all(model: EvalModel, data: str, baseline: bool = True, batch_size: int = 64,
              source_options: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Embeddings]:
    """``{"pretrained": Embeddings, "random": Embeddings[, "init": ...]}`` of ``data`` (``(N, D)`` each), one pass:
    what :func:`sslkit.embed.embed` gives, read with the options :meth:`EvalModel.source_options` resolved.

    Embeddings that are not all finite (a diverged run's NaN weights) are a one-line usage error."""
    source = index_source(model, data, source_options)
    return embed_indexed(model, data, source, index_refs(source, data), baseline, batch_size, progress)


def embed_sample(model: EvalModel, data: str, source: Any, refs: list, choose: Callable[[set[int]], list[int]],
                 baseline: bool = True, batch_size: int = 64, progress: bool = True
                 ) -> tuple[dict[str, Embeddings], int]:
    """:func:`embed_all` of the samples ``choose`` picks among ``refs`` (``source``'s index, from
    :func:`index_source`) only: :func:`decode_sample` decodes them (and no other), in memory, and each part is
    embedded before the next is decoded. Returns the embeddings, in the order chosen, and how many picks failed."""
    both, names, dims = _combined(model, baseline)
    rows: dict[int, np.ndarray] = {}

    def use(kept: list[int], pixels: np.ndarray) -> None:
        rows.update(zip(kept, embed_mod.encode_pixels(both, pixels, batch_size, progress)))

    order, failed, skipped = decode_sample(source, refs, *sample_format(source, refs, model.spec.channels,
                                                                        model.spec.image_size), choose, use, progress)
    embed_mod.warn_inexact(both)
    emb = _embeddings(source, [refs[i] for i in order], np.stack([rows[i] for i in order]), skipped)
    return _split(emb, names, dims, data), failed


def embed_indexed(model: EvalModel, data: str, source: Any, refs: list, baseline: bool = True, batch_size: int = 64,
                  progress: bool = True) -> dict[str, Embeddings]:
    """:func:`embed_all` of ``data`` already indexed (``source`` from :func:`index_source`, ``refs`` from
    :func:`~sslkit.data.pipeline.index_refs`): every sample decoded through the default cache as :func:`embed_all`
    decodes it (:func:`~sslkit.data.pipeline.load_refs`), without indexing the data (and noting its options) again."""
    both, names, dims = _combined(model, baseline)
    loaded = load_refs(source, refs, data, both.spec.image_size, both.spec.channels, progress=progress)
    pixels = embed_mod.encode_pixels(both, loaded.prepared.pixels, batch_size, progress)
    embed_mod.warn_inexact(both)
    return _split(_embeddings(source, loaded.prepared.refs, pixels, loaded.prepared.skipped), names, dims, data)


def _embeddings(source: Any, refs: list, rows: np.ndarray, skipped: list[tuple[str, str]]) -> Embeddings:
    """The :class:`Embeddings` of ``refs`` (``rows``: their embeddings, in that order), as :func:`sslkit.embed.embed`
    makes them: sample ids, labels, the skipped files' count and reasons, label paths."""
    return Embeddings(rows, [embed_mod.sample_id(source, r) for r in refs], [r.label for r in refs],
                      len(skipped), embed_mod.skip_reasons(skipped), [embed_mod.label_paths(source, r) for r in refs])


def check_labels(model: EvalModel, data: str, what: str, labels_csv: str | None,
                 source_options: dict[str, Any] | None = None) -> tuple[dict[str, str] | None, list[str]]:
    """Fail before decoding anything when ``data`` has no labelled image.

    Reads the index only (file names, headers); returns the CSV table and the labels found.
    """
    table, labels, _, _, _ = index_labels(model, data, what, labels_csv, source_options)
    return table, labels


def index_labels(model: EvalModel, data: str, what: str, labels_csv: str | None,
                 source_options: dict[str, Any] | None = None,
                 every: bool = False) -> tuple[dict[str, str] | None, list, list, list, Any]:
    """:func:`check_labels` plus the source's sample refs (ids, split groups), their sample ids
    (the ids embeddings carry: ``Source.sample_id``, else ``ref.id``) and the source, from the index only.
    ``every``: the labels of all refs, None where a ref has none (else only the labels found)."""
    table = read_labels_csv(labels_csv) if labels_csv else None
    source = index_source(model, data, source_options)
    refs = source.index()
    if not refs:
        raise UsageError(f"{what}: no images found in {data!r}")
    ids = [embed_mod.sample_id(source, r) for r in refs]  # what the CSV is matched against after embedding, too
    labels = assign_labels(ids, [r.label for r in refs], table,
                           [embed_mod.label_paths(source, r) for r in refs] if table is not None else ())
    if all(lab is None for lab in labels):
        raise no_labels(what, data, table is not None)
    return table, labels if every else [lab for lab in labels if lab is not None], refs, ids, source


def labelled_embeddings(model: EvalModel, data: str, what: str, table: dict[str, str] | None = None,
                        baseline: bool = True, **kw: Any) -> dict[str, Labelled]:
    """``{"pretrained": Labelled, "random": Labelled}`` (no ``random`` without ``baseline``).

    ``table`` is a labels CSV read by :func:`check_labels` (None: class folders), matched as in
    :func:`index_labels`: against each sample's path, and a volume's slice files and folders.
    """
    out = {}
    for name, emb in embed_all(model, data, baseline, **kw).items():
        labels = assign_labels(emb.ids, emb.labels, table, emb.label_paths)
        out[name] = select_labelled(emb.embeddings, labels, what, data, table is not None, emb.ids)
        out[name].skipped = emb.skip_reasons
    return out


def index_source(model: EvalModel, data: str, source_options: dict[str, Any] | None = None) -> Any:
    """The source of ``data`` as :func:`~sslkit.data.pipeline.load_data` makes it when :func:`embed_all` reads
    ``data`` (:func:`~sslkit.data.pipeline.open_source`): the model's source options and decode limit, and the
    header index under the default cache's ``headers/`` (unchanged DICOM files' headers are not read again). For
    what the index alone tells (labels, header fields, the refs a sample is chosen from)."""
    return open_source(data, model.source_options(data, source_options), None, model.pretrained.max_pixels)


#: the decoded pixels :func:`decode_sample` holds at once: a part is decoded, used, then dropped
PART_BYTES = 256 * 2**20
#: :func:`decode_sample` stops replacing picks that fail to decode after this many failures per pick
TRIES_PER_PICK = 10


def decode_sample(source: Any, refs: list, channels: int, size: Any, choose: Callable[[set[int]], list[int]],
                  use: Callable[[list[int], np.ndarray], None], progress: bool = True
                  ) -> tuple[list[int], int, list[tuple[str, str]]]:
    """Decode only the samples ``choose(failed)`` picks (indices into ``refs``, in the order wanted), in memory
    (a sample fills no cache entry), at most :data:`PART_BYTES` at a time: ``use(indices, pixels)`` gets each
    part's decoded picks. A pick that does not decode joins ``failed`` and ``choose`` is asked again, so the choice
    rule itself replaces it; after :data:`TRIES_PER_PICK` failures per pick it stops there (a note says so).
    Returns the decoded picks in the order chosen, how many picks failed, and the skipped ``(path, reason)``."""
    from sslkit.data.prepare import prepare
    from sslkit.data.room import sides

    done: set[int] = set()
    failed: set[int] = set()
    skipped = list(source.skipped)
    per = max(1, PART_BYTES // (channels * int(np.prod(sides(size))) * 2))
    want = choose(failed)
    limit = TRIES_PER_PICK * max(1, len(want))
    while todo := [i for i in want if i not in done]:
        if len(failed) >= limit:
            print(f"sslkit: note: {len(failed)} of the samples picked failed to decode; using the "
                  f"{len(want) - len(todo)} that did", file=sys.stderr)
            break
        for a in range(0, len(todo), per):
            part = todo[a:a + per]
            prepared = prepare(source, [refs[i] for i in part], channels, size, False, progress)
            decoded = set(prepared.refs)
            kept = [i for i in part if refs[i] in decoded]  # in the order prepare keeps them
            failed.update(i for i in part if refs[i] not in decoded)
            skipped += prepared.skipped
            if kept:
                use(kept, prepared.pixels)
            done.update(kept)
        want = choose(failed)
    if not (picked := [i for i in want if i in done]):
        raise UsageError(f"no decodable image among the {len(failed)} samples tried"
                         f" (first: {skipped[0][1] if skipped else 'unknown'})")
    return picked, len(failed), skipped
