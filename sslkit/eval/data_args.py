"""What ``sslkit eval knn``, ``linear`` and ``curve`` evaluate on: the labelled images (``--train`` and
``--test``, or one ``--data`` folder split into grouped folds), how to read them, and the checks
that refuse a combination of options in one line before anything is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sslkit.errors import UsageError
from sslkit.eval.split import parse_split


@dataclass
class DataArgs:
    """Which labelled images to evaluate on and how to read them."""

    train: str | None = None
    test: str | None = None
    labels_csv: str | None = None
    positive: str | None = None
    baseline: bool = True
    batch_size: int = 64
    source_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    device: str = "auto"  # PyTorch encoders and the kNN's scoring: auto, cpu, cuda
    # one labelled folder, grouped k-fold (sslkit.eval.split) instead of --train/--test
    data: str | None = None
    split: str | None = None  # "group:K"
    group_by: str = "source"  # source | folder
    group_pattern: str | None = None  # regex on the file name
    seed: int = 0  # fold assignment
    allow_overlap: bool = False  # --train/--test sharing images: evaluate anyway, report the count
    max_pixels: int | None = None  # decode limit (None: the run's --max-pixels)
    train_options: dict[str, Any] = field(default_factory=dict)  # --train-opt: over source_options, --train only
    test_options: dict[str, Any] = field(default_factory=dict)  # --test-opt: over source_options, --test only
    split_only: tuple[str, ...] = ()  # flags given that act on --data's folds only (knn's --seed)

    def options_for(self, side: str) -> dict[str, Any]:
        """The source options of one side (``train``, ``test`` or ``data``): ``--data-opt`` and the
        source flags, then ``--train-opt`` (``--test-opt``) for that side."""
        own = {"train": self.train_options, "test": self.test_options, "data": {}}[side]
        return {**self.source_options, **own}

    def check(self) -> int | None:
        """The fold count of ``--data`` mode (None for ``--train/--test``); one-line errors otherwise."""
        if self.data is not None:
            if self.train or self.test:
                raise UsageError("give either --data (one labelled folder, split into folds) or --train and --test")
            if self.train_options or self.test_options:
                raise UsageError("--train-opt and --test-opt apply to --train and --test; with --data give --data-opt")
            if self.allow_overlap:
                raise UsageError("--allow-overlap applies to --train and --test (images in both); --data is one "
                                 "labelled folder, split into folds")
            return parse_split(self.split or "group:5")
        if not (self.train and self.test):
            raise UsageError("give --train and --test, or one labelled folder with --data DIR --split group:5")
        given = [flag for flag, on in (("--split", self.split), ("--group-pattern", self.group_pattern),
                                       ("--group-by folder", self.group_by != "source")) if on] + list(self.split_only)
        if given:
            raise UsageError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --data (one "
                             "labelled folder); --train/--test are already split")
        return None
