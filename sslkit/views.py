"""The views a task trains on: :class:`ViewRecipe` (one augmented view, composed of the
batched ops of :mod:`sslkit.augment`), named recipes (:data:`RECIPES`) and
:class:`MultiView` (several recipes on one batch, normalised).

Named recipes are :class:`ViewRecipe` settings; any field can be overridden by name
(:func:`override_recipe`, :meth:`MultiView.override`, ``--augment-opt``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from sslkit.augment import (Normalize, color_jitter, contrast, cutout, gamma, gaussian_blur, gaussian_noise,
                            grayscale, horizontal_flip, random_resized_crop, random_rotate90, random_rotation,
                            random_sobel, solarize, vertical_flip)


@dataclass(frozen=True)
class ViewRecipe:
    """One view of the SimCLR augmentation family (Chen et al. 2020, Sec. 3 and App. A).

    ``(B, C, H, W)`` in [0, 1] -> ``(B, C, size, size)`` in [0, 1]. Colour ops (saturation,
    hue, random grayscale) apply to 3-channel data whose channels are colour planes
    (``colour``); elsewhere (1 channel, a slab's slices, stacked windows) ``gamma_p`` and
    contrast / brightness jitter, the same for every channel, take their place. Crop, horizontal
    flip and (on colour data) random grayscale always draw their random numbers; the other ops
    draw none when their probability is 0, so adding such fields never changes the views of an
    existing recipe.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: float = 0.4  # brightness = contrast strength (and saturation's, unless saturation is set)
    saturation: float | None = None  # saturation strength; None: as jitter (BYOL's recipes: 0.2)
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    gamma_p: float = 0.5
    vflip_p: float = 0.0
    rotate_p: float = 0.0
    rotate_degrees: float = 15.0  # free rotation in ±degrees
    rot90_p: float = 0.0  # 90°, 180° or 270°
    contrast_p: float = 0.0  # extra contrast jitter (any channel count)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.05)
    cutout_p: float = 0.0
    cutout_scale: tuple[float, float] = (0.02, 0.2)
    sobel_p: float = 0.0
    colour: bool = True  # 3 channels are RGB planes; False: separate intensities (set by the engine for slabs, windows)

    def __post_init__(self) -> None:
        problem = recipe_problem(self)
        if problem:
            raise ValueError(problem)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_resized_crop(x, self.size, self.scale)
        x = horizontal_flip(x, self.flip_p)
        if self.vflip_p > 0:
            x = vertical_flip(x, self.vflip_p)
        if self.rot90_p > 0:
            x = random_rotate90(x, self.rot90_p)
        if self.rotate_p > 0:
            x = random_rotation(x, self.rotate_p, self.rotate_degrees)
        if self.jitter_p > 0:
            sat = self.jitter if self.saturation is None else self.saturation
            x = color_jitter(x, self.jitter, self.jitter, sat, self.hue, self.jitter_p, self.colour)
        if x.shape[1] == 3 and self.colour:
            x = grayscale(x, self.gray_p)
        elif self.gamma_p > 0:
            x = gamma(x, self.gamma_p)
        if self.contrast_p > 0:
            x = contrast(x, self.contrast_p, self.jitter)
        if self.blur_p > 0:
            x = gaussian_blur(x, self.blur_p)
        if self.sobel_p > 0:
            x = random_sobel(x, self.sobel_p)
        if self.noise_p > 0:
            x = gaussian_noise(x, self.noise_p, self.noise_std)
        if self.cutout_p > 0:
            x = cutout(x, self.cutout_p, self.cutout_scale)
        if self.solarize_p > 0:
            x = solarize(x, self.solarize_p)
        return x


#: ViewRecipe fields that are probabilities, in [0, 1]
PROBABILITIES = ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "gamma_p", "vflip_p", "rotate_p", "rot90_p",
                 "contrast_p", "noise_p", "cutout_p", "sobel_p")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pair(v: Any, low_min: float, high_max: float, low_open: bool) -> bool:
    """``v`` is ``(low, high)``: finite, ``low_min < low`` (``<=`` unless ``low_open``), ``low <= high <= high_max``."""
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(map(_number, v)):
        return False
    return (low_min < v[0] if low_open else low_min <= v[0]) and v[0] <= v[1] <= high_max


def recipe_problem(r: "ViewRecipe") -> str | None:
    """What is wrong with a recipe's values, in one line naming the field, its value and the valid
    range (``hue`` as torchvision's ``ColorJitter`` takes it); None when nothing is. A value out of
    range used to crash at the first batch, or train silently."""
    def shown(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

    checks = [("size", isinstance(r.size, int) and not isinstance(r.size, bool) and r.size >= 8,
               "an integer >= 8 (pixels, as --image-size)"),
              ("scale", _pair(r.scale, 0, 1, True), "two area fractions low,high with 0 < low <= high <= 1"),
              ("cutout_scale", _pair(r.cutout_scale, 0, 1, True),
               "two area fractions low,high with 0 < low <= high <= 1"),
              ("noise_std", _pair(r.noise_std, 0, math.inf, False), "two numbers low,high with 0 <= low <= high"),
              ("jitter", _number(r.jitter) and r.jitter >= 0, "a number >= 0"),
              ("saturation", r.saturation is None or (_number(r.saturation) and r.saturation >= 0),
               "a number >= 0 (or unset: as jitter)"),
              ("hue", _number(r.hue) and 0 <= r.hue <= 0.5, "a number in [0, 0.5]"),
              ("rotate_degrees", _number(r.rotate_degrees) and 0 <= r.rotate_degrees <= 180,
               "a number of degrees in [0, 180]")]
    checks += [(p, _number(getattr(r, p)) and 0 <= getattr(r, p) <= 1, "a probability in [0, 1]")
               for p in PROBABILITIES]
    for name, ok, expected in checks:
        if not ok:
            return f"{name} must be {expected}, got {shown(getattr(r, name))}"
    return None


#: Named recipes: ViewRecipe fields (``size`` comes from the run). ``recipe(name, size)``.
RECIPES: dict[str, dict[str, Any]] = {
    # SimCLR's ImageNet views (Chen et al. 2020, App. A)
    "simclr": {},
    # BYOL's second view: rarer blur, some solarization (Grill et al. 2020, Tab. 6)
    "byol2": {"blur_p": 0.1, "solarize_p": 0.2, "saturation": 0.2},
    # MAE: crop and flip only (He et al. 2022)
    "crop": {"scale": (0.2, 1.0), "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "gamma_p": 0.0},
    # radiographs / CT slices: mild geometry, intensity (not colour) changes, noise
    "xray": {"scale": (0.3, 1.0), "rotate_p": 0.5, "rotate_degrees": 10.0, "jitter": 0.3, "hue": 0.0,
             "gray_p": 0.0, "gamma_p": 0.5, "blur_p": 0.3, "noise_p": 0.3, "noise_std": (0.0, 0.03)},
    # orientation-free data (histology, dermoscopy, microscopy): every flip and 90° turn
    "orientation_free": {"vflip_p": 0.5, "rot90_p": 0.75},
    # the study's full vocabulary, for ablations
    "everything": {"vflip_p": 0.5, "rotate_p": 0.5, "rot90_p": 0.25, "contrast_p": 0.5, "noise_p": 0.5,
                   "cutout_p": 0.5, "sobel_p": 0.1},
}


def byol_recipes(size: int, min_scale: float = 0.08) -> list[ViewRecipe]:
    """BYOL's two asymmetric view recipes (Grill et al. 2020, Table 6); also used by
    Barlow Twins, VICReg, MoCo v3 and DINO's global crops: colour jitter 0.8 of brightness,
    contrast 0.4, saturation 0.2, hue 0.1."""
    blur = size >= 96
    common = dict(scale=(min_scale, 1.0), jitter_p=0.8, jitter=0.4, saturation=0.2, hue=0.1, gray_p=0.2)
    return [ViewRecipe(size, blur_p=1.0 if blur else 0.0, solarize_p=0.0, **common),
            ViewRecipe(size, blur_p=0.1 if blur else 0.0, solarize_p=0.2, **common)]


def recipe(name: str, size: int, **overrides: Any) -> ViewRecipe:
    """The named recipe at ``size``, with ``overrides`` (field values or their strings)."""
    if name not in RECIPES:
        from sslkit.errors import UsageError
        from sslkit.errors import unknown_name_message

        raise UsageError(unknown_name_message("augmentation recipe", name, sorted(RECIPES)))
    return override_recipe(ViewRecipe(size, **RECIPES[name]), overrides)


def override_recipe(base: ViewRecipe, overrides: dict[str, Any]) -> ViewRecipe:
    """``base`` with fields replaced; string values (``"0.5"``, ``"0.2,1.0"``) are parsed.

    An unknown field or a bad value is a :class:`~sslkit.errors.UsageError`.
    """
    if not overrides:
        return base
    from sslkit.options import build_options

    if "size" in overrides:
        from sslkit.errors import UsageError

        raise UsageError("--augment-opt: size is set by --image-size (a task's smaller crops follow it)")

    current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    parsed = dataclasses.asdict(build_options(ViewRecipe, {**{"size": base.size}, **overrides}, "--augment-opt"))
    return dataclasses.replace(base, **{k: parsed[k] for k in overrides if k in current})


class MultiView(nn.Module):
    """Apply several recipes to one batch and normalise: ``x -> (view_1, ..., view_k)``."""

    def __init__(self, recipes: Sequence[ViewRecipe], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.recipes = list(recipes)
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.normalize(recipe(x)) for recipe in self.recipes)

    def override(self, **overrides: Any) -> "MultiView":
        """The same views with ``overrides`` applied to every recipe (``--augment-opt``)."""
        out = MultiView([override_recipe(r, overrides) for r in self.recipes], [0.0], [1.0])
        out.normalize = self.normalize
        return out


def _is_recipe(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def views_record(augment: Any) -> dict[str, Any]:
    """The augmentation a run applies, as ``run.json`` records it (``views``): for its module and
    each submodule holding view recipes (dataclasses: :class:`ViewRecipe`, a volume recipe, a
    plugin's own), the class and every recipe's fields, ``--augment-opt`` overrides and the
    engine's choices (``colour``) included, keyed by module path (``.`` for the top). A compiled
    augmentation (``--compile``: its ``_orig_mod``) records as the one it compiles."""
    while hasattr(augment, "_orig_mod"):  # sslkit.engine.compiled.CompiledOrEager, torch's OptimizedModule
        augment = augment._orig_mod
    if not isinstance(augment, nn.Module):
        return {".": {"class": type(augment).__name__}}
    out: dict[str, Any] = {}
    for path, module in augment.named_modules():
        held = {}
        for name, value in vars(module).items():
            if _is_recipe(value):
                held[name] = dataclasses.asdict(value)
            elif isinstance(value, (list, tuple)) and value and all(_is_recipe(v) for v in value):
                held[name] = [dataclasses.asdict(v) for v in value]
        if held or not path:
            out[path or "."] = {"class": type(module).__name__, **held}
    return json.loads(json.dumps(out, default=str))  # tuples as lists, anything else as text
