"""The task protocol: a pretext task wraps a backbone and turns views into a loss.

The engine does, for every batch of images ``x: (B, C, S, S)`` in ``[0, 1]``::

    views = task.augment(x)        # built once by task.views(spec); batched, on device
    out = task(views)              # {"loss": scalar tensor, other scalars to log}
    ...backward, optimizer step...
    task.on_step_end(step, total)  # EMA teachers, queues, centres, schedules

Only ``task.encoder`` (the backbone alone) is exported.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from sslkit.spec import InputSpec

#: metric names the engine writes itself (``metrics.csv`` columns); a task returning one is refused
RESERVED_METRICS = frozenset({"step", "epoch", "lr", "img_per_s", "grad_norm", "stop", "requeue"})

Views = tuple[torch.Tensor, ...]
"""What ``Task.views(spec)(x)`` returns and ``Task.forward`` receives: a tuple of tensors
(normalised views, and e.g. labels or masks a task draws with them), all on the batch's device."""


class Task(nn.Module):
    """Base class of every pretext task (registered with ``register_tasks``).

    Subclasses set ``Options`` (a dataclass whose fields are the ``--task-opt`` options;
    ``None`` for no options) and ``default_backbone``, and implement ``views`` and
    ``forward``. Built as ``TaskClass(backbone, options, spec)``.

    Rules (``sslkit.testing.check_task`` checks them; the engine enforces the reserved keys):

    * ``forward(views)`` returns ``{"loss": scalar tensor, other scalars to log}`` (each a
      Python int/float or a 1-element tensor); the keys ``step``, ``epoch``, ``lr``,
      ``img_per_s``, ``grad_norm``, ``stop`` and ``requeue`` (:data:`RESERVED_METRICS`) are
      the engine's own ``metrics.csv`` columns and are refused with a one-line error.
    * ``views(spec)`` returns a callable with ``override(**fields)`` (``--augment-opt``);
      :class:`sslkit.api.MultiView` provides it.
    * State a resume needs (EMA teachers, queues, centres, schedules) is in the state
      dict (parameters and buffers): a resumed run repeats the uninterrupted one exactly.
    * The task trains with 1- and 3-channel input; ``self.encoder`` (the backbone alone)
      is what export ships, so the task must not change its ``forward``.
    """

    Options: ClassVar[type | None] = None
    default_backbone: ClassVar[str] = "timm:resnet18"
    #: The task's own defaults of ``sslkit pretrain`` settings (``RunConfig`` fields, e.g.
    #: ``{"optimizer": "lars", "base_lr": 1.2, "lr_scaling": "sqrt", "weight_decay": 1e-6}``):
    #: they sit between the built-in defaults and a config file or the command line, and
    #: ``run.json`` records the values used. Checked like a config file's values.
    engine_defaults: ClassVar[dict[str, Any]] = {}
    #: Settings that replace some of ``engine_defaults`` when the run's backbone is ViT-like
    #: (a :class:`sslkit.api.TokenBackbone`, e.g. ``{"optimizer": "adamw", "base_lr": 1e-3}``
    #: where the task's own defaults are LARS for CNNs). ``None``: the same for every backbone.
    token_engine_defaults: ClassVar[dict[str, Any] | None] = None
    #: ``True``: ``views`` and ``forward`` may be recorded as a CUDA graph (``--capture
    #: graphs``): random numbers only from torch's generators, no host reads (``.item()``,
    #: data-dependent shapes or branches), no Python-side state handed from ``forward`` to
    #: ``on_step_end``. A string says why not (shown to the user); ``False``: not declared.
    capturable: ClassVar[bool | str] = False
    #: ``True``: the encoder trains on inputs that are not the whole images it will embed
    #: (jigsaw's tiles), so the engine recomputes its BatchNorm running statistics on whole,
    #: un-augmented training images after the last step, for the saved encoder only
    #: (``sslkit/engine/batchnorm.py``; ``run.json`` records ``batchnorm_recomputed``).
    recompute_batchnorm: ClassVar[bool] = False
    #: The fewest images per process ``forward`` needs: 2 where its loss compares the images of a batch
    #: (in-batch negatives, batch statistics: simclr, barlowtwins, vicreg, jigsaw's BatchNorm head). A
    #: smaller ``--batch-size`` / processes is refused in one line before any image is decoded (and again
    #: once the data is known, where fewer images than the batch leave less). A task whose need depends on
    #: its options sets it on the instance in ``__init__`` (``moco``: 2 for version 3 only).
    min_batch: int = 1
    #: How the trained encoder is best embedded, where its backbone offers a choice
    #: (``embedding_options`` on the backbone): ``"patch_mean"``, the mean of a ViT's normed
    #: patch tokens instead of its class token. The engine records the backbone options that
    #: give it in ``run.json`` (under the user's own ``--backbone-opt``), so ``embed``, ``eval``
    #: and the export use it. ``None``: the backbone's own embedding.
    embedding: ClassVar[str | None] = None
    #: Options added after runs of the task were recorded, each with the value those runs
    #: used (e.g. ``{"target": "pixels"}`` where a later default is ``"hog"``): ``--resume``
    #: of a ``run.json`` without the key continues with this value, not today's default.
    legacy_option_values: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: nn.Module, options: Any, spec: InputSpec) -> None:
        super().__init__()
        self.encoder = backbone
        self.options = options
        self.spec = spec

    @classmethod
    def backbone_engine_defaults(cls, backbone: nn.Module) -> dict[str, Any] | None:
        """Settings that replace some of ``engine_defaults`` for the run's ``backbone`` (built on torch's
        meta device before the run: its class and shapes, no weights). Default: ``token_engine_defaults``
        when it is ViT-like (a :class:`sslkit.api.TokenBackbone`), else None. Override it where the
        family matters beyond ViT-or-not (the built-in ``simmim``: the paper's AdamW 1e-4 for ViTs and
        Swin, its own measured settings for CNNs)."""
        from sslkit.backbone import is_token_backbone

        return cls.token_engine_defaults if is_token_backbone(backbone) else None

    @classmethod
    def default_backbone_for(cls, image_size: int) -> str:
        """The backbone a run of ``image_size``-pixel images builds when the user names none (no
        ``--backbone``, and no ``--init`` that names its architecture). Default: ``default_backbone``
        at every size; a task whose best backbone for small images is another family returns it
        there (the built-in ``simmim``: a ResNet-18 below 96 px, measured)."""
        return cls.default_backbone

    @classmethod
    def default_backbone_options(cls, image_size: int) -> dict[str, Any]:
        """Backbone options that fit ``default_backbone_for(image_size)`` to images of ``image_size`` pixels
        (e.g. a ViT's ``patch_size`` for small images). The engine adds them only when the run
        builds the default backbone from random init (no ``--backbone``, no ``--init``; an
        ``--init`` run directory gives the architecture it recorded instead), under the user's own
        ``--backbone-opt`` (which win key by key); ``run.json`` records the result. Default:
        ``{}``, the backbone as named."""
        return {}

    @classmethod
    def check(cls, backbone: nn.Module, spec: InputSpec) -> str | None:
        """Why this backbone/input pairing cannot work (one line naming what would), or None.

        Called before any image is decoded, on the real backbone and a stand-in spec.
        """
        return None

    def views(self, spec: InputSpec) -> Callable[[torch.Tensor], Views]:
        """The augmentation: ``(B, C, S, S)`` in [0, 1] -> tuple of normalised views.

        Batched and on the batch's device. The returned object has ``override(**fields)``
        (a copy with view-recipe fields replaced; unknown fields raise ``UsageError``),
        which ``--augment-opt key=value`` calls: return a :class:`sslkit.api.MultiView`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement views(spec)")

    def forward(self, views: Views) -> dict[str, torch.Tensor]:
        """``views`` (what ``views(spec)`` made) -> ``{"loss": scalar, name: scalar, ...}``.

        Every value is logged to ``metrics.csv``; reserved keys: ``step``, ``epoch``,
        ``lr``, ``img_per_s``, ``grad_norm``, ``stop``, ``requeue``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(views)")

    def resolved_options(self) -> dict[str, Any]:
        """The values this task chose for options the user left at their ``None`` default (e.g.
        ``{"mask_patch": 20}``, computed from the image size or the backbone). The engine records
        them in ``run.json`` in place of ``None``, so the run says what it trained with and
        ``--resume`` rebuilds the same task even where a later version resolves them otherwise.
        Building the task again with them must give the same values. Default: ``{}``."""
        return {}

    @classmethod
    def planned_options(cls, total_steps: int) -> dict[str, Any]:
        """Values for options left at their ``None`` default that depend on how long the run is:
        ``total_steps``, the optimizer steps it plans (its LR schedule's horizon, known once the data
        is). The engine fills them in before it builds the task (a value the user gave stands) and
        records them in ``run.json``, so ``--resume`` keeps them whatever horizon the resumed run
        has. A task built without a planned run (a probe before the data is read, code that builds it
        directly) resolves those options itself in ``__init__`` and reports them in
        ``resolved_options``. Default: ``{}``. The built-in ``byol`` and ``dino``: gentle crops and a
        slow target up to 1,000 steps, the paper's beyond (measured)."""
        return {}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimizer step (1-based ``step``). ``forward`` runs once per
        micro-batch before it (``--accumulate K``: K times); what it hands over (keys to enqueue, a batch
        mean) gathers every micro-batch's, so the update is that of one K x larger batch."""

    def data_note(self, images: int) -> str | None:
        """A note on the training data's size for this task's options, or None. The engine calls it
        once the data is known (``images``: training images over all processes) and prints the line
        on stderr, the run going on (``moco``: a queue of negatives at least as long as the data
        holds keys of each query's own image). Refuse what cannot work in ``check`` or with
        ``min_batch`` instead. Default: None."""
        return None

    def head_state(self) -> dict[str, torch.Tensor]:
        """The task's state besides the encoder (decoders, projection heads, EMA teachers,
        queues, centres): what ``--init RUN_DIR`` restores from an earlier run of the same
        task, by name and shape, so continued pretraining does not restart them from random.
        Default: every ``state_dict`` entry outside ``encoder.``; override to leave some out."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def unimplemented(cls: type) -> list[str]:
    """The methods every task defines that ``cls`` leaves to :class:`Task`, which only raises:
    ``["views(spec)", "forward(views)"]`` or part of it; ``[]`` for a task that defines both."""
    return [f"{name}({arg})" for name, arg in (("views", "spec"), ("forward", "views"))
            if getattr(cls, name, None) is getattr(Task, name)]
