"""Multi-echo and dynamic series: one volume per echo / time point where positions repeat.

A series (or an enhanced multi-frame file) that holds several echoes or time points has
every slice position several times. Which of its images belong together is said by
EchoNumbers, TemporalPositionIdentifier, TriggerTime or AcquisitionNumber (single-frame
files), or by the per-frame MR Echo and Frame Content functional groups (enhanced files:
EffectiveEchoTime, TemporalPositionIndex). :func:`split_repeats` uses them, in that
order, only as far as they explain the repeats.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: positions closer than this (mm) along the normal are the same position
SAME_MM = 1e-3
#: what splits a series whose positions repeat, in the order tried: (header fact, keyword, name)
REPEATS = (("echo", "EchoNumbers", "echo"), ("temporal", "TemporalPositionIdentifier", "time point"),
           ("trigger", "TriggerTime", "trigger time"), ("acquisition", "AcquisitionNumber", "acquisition"))
SUFFIX = {"echo": "e", "temporal": "t", "trigger": "tt", "acquisition": "a"}  # of a split volume's key


def label(value: Any) -> float | None:
    """A number that labels an echo or a time point (the first of a multi-valued element), rounded."""
    if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, 3) if math.isfinite(v) else None


def frame_facts(per_frame: Sequence[Any]) -> list[dict[str, float | None]] | None:
    """Per frame of an enhanced file: ``echo`` (the rank of its EffectiveEchoTime among the
    file's, from 1, as EchoNumbers counts) and ``temporal`` (TemporalPositionIndex); None
    when no frame says either."""
    def first(group: Any, sequence: str, keyword: str) -> float | None:
        items = group.get(sequence) if group is not None else None
        return label(items[0].get(keyword)) if items else None

    times = [first(f, "MREchoSequence", "EffectiveEchoTime") for f in per_frame]
    temporal = [first(f, "FrameContentSequence", "TemporalPositionIndex") for f in per_frame]
    if all(t is None for t in times + temporal):
        return None
    rank = {t: i + 1 for i, t in enumerate(sorted({t for t in times if t is not None}))}
    return [{"echo": rank.get(t), "temporal": p} for t, p in zip(times, temporal)]


def repeated(positions: np.ndarray, orientation: Sequence[float]) -> int:
    """How many of ``positions (N, 3)`` repeat a position already taken along the normal."""
    if len(positions) < 2:
        return 0
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    d = np.sort(np.asarray(positions, float) @ np.cross(row, col))
    return int(np.sum(np.diff(d) < SAME_MM))


def split_repeats(positions: np.ndarray, facts: Sequence[dict[str, Any]], orientation: Sequence[float]
                  ) -> tuple[list[tuple[str, str, list[int]]], list[str]]:
    """Images at ``positions (N, 3)`` with their ``facts`` -> one part per echo / time point.

    Where positions repeat, the facts of :data:`REPEATS` that vary are tried in order
    (echo, temporal position, trigger time, acquisition number); one is used when it
    lowers the number of repeated positions without leaving a part of a single image
    (a number that changes every slice, as AcquisitionNumber may, explains nothing),
    until none repeat. Returns ``([(key suffix, label, indices)], names of the facts
    used)``; one part ``("", "", all)`` when no fact explains the repeats (they stay
    reported as duplicate positions).
    """
    positions = np.asarray(positions, float)
    every = list(range(len(positions)))
    left = repeated(positions, orientation)
    used: list[tuple[str, str]] = []
    groups: dict[tuple, list[int]] = {(): every}
    for fact, _, name in REPEATS:
        if not left:
            break
        if len({f.get(fact) for f in facts}) < 2:
            continue
        trial: dict[tuple, list[int]] = {}
        for i in every:
            trial.setdefault(tuple(facts[i].get(f) for f, _ in used) + (facts[i].get(fact),), []).append(i)
        repeats = sum(repeated(positions[g], orientation) for g in trial.values())
        if repeats < left and min(map(len, trial.values())) > 1:
            used, groups, left = used + [(fact, name)], trial, repeats
    if not used:
        return [("", "", every)], []

    def order(values: tuple) -> tuple:
        return tuple((v is None, v or 0.0) for v in values)

    parts = []
    for values in sorted(groups, key=order):
        suffix = "".join(f".{SUFFIX[fact]}{'x' if v is None else f'{v:g}'}" for (fact, _), v in zip(used, values))
        text = ", ".join(f"{name} {'unknown' if v is None else f'{v:g}'}" for (_, name), v in zip(used, values))
        parts.append((suffix, text, groups[values]))
    return parts, [name for _, name in used]
