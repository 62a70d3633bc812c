"""Exporter ``safetensors``: the encoder's weights as a timm checkpoint, for fine-tuning.

The file holds the state dict of the plain timm module (keys exactly as
``timm.create_model(name)`` names them, no classifier), so timm loads it like any
pretrained checkpoint, offline::

    model = timm.create_model("resnet18", pretrained=True, num_classes=K, in_chans=C,
                              pretrained_cfg_overlay=dict(file="encoder.safetensors"))

``num_classes=K`` (any K, or 0 for features) is needed because the file has no 1000-class
head; add ``num_classes=0`` to the overlay to make any K work, ``input_size=(C, S, S)``
to silence timm's channel warning, and ``mean``/``std`` so ``timm.data.resolve_data_config``
gives the run's normalisation. The file's header metadata holds all of this
(``timm_create_model`` and ``pretrained_cfg_overlay``, JSON) plus the run's sslkit metadata.
ViTs also need the run's ``img_size`` (else timm resamples the position embeddings) and
``backbone_options`` such as ``patch_size``. Runs with ``cifar_stem`` changed the ResNet
stem: build the model, apply the same change, then ``load_state_dict`` (see README).

Verified before the file appears: timm builds the model from the written file by the
route above and its features equal the trained encoder's (max abs diff 0 in float32).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslkit.api import CheckFailed, InputSpec, UsageError, hookimpl, write_atomic


FORMAT = "sslkit.timm-weights/1"
FP16_TOLERANCE = 1e-2  # relative to the largest |feature| value


def timm_recipe(metadata: dict[str, Any], spec: InputSpec) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model_name, create_model kwargs, pretrained_cfg_overlay without file)`` for a run."""
    prefix, _, name = metadata["backbone"].partition(":")
    if prefix != "timm":
        raise UsageError(f"--format safetensors writes timm checkpoints; backbone {metadata['backbone']!r} is not timm:")
    options = {k: v for k, v in (metadata.get("backbone_options") or {}).items() if k != "cifar_stem"}
    kwargs: dict[str, Any] = {"in_chans": spec.channels, **options}
    overlay = {"num_classes": 0, "input_size": [spec.channels, spec.image_size, spec.image_size],
               "mean": list(spec.mean), "std": list(spec.std)}
    return name, kwargs, overlay


def _create(name: str, kwargs: dict[str, Any], image_size: int, **extra: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, img_size=image_size, **kwargs, **extra)
    except TypeError:  # CNNs take no img_size
        return timm.create_model(name, **kwargs, **extra)


def export_safetensors(encoder: nn.Module, spec: InputSpec, metadata: dict[str, Any], out: Path,
                       fp16: bool = False, **unknown: Any) -> dict[str, Any]:
    """Write ``encoder.model``'s state dict to ``out`` and check timm loads it back."""
    from safetensors.torch import save_file

    if unknown:
        raise UsageError(f"the safetensors exporter has no option {', '.join(sorted(unknown))} (it takes --fp16)")
    name, kwargs, overlay = timm_recipe(metadata, spec)
    net = getattr(encoder, "model", None)
    if not isinstance(net, nn.Module):
        raise UsageError(f"backbone {metadata['backbone']!r} does not wrap a timm module")
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in net.state_dict().items()}
    cifar = bool((metadata.get("backbone_options") or {}).get("cifar_stem"))
    header = {
        "format": FORMAT,
        "timm_model": name,
        "timm_create_model": json.dumps({"model_name": name, **kwargs,
                                         **({"img_size": spec.image_size} if hasattr(net, "patch_embed") else {})}),
        "pretrained_cfg_overlay": json.dumps(overlay),
        "cifar_stem": json.dumps(cifar),
        "dtype": "float16" if fp16 else "float32",
        "sslkit": json.dumps(metadata, sort_keys=True, default=str),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=header)
        report.update(_verify(encoder, tmp, name, kwargs, overlay, spec, cifar, fp16))

    report: dict[str, Any] = {"timm_model": name, "keys": len(state), "cifar_stem": cifar}
    write_atomic(Path(out), write, suffix=".safetensors")
    return report


@torch.no_grad()
def _verify(encoder: nn.Module, file: Path, name: str, kwargs: dict[str, Any], overlay: dict[str, Any],
            spec: InputSpec, cifar: bool, fp16: bool) -> dict[str, Any]:
    """Load ``file`` the way a user would and compare features with ``encoder``."""
    from safetensors.torch import load_file

    from sslkit_plugins.backbones.timm import use_cifar_stem

    logging.getLogger("timm").setLevel(logging.ERROR)
    if cifar:
        model = _create(name, kwargs, spec.image_size, pretrained=False, num_classes=0)
        use_cifar_stem(model)
        model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
        route = "create_model + cifar stem + load_state_dict"
    else:
        model = _create(name, kwargs, spec.image_size, pretrained=True, num_classes=0,
                        pretrained_cfg_overlay={"file": str(file), **overlay})
        route = "timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))"
    model = model.float().eval()
    x = torch.randn(4, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    ref, got = encoder.eval().float()(x), model(x)
    diff = float((ref - got).abs().max())
    limit = FP16_TOLERANCE * float(ref.abs().max()) if fp16 else 0.0
    if not diff <= limit:
        raise CheckFailed(f"timm's model loaded from the safetensors file differs from the encoder: "
                          f"max abs diff {diff:.3g} > {limit:.3g}")
    return {"verified_by": route, "max_abs_diff": diff}


@hookimpl
def register_exporters(register):
    register("safetensors", export_safetensors)
