"""Which sample modes (slice, slab, volume) a task and a backbone take; the pairing check.

A task states the modes it trains on in ``sample_modes`` (default ``("slice", "slab")``:
every 2D task takes slabs, which are just K-channel images); a backbone states its
``spatial_dims`` (default 2; MONAI's 3D networks say 3). :func:`pairing_problem` is called
by :func:`sslkit.registry.create_task`, so a pairing that cannot work (3D volumes and a 2D
backbone, a task without a 3D form) is refused before any image is decoded, naming what
would work. :func:`check_planar_sizes` refuses a 2D sample's side given for a volume run;
:func:`check_sample_mode` (before decoding) and :func:`check_sample_shape` (after) hold ``embed``
and ``eval`` data to the model's sample mode.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sslkit.errors import UsageError

if TYPE_CHECKING:
    from sslkit.spec import InputSpec

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


#: the source options that say how a volumetric source makes samples (:class:`sslkit.data.volume.SampleMode`)
SAMPLE_OPTIONS = ("sample", "volume_size", "spacing")


def source_option_names(scheme: str) -> set[str]:
    """The option names source ``scheme`` takes (its ``Options`` dataclass's fields)."""
    from sslkit.options import option_names
    from sslkit.registry import get_source

    return option_names(getattr(get_source(scheme), "Options", None))


def check_sample_mode(spec: InputSpec, scheme: str, options: dict[str, Any]) -> None:
    """Before any decoding: source ``options`` must make volumes of the model's ``--volume-size`` for a
    volume model, 2D samples for a 2D one (a source without a ``sample`` option makes 2D images); else
    one line naming the flags to pass. A bad value is left to the source to name."""
    from sslkit.data.volume import SampleMode

    def made(sample: Any, size: Any) -> str:  # as flags: "--sample volume --volume-size 16,16,16"
        text = str(sample or "slice").strip().lower()
        m = SampleMode.parse(text, "", str(size or "") if text == "volume" else "")
        mode = f"slab:{m.slab}" if m.mode == "slab" else m.mode
        return f"--sample {mode}" + (f" --volume-size {','.join(map(str, m.size))}" if m.size else "")

    takes = "sample" in source_option_names(scheme)
    if takes and not options.get("sample"):
        return  # none recorded nor given (the source's default): check_sample_shape, once decoded
    try:
        want = made(spec.sample, ",".join(map(str, spec.volume_size or ())))
        got = made(options.get("sample"), options.get("volume_size")) if takes else "--sample slice"
    except UsageError:
        return
    if got != want and "volume" in want + got:  # 2D samples of other channels: check_sample_shape, once decoded
        raise UsageError(f"the model takes samples made with {want}, " + (
            f"these source options ask for {got}; pass the model's ({want}) or leave them unset" if takes else
            f"and source {scheme!r} makes 2D images only; give data of a source that takes {want}"))


def note_other_spacing(spec: InputSpec, given: str) -> None:
    """A note on stderr when ``--spacing`` resamples volumes to another voxel size than the model's
    (allowed: the shape still fits, but the model sees its anatomy at another scale)."""
    import numpy as np

    from sslkit.data.volume import SampleMode

    if spec.sample != "volume" or not spec.spacing:
        return
    try:
        asked = SampleMode.parse("volume", given, ",".join(map(str, spec.volume_size or (1,)))).spacing
    except UsageError:
        return  # the source says what is wrong with it
    if asked is not None and not np.allclose(asked, spec.spacing, rtol=1e-6):
        def xyz(zyx) -> str:  # as the flag takes it
            return ",".join(f"{v:g}" for v in reversed(zyx))

        print(f"sslkit: note: --spacing {xyz(asked)} resamples to another voxel size than the model's "
              f"({xyz(spec.spacing)} mm, x,y,z): it sees the anatomy at another scale", file=sys.stderr)


def check_sample_shape(shape: tuple[int, ...], spec: Any) -> None:
    """The decoded samples must have the shape the model takes: a ``--data-opt volume_size=`` (or
    ``sample=``) other than the run's gave a torch or onnxruntime traceback; one line instead."""
    sides = tuple(spec.volume_size) if spec.sample == "volume" and spec.volume_size else (spec.image_size,) * 2
    want = (spec.channels, *sides)
    if shape != want:
        raise UsageError(f"the data gives samples of {'x'.join(map(str, shape))}, the model takes "
                         f"{'x'.join(map(str, want))} (its --sample {spec.sample}"
                         f"{', --volume-size ' + ','.join(map(str, sides)) if spec.sample == 'volume' else ''}); "
                         f"leave the source's sample and volume_size as the run's")
