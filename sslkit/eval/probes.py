"""``sslkit eval knn`` and ``sslkit eval linear``: embed, probe, score, report.

Both score the pretrained encoder and, unless ``baseline=False``, a randomly
initialised encoder of the same architecture on the same images, and save the report
(:mod:`sslkit.eval.report`) in the model's ``eval/`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sslkit.eval.data_args import DataArgs
from sslkit.eval.features import ENCODERS, EvalModel, index_labels, labelled_embeddings, open_model
from sslkit.eval.gain import gains
from sslkit.eval.knn import TEMPERATURE, knn_votes
from sslkit.eval.labels import Labelled, assign_labels, class_index
from sslkit.eval.linear import C_GRID, fit_linear_probe
from sslkit.eval.metrics import classification_metrics
from sslkit.eval.overlap import check_overlap
from sslkit.eval.report import new_report, save_report, skipped_summary
from sslkit.eval.split import fold_method, file_groups_note, group_folds, group_keys, mean_std


@dataclass
class ProbeData:
    """Embedded, labelled train and test sets of every encoder, and the class names.

    In ``--data`` mode both sides of ``sets`` hold all labelled samples and ``folds``
    lists ``(train_idx, test_idx)``; :meth:`fold` gives one fold's sets.
    """

    model: EvalModel
    sets: dict[str, tuple[Labelled, Labelled]]  # encoder -> (train, test)
    classes: list[str]
    positive: int | None
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None
    groups: int = 0
    split_method: str = ""  # how ``folds`` were drawn (sslkit.eval.split.fold_method)
    split_notes: list[str] = field(default_factory=list)  # what the report's settings.split.notes say
    overlap: int = 0  # scored test samples whose content is a scored training sample's (--allow-overlap)
    #: ``(encoder, setting)`` -> per-test-image correctness of a single split, for the paired gain
    correct: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def indices(self, labels: Sequence[str]) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[c] for c in labels], dtype=np.int64)

    def fold(self, i: int) -> "ProbeData":
        tr, te = self.folds[i]
        sets = {e: (take_samples(a, tr), take_samples(a, te)) for e, (a, _) in self.sets.items()}
        return ProbeData(self.model, sets, self.classes, self.positive)


def take_samples(s: Labelled, idx: np.ndarray) -> Labelled:
    """The samples ``idx`` of ``s`` (embeddings, labels, ids)."""
    return Labelled(s.x[idx], [s.labels[i] for i in idx], 0, [s.ids[i] for i in idx] if s.ids else [],
                    groups=[s.groups[i] for i in idx] if s.groups else [])


def prepare(model_path: str, args: DataArgs, needs_run: str | None = None,
            check_model: Callable[[EvalModel], None] | None = None) -> ProbeData:
    """Open the model, check it (``needs_run``, ``check_model``) and the labels before decoding
    anything, embed train and test sets."""
    k = args.check()
    model = open_model(model_path, args.device)
    model.max_pixels = args.max_pixels
    if needs_run:
        model.require_run(needs_run)
    if check_model is not None:
        check_model(model)
    if k is not None:
        return _prepare_folds(model, args, k)
    kw = dict(batch_size=args.batch_size, progress=args.progress)
    table, train_labels, train_refs, train_ids, train_source = index_labels(
        model, args.train, "--train", args.labels_csv, args.options_for("train"))
    _, test_labels, test_refs, test_ids, test_source = index_labels(
        model, args.test, "--test", args.labels_csv, args.options_for("test"))
    class_index(train_labels, test_labels, args.positive)  # fail fast, before embedding
    overlap = check_overlap(train_refs, test_refs, args.allow_overlap, train_ids, test_ids,
                            (train_source, test_source), args.progress)
    train = labelled_embeddings(model, args.train, "--train", table, args.baseline,
                                source_options=args.options_for("train"), **kw)
    test = labelled_embeddings(model, args.test, "--test", table, args.baseline,
                               source_options=args.options_for("test"), **kw)
    classes, positive = class_index(train["pretrained"].labels, test["pretrained"].labels, args.positive)
    group_of = dict(zip(train_ids, group_keys([r.id for r in train_refs], {r.id: r.group for r in train_refs})))
    for s in train.values():  # the linear probe's validation split keeps a patient's images on one side
        s.groups = [group_of[i] for i in s.ids]
    return ProbeData(model, {e: (train[e], test[e]) for e in train}, classes, positive,
                     overlap=overlap.scored(train["pretrained"].ids, test["pretrained"].ids))


def _prepare_folds(model: EvalModel, args: DataArgs, k: int) -> ProbeData:
    """``--data DIR --split group:K``: embed once, assign groups, cut grouped stratified folds."""
    table, labels, refs, ids, _ = index_labels(model, args.data, "--data", args.labels_csv, args.source_options,
                                               every=True)
    known = [lab for lab in labels if lab is not None]
    classes, positive = class_index(known, known, args.positive)
    paths = [r.id for r in refs]  # a pattern or folder reads the file's path; embeddings carry ``ids``
    group_of = dict(zip(ids, group_keys(paths, {r.id: r.group for r in refs}, args.group_by, args.group_pattern)))
    labelled = [(i, lab) for i, lab in zip(ids, labels) if lab is not None]
    group_folds(np.array([classes.index(lab) for _, lab in labelled]), [group_of[i] for i, _ in labelled], k,
                args.seed, classes)  # fail fast (too few groups, a class missing from a fold), before decoding
    note = file_groups_note([group_of[i] for i, _ in labelled], k)  # after the refusals: an error is one line
    embs = labelled_embeddings(model, args.data, "--data", table, args.baseline, batch_size=args.batch_size,
                               source_options=args.source_options, progress=args.progress)
    first = embs["pretrained"]
    groups = [group_of[i] for i in first.ids]
    for s in embs.values():
        s.groups = groups
    y = np.array([classes.index(c) for c in first.labels])
    folds = group_folds(y, groups, k, args.seed, classes)
    return ProbeData(model, {e: (s, s) for e, s in embs.items()}, classes, positive, folds, len(set(groups)),
                     split_method=fold_method(y, groups, k), split_notes=[note] if note else [])


def base_report(kind: str, prep: ProbeData, args: DataArgs, settings: dict[str, Any]) -> dict[str, Any]:
    """A new report with the model, data (train/test or folds), classes and ``settings`` filled in."""
    report = new_report(kind, prep.model.describe(), settings)
    tr, te = prep.sets["pretrained"]
    if prep.folds is not None:
        settings["split"] = {"kind": "group", "folds": len(prep.folds), "group_by": "pattern" if args.group_pattern
                             else args.group_by, "group_pattern": args.group_pattern, "seed": args.seed,
                             "method": prep.split_method, "notes": prep.split_notes}
        report["data"] = {"data": {"source": args.data, "samples": len(tr.labels), "unlabelled": tr.unlabelled,
                                   "groups": prep.groups, "skipped": skipped_summary(tr.skipped)}}
        pairs = (("data", tr),)
    else:
        report["data"] = {
            "train": {"source": args.train, "samples": len(tr.labels), "unlabelled": tr.unlabelled,
                      "skipped": skipped_summary(tr.skipped), **_side_options(args.train_options)},
            "test": {"source": args.test, "samples": len(te.labels), "unlabelled": te.unlabelled,
                     "skipped": skipped_summary(te.skipped), **_side_options(args.test_options)},
        }
        if args.allow_overlap:
            report["data"]["overlap"] = {"test_samples_in_train": prep.overlap,
                                         "by": "sha256 of file content (and frame), or the source's content key",
                                         "counted": "scored test images (decoded, labelled) whose content is a "
                                                    "scored training image's"}
        pairs = (("train", tr), ("test", te))
    report["classes"] = prep.classes
    report["class_counts"] = {split: {c: int(n) for c, n in zip(*np.unique(s.labels, return_counts=True))}
                              for split, s in pairs}
    report["positive_class"] = prep.classes[prep.positive] if prep.positive is not None else None
    return report


def over_folds(prep: ProbeData, fn) -> dict[str, dict[str, Any]]:
    """``fn(prep)`` once, or per fold with each metric's mean, ``std`` and ``folds`` (``--split``)."""
    if prep.folds is None:
        return fn(prep)
    runs = [fn(prep.fold(i)) for i in range(len(prep.folds))]
    return {enc: {s: mean_std([r[enc][s] for r in runs]) for s in runs[0][enc]} for enc in runs[0]}


def knn_results(prep: ProbeData, ks: Sequence[int] = (20, 200),
                temperature: float = TEMPERATURE) -> dict[str, dict[str, Any]]:
    """``{encoder: {"k=K": metrics}}`` of the weighted kNN for every ``k``."""
    if prep.folds is not None:
        return over_folds(prep, lambda p: knn_results(p, ks, temperature))
    results, device = {}, prep.model.device if prep.model is not None else "cpu"  # features alone: the CPU
    for enc, (tr, te) in prep.sets.items():
        ytr, yte = prep.indices(tr.labels), prep.indices(te.labels)
        votes = knn_votes(tr.x, ytr, te.x, len(prep.classes), ks, temperature, device=device)
        prep.correct.update({(enc, f"k={k}"): v.argmax(1) == yte for k, v in votes.items()})
        results[enc] = {
            f"k={k}": {**classification_metrics(yte, v.argmax(1), v, len(prep.classes), prep.positive),
                       "k_used": min(k, len(ytr))}
            for k, v in votes.items()
        }
    return results


def linear_results(prep: ProbeData, C_grid: Sequence[float] = C_GRID, val_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{encoder: {"linear": metrics + chosen C}}`` of the frozen-feature linear probe."""
    if prep.folds is not None:
        return over_folds(prep, lambda p: linear_results(p, C_grid, val_fraction, seed))
    results = {}
    for enc, (tr, te) in prep.sets.items():
        ytr, yte = prep.indices(tr.labels), prep.indices(te.labels)
        probe = fit_linear_probe(tr.x, ytr, len(prep.classes), C_grid, val_fraction, seed=seed,
                                 groups=tr.groups or None)
        p = probe.predict_proba(te.x)
        prep.correct[(enc, "linear")] = p.argmax(1) == yte
        results[enc] = {"linear": {
            **classification_metrics(yte, p.argmax(1), p, len(prep.classes), prep.positive),
            "C": probe.C, "val_balanced_accuracy": probe.val_scores.get(probe.C),
            "val_balanced_accuracy_by_C": {f"{C:g}": v for C, v in sorted(probe.val_scores.items())}}}
    return results


def evaluate_knn(model_path: str, args: DataArgs, ks: Sequence[int] = (20, 200),
                 temperature: float = TEMPERATURE) -> dict[str, Any]:
    """Weighted kNN (Wu et al. 2018) for every ``k``; returns the saved report."""
    prep = prepare(model_path, args)
    report = base_report("knn", prep, args, {"k": list(ks), "temperature": temperature, "metric": "cosine",
                                         "baseline": args.baseline})
    report["results"] = knn_results(prep, ks, temperature)
    report["gain"] = gains(report["results"], prep.correct)
    save_report(report, prep.model.report_dir)
    return report


def evaluate_linear(model_path: str, args: DataArgs, C_grid: Sequence[float] = C_GRID,
                    val_fraction: float = 0.2, seed: int = 0, finetune: bool = False,
                    finetune_options: Any = None) -> dict[str, Any]:
    """Linear probe on frozen features (and optionally a short fine-tune); returns the saved report."""
    prep = prepare(model_path, args, "--finetune" if finetune else None,
                   _check_layer_decay if finetune and finetune_options and finetune_options.layer_decay else None)
    settings: dict[str, Any] = {"C_grid": sorted(C_grid), "val_fraction": val_fraction, "seed": seed,
                                "val_split": val_split_kind(prep), "standardize": True, "baseline": args.baseline}
    if finetune:
        from dataclasses import asdict

        from sslkit.eval.finetune import FinetuneOptions

        finetune_options = finetune_options or FinetuneOptions()
        settings["finetune"] = asdict(finetune_options)
    report = base_report("linear", prep, args, settings)
    report["results"] = linear_results(prep, C_grid, val_fraction, seed)
    if finetune:
        _add_finetune(report, prep, args, finetune_options)
    report["gain"] = gains(report["results"], prep.correct)
    save_report(report, prep.model.report_dir)
    return report


def val_split_kind(prep: ProbeData) -> str:
    """How the linear probe's validation split (the one that chooses ``C``) is drawn: ``"group"`` when
    some split group (patient) holds two or more of the labelled images, whole groups to one side; else
    ``"image"``. Of the whole labelled set: a fold or label fraction whose images are all from different
    patients is split per image, which is the same split."""
    groups = prep.sets["pretrained"][0].groups
    return "group" if len(set(groups)) < len(groups) else "image"


def _check_layer_decay(model: EvalModel) -> None:
    """``--finetune-layer-decay`` needs a ViT: refused before any image is decoded."""
    from sslkit.eval.finetune import Classifier
    from sslkit.init.continued import layer_decay_scale

    layer_decay_scale(Classifier(model.build_random_encoder(), 2), 1.0, "--finetune-layer-decay")


def _side_options(options: dict[str, Any]) -> dict[str, Any]:
    """A side's own source options (``--train-opt`` / ``--test-opt``) for the report, when given."""
    return {"options": {k: str(v) for k, v in options.items()}} if options else {}


def _add_finetune(report: dict[str, Any], prep: ProbeData, args: DataArgs, options: Any) -> None:
    """``results[encoder]["finetune"]``: each encoder fine-tuned on the training images and scored
    on the test images; over ``--split group:K``, once per fold (the folds of the probes), with
    each metric's mean, ``std`` and ``folds``."""
    from sslkit.engine import resolve_device

    run, dev = prep.model.require_run("--finetune"), resolve_device(args.device)
    if prep.folds is None:
        (xtr, _, ytr), (xte, _, yte) = (_labelled_pixels(prep, args, side, run.spec) for side in ("train", "test"))
        scores = _finetune_each(prep, run, xtr, ytr, xte, yte, options, dev, args)
    else:  # the folds index the embedded samples: find each one's pixels by its id
        pixels, ids, _ = _labelled_pixels(prep, args, "data", run.spec)
        first, row = prep.sets["pretrained"][0], {sample: i for i, sample in enumerate(ids)}
        at, y = np.array([row[i] for i in first.ids], dtype=np.int64), prep.indices(first.labels)
        runs = [_finetune_each(prep, run, pixels.rows(at[tr]), y[tr], pixels.rows(at[te]), y[te], options, dev,
                               args, False) for tr, te in prep.folds]
        scores = {enc: mean_std([r[enc] for r in runs]) for enc in runs[0]}
    for enc, metrics in scores.items():
        report["results"][enc]["finetune"] = {**metrics, "epochs": options.epochs}


def _labelled_pixels(prep: ProbeData, args: DataArgs, side: str,
                     spec: Any) -> tuple["Rows", list[str], np.ndarray]:
    """The labelled images of one side (``train``, ``test`` or ``data``): uint16 ``(N, C, S, S)``
    at the run's input size, as :class:`Rows` of the decoded (memory-mapped) cache, not a copy;
    their sample ids and their class indices."""
    data = {"train": args.train, "test": args.test, "data": args.data}[side]
    from sslkit.data.pipeline import load_data
    from sslkit.embed import label_paths, sample_id
    from sslkit.eval.labels import read_labels_csv

    table = read_labels_csv(args.labels_csv) if args.labels_csv else None
    loaded = load_data(data, spec.image_size, spec.channels, prep.model.source_options(data, args.options_for(side)),
                       progress=args.progress, max_pixels=prep.model.pixel_limit)
    refs, source = loaded.prepared.refs, loaded.source
    ids = [sample_id(source, r) for r in refs]  # as the embeddings' ids (a volume's series key)
    labels = assign_labels(ids, [r.label for r in refs], table, [label_paths(source, r) for r in refs])
    keep = np.array([i for i, lab in enumerate(labels) if lab is not None], dtype=np.int64)
    return Rows(loaded.prepared.pixels, keep), [ids[i] for i in keep], prep.indices([labels[i] for i in keep])


class Rows:
    """Rows ``at`` of an ``(N, ...)`` array, read when asked: ``rows[idx]`` is ``pixels[at[idx]]``.

    What fine-tuning reads instead of a copy ``pixels[at]``: its batch loader (``len``, ``shape``,
    ``ndim``, integer-array indexing) reads one batch at a time, so the labelled images of the
    memory-mapped decoded cache are never all in memory at once."""

    def __init__(self, pixels: np.ndarray, at: np.ndarray) -> None:
        self.pixels, self.at = pixels, np.asarray(at, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.at)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.at), *self.pixels.shape[1:])

    @property
    def ndim(self) -> int:
        return self.pixels.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.pixels.dtype

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.pixels[self.at[idx]]

    def rows(self, idx: np.ndarray) -> "Rows":
        """Rows ``idx`` of these rows, still unread."""
        return Rows(self.pixels, self.at[idx])


def _finetune_each(prep: ProbeData, run: Any, xtr: Rows, ytr: np.ndarray, xte: Rows, yte: np.ndarray,
                   options: Any, dev: Any, args: DataArgs, paired: bool = True) -> dict[str, dict[str, Any]]:
    """``{encoder: metrics}``: each encoder (pretrained, the random baseline, the ``--init``
    weights) fine-tuned on ``xtr`` and scored on ``xte``; ``paired``: each test image's verdict
    kept for the paired gain of a single split."""
    import copy

    from sslkit.eval.finetune import finetune, predict_proba

    out = {}
    for enc in prep.sets:  # "init": a copy of the --init weights (fine-tuning trains in place; folds share them)
        encoder = (run.build_encoder() if enc == "pretrained" else copy.deepcopy(prep.model.build_init_encoder())
                   if enc == "init" else prep.model.build_random_encoder())
        model = finetune(encoder, run.spec, xtr, ytr, len(prep.classes), options, dev, args.progress)
        p = predict_proba(model, run.spec, xte, args.batch_size, dev)
        if paired:
            prep.correct[(enc, "finetune")] = p.argmax(1) == yte
        out[enc] = classification_metrics(yte, p.argmax(1), p, len(prep.classes), prep.positive)
    return out


__all__ = ["DataArgs", "ENCODERS", "evaluate_knn", "evaluate_linear"]
