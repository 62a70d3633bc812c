"""The ONNX exporter's parity checks (:func:`verify`): onnxruntime on the written file against the
graph's module in PyTorch, on random and real inputs; and, on the real ones, what rounding the
client's input to the graph's dtype costs against the run's unrounded pixels (:func:`input_rounding`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslkit.api import CheckFailed, InputSpec, RawInput

INPUT, OUTPUT = "pixels", "embedding"


def example_input(raw: RawInput, batch: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Random raw pixels of the graph's input kind ``(batch, C_in, H, W)``."""
    shape = (batch, raw.channels, *size)
    if raw.kind == "normalized":
        return torch.randn(shape, generator=gen)
    if raw.kind == "unit":
        return torch.rand(shape, generator=gen)
    if raw.kind in ("uint8", "uint16"):
        top = 256 if raw.kind == "uint8" else 65536
        return torch.randint(0, top, shape, generator=gen, dtype=torch.int32).to(getattr(torch, raw.kind))
    lo, hi = min(raw.lower), max(raw.upper)
    margin = 0.25 * (hi - lo)
    return torch.rand(shape, generator=gen) * (hi - lo + 2 * margin) + (lo - margin)


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """Max abs difference, min cosine (per row), and max |ref|."""
    diff = float(np.abs(ref.astype(np.float64) - got).max())
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = float(np.min(np.sum(ref.astype(np.float64) * got, 1) / np.maximum(norms, 1e-12)))
    return diff, cos, float(np.abs(ref).max())


def _normalised(spec: InputSpec, unit: np.ndarray) -> np.ndarray:
    ones = (1,) * (unit.ndim - 2)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, *ones)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, *ones)
    return ((unit - mean) / std).astype(np.float32)


def check_inputs(raw: RawInput, spec: InputSpec, sizes: list[tuple[int, int]], samples: np.ndarray | None,
                 gen: torch.Generator) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """``(kind, graph input, unit)`` to check: random inputs at each size, batch 1 and 8, then the real
    samples (float32 in [0, 1], resized as in training: ``unit``, unrounded) as the client feeds them:
    rounded to the graph's dtype (:meth:`RawInput.from_unit`), or normalised for a graph without
    preprocessing. Random inputs have no ``unit``."""
    from sslkit.api import resize_square

    inputs: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for size in sizes:
        for b in (1, 8):
            inputs.append(("random", example_input(raw, b, size, gen).numpy(), None))
    if samples is None or not len(samples):
        return inputs
    for size in sorted({s[0] for s in sizes}) if samples.ndim == 4 else [None]:  # volumes: their own size
        unit = np.stack([resize_square(s, size) for s in samples]) if size not in (None, samples.shape[-1]) else samples
        unit = np.resize(unit, (max(8, len(unit)), *unit.shape[1:]))  # tile up to batch 8
        for b in (1, 8):
            u = unit[:b].astype(np.float32)
            inputs.append(("real", _normalised(spec, u) if raw.kind == "normalized" else raw.from_unit(u), u))
    return inputs


def verify(path: Path, module: Any, raw: RawInput, spec: InputSpec, sizes: list[tuple[int, int]],
           samples: np.ndarray | None, tolerance: float, min_cosine: float | None, log) -> list[dict[str, Any]]:
    """onnxruntime on ``path`` vs ``module`` in PyTorch float32, random and real inputs.

    ``min_cosine=None``: the float32 rule, max abs difference <= ``tolerance`` x max(1, max |reference|)
    (absolute for embeddings within [-1, 1], relative above); otherwise the float16 rule
    (``tolerance`` x max |reference|, and a cosine floor). The float32 checks of real inputs also
    compare the graph on the client's input with the encoder (``module.encoder``) on the unrounded
    pixels (``unrounded``: said, never refused: it is the client's dtype, not the export).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no buffer-reuse warnings when the second size runs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    encoder = getattr(module, "encoder", None) if min_cosine is None else None
    checks = []
    for kind, x, unit in check_inputs(raw, spec, sizes, samples, torch.Generator().manual_seed(0)):
        with torch.no_grad():
            ref = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        got = session.run([OUTPUT], {INPUT: x})[0]
        diff, cos, scale = compare(ref, got)
        limit = tolerance * (max(1.0, scale) if min_cosine is None else scale)
        check = {"inputs": kind, "batch": int(x.shape[0]), "size": [int(v) for v in x.shape[2:]],
                 "max_abs_diff": diff, "min_cosine": cos, "limit": limit}  # the max abs diff allowed here
        label, dims = "fp16 " if min_cosine is not None else "", "x".join(map(str, x.shape[2:]))
        line = f"{label}parity {kind:6s} batch {x.shape[0]} {dims}: max abs diff {diff:.2e}, min cosine {cos:.6f}"
        if unit is not None and encoder is not None:
            with torch.no_grad():
                unrounded = encoder(torch.from_numpy(_normalised(spec, unit))).numpy()
            d, c, s = compare(unrounded, got)
            check["unrounded"] = {"max_abs_diff": d, "min_cosine": c, "max_abs_embedding": s}
            line += f"; vs the unrounded pixels: max abs diff {d:.2e}, min cosine {c:.6f}"
        checks.append(check)
        log(line)
        if not (diff <= limit and (min_cosine is None or cos >= min_cosine)):
            rule = (f"max abs diff {diff:.3g} > {limit:.3g} ({tolerance:g} x max(1, max |embedding| {scale:.3g}))"
                    if min_cosine is None else
                    f"max abs diff {diff:.3g} (limit {tolerance:g} x max |embedding| {scale:.3g}), "
                    f"min cosine {cos:.6f} (limit {min_cosine})")
            raise CheckFailed(f"ONNX {label}parity failed on {kind} inputs at batch {x.shape[0]}, {dims}: {rule}")
    return checks


def input_rounding(checks: list[dict[str, Any]], raw: RawInput) -> dict[str, Any] | None:
    """What the real inputs' rounding to the graph's input cost (the checks' ``unrounded``): the worst max
    abs difference, it relative to the largest |embedding| value of the unrounded pixels, the lowest
    cosine; None without real inputs."""
    real = [c["unrounded"] for c in checks if "unrounded" in c]
    if not real:
        return None
    worst, peak = max(r["max_abs_diff"] for r in real), max(r["max_abs_embedding"] for r in real)
    return {"input": raw.kind, "checks": len(real), "max_abs_diff": worst, "relative": worst / max(peak, 1e-12),
            "min_cosine": min(r["min_cosine"] for r in real)}
