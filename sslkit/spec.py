"""InputSpec: what the encoder expects, decided once and carried to export and embed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """The preprocessing contract of one run.

    Pixels leave the source as float32 ``(C, H, W)`` in ``[0, 1]`` (``preprocessing``
    says how: DICOM window, bit depth...), are resized so the shorter side is
    ``image_size`` and centre-cropped to ``image_size``², then normalised per channel with
    ``(x - mean) / std``. The encoder sees only normalised pixels.
    """

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: volumetric sources (sslkit.data.volume): "slice", "slab:K" or "volume"; the
    #: resampled spacing (dz, dy, dx) mm and size (D, H, W) in volume mode; the axis order.
    #: Taken from ``preprocessing`` (the source's own statement) when not given.
    sample: str = "slice"
    spacing: tuple[float, ...] | None = None
    volume_size: tuple[int, ...] | None = None
    orientation: str = ""
    #: the source's :class:`sslkit.raw_input.GraphPreprocessing` as JSON (what an export
    #: ``--with-preprocessing`` puts in its graph); None: recorded before sources stated it
    graph_preprocessing: dict[str, Any] | None = None
    #: the span of the data's values in [0, 1] units that the views take as the full range: a run on
    #: data using a narrow part of [0, 1] (12-bit content in 16-bit files: up to 0.0625) gives its
    #: task's views the pixels rescaled from it to [0, 1], so gamma, solarization, noise and the
    #: brightness clip act as on full-range data (:func:`sslkit.data.prepare.value_range`);
    #: ``(0, 1)``: as they are. Training only: embedding and export normalise with ``mean``/``std``.
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        pre = self.preprocessing or {}
        if self.sample == "slice" and pre.get("sample"):
            object.__setattr__(self, "sample", str(pre["sample"]))
            object.__setattr__(self, "orientation", str(pre.get("orientation", "")))
            if isinstance(pre.get("spacing_mm"), list):
                object.__setattr__(self, "spacing", tuple(float(v) for v in pre["spacing_mm"]))
            if pre.get("volume_size"):
                object.__setattr__(self, "volume_size", tuple(int(v) for v in pre["volume_size"]))
        for name in ("spacing", "volume_size", "value_range"):  # JSON lists back to tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def colour(self) -> bool:
        """Whether the channels are one image's colour planes (RGB), so saturation, hue and random
        grayscale may mix them: 3 channels that are not a slab's slices (``slab:3``) nor windows of
        one value stacked as channels (a ``window`` graph, e.g. lung, mediastinum, bone)."""
        graph = self.graph_preprocessing or {}
        return self.channels == 3 and not self.sample.startswith("slab") and graph.get("kind") != "window"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["resize"] = ("resampled to spacing (dz, dy, dx mm), centre crop / zero pad to volume_size (D, H, W)"
                         if self.sample == "volume" else "shorter side to image_size, centre crop")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["mean"], kwargs["std"] = tuple(kwargs["mean"]), tuple(kwargs["std"])
        return cls(**kwargs)
