"""``check_exporter``: an exporter writes one verified file and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sslkit.testing.registry import resolve, uses_builtins


@uses_builtins("timm", volumes=("monai",))
def check_exporter(exporter: Any, *, tmp_path: Path, backbone: str | None = None,
                   backbone_options: dict | None = None, channels: int = 1, image_size: int = 32,
                   options: dict | None = None, reload: Any = None,
                   volume: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Check export function ``exporter`` (a registered format or the function).

    Calls it as sslkit does, ``exporter(encoder, spec, metadata, out, samples=...,
    samples_note=..., log=..., **options)``, on a fresh ``backbone`` (eval mode) and checks:
    it returns a JSON-able dict, ``out`` exists and is not empty, nothing else is left in
    its folder (no temporary files), and an unknown option raises ``UsageError`` without
    writing anything. ``reload(out)``, if given, returns a callable ``(B, C, S, S) numpy ->
    (B, D)`` loaded from the file, compared with the encoder (max abs diff <= 1e-4).
    With ``volume`` ``(D, H, W)`` the encoder is a 3D network (default ``monai:resnet10``,
    the ``volumes`` extra) of a ``--sample volume`` run, and the samples (and ``reload``'s
    input) are ``(B, C, D, H, W)``. ``backbone`` defaults to ``timm:resnet10t`` on images.
    Returns the exporter's report.
    """
    import numpy as np
    import torch

    from sslkit.api import UsageError
    from sslkit.sample_modes import build_backbone

    name, fn = resolve("exporters", exporter)
    backbone = backbone or ("monai:resnet10" if volume else "timm:resnet10t")
    encoder = build_backbone(backbone, channels, image_size, volume, **(backbone_options or {})).eval()
    spec = _spec(channels, image_size, volume)
    metadata = {"task": "sslkit.testing", "backbone": backbone, "backbone_options": dict(backbone_options or {}),
                "embedding_dim": int(encoder.num_features), "sslkit_version": "test"}
    shape = (4, channels, *(volume or (image_size, image_size)))
    samples = np.random.default_rng(0).random(shape, dtype=np.float32)
    folder = Path(tmp_path) / f"export-{name or getattr(fn, '__name__', 'fn')}"
    folder.mkdir(parents=True, exist_ok=True)
    out, lines = folder / "encoder.out", []
    report = fn(encoder, spec, metadata, out, samples=samples, samples_note="4 generated images",
                log=lines.append, **(options or {}))
    _check_report(report)
    assert out.is_file() and out.stat().st_size > 0, "the exporter wrote no file"
    assert sorted(p.name for p in folder.iterdir()) == [out.name], \
        f"the exporter left other files behind: {sorted(p.name for p in folder.iterdir())}"
    if reload is not None:
        x = samples * 1.0
        with torch.no_grad():
            ref = encoder((torch.from_numpy(x) - 0.5) / 0.25).numpy()
        got = np.asarray(reload(out)(((x - 0.5) / 0.25).astype(np.float32)))
        assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-4, "the reloaded file differs"
    refused = folder / "refused.out"
    try:
        fn(encoder, spec, metadata, refused, samples=None, samples_note="none", log=lines.append,
           no_such_option_for_sslkit_testing=1)
    except UsageError:
        pass
    else:
        raise AssertionError("an unknown exporter option must raise sslkit.api.UsageError")
    assert not refused.exists(), "a refused export left a file behind"
    return report


def _check_report(report: Any) -> None:
    """A dict that ``json.dumps`` takes (numpy numbers allowed)."""
    from sslkit.api import first_line

    assert isinstance(report, dict), f"the exporter returned {type(report).__name__}, not a report dict"
    try:
        json.dumps(report, default=float)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"the exporter's report is not JSON-able (return str, int, float, bool, None, "
                             f"lists and dicts; e.g. str(path)): {type(exc).__name__}: {first_line(exc)}") from None


def _spec(channels: int, image_size: int, volume: tuple[int, int, int] | None) -> Any:
    """The run's input contract: images of a folder, or 1 mm volumes of a volumetric source."""
    from sslkit.api import ORIENTATION, InputSpec

    mean, std = (0.5,) * channels, (0.25,) * channels
    if volume is None:
        return InputSpec(channels, image_size, mean, std, source="folder")
    return InputSpec(channels, image_size, mean, std, source="kit-volumes", sample="volume",
                     spacing=(1.0, 1.0, 1.0), volume_size=tuple(volume), orientation=ORIENTATION)
