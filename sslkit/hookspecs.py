"""The whole sslkit plugin contract.

A plugin is a module (or object) with ``@sslkit.hookimpl`` functions named after the hooks
below, announced through an entry point in the group ``sslkit``::

    # pyproject.toml of your package
    [project.entry-points.sslkit]
    my_plugin = "my_package.my_plugin"

    # my_package/my_plugin.py
    import sslkit

    @sslkit.hookimpl
    def register_tasks(register):
        register("my_task", MyTask)

Every hook receives one ``register(name, obj)`` callable. Names are unique across all
plugins of one kind: two plugins registering the same task name is an error naming both.
A plugin that fails to import, or whose hook raises, is reported in one line and skipped;
the others keep working. sslkit's own built-ins (``plugins/`` in the source tree, imported
as ``sslkit_plugins``) use exactly these hooks and entry points.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("sslkit")
hookimpl = pluggy.HookimplMarker("sslkit")
"""Decorator marking a plugin function as the implementation of a hook below:
``@hookimpl`` above ``def register_tasks(register): ...``."""

Register = Callable[[str, Any], None]


@hookspec
def register_tasks(register: Register) -> None:
    """Register pretext tasks: ``register(name, TaskClass)``.

    ``TaskClass`` subclasses :class:`sslkit.task.Task`: an ``nn.Module`` built as
    ``TaskClass(backbone, options, spec)``, with an ``Options`` dataclass (its fields are
    the task's ``--task-opt key=value`` options), ``check(backbone, spec)`` (why a pairing
    cannot work, or None), ``views(spec)`` (the batched augmentation producing the task's
    views), ``forward(views) -> {"loss": tensor, ...}`` and ``on_step_end(step, total)``.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone families: ``register(prefix, factory)``.

    A backbone name is ``prefix:model`` (``timm:resnet18``). The engine calls
    ``factory(model, in_chans=C, image_size=S, **options)``, which returns a
    :class:`sslkit.backbone.Backbone`: an ``nn.Module`` mapping ``(B, C, H, W)`` pixels to a
    ``(B, D)`` embedding, with attributes ``in_chans`` and ``num_features``.
    """


@hookspec
def register_sources(register: Register) -> None:
    """Register dataset sources: ``register(scheme, SourceClass)``.

    ``--data scheme:location`` builds ``SourceClass(location, **options)``, a
    :class:`sslkit.data.source.Source` with ``index() -> list[SampleRef]`` (cheap: headers
    only) and ``load(ref) -> float32 array (C, H, W) in [0, 1]`` (raising ``NotAnImage`` to
    skip silently, ``Undecodable`` or any error to skip with a reported reason). Optional:
    ``channels_of(ref)``, ``properties(ref)`` (for ``sslkit data inspect``), ``describe()``
    (how pixels reached [0, 1], stored in the run's InputSpec), ``parallel_decode``. A bare
    path is given to the source whose ``sniff(path)`` scores highest.
    """


@hookspec
def register_exporters(register: Register) -> None:
    """Register export formats: ``register(format, export_function)``.

    ``export_function(encoder, spec, metadata, out, **options) -> dict`` writes the trained
    encoder (the backbone alone, eval mode) to ``out`` and returns a report of what it
    checked. ``spec`` is the run's :class:`sslkit.spec.InputSpec`; ``metadata`` is a
    JSON-able dict (task, backbone, embedding dim, versions) to embed in the artefact.
    """


@hookspec
def register_callbacks(register: Register) -> None:
    """Register run callbacks: ``register(name, factory)``; ``--callbacks a,b`` picks them.

    ``factory()`` returns a :class:`sslkit.api.Callback`, whose methods the engine calls:
    ``on_run_start(run)`` (a :class:`sslkit.api.RunInfo`: run directory, ``run.json``
    record, start step, horizon), ``on_step_end(step, metrics)`` after every optimizer
    step, ``on_checkpoint(path)`` after every checkpoint and ``on_run_end(summary)`` at the
    end, also after a failure. Rank 0 only unless the class sets ``all_ranks = True``; a
    callback that raises is reported in one line and not called again, the run goes on.
    ``metrics.csv`` (``csv``) and TensorBoard (``tensorboard``) are built-in callbacks.
    """
