"""Exporter ``safetensors``: the encoder's weights as a timm checkpoint, for fine-tuning.

The file holds the state dict of the plain timm module (keys exactly as
``timm.create_model(name)`` names them, no classifier), so timm loads it like any
pretrained checkpoint, offline. Its header metadata (JSON strings) says how:

- ``timm_create_model``: ``create_model`` keyword arguments (``model_name``, the run's
  ``in_chans``, backbone options such as ``patch_size``, and ``img_size`` for ViTs);
- ``pretrained_cfg``: timm's pretrained config of the run: ``input_size`` ``(C, S, S)``,
  ``mean``/``std``, ``crop_pct`` 1.0, ``crop_mode`` center, ``interpolation`` bilinear
  (the run resized the shorter side to S and centre-cropped), ``num_classes`` 0 (the
  file has no classifier, so any ``num_classes`` works);
- ``sslkit``: the run's sslkit metadata.

::

    model = timm.create_model(**create_kwargs, pretrained=True, num_classes=K,
                              pretrained_cfg_overlay=dict(pretrained_cfg, file="encoder.safetensors"))
    timm.data.resolve_data_config(model=model)  # the run's size, mean/std, crop, interpolation

Runs with ``cifar_stem`` changed the ResNet stem: build the model, apply the same change,
then ``load_state_dict`` (see README).

Verified before the file appears: timm builds the model from the written file by the
route above, its features equal the trained encoder's (max abs diff 0 in float32) and
``resolve_data_config`` gives the run's input size, mean/std and crop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslkit.api import CheckFailed, InputSpec, UsageError, hookimpl, write_atomic


FORMAT = "sslkit.timm-weights/2"
FP16_TOLERANCE = 1e-2  # relative to the largest |feature| value
# How sslkit resized for pretraining (shorter side to S, centre crop), in timm's terms.
RESIZE = {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}


def timm_recipe(metadata: dict[str, Any], spec: InputSpec,
                options: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model_name, create_model kwargs, pretrained_cfg without file)`` for a run whose timm
    backbone was built with ``create_model(**options)`` (its ``create_options``)."""
    prefix, _, name = metadata["backbone"].partition(":")
    if prefix != "timm":
        raise UsageError(f"--format safetensors writes timm checkpoints; backbone {metadata['backbone']!r} is not "
                         "a timm backbone (--format onnx exports any backbone)")
    kwargs: dict[str, Any] = {"in_chans": spec.channels, **options}
    overlay = {"num_classes": 0, "input_size": [spec.channels, spec.image_size, spec.image_size],
               "mean": list(spec.mean), "std": list(spec.std), **RESIZE}
    return name, kwargs, overlay


def export_safetensors(encoder: nn.Module, spec: InputSpec, metadata: dict[str, Any], out: Path,
                       fp16: bool = False, samples=None, samples_note: str | None = None, log=None,
                       **unknown: Any) -> dict[str, Any]:
    """Write ``encoder.model``'s state dict to ``out`` and check timm loads it back.

    ``samples``, ``samples_note`` and ``log`` are the keywords sslkit passes every exporter;
    this one checks on random inputs (features are equal bit for bit) and logs nothing.
    """
    from safetensors.torch import save

    if unknown:
        raise UsageError(f"the safetensors exporter has no option {', '.join(sorted(unknown))} (it takes --fp16)")
    options = getattr(encoder, "create_options", None)
    name, kwargs, overlay = timm_recipe(metadata, spec, options or {})
    net = getattr(encoder, "model", None)
    if not isinstance(net, nn.Module) or options is None:
        raise UsageError(f"backbone {metadata['backbone']!r} does not wrap a timm module")
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in net.state_dict().items()}
    cifar = bool((metadata.get("backbone_options") or {}).get("cifar_stem"))
    create = {"model_name": name, **kwargs, **({"img_size": spec.image_size} if hasattr(net, "patch_embed") else {})}
    header = {
        "format": FORMAT,
        "timm_model": name,
        "timm_create_model": json.dumps(create),
        "pretrained_cfg": json.dumps(overlay),
        "cifar_stem": json.dumps(cifar),
        "dtype": "float16" if fp16 else "float32",
        "sslkit": json.dumps(metadata, sort_keys=True, default=str),
    }

    def write(tmp: Path) -> None:
        tmp.write_bytes(sorted_header(save(state, metadata=header)))  # Python's write: a full disk is an OSError
        report.update(_verify(encoder, tmp, create, overlay, spec, cifar, fp16))

    report: dict[str, Any] = {"timm_model": name, "keys": len(state), "cifar_stem": cifar}
    write_atomic(Path(out), write, suffix=".safetensors")
    return report


def sorted_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its header's ``__metadata__`` keys in sorted order: safetensors
    writes them in hash-map order, which changes from one save to the next, so the same export gave
    different bytes. Tensor entries and data are kept as written (offsets count from the data's start);
    the header is padded with spaces to a multiple of 8 bytes, as safetensors pads it."""
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


@torch.no_grad()
def _verify(encoder: nn.Module, file: Path, create: dict[str, Any], cfg: dict[str, Any],
            spec: InputSpec, cifar: bool, fp16: bool) -> dict[str, Any]:
    """Load ``file`` the way a user would (the header's ``create`` kwargs and ``cfg``),
    compare features with ``encoder`` and timm's data config with the run's."""
    import timm
    from safetensors.torch import load_file

    logging.getLogger("timm").setLevel(logging.ERROR)
    if cifar:
        model = timm.create_model(**create, pretrained=False, num_classes=0, pretrained_cfg_overlay=cfg)
        encoder.timm_modifier(model)  # the backbone's own stem change (timm backbone attribute)
        model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
        route = "create_model + cifar stem + load_state_dict"
    else:
        model = timm.create_model(**create, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(cfg, file=str(file)))
        route = "timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg, file=...))"
    model = model.float().eval()
    x = torch.randn(4, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    ref, got = encoder.eval().float()(x), model(x)
    diff = float((ref - got).abs().max())
    limit = FP16_TOLERANCE * float(ref.abs().max()) if fp16 else 0.0
    if not diff <= limit:
        raise CheckFailed(f"timm's model loaded from the safetensors file differs from the encoder: "
                          f"max abs diff {diff:.3g} > {limit:.3g}")
    data = timm.data.resolve_data_config(model=model)
    want = {"input_size": (spec.channels, spec.image_size, spec.image_size), "mean": tuple(spec.mean),
            "std": tuple(spec.std), **RESIZE}
    got_cfg = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items() if k in want}
    if got_cfg != want:
        raise CheckFailed(f"timm.data.resolve_data_config reads {got_cfg} from the safetensors file, not the run's {want}")
    return {"verified_by": route, "max_abs_diff": diff, "data_config": data}


@hookimpl
def register_exporters(register):
    register("safetensors", export_safetensors)
