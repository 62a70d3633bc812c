"""sslkit's public API: the one module a plugin imports.

Everything a task, backbone, source or exporter plugin needs is re-exported here; every
other module of ``sslkit`` is private and may change in any release. ``API_VERSION``
changes (1 -> 2) only when a name below is removed or changes meaning; new names may be
added within a version. A plugin declares the range it was written for in its module
(``sslkit_api = ">=1,<2"``); ``sslkit plugins`` refuses a plugin whose range excludes the
running ``API_VERSION`` with one line naming it. See ``docs/plugins.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sslkit.data.parallel import parallel_map
from sslkit.data.prepare import resize_square
from sslkit.data.skips import skip_reason
from sslkit.data.room import available_memory
from sslkit.data.source import (DEFAULT_MAX_PIXELS, NotAnImage, SampleRef, Source, Undecodable, check_pixel_count,
                                to_channels)
from sslkit.data.volume import (ORIENTATION, SampleMode, crop_or_pad, fit_volume, resample, slab_indices, volume_fit,
                                stack_slab)
from sslkit.data.unit_range import box_reduce, unit_floats
from sslkit.data.walk import IMAGE_SUFFIXES, check_dir, first_files, walk_files
from sslkit.errors import CheckFailed, UsageError, first_line, unknown_name_message, without_quoted
from sslkit.hookspecs import hookimpl
from sslkit.options import check_unit_interval, fill_unset
from sslkit.output_file import read_json, write_atomic
from sslkit.progress import human_bytes
from sslkit.pseudonym import file_key, keyed_hash
from sslkit.raw_input import GraphPreprocessing, RawInput, raw_input_for
from sslkit.spec import InputSpec

if TYPE_CHECKING:  # imported on first use (``__getattr__`` below): these need torch, a decode worker does not
    from sslkit.augment import Normalize, rotate, rotate90
    from sslkit.augment3d import (VolumeRecipe, VolumeViews, masked_volume_recipe, pair_volume_recipes,
                                   random_resized_crop_3d)
    from sslkit.backbone import Backbone, TokenBackbone, is_token_backbone
    from sslkit.distributed import all_gather_with_grad, all_reduce_sum, rank, world_size
    from sslkit.ema import cosine_momentum, ema_update, frozen_copy
    from sslkit.engine.events import Callback, RunInfo
    from sslkit.heads import ConvDecoder, DINOHead, mlp
    from sslkit.hog import hog_token_size, hog_tokens
    from sslkit.projected_pair import ProjectedPairTask
    from sslkit.reconstruction import reconstruction_views
    from sslkit.task import Task, Views
    from sslkit.views import MultiView, ViewRecipe, byol_recipes, override_recipe, recipe

#: module -> the names it gives this module, imported when one of them is first used
_LAZY = {
    "sslkit.augment": ("Normalize", "rotate", "rotate90"),
    "sslkit.augment3d": ("VolumeRecipe", "VolumeViews", "masked_volume_recipe", "pair_volume_recipes",
                         "random_resized_crop_3d"),
    "sslkit.backbone": ("Backbone", "TokenBackbone", "is_token_backbone"),
    "sslkit.distributed": ("all_gather_with_grad", "all_reduce_sum", "rank", "world_size"),
    "sslkit.ema": ("cosine_momentum", "ema_update", "frozen_copy"),
    "sslkit.engine.events": ("Callback", "RunInfo"),
    "sslkit.heads": ("ConvDecoder", "DINOHead", "mlp"),
    "sslkit.hog": ("hog_tokens", "hog_token_size"),
    "sslkit.projected_pair": ("ProjectedPairTask",),
    "sslkit.reconstruction": ("reconstruction_views",),
    "sslkit.task": ("Task", "Views"),
    "sslkit.views": ("MultiView", "ViewRecipe", "byol_recipes", "override_recipe", "recipe"),
}
_FROM = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    """The torch-backed names, imported on first use: a source plugin (and a decode worker
    process that loads it) imports ``sslkit.api`` without importing torch."""
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module 'sslkit.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM))


#: The version of this module's contract (an int; see the module docstring).
API_VERSION = 1
"""The version of this module's contract: an int, bumped only when a public name is removed
or changes meaning (see the module docstring and docs/plugins.md)."""

__all__ = [
    "API_VERSION", "hookimpl",
    # tasks
    "Task", "Views", "ProjectedPairTask", "reconstruction_views", "check_unit_interval", "fill_unset",
    "hog_tokens",
    "hog_token_size",
    # augmentation
    "ViewRecipe", "MultiView", "Normalize", "recipe", "byol_recipes", "override_recipe", "rotate", "rotate90",
    # 3D augmentation (volumes: --sample volume)
    "VolumeRecipe", "VolumeViews", "masked_volume_recipe", "pair_volume_recipes", "random_resized_crop_3d",
    # heads and teachers
    "mlp", "DINOHead", "ConvDecoder", "frozen_copy", "ema_update", "cosine_momentum",
    # distributed
    "rank", "world_size", "all_reduce_sum", "all_gather_with_grad",
    # backbones
    "Backbone", "TokenBackbone", "is_token_backbone",
    # sources
    "Source", "SampleRef", "NotAnImage", "Undecodable", "to_channels", "walk_files", "first_files", "check_dir", "IMAGE_SUFFIXES",
    "parallel_map", "resize_square", "check_pixel_count", "DEFAULT_MAX_PIXELS", "keyed_hash", "file_key", "available_memory", "human_bytes",
    "skip_reason", "unit_floats", "box_reduce",
    # volumetric sources (slice / slab:K / volume sampling)
    "SampleMode", "ORIENTATION", "slab_indices", "stack_slab", "resample", "crop_or_pad", "fit_volume", "volume_fit",
    # inputs, export, errors
    "InputSpec", "GraphPreprocessing", "RawInput", "raw_input_for", "write_atomic", "read_json", "UsageError",
    "CheckFailed", "first_line", "unknown_name_message", "without_quoted",
    # run callbacks (register_callbacks)
    "Callback", "RunInfo",
]
