"""What an exported graph takes as input, and how it maps to the encoder's pixels.

An encoder sees normalised pixels ``(x - mean) / std`` of ``x`` in [0, 1]. An export
``--with-preprocessing`` takes the pixels as the client has them and does the mapping to
[0, 1] inside the graph:

* ``uint8``: 8-bit images, ``x = raw / 255``;
* ``uint16``: 16-bit images, ``x = raw / 65535``;
* ``window``: the source's values (e.g. CT Hounsfield units) in float32, one fixed linear
  window per output channel, ``x_c = clip((raw - lower_c) / (upper_c - lower_c), 0, 1)``;
  a stack of 3 windows turns a 1-channel input into 3 channels. Output channel ``j``
  reads input channel ``j % C_in``: a ``slab:K`` run takes the values of its K slices as
  K input channels and applies each window to every slice (``C`` windows give the run's
  ``C*K`` channels, channel-major as :func:`sslkit.data.volume.stack_slab` stacks them);
* ``unit``: float32 already in [0, 1] (the client did the source's mapping, e.g. a
  per-file window that no fixed graph can reproduce);
* ``normalized``: no preprocessing in the graph; the client feeds ``(x - mean) / std``.

Which of these a run's graph takes is the source's statement, never guessed from its
name: :meth:`Source.graph_preprocessing` returns a :class:`GraphPreprocessing`, stored
in the run's :class:`InputSpec` (``graph_preprocessing``). Resizing (shorter side to
``image_size``, centre crop) always stays with the client.

A ``pixels`` source's graph takes, unless ``--input-dtype`` says otherwise, the integer type of the
run's data (:func:`default_input_dtype`: uint8 for 8-bit images, uint16 for 16-bit ones: 12-bit
content stored in 16 bits is fed as stored, its values 0-4095, never stretched to its range), so no
client loses bits the run saw; float32 for data on neither grid.

A ``--sample volume`` run's client builds the volume (:data:`VOLUME_STEPS`): it resamples
the values the graph takes (modality values for a window graph: the graph windows after
resampling, as the run's source does) and pads with :attr:`RawInput.pad_value`, the value
the graph maps to 0 in every channel, as training pads with 0 after the window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sslkit.errors import UsageError, shown
from sslkit.spec import InputSpec

KINDS = ("normalized", "unit", "uint8", "uint16", "window")
DTYPES = {"normalized": "float32", "unit": "float32", "uint8": "uint8", "uint16": "uint16", "window": "float32"}
#: what a volume run's client does to its values before the graph (resampling, crop / pad)
VOLUME_STEPS = ("stacks the slices along the slice normal at their positions, laid out as input.orientation says "
                "(a series: D ascending, H rows, W columns as displayed; an image turned to its closest canonical "
                "RAS+ axes: as it says), resamples to spacing_mm (dz, dy, dx; trilinear; along D linear between the two "
                "nearest slices, so a missing slice is interpolated across; the grid spans half a step before "
                "the first slice to half a step after the last), centre crops / pads to volume_size (D, H, W)")
#: the integer grids a source's [0, 1] pixels may lie on: k / 255 (8-bit), k / 65535 (16-bit)
GRIDS = (("uint8", 255.0), ("uint16", 65535.0))
#: what a note quotes of a plugin's own text (a source's client sentence, its preprocessing values)
PLUGIN_TEXT = 400
_WL = re.compile(r"W\s*([-+]?[\d.]+(?:e[-+]?\d+)?),\s*L\s*([-+]?[\d.]+(?:e[-+]?\d+)?)", re.I)


@dataclass(frozen=True)
class GraphPreprocessing:
    """What a source's mapping to [0, 1] becomes in a graph exported ``--with-preprocessing``.

    Returned by :meth:`sslkit.api.Source.graph_preprocessing`; stored in the run's
    InputSpec, so export needs neither the data nor the source plugin.

    ``kind``:

    * ``"pixels"`` (the default): the source reads image pixels; the graph takes the run's
      images' integer type (uint8, or uint16 where they are finer: :func:`default_input_dtype`),
      or ``--input-dtype``'s (float32: in [0, 1]), and scales them;
    * ``"window"``: the graph takes one float32 channel of the source's values and applies
      one fixed linear window per output channel, ``lower`` / ``upper`` (``C`` each):
      ``x_c = clip((raw - lower_c) / (upper_c - lower_c), 0, 1)``;
    * ``"unit"``: the mapping differs from file to file (a per-file window): the client
      applies it, the graph takes float32 in [0, 1].

    ``client``: one sentence on what the client does before the graph (export prints it
    and stores it in the file's metadata). ``options``: the source options a ``window``
    graph bakes in; embedding with that graph refuses other values for them.
    """

    kind: Literal["pixels", "window", "unit"] = "pixels"
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()
    client: str = ""
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("pixels", "window", "unit"):
            raise ValueError(f"graph preprocessing kind must be pixels, window or unit, not {self.kind!r}")
        if self.kind == "window" and (not self.lower or len(self.lower) != len(self.upper)
                                      or any(hi <= lo for lo, hi in zip(self.lower, self.upper))):
            raise ValueError("a window graph needs one lower < upper pair per output channel")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "client": self.client, "options": list(self.options)}
        if self.kind == "window":
            out["window"] = [{"lower": lo, "upper": hi} for lo, hi in zip(self.lower, self.upper)]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GraphPreprocessing":
        windows = data.get("window") or []
        return cls(data.get("kind", "pixels"), tuple(float(w["lower"]) for w in windows),
                   tuple(float(w["upper"]) for w in windows), str(data.get("client", "")),
                   tuple(data.get("options") or ()))


@dataclass(frozen=True)
class RawInput:
    """The graph input contract: ``kind`` (see module doc), input channels, windows."""

    kind: str
    channels: int
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()

    @property
    def dtype(self) -> str:
        return DTYPES[self.kind]

    @property
    def pad_value(self) -> float:
        """The input value that :meth:`to_unit` maps to 0 in every channel (a window graph: the
        lowest lower bound), with which a volume's client pads: the padding training gives."""
        return min(self.lower) if self.kind == "window" else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "dtype": self.dtype, "channels": self.channels}
        if self.kind == "window":
            out["window"] = [{"lower": lo, "upper": hi, "width": hi - lo, "level": (lo + hi) / 2}
                             for lo, hi in zip(self.lower, self.upper)]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RawInput":
        windows = data.get("window") or []
        return cls(data["kind"], int(data["channels"]), tuple(float(w["lower"]) for w in windows),
                   tuple(float(w["upper"]) for w in windows))

    def to_unit(self, raw: np.ndarray) -> np.ndarray:
        """``(B, C_in, *spatial)`` raw pixels -> ``(B, C, *spatial)`` float32 in [0, 1] (not for ``normalized``)."""
        x = np.asarray(raw).astype(np.float32)
        if self.kind == "uint8":
            return x / np.float32(255.0)
        if self.kind == "uint16":
            return x / np.float32(65535.0)
        if self.kind == "window":
            lo, hi = self._bounds(x.ndim)
            if x.shape[1] > 1:  # output channel j reads input channel j % C_in
                x = np.tile(x, (1, len(self.lower) // x.shape[1]) + (1,) * (x.ndim - 2))
            return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        return x

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """``(B, C, H, W)`` pixels in [0, 1] -> raw pixels that ``to_unit`` maps back to them.

        Exact for ``uint8`` / ``uint16`` data that came from 8 / 16-bit images; for a
        window stack, each pixel gets a modality value consistent with every channel.
        """
        u = np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0)
        if self.kind == "uint8":
            return np.rint(u * 255.0).astype(np.uint8)
        if self.kind == "uint16":
            return np.rint(u * 65535.0).astype(np.uint16)
        if self.kind != "window":
            return u.astype(np.float32)
        n, spatial = len(u), u.shape[2:]
        per = (1, len(self.lower) // self.channels, self.channels) + (1,) * len(spatial)
        u = u.reshape(n, *per[1:3], *spatial)  # (B, windows, C_in, ...): axis 1 holds one input's windows
        lo, hi = (b.astype(np.float64).reshape(per) for b in self._bounds(u.ndim))
        point = lo + u * (hi - lo)
        inside = (u > 0) & (u < 1)
        n_inside = inside.sum(1, keepdims=True)
        estimate = np.where(inside, point, 0).sum(1, keepdims=True) / np.maximum(n_inside, 1)
        # all channels clipped: a value inside every channel's half-line
        floor = np.where(u >= 1, hi, -np.inf).max(1, keepdims=True)
        ceil = np.where(u <= 0, lo, np.inf).min(1, keepdims=True)
        floor = np.where(np.isfinite(floor), floor, ceil - 1.0)
        ceil = np.where(np.isfinite(ceil), ceil, floor + 1.0)
        out = np.where(n_inside > 0, estimate, (floor + ceil) / 2)
        return out.reshape(n, self.channels, *spatial).astype(np.float32)

    def _bounds(self, ndim: int = 4) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, len(self.lower)) + (1,) * (ndim - 2)
        return (np.asarray(self.lower, np.float32).reshape(shape), np.asarray(self.upper, np.float32).reshape(shape))


def graph_preprocessing_of(spec: InputSpec) -> GraphPreprocessing:
    """The source's statement stored in ``spec``; for a spec recorded before sources made
    one (``graph_preprocessing`` None), what its ``preprocessing`` text says (:func:`legacy_graph_preprocessing`)."""
    if spec.graph_preprocessing is not None:
        return GraphPreprocessing.from_json(spec.graph_preprocessing)
    return legacy_graph_preprocessing(spec.preprocessing)


def legacy_graph_preprocessing(preprocessing: dict[str, Any]) -> GraphPreprocessing:
    """The graph preprocessing of a run.json (or ONNX metadata) written before sources
    declared it: such runs recorded fixed windows only as ``window`` descriptions of the
    source (``"lung (W 1500, L -600)"``), and the option that chose them was ``window``.
    Read so that old runs export as they always did; new runs never come here.
    """
    if "window" not in preprocessing:
        return GraphPreprocessing()
    windows = fixed_windows(preprocessing)
    if windows is None:
        return GraphPreprocessing("unit", client=(
            "the run used a per-file window (auto/minmax) that no fixed graph can apply: the client "
            "windows each file to [0, 1] as the run did; the graph normalises"))
    lower, upper = zip(*windows)
    return GraphPreprocessing("window", tuple(lower), tuple(upper), options=("window",), client=(
        "client passes modality values (HU for CT) after RescaleSlope/Intercept; " + (
            "MONOCHROME1: reflect them in the window first (lower + upper - value)" if len(windows) == 1
            else "MONOCHROME1 and colour files cannot use this graph (a stack of windows has no single reflection)")))


def fixed_windows(preprocessing: dict[str, Any]) -> list[tuple[float, float]] | None:
    """Legacy ``window`` descriptions as ``(lower, upper)``, or None when any is per-file.

    A list of descriptions such as ``"lung (W 1500, L -600)"`` or ``"W 400, L 40"``
    (fixed) or ``"auto"`` / ``"minmax"`` (chosen per file); see :func:`legacy_graph_preprocessing`.
    """
    windows = preprocessing.get("window")
    if windows is None:
        return None
    if isinstance(windows, str):
        windows = [windows]
    out = []
    for w in windows:
        m = _WL.search(str(w))
        if not m:
            return None
        width, level = float(m.group(1)), float(m.group(2))
        out.append((level - width / 2, level + width / 2))
    return out


def raw_input_for(spec: InputSpec, with_preprocessing: bool, input_dtype: str | None = None) -> tuple[RawInput, str]:
    """The graph input for ``spec``, and a note on what the client must still do.

    ``input_dtype`` (``uint8``, ``uint16``, ``float32``) chooses the raw dtype of a
    ``pixels`` source (None: uint8; ``sslkit export`` passes :func:`default_input_dtype`'s
    choice, which follows the run's data); a source whose graph takes its own values
    (``window``) or pixels it mapped per file (``unit``) fixes float32.
    """
    raw, note = _raw_input(spec, with_preprocessing, input_dtype)
    if spec.sample == "volume" and raw.kind == "window":
        from sslkit.data.volume import VOLUME_DECODE

        if (spec.preprocessing or {}).get("decode") != VOLUME_DECODE:  # windowed slice by slice, then resampled
            raise UsageError("this volume run was trained by an sslkit that windowed each slice before resampling; "
                             "a graph that windows cannot reproduce it: export without --with-preprocessing "
                             "(the client then gives the run's own [0, 1] volumes, as sslkit data dump writes them)")
    return raw, (volume_note(raw, note, spec) if spec.sample == "volume" else note)


def volume_note(raw: RawInput, note: str, spec: InputSpec | None = None) -> str:
    """What a volume run's client does before the graph: ``note`` (the mapping the client
    still does, from the source), then the volume steps and the pad value."""
    if raw.kind == "window":
        return (f"{note}; then {VOLUME_STEPS}, padding with {raw.pad_value:g} (the lowest window's lower bound, "
                f"0 in every channel; MONOCHROME1: after the reflection); the graph windows the resampled "
                f"values (one channel per window) and normalises")
    if raw.kind == "normalized":
        mapping = f" (the run's source: {source_mapping(spec)})" if spec is not None and spec.preprocessing else ""
        return (f"client builds each volume as the run's source does (what sslkit data dump writes: it "
                f"{VOLUME_STEPS}, values in [0, 1]{mapping}, padding 0) and normalises: (x - mean) / std")
    if raw.kind == "unit":
        return f"{note}; then, on those values in [0, 1], {VOLUME_STEPS}, padding with 0; the graph normalises"
    return f"client {VOLUME_STEPS}, padding with 0; the graph scales and normalises"


def source_mapping(spec: InputSpec) -> str:
    """The run's source's own statement of how it read its files (``spec.preprocessing``, what its
    ``describe()`` gave: scaling, windows, inversions...) in one line, each value bounded (a plugin's text)."""
    def plain(value: Any) -> str:
        text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return _bounded(text, PLUGIN_TEXT // 4)

    given = [f"{key}: {plain(value)}" for key, value in (spec.preprocessing or {}).items()
             if value is not None and not (isinstance(value, (str, list, tuple, dict)) and not value)]
    return f"source {spec.source!r}: " + "; ".join(given) if given else f"source {spec.source!r}"


def client_steps(kind: str, spec: InputSpec) -> str:
    """What a client does before a graph taking ``kind``: ``normalized`` (any source: the source's own
    mapping to [0, 1] in its words, then resizing and normalising), or a ``pixels`` source's ``uint8``,
    ``uint16`` or ``unit``, whichever bit depth its images have (the graph's dtype says nothing of the files')."""
    if kind == "normalized":
        return (f"client maps each image to x in [0, 1] as the run's source did ({source_mapping(spec)}), resizes "
                f"(shorter side to image_size, centre crop) and normalises: (x - mean) / std")
    if kind == "uint8":
        return ("client resizes each image's 8-bit values (16-bit images: round(value / 257), the nearest 8-bit "
                "value) and feeds uint8; the graph scales (/ 255) and normalises")
    if kind == "uint16":
        return ("client resizes each image's 16-bit values as stored, never stretched to their range (12-bit "
                "content stays 0-4095; 8-bit images: value x 257) and feeds uint16; the graph scales (/ 65535) "
                "and normalises")
    return (f"client maps each image to x in [0, 1] as the run's source did ({source_mapping(spec)}), resizes "
            f"and feeds float32; the graph normalises")


def pixel_grid(x: np.ndarray) -> str:
    """``"uint8"`` when every value of ``x`` (a source's float pixels in [0, 1]) is ``k / 255`` (to
    float32 rounding), ``"uint16"`` when ``k / 65535``, else ``"float"`` (float images, images
    reduced while decoding). Reads at most about a million values, evenly spaced."""
    flat = np.asarray(x).reshape(-1)
    flat = flat[:: max(1, flat.size // 2**20)].astype(np.float64)
    for name, top in GRIDS:
        scaled = flat * top
        if np.abs(scaled - np.rint(scaled)).max(initial=0.0) <= top * 2.0**-22:  # 4 float32 ulps of 1
            return name
    return "float"


def default_input_dtype(spec: InputSpec, grid: str | None, read: str) -> tuple[str | None, str]:
    """The ``--input-dtype`` an export ``--with-preprocessing`` takes when none is given, and why:
    for a ``pixels`` source, the grid of the run's data (``grid``: :func:`pixel_grid` of the images
    read, None when none were; ``read``: which, or why none). Data never read: uint8, said, unless the
    run recorded a narrow value range (12-bit content in 16-bit files?): then a usage error asking for
    ``--input-dtype``. Other sources fix their graph's dtype: ``(None, "")``."""
    if graph_preprocessing_of(spec).kind != "pixels":
        return None, ""
    if grid == "float":
        return "float32", (f"float32: the run's data holds values on neither the 8- nor the 16-bit grid "
                           f"(float images, or images reduced while decoding; {read})")
    if grid in ("uint8", "uint16"):
        return grid, f"{grid}: the run's data holds {grid[4:]}-bit values ({read})"
    low, high = spec.value_range
    if (low, high) != (0.0, 1.0):
        raise UsageError(f"the run's data spans only [{low:g}, {high:g}] of [0, 1] (12-bit content in 16-bit "
                         f"files?) and its images were not read here ({read}): give --input-dtype uint16 for "
                         f"16-bit images, uint8 for 8-bit ones, or float32, or --check-data with some of them")
    return "uint8", (f"uint8 assumed: the run's data was not read ({read}); give --input-dtype uint16 for "
                     f"16-bit images")


def _bounded(text: str, limit: int = PLUGIN_TEXT) -> str:
    """A source's own text as it is, or bounded (:func:`~sslkit.errors.shown`) where it is longer than ``limit``."""
    return text if len(text) <= limit else shown(text, limit)


def _raw_input(spec: InputSpec, with_preprocessing: bool, input_dtype: str | None) -> tuple[RawInput, str]:
    """:func:`raw_input_for` before its volume note."""
    c = spec.channels
    declared = graph_preprocessing_of(spec)
    if not with_preprocessing:
        if input_dtype not in (None, "float32"):
            raise UsageError("--input-dtype needs --with-preprocessing")
        return RawInput("normalized", c), client_steps("normalized", spec)
    if declared.kind == "pixels":
        kind = {None: "uint8", "uint8": "uint8", "uint16": "uint16", "float32": "unit"}.get(input_dtype)
        if kind is None:
            raise UsageError(f"--input-dtype must be uint8, uint16 or float32, not {input_dtype!r}")
        return RawInput(kind, c), client_steps(kind, spec)
    what = "the values its window applies to" if declared.kind == "window" else "pixels in [0, 1]"
    if input_dtype not in (None, "float32"):
        raise UsageError(f"this run's graph takes float32 {what} (its source {spec.source!r} says so); "
                         f"drop --input-dtype")
    if declared.kind == "unit":
        own = _bounded(declared.client or "the client maps each file to [0, 1] as the run's source did")
        return RawInput("unit", c), f"{own} ({source_mapping(spec)})"
    k = int(spec.sample.split(":")[1]) if str(spec.sample).startswith("slab:") else 1
    if len(declared.lower) * k != c:
        raise UsageError(f"the run's {len(declared.lower)} windows do not match its {c} channels"
                         + (f" ({k} slices per slab)" if k > 1 else ""))
    own = _bounded(declared.client) + resize_order(declared, spec)
    if k == 1:
        return RawInput("window", 1, declared.lower, declared.upper), own
    # slab:K: the K slices' values are the K input channels; window w applies to each of them
    lower = tuple(lo for lo in declared.lower for _ in range(k))
    upper = tuple(hi for hi in declared.upper for _ in range(k))
    return RawInput("window", k, lower, upper), (f"{own}; slab:{k}: pass the {k} slices' "
                                                  f"values as {k} channels (edge slices repeated at the volume's ends)")


def resize_order(declared: GraphPreprocessing, spec: InputSpec) -> str:
    """The client's step that makes resizing agree with a 2D run's: its source windowed each image
    before the core resized it. A window is linear between its ends, so values clipped to one window
    resize exactly as its windowed pixels did; a stack has no single clip. Volumes are resampled in
    their own values before the window (:data:`sslkit.data.volume.VOLUME_DECODE`): nothing to add."""
    if spec.sample == "volume":
        return ""
    if len(declared.lower) == 1:
        lo, hi = declared.lower[0], declared.upper[0]
        return (f"; clip the values to the window [{lo:g}, {hi:g}] before resizing (the run windowed before "
                f"resizing: clipped values resize exactly as its windowed pixels did)")
    return ("; the run windowed before resizing: values resized first differ from its pixels wherever a window "
            "clips (a stack of windows has no single clip)")
