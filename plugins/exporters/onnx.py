"""Exporter ``onnx``: the encoder as a self-describing, self-verified ONNX file.

Graph: input ``pixels`` ``(batch, C, H, W)``, output ``embedding`` ``(batch, D)``
float32. The batch dimension is always symbolic; height and width are symbolic too for
architectures without a fixed token grid (CNNs), fixed at the run's image size for ViTs.
Exported with the torch dynamo exporter (``torch.onnx.export(dynamo=True)``).

``with_preprocessing=True`` puts the run's mapping from raw pixels (uint8, uint16, or
DICOM modality values with a fixed window; :mod:`sslkit.raw_input`) and its
normalisation inside the graph; resizing always stays with the client. ``sslkit export``
passes ``input_dtype`` following the run's data when none is given (uint16 for 16-bit images:
``metadata["data_pixels"]`` says what was read); called without, a pixels graph takes uint8. A ``--sample volume``
run's client resamples the values the graph takes and pads them with the value the graph maps
to 0 (``input.pad_value``; its ``client_steps`` say how), so a window graph windows after
resampling, as training does.

Every export verifies itself before the file appears: ``onnx.checker`` (full check),
then onnxruntime against PyTorch on random and real inputs (samples of the run's data,
when given) at batch 1 and 8, and at a second image size where H/W are dynamic. Above
``tolerance`` (1e-4) x max(1, max |torch|) (max abs difference, relative to the embedding's scale
where it is above 1: float32 rounding grows with the values) the export fails and nothing is left behind.
On real inputs it also compares the graph on the client's input (the pixels rounded to its dtype) with
the encoder on the unrounded pixels: ``input_rounding`` in the report and the metadata, what the
client's dtype costs (said, never refused; :mod:`.onnx_verify`).
``fp16=True`` additionally converts the graph to float16 (float32 input and output kept)
and checks it against the float32 PyTorch encoder with its own tolerance:
``max |ort - torch| <= fp16_tolerance * max |torch|`` and cosine >= 0.999.

``metadata_props["sslkit"]`` holds JSON: input name, dtype, shape with dynamic axes,
channels, image size, resize rule, mean/std or windows and whether they are in the graph,
output, task, backbone, embedding dim, versions, run id and settings' sha256 (``run_id_from``:
run.json's, or a hash of the weights for older runs), the weights' step and sha256, dataset fingerprint, and the
verification results. Never a path or a patient identifier: the dynamo exporter's own
annotations (per-node stack traces with the build machine's source paths, FX node text,
class names) are stripped before the file is written (:func:`.onnx_strip.strip_build_metadata`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sslkit.api import (CheckFailed, InputSpec, RawInput, UsageError, first_line, hookimpl, is_token_backbone,
    raw_input_for, write_atomic)
from sslkit_plugins.exporters.onnx_strip import strip_build_metadata
from sslkit_plugins.exporters.onnx_verify import INPUT, OUTPUT, example_input, input_rounding, verify

__all__ = ["GraphModule", "export_onnx", "example_input", "verify", "supported_opsets"]


TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2  # relative to the largest |embedding| value
FP16_MIN_COSINE = 0.999
FORMAT = "sslkit.onnx/1"
MAX_SIDE = 8192


class GraphModule(nn.Module):
    """What the ONNX graph computes: raw pixels ``(B, C_in, H, W) -> (B, D)``.

    ``raw.kind == "normalized"`` is the encoder alone; otherwise the input is cast to
    float32, mapped to [0, 1] as :class:`RawInput` documents, normalised with the run's
    mean/std, and encoded.
    """

    def __init__(self, encoder: nn.Module, raw: RawInput, spec: InputSpec) -> None:
        super().__init__()
        self.encoder, self.kind = encoder, raw.kind
        c, ones = spec.channels, (1,) * len(spatial_shape(spec))  # (B, C, H, W) or volumes (B, C, D, H, W)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, c, *ones))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, c, *ones))
        if raw.kind == "window":
            self.register_buffer("lower", torch.tensor(raw.lower, dtype=torch.float32).view(1, -1, *ones))
            self.register_buffer("span", torch.tensor(raw.upper, dtype=torch.float32).view(1, -1, *ones) - self.lower)
        self.scale = {"uint8": 1 / 255.0, "uint16": 1 / 65535.0}.get(raw.kind, 1.0)
        # a window graph's output channel j reads input channel j % C_in (slab:K: each window on each slice)
        self.repeat = len(raw.lower) // raw.channels if raw.kind == "window" and raw.channels > 1 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "normalized":
            return self.encoder(x)
        x = x.to(torch.float32)
        if self.kind == "window":
            if self.repeat > 1:
                x = x.repeat(1, self.repeat, *(1,) * (x.dim() - 2))
            x = (x - self.lower) / self.span
            x = torch.where(torch.isnan(x), torch.zeros_like(x), x).clamp(0.0, 1.0)  # NaN -> 0, as in training
        elif self.scale != 1.0:
            x = x * self.scale
        return self.encoder((x - self.mean) / self.std)


def export_onnx(encoder: nn.Module, spec: InputSpec, metadata: dict[str, Any], out: Path, opset: int = 18,
                with_preprocessing: bool = False, input_dtype: str | None = None, fp16: bool = False,
                tolerance: float = TOLERANCE, fp16_tolerance: float = FP16_TOLERANCE,
                samples: np.ndarray | None = None, samples_note: str | None = None,
                log=None, **unknown: Any) -> dict[str, Any]:
    """Export ``encoder`` to ``out``; returns the verification report.

    ``samples``: real images of the run's data, float32 ``(N, C, S, S)`` in [0, 1]
    (before normalisation), for the real-input parity check; ``samples_note`` says why
    there are none. ``log(line)`` receives progress lines.
    """
    import onnx

    if unknown:
        raise UsageError(f"the onnx exporter has no option {', '.join(sorted(unknown))}")
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise UsageError(f"--opset {opset}: the installed torch exporter writes opsets {low} to {high}")
    out = Path(out)
    log = log or (lambda line: None)
    raw, client_note = raw_input_for(spec, with_preprocessing, input_dtype)
    module = GraphModule(encoder.eval().float(), raw, spec).eval()
    wanted = not is_token_backbone(encoder) and not _has_fixed_grid(encoder) and spec.sample != "volume"
    try:
        model, dynamic_hw = _torch_export(module, raw, spec, opset, wanted)
    except Exception as exc:
        raise CheckFailed(f"torch.onnx.export (dynamo) failed for {metadata.get('backbone')}: "
                          f"{type(exc).__name__}: {first_line(exc)}") from None
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter's version conversion can fail and keep its own opset
        raise CheckFailed(f"--opset {opset}: the exporter wrote opset {written} instead; choose another --opset")
    if wanted and not dynamic_hw:
        log("height/width fixed at the run's size: this architecture did not export with dynamic H/W")
    sizes = [spatial_shape(spec)]
    if dynamic_hw:
        sizes.append((spec.image_size + 32, spec.image_size + 16))

    report: dict[str, Any] = {"tolerance": tolerance, "dynamic_hw": dynamic_hw, "input_kind": raw.kind,
                              "client_note": client_note, "opset": opset}

    strip_build_metadata(model)

    def write(tmp: Path) -> None:
        nonlocal model
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        _summarise(report, verify(tmp, module, raw, spec, sizes, samples, tolerance, None, log), raw, samples,
                   samples_note, log)
        if fp16:
            model, report["fp16"] = _to_fp16(model, tmp, lambda: verify(tmp, module, raw, spec, sizes, samples,
                                                                       fp16_tolerance, FP16_MIN_COSINE, log),
                                             fp16_tolerance)
        entry = model.metadata_props.add()
        entry.key = "sslkit"
        entry.value = json.dumps(_metadata(metadata, spec, raw, dynamic_hw, client_note, fp16, report), sort_keys=True)
        onnx.save_model(model, str(tmp))

    write_atomic(out, write, suffix=".onnx")
    return report


def _summarise(report: dict[str, Any], checks: list[dict[str, Any]], raw: RawInput, samples: np.ndarray | None,
               samples_note: str | None, log: Callable[[str], None]) -> None:
    """The parity checks in ``report``: each, the worst difference (and the limit its check applied) and
    cosine, what real inputs there were (or why none), and what their rounding to the graph's input cost
    (``input_rounding``, against the run's unrounded pixels)."""
    report["checks"] = checks
    rounding = input_rounding(checks, raw)
    if rounding is not None:
        report["input_rounding"] = rounding
    worst = max(checks, key=lambda c: c["max_abs_diff"])
    report["max_abs_diff"], report["limit"] = worst["max_abs_diff"], worst["limit"]  # the limit applied to it
    report["min_cosine"] = min(c["min_cosine"] for c in checks)
    if samples is None or not len(samples):
        report["real_inputs"] = samples_note or "skipped: no real samples given"
        log(f"real-input check {report['real_inputs']}")
    else:
        report["real_inputs"] = samples_note or f"{len(samples)} real samples"


def supported_opsets() -> tuple[int, int]:
    """The opsets the installed torch dynamo exporter writes: 18 (its base) to torch's newest."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a torch without the constant: only what it has always written
        return 18, 18
    return 18, max(18, int(ONNX_MAX_OPSET))


def _to_fp16(model, tmp: Path, check: Callable[[], list[dict[str, Any]]], tolerance: float) -> tuple[Any, dict]:
    """``model`` with float16 weights (float32 inputs and outputs), saved to ``tmp`` and checked
    by ``check()`` against the float32 encoder: the fp16 model and its report. The converter
    appends the float32 input's Cast after the nodes that read it: the graph is sorted again."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True)
    OnnxModel(model).topological_sort()
    onnx.save_model(model, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    checks = check()
    return model, {"tolerance": f"max abs diff <= {tolerance:g} x max |embedding|, cosine >= {FP16_MIN_COSINE}",
                   "checks": checks, "max_abs_diff": max(c["max_abs_diff"] for c in checks),
                   "min_cosine": min(c["min_cosine"] for c in checks)}


def spatial_shape(spec: InputSpec) -> tuple[int, ...]:
    """The graph input's spatial shape: ``(S, S)``, or ``(D, H, W)`` for ``--sample volume``."""
    return tuple(spec.volume_size) if spec.sample == "volume" and spec.volume_size else (spec.image_size,) * 2


def _has_fixed_grid(encoder: nn.Module) -> bool:
    """True when the model holds absolute position embeddings tied to one input size
    (timm ViTs built with ``dynamic_img_size=True`` resample them: not fixed)."""
    if any(getattr(m, "dynamic_img_size", False) for m in encoder.modules()):
        return False
    return any(n.endswith("pos_embed") for n, _ in encoder.named_parameters())


def _torch_export(module: GraphModule, raw: RawInput, spec: InputSpec, opset: int, dynamic_hw: bool):
    """The ONNX ModelProto of ``module``; falls back to a fixed H/W if dynamic export fails."""
    gen = torch.Generator().manual_seed(0)
    example = example_input(raw, 2, spatial_shape(spec), gen)
    Dim = torch.export.Dim
    shapes = {0: Dim("batch", min=1, max=4096)}
    if dynamic_hw:
        shapes.update({2: Dim("height", min=8, max=MAX_SIDE), 3: Dim("width", min=8, max=MAX_SIDE)})
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                output_names=[OUTPUT], dynamic_shapes=(shapes,), external_data=False, verbose=False,
                report=False,
            )
    except Exception:
        if not dynamic_hw:
            raise
        return _torch_export(module, raw, spec, opset, False)
    return program.model_proto, dynamic_hw


def _metadata(base: dict[str, Any], spec: InputSpec, raw: RawInput, dynamic_hw: bool, client_note: str,
              fp16: bool, report: dict[str, Any]) -> dict[str, Any]:
    """The ``sslkit`` metadata entry: the run's ``base`` plus the graph's own contract."""
    s = spec.image_size
    shape: list[Any] = ["batch", raw.channels, "height", "width"] if dynamic_hw else ["batch", raw.channels,
                                                                                      *spatial_shape(spec)]
    normalize_in_graph = raw.kind != "normalized"
    meta = dict(base)
    meta.update({
        "format": FORMAT,
        "input": {
            "name": INPUT, "dtype": raw.dtype, "layout": "NCHW", "shape": shape,
            "dynamic_axes": {"0": "batch", **({"2": "height", "3": "width"} if dynamic_hw else {})},
            "channels": raw.channels, "image_size": s,
            "resize": "client: shorter side to image_size (bilinear, antialiased), centre crop to image_size",
            "raw": raw.to_json(),
            "preprocessing_in_graph": normalize_in_graph,
            "mean": list(spec.mean), "std": list(spec.std),
            "client_steps": client_note,
        },
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", base.get("embedding_dim")]},
        "spec": spec.to_dict(),
        "precision": "float16" if fp16 else "float32",
        "opset": report["opset"],
        "verification": {
            "onnx_checker": "full",
            "float32": {"max_abs_diff": report["max_abs_diff"], "min_cosine": report["min_cosine"],
                        "tolerance": report["tolerance"], "rule": "max abs diff <= tolerance x max(1, max |embedding|)"},
            **({"float16": {k: report["fp16"][k] for k in ("max_abs_diff", "min_cosine", "tolerance")}} if fp16 else {}),
            **({"input_rounding": report["input_rounding"]} if "input_rounding" in report else {}),
            "inputs": sorted({c["inputs"] for c in report["checks"]}),
            "sizes": sorted({tuple(c["size"]) for c in report["checks"]}),
        },
    })
    if spec.sample != "slice":  # slabs and volumes of a volumetric source (sslkit.data.volume)
        meta["input"].update(sample=spec.sample, orientation=spec.orientation)
    if spec.sample == "volume":  # no image size: the client builds a volume of volume_size
        del meta["input"]["image_size"]
        meta["input"].update(layout="NCDHW", volume_size=list(spec.volume_size),
                             spacing_mm=list(spec.spacing) if spec.spacing else "native", pad_value=raw.pad_value,
                             pad_units=_PAD_UNITS[raw.kind],
                             resize="client: resample to spacing_mm (dz, dy, dx; trilinear, along D at the slices' "
                                    "positions; the field of view kept, n voxels -> round(n * spacing / spacing_mm), "
                                    "align_corners=False), centre crop / pad with pad_value to volume_size (D, H, W); "
                                    "client_steps says each step")
    return meta


_PAD_UNITS = {"window": "the graph's input values (modality values, e.g. HU), before its window",
              "normalized": "[0, 1], before (x - mean) / std", "unit": "[0, 1]", "uint8": "uint8", "uint16": "uint16"}


@hookimpl
def register_exporters(register):
    register("onnx", export_onnx)
