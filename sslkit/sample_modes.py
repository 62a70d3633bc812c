"""Which sample modes (slice, slab, volume) a task and a backbone take; the pairing check.

A task states the modes it trains on in ``sample_modes`` (default ``("slice", "slab")``:
every 2D task takes slabs, which are just K-channel images); a backbone states its
``spatial_dims`` (default 2; MONAI's 3D networks say 3). :func:`pairing_problem` is called
by :func:`sslkit.registry.create_task`, so a pairing that cannot work (3D volumes and a 2D
backbone, a task without a 3D form) is refused before any image is decoded, naming what
would work. :func:`check_planar_sizes` refuses a 2D sample's side given for a volume run.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODES = ("slice", "slab")


def mode_of(spec: Any) -> str:
    """``"slice"``, ``"slab"`` or ``"volume"`` from an InputSpec's ``sample``."""
    return str(getattr(spec, "sample", "slice") or "slice").split(":")[0]


def task_modes(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "sample_modes", DEFAULT_MODES))


def pairing_problem(name: str, cls: type, backbone: Any, spec: Any) -> str | None:
    """Why task ``name`` with ``backbone`` cannot train on ``spec``'s samples, or None."""
    from sslkit.registry import get_task, list_tasks

    mode = mode_of(spec)
    dims = int(getattr(backbone, "spatial_dims", 2))
    bb = getattr(backbone, "name", type(backbone).__name__)
    if mode == "volume" and dims != 3:
        return (f"--sample volume gives 3D volumes and {bb} is a 2D backbone; use a 3D one "
                f"(monai:resnet18, monai:vit) or --sample slice / slab:K")
    if mode != "volume" and dims == 3:
        return f"{bb} is a 3D backbone and takes --sample volume only (got --sample {getattr(spec, 'sample', 'slice')})"
    if mode not in task_modes(cls):
        able = [t for t in list_tasks() if mode in task_modes(get_task(t))]
        return f"it does not train on {mode} samples; tasks that do: {', '.join(able) or 'none installed'}"
    return None


def build_backbone(name: str, in_chans: int, image_size: int, volume_size: tuple[int, ...] | None,
                   **options: Any) -> Any:
    """``create_backbone`` for the run's samples: built for ``volume_size`` when the samples
    are volumes. A backbone that cannot take a volume size but builds as a 2D one is returned
    as that, so that :func:`pairing_problem` names the mismatch instead of a build error."""
    from sslkit.errors import UsageError
    from sslkit.registry import create_backbone

    if volume_size is None:
        return create_backbone(name, in_chans=in_chans, image_size=image_size, **options)
    try:
        return create_backbone(name, in_chans=in_chans, image_size=tuple(volume_size), **options)
    except UsageError as exc:
        try:
            planar = create_backbone(name, in_chans=in_chans, image_size=image_size, **options)
        except UsageError:
            raise exc from None
        if getattr(planar, "spatial_dims", 2) == 3:
            raise
        return planar


#: the settings of a 2D sample's side (``--image-size``, ``--cache-size``): a volume run's samples are
#: ``--volume-size`` voxels, so these would change nothing but the run's record
PLANAR_SIZES = ("image_size", "cache_size")


def check_planar_sizes(given: dict[str, Any], data: str | None, source_options: dict[str, Any]) -> None:
    """Refuse, in one line naming ``--volume-size``, the settings of :data:`PLANAR_SIZES` that
    ``given`` (the command line's) sets when the source ``data`` samples whole volumes. A source that
    cannot be made yet (a folder not there, a bad ``--volume-size``) is the run's own error, later."""
    from sslkit.data.volume import sample_mode
    from sslkit.errors import UsageError
    from sslkit.registry import create_source

    named = [f"--{k.replace('_', '-')}" for k in PLANAR_SIZES if given.get(k) is not None]
    if not named or not data:
        return
    try:
        volumes = sample_mode(create_source(data, **source_options)).volumetric
    except UsageError:
        return
    if not volumes:
        return
    flags = " and ".join(named)
    raise UsageError(f"{flags} {'set' if len(named) > 1 else 'sets'} the side of 2D samples; a --sample volume "
                     f"run's samples are --volume-size D,H,W voxels: drop {flags}")
