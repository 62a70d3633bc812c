"""The backbone a run builds when the user names none: the task's default fitted to the images,
or the architecture that ``--init``'s weights name (an sslkit run's record, a timm tag, a
Hugging Face model's ``config.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.output_file import read_json
from sslkit.run import RUN_JSON, checkpoint_path, split_checkpoint

# Hugging Face ViT widths -> (timm size name, depth, heads) of the published models
_HF_SIZES = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
             1536: ("giant", 40, 24)}


def run_backbone(task_cls: type, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The backbone name and options the run builds, under the user's options: the user's
    backbone; with ``--init``, the architecture its weights name (:func:`init_backbone`), else the
    task's default for the image size (``default_backbone_for``) as named; without, that default with its
    ``default_backbone_options`` for the image size."""
    options = dict(values.get("backbone_options") or {})
    if values.get("backbone"):
        return values["backbone"], options
    size = values.get("image_size")
    default = task_cls.default_backbone_for(size) if isinstance(size, int) else task_cls.default_backbone
    init = values.get("init")
    if init:
        named = init_backbone(str(init))
        return (named[0], {**named[1], **options}) if named else (default, options)
    fitted = task_cls.default_backbone_options(size) if isinstance(size, int) else {}
    return default, {**fitted, **options}


def init_backbone(init: str) -> tuple[str, dict[str, Any]] | None:
    """(backbone, options) that ``--init``'s weights were made for, when they say: the backbone an
    sslkit run (or the run of a checkpoint) recorded, or the one an ``sslkit export --format safetensors``
    file's header records, a timm tag's architecture
    (``timm:vit_small_patch14_dinov2.lvd142m`` -> ``timm:vit_small_patch14_dinov2``), or the timm
    twin of a Hugging Face ViT / DINOv2 ``config.json`` in a model folder or the local Hub cache.
    None otherwise (a bare weights file): the task's default, which ``--init`` then checks."""
    init = init.strip()
    if init.startswith("timm:"):
        arch = init[5:].split(".", 1)[0].strip()
        return (f"timm:{arch}", {}) if arch else None  # none named: --init reports it when it resolves
    path = checkpoint_path(Path(init).expanduser())  # RUN/checkpoints/step-N as its folder
    if path.is_file() and path.suffix == ".safetensors":
        return exported_backbone(path)
    if path.is_dir():
        return recorded_backbone(split_checkpoint(path)[0] / RUN_JSON) or hf_backbone(read_json(path / "config.json"))
    if init.startswith(("hf-hub:", "hf:")) or (init.count("/") == 1 and not path.exists()
                                                and not init.startswith((".", "/", "~"))):
        from huggingface_hub import try_to_load_from_cache

        from sslkit.init.resolve import hub_cache_dir

        repo, _, revision = init.split(":", 1)[-1].partition("@")
        try:
            hit = try_to_load_from_cache(repo, "config.json", cache_dir=str(hub_cache_dir()), revision=revision or None)
        except Exception:  # a name the Hub client refuses: --init reports it when it resolves the weights
            return None
        return hf_backbone(read_json(Path(hit))) if isinstance(hit, str) else None
    return None


def hf_backbone(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The timm model (and options) of a Hugging Face ``ViTModel`` / ``Dinov2Model`` /
    ``Dinov2WithRegistersModel`` config: a published size by name, another width, depth or head
    count as options of the nearest; None for other model types."""
    kind = config.get("model_type")
    try:
        width, depth, heads = (int(config[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        patch = int(config.get("patch_size", 14 if kind != "vit" else 16))
        mlp_ratio = float(config.get("mlp_ratio") or int(config.get("intermediate_size", 4 * width)) / width)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    size, std_depth, std_heads = _HF_SIZES.get(width, ("small", None, None))
    if kind in ("dinov2", "dinov2_with_registers"):
        registers = int(config.get("num_register_tokens", 0) or 0)
        reg = f"_reg{registers}" if registers else ""
        swiglu = bool(config.get("use_swiglu_ffn"))
        if swiglu != (size == "giant") or patch != 14 or registers not in (0, 4):
            return None
        name = f"vit_{size}_patch14{reg}_dinov2"
    elif kind == "vit":
        name = f"vit_{size}_patch{patch}_224"
    else:
        return None
    import timm

    if not timm.is_model(name):
        return None
    options = {} if (depth, heads) == (std_depth, std_heads) else {"embed_dim": width, "depth": depth,
                                                                     "num_heads": heads}
    if options and mlp_ratio != 4.0 and size != "giant":
        options["mlp_ratio"] = mlp_ratio
    return f"timm:{name}", options


def exported_backbone(file: Path) -> tuple[str, dict[str, Any]] | None:
    """(backbone, backbone options) of the run an ``sslkit export --format safetensors`` file came from
    (its header's ``sslkit`` metadata); None for another safetensors file, or one that cannot be read
    (``--init`` reports that when it loads the weights)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:  # the header only; no torch needed
            recorded = json.loads((f.metadata() or {}).get("sslkit") or "{}")
        return str(recorded["backbone"]), dict(recorded.get("backbone_options") or {})
    except Exception:  # not sslkit's, or not a safetensors file at all
        return None


def recorded_backbone(run_json: Path) -> tuple[str, dict[str, Any]] | None:
    """(backbone, backbone options) from a run's ``run.json``; None when it is not a readable one
    (``--init`` reports what is wrong with it when it loads the weights)."""
    config = read_json(run_json).get("config")
    try:
        return str(config["backbone"]), dict(config.get("backbone_options") or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
