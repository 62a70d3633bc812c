"""The whole sslkit plugin contract.

A plugin is a module (or object) with ``@sslkit.hookimpl`` functions named after the hooks
below, announced through an entry point in the group ``sslkit``::

    # pyproject.toml of your package
    [project.entry-points.sslkit]
    my_plugin = "my_package.my_plugin"

    # my_package/my_plugin.py
    from sslkit.api import hookimpl

    sslkit_api = ">=1,<2"  # the sslkit.api versions this plugin was written for

    @hookimpl
    def register_tasks(register):
        register("my_task", MyTask)

Import only :mod:`sslkit.api` (every other sslkit module is private). Every hook receives
one ``register(name, obj)`` callable; a name holds no ``:``. Names should be unique across
all plugins of one kind: when two plugins register the same name, both load, ``sslkit
plugins`` lists the conflict, and a command that uses that name fails in one line naming
both plugins. A plugin that fails to import, whose hook raises, or whose ``sslkit_api``
range excludes the running ``sslkit.api.API_VERSION`` is reported in one line and skipped;
the others keep working. sslkit's own built-ins (``plugins/`` in the source tree, imported
as ``sslkit_plugins``) use exactly these hooks and entry points. ``sslkit.testing`` checks
a plugin against every rule below; docs/plugins.md is the guide.
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

    ``TaskClass`` subclasses :class:`sslkit.api.Task`: an ``nn.Module`` built as
    ``TaskClass(backbone, options, spec)``, with an ``Options`` dataclass (its fields are
    the task's ``--task-opt key=value`` options; None for none), ``check(backbone, spec)``
    (why a pairing cannot work, one line, or None), ``views(spec)`` (the batched
    augmentation producing the task's views), ``forward(views) -> {"loss": tensor, ...}``
    and ``on_step_end(step, total)``. Rules (the engine enforces those marked *):

    * ``forward`` returns ``"loss"`` (a scalar tensor) plus any other scalars to log (a
      Python int/float or a 1-element tensor each; *: at the first step); the keys ``step``,
      ``epoch``, ``lr``, ``img_per_s``, ``grad_norm``, ``stop`` and ``requeue`` are reserved
      for the engine's own ``metrics.csv`` columns (*: one-line error naming the task).
    * ``views(spec)`` returns a callable ``(B, C, S, S) -> Views`` with an
      ``override(**fields)`` method returning a copy with view-recipe fields replaced
      (what ``--augment-opt`` calls; :class:`sslkit.api.MultiView` has it). Options it does
      not know raise :class:`sslkit.api.UsageError`.
    * Everything a resume needs (EMA teachers, queues, centres, schedules) lives in the
      state dict (parameters and buffers), so a resumed run repeats the uninterrupted one.
    * ``self.encoder`` is the backbone alone: it is what export ships.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone families: ``register(prefix, factory)``.

    A backbone name is ``prefix:model`` (``timm:resnet18``). The engine calls
    ``factory(model, in_chans=C, image_size=S, **options)`` (``options``: the
    ``--backbone-opt`` values), which returns a :class:`sslkit.api.Backbone`: an
    ``nn.Module`` mapping ``(B, C, H, W)`` pixels to a ``(B, D)`` embedding, with attributes
    ``in_chans`` and ``num_features`` (``D``), for ``C`` = 1 and 3. An unknown model or
    option raises :class:`sslkit.api.UsageError` (one line). ViT-like backbones may add the
    :class:`sslkit.api.TokenBackbone` interface masked tasks use.
    """


@hookspec
def register_sources(register: Register) -> None:
    """Register dataset sources: ``register(scheme, SourceClass)``.

    ``--data scheme:location`` builds ``SourceClass(location, options)``: ``options`` is an
    instance of ``SourceClass.Options`` (a dataclass whose fields are the ``--data-opt``
    options) built from the user's values, or None when the class has no ``Options``.
    ``SourceClass`` subclasses :class:`sslkit.api.Source` with ``index() ->
    list[SampleRef]`` (cheap: headers only) and ``load(ref) -> float32 array (C, H, W) in
    [0, 1]`` (raising ``NotAnImage`` to skip silently, ``Undecodable`` or any error to skip
    with a reported reason). Optional: ``channels_of(ref)``, ``properties(ref)`` (for
    ``sslkit data inspect``), ``describe()`` (how pixels reached [0, 1], stored in the
    run's InputSpec), ``graph_preprocessing()`` (what an export ``--with-preprocessing``
    puts in its graph: a :class:`sslkit.api.GraphPreprocessing`, default image pixels),
    ``parallel_decode``, ``loads_whole_file``. CLI flags for some ``Options`` fields (``--window``) come from an
    entry point of group ``sslkit.source_flags`` (:mod:`sslkit.source_flags`). Rules (* = enforced):

    * ``SourceClass.scheme`` equals the registered name (*: at registration, one line
      naming the plugin; the source is skipped).
    * Every ``SampleRef.path`` is an existing file (fingerprints, caches and the
      pairing of split groups read it); a source of generated data names a real file.
    * A source pickles (``pickle.dumps(source)``): the first decoding pass runs ``load`` in
      worker processes. Keep open handles out of its state, or drop them in
      ``__getstate__``.
    * A bare ``--data PATH`` goes to the source whose ``sniff(path)`` scores highest:
      0 = not mine, about 0.5 = plausible (the right file extensions), 1 = certain (a
      magic number matched); a path no source scores above 0 is a one-line error.
    """


@hookspec
def register_exporters(register: Register) -> None:
    """Register export formats: ``register(format, export_function)``.

    sslkit calls, always with these keywords::

        export_function(encoder, spec, metadata, out, *, samples, samples_note, log, **options) -> dict

    It writes the trained ``encoder`` (the backbone alone, eval mode) to ``out`` (a
    ``Path``) and returns a JSON-able report of what it checked. ``spec`` is the run's
    :class:`sslkit.api.InputSpec`; ``metadata`` a JSON-able dict (task, backbone, embedding
    dim, versions; no paths or patient identifiers) to embed in the artefact; ``samples``
    real images of the run's data, float32 ``(N, C, S, S)`` in [0, 1], or None (then
    ``samples_note`` says why); ``log(line)`` prints progress; ``options`` are the
    format's own options (``--opset``, ``--fp16``...): an unknown one raises
    :class:`sslkit.api.UsageError`. Rules: write through
    :func:`sslkit.api.write_atomic`, so a failed export leaves nothing behind; verify the
    written file (load it back and compare with the encoder) before returning, raising
    :class:`sslkit.api.CheckFailed` when it differs.
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
