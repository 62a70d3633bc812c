"""``--init``: start a backbone from published or earlier weights instead of random init.

:func:`load_init` resolves the source (:mod:`.resolve`: local file, run directory, Hub
id or timm tag, offline by default), reads it without running pickled code
(:mod:`.read`), renames its keys to timm's (:mod:`.keymap`), fits them to the backbone
(:mod:`.adapt`: input channels, patch size, position grid) and loads them. Weights that
cannot be fitted (a shape, more than 10 % of the backbone missing, numbered blocks the backbone
lacks: :func:`.adapt.extra_blocks`) are one :class:`~sslkit.errors.UsageError` line naming them. A
``--resume`` from a checkpoint does not read them again (:mod:`.resume`).

A backbone says where its published-layout weights live with an optional
``init_target()`` method returning ``{"module", "first_conv", "pos_embed", "grid",
"prefix_tokens"}`` (the timm plugin has one); without it the whole backbone is the
target and its first 4-D weight is taken as the stem.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslkit.errors import UsageError
from sslkit.init.adapt import extra_blocks, fit
from sslkit.init.keymap import to_timm
from sslkit.init.read import read_weights
from sslkit.init.resolve import InitFile, resolve_init

MAX_MISSING_FRACTION = 0.1  # more of the backbone missing than this: the weights are of another model
ARCH_HINT = "; --backbone names the architecture the weights were made for"
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: many checkpoints omit it, never counted missing


def load_init(init: str, backbone: nn.Module, allow_download: bool = False) -> dict[str, Any]:
    """Load ``init`` into ``backbone`` (in place); returns the record for ``run.json``.

    The record holds ``source`` (Hub id, timm tag or file name; never a full path),
    ``kind``, ``sha256`` of the file, ``layout``, ``loaded`` (tensor count), ``adapted``,
    ``missing`` and ``unexpected`` key lists, ``kept`` (tensors the backbone froze, e.g. a fixed
    sin-cos position table: its own values stay), and ``summary`` (one line).
    """
    found = resolve_init(init, allow_download)
    weights, not_read, sha = read_found(found)
    target = init_target(backbone)
    module: nn.Module = target["module"]
    own = module.state_dict()
    renamed, layout, prefix = to_timm(weights, own)
    fitted = fit(renamed, own, target)
    name = _backbone_name(backbone)
    if fitted.mismatched:
        more = f" (+{len(fitted.mismatched) - 3} more)" if len(fitted.mismatched) > 3 else ""
        raise UsageError(f"--init {found.name} does not fit {name}: {len(fitted.mismatched)} tensors cannot be "
                         f"adapted: {'; '.join(fitted.mismatched[:3])}{more}{ARCH_HINT}")
    counted = [k for k in own if not k.endswith(COUNTER)]  # as fit() counts the missing ones
    if not fitted.state or len(fitted.missing) > MAX_MISSING_FRACTION * len(counted):
        sample = ", ".join([k for k in weights if not k.endswith(COUNTER)][:3])
        raise UsageError(f"--init {found.name} does not fit {name}: {len(fitted.missing)} of its {len(counted)} "
                         f"tensors are not in the weights (the weights' {layout} layout has keys like {sample})"
                         f"{ARCH_HINT}")
    extra = extra_blocks(fitted.unexpected, own)
    if extra:
        tensors = sum(1 for k in fitted.unexpected if any(k.startswith(b + ".") for b in extra))
        more = f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""
        raise UsageError(f"--init {found.name} does not fit {name}: {tensors} of its tensors are in blocks {name} "
                         f"lacks: {', '.join(extra[:4])}{more}{ARCH_HINT}")
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}  # e.g. pos_embed=sincos: the run's own
    kept = sorted(k for k in fitted.state if k in frozen)
    module.load_state_dict({k: v for k, v in fitted.state.items() if k not in frozen}, strict=False)
    record = {"source": found.name, "kind": found.kind, "sha256": sha, "layout": layout, "prefix_removed": prefix,
              "loaded": len(fitted.state) - len(kept), "adapted": fitted.adapted, "missing": fitted.missing,
              "unexpected": fitted.unexpected, "not_read": not_read, "kept": kept}
    record["summary"] = summary_line(record)
    return record


def summary_line(record: dict[str, Any]) -> str:
    """``init: NAME (sha256 0123abcd): 150 tensors loaded; adapted: ...; missing: ...; unused: ...``."""
    def listing(keys: list[str]) -> str:
        return "none" if not keys else ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    return (f"init: {record['source']} (sha256 {record['sha256'][:12]}, {record['layout']} layout): "
            f"{record['loaded']} tensors loaded; adapted: {listing(record['adapted'])}; "
            f"missing: {listing(record['missing'])}; unused: {listing(record['unexpected'])}"
            + (f"; kept the backbone's own fixed {listing(record['kept'])}" if record.get("kept") else "")
            + (f"; pickled objects not read: {listing(record['not_read'])}" if record.get("not_read") else ""))


def init_target(backbone: nn.Module) -> dict[str, Any]:
    """The backbone's ``init_target()``, or the generic one (whole module, first 4-D weight as the stem)."""
    hook = getattr(backbone, "init_target", None)
    if callable(hook):
        return hook()
    first = next((k for k, v in backbone.state_dict().items() if v.ndim == 4 and k.endswith("weight")), None)
    return {"module": backbone, "first_conv": first, "pos_embed": None}


def _backbone_name(backbone: nn.Module) -> str:
    return getattr(backbone, "name", type(backbone).__name__)


def read_found(found: InitFile) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """``(tensors, not_read, sha256)`` of a resolved ``--init``; the last one read is kept, since
    the check before decoding reads it first and the run then loads it (while its files are unchanged)."""
    files = dict.fromkeys((found.path, *found.files()))  # a shard index and its shards, or the one file
    stats = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _read(found.path, found.name, stats)


@functools.lru_cache(maxsize=1)
def _read(path: Path, name: str, stats: tuple) -> tuple[dict[str, torch.Tensor], list[str], str]:
    tensors, not_read = read_weights(path, name)
    return tensors, not_read, InitFile(path, "file", name).sha256()


def onnx_record(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What exported metadata keeps of a run's init: source name, kind, sha256, adaptations."""
    if not record:
        return None
    return {k: record.get(k) for k in ("source", "kind", "sha256", "layout", "adapted")}


__all__ = ["load_init", "init_target", "summary_line", "onnx_record", "resolve_init"]
