"""Look things up by name: tasks, backbones, sources, exporters.

Modelled on timm's registry: ``list_*`` gives the names, ``get_*`` the registered object,
``create_*`` builds one, and an unknown name raises a :class:`UsageError` listing the valid
names (and the closest match).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.errors import UsageError, shown, unknown_name_message  # noqa: F401 (re-exported)
from sslkit.plugins import get_plugins


def _names(kind: str) -> list[str]:
    return sorted(get_plugins().entries[kind])


def _get(kind: str, singular: str, name: str) -> Any:
    """The object registered as ``name``; a one-line :class:`UsageError` if it is unknown, or
    registered by two plugins (a conflict is an error only where the name is used)."""
    plugins = get_plugins()
    entry = plugins.lookup(kind, name)
    if entry is not None:
        return entry.obj
    blocked, variable = not_loaded()
    if name in blocked:  # a built-in's entry point is named like what it registers (onnx, folder, timm)
        fix = "add it there" if variable == "SSLKIT_LOAD_PLUGINS" else "take it out of it"
        raise UsageError(f"{singular} {shown(name)} comes from the plugin {name!r}, which is installed but not "
                         f"loaded ({variable}); {fix}, or unset {variable}")
    hint = f"; installed, not loaded ({variable}): {_listed(blocked)}" if blocked else ""
    raise UsageError(unknown_name_message(singular, name, sorted(plugins.entries[kind]), hint,
                                          empty="none loaded" if blocked else "none installed"))


def _listed(names: list[str], most: int = 12) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def not_loaded() -> tuple[list[str], str]:
    """The installed plugins that SSLKIT_LOAD_PLUGINS / SSLKIT_DISABLE_PLUGINS keep from loading, and
    the variable that does (``SSLKIT_LOAD_PLUGINS`` when set): what an unknown name's line points at."""
    import os

    blocked = sorted(name for name, plugin in get_plugins().pm.list_name_plugin() if plugin is None)
    return blocked, "SSLKIT_LOAD_PLUGINS" if os.environ.get("SSLKIT_LOAD_PLUGINS") is not None \
        else "SSLKIT_DISABLE_PLUGINS"


def summary(kind: str, name: str) -> str:
    """One line on what ``name`` is: the first sentence of its own docstring (not one inherited from its
    class, nor the signature a dataclass gets), else of its module's (with the ``Task ``x``: `` such a
    docstring opens with left out), reStructuredText's double backquotes as single; ``""`` without either."""
    import re
    import sys

    obj = get_plugins().entries[kind][name].obj
    own = getattr(obj, "__doc__", None) if callable(obj) else None
    if own is getattr(type(obj), "__doc__", None) and not isinstance(obj, type):  # an instance's: its class's
        own = None
    if isinstance(obj, type) and own and own.startswith(f"{obj.__name__}("):  # a dataclass's generated one
        own = None
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    for doc in (own, getattr(module, "__doc__", None)):
        if doc and doc.strip():
            text = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")
            text = re.sub(r"^[\w ]+ `[^`]+`: ", "", text)
            first = re.split(r"(?<! al\.)(?<! e\.g\.)(?<! i\.e\.)(?<=\.)\s", text, maxsplit=1)[0]
            return first if len(first) <= 200 else first[:199] + "…"
    return ""


def plugin_of(kind: str, name: str) -> str:
    """Which plugin registered ``name`` (for run metadata)."""
    return get_plugins().entries[kind][name].plugin


# --- tasks -----------------------------------------------------------------------------
def list_tasks() -> list[str]:
    return _names("tasks")


def get_task(name: str) -> type:
    return _get("tasks", "task", name)


def create_task(name: str, backbone: Any, spec: Any, /, **options: Any) -> Any:
    """Build task ``name`` around ``backbone``; ``options`` are its Options fields."""
    from sslkit.options import build_options

    from sslkit.sample_modes import pairing_problem

    cls = get_task(name)
    reason = pairing_problem(name, cls, backbone, spec) or cls.check(backbone, spec)
    if reason:
        raise UsageError(f"task {name!r} cannot run here: {reason}")
    return cls(backbone, build_options(cls.Options, options, f"task {name!r}"), spec)


# --- backbones -------------------------------------------------------------------------
def list_backbones() -> list[str]:
    """Registered backbone prefixes; a backbone name is ``prefix:model``."""
    return _names("backbones")


def split_backbone_name(name: str) -> tuple[str, str]:
    prefix, sep, model = name.partition(":")
    if not sep or not model:
        raise UsageError(
            f"backbone {name!r} must be written prefix:model, e.g. timm:resnet18 "
            f"(prefixes: {', '.join(list_backbones()) or ('none loaded' if not_loaded()[0] else 'none installed')})"
        )
    return prefix, model


#: keywords every backbone factory gets from sslkit, never from ``--backbone-opt``: how to change them
SET_BY_SSLKIT = {"in_chans": "from the data's channels; give --channels 1 or 3 instead",
                 "image_size": "from --image-size; give --image-size instead"}


def check_backbone_options(options: dict[str, Any]) -> None:
    """Refuse, in one line, a backbone option that sslkit itself passes to every backbone factory."""
    given = sorted(options.keys() & SET_BY_SSLKIT.keys())
    if given:
        raise UsageError(f"--backbone-opt {given[0]}: sslkit sets it {SET_BY_SSLKIT[given[0]]}")


def create_backbone(name: str, /, in_chans: int, image_size: int, **options: Any) -> Any:
    """Backbone ``name`` (``prefix:model``) built by its plugin's factory; a factory that returns no
    embedding size (``num_features``, a positive int, which tasks size their heads by) is refused in
    one line naming the plugin."""
    prefix, model = split_backbone_name(name)
    factory = _get("backbones", "backbone prefix", prefix)
    net = factory(model, in_chans=in_chans, image_size=image_size, **options)
    size = getattr(net, "num_features", None)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        got = "has no num_features" if size is None else f"has num_features {shown(size)}"
        raise UsageError(f"backbone {name!r} (plugin {plugin_of('backbones', prefix)!r}) {got}: a backbone factory "
                         f"returns an nn.Module with in_chans and num_features, the embedding size D (a positive int)")
    return net


def meta_backbone(name: str, /, in_chans: int, image_size: int, **options: Any) -> Any:
    """Backbone ``name`` as the run will build it, known before the run: built on torch's meta device
    (no memory, no weights), or normally when the factory cannot build there. An unknown name or
    option is the usual one-line error."""
    import torch

    try:
        with torch.device("meta"):
            return create_backbone(name, in_chans, image_size, **options)
    except UsageError:
        raise
    except Exception:  # a factory that needs real tensors (fills weights from data, ...)
        return create_backbone(name, in_chans, image_size, **options)


# --- sources ---------------------------------------------------------------------------
def list_sources() -> list[str]:
    return _names("sources")


def get_source(scheme: str) -> type:
    return _get("sources", "data source", scheme)


def resolve_data(data: str) -> tuple[str, str]:
    """``"dicom:/scans"`` -> ``("dicom", "/scans")``; a bare path -> the best sniffing source."""
    scheme, sep, location = data.partition(":")
    if sep and scheme in get_plugins().entries["sources"]:
        return scheme, location
    if sep and len(scheme) > 1 and not Path(data).exists():
        get_source(scheme)  # raises: unknown scheme, listing the valid ones
    path = Path(data)
    if not path.exists():
        raise UsageError(f"data path {data!r} does not exist")
    scores = {s: _sniff(s, path) for s in list_sources()}
    best = max(scores, key=scores.get, default=None)
    if best is None or scores[best] <= 0:
        blocked, variable = not_loaded()
        schemes = ", ".join(f"{s}:" for s in list_sources())
        fix = f"prefix it with a source scheme: {schemes}" if schemes else "no data source is loaded"
        raise UsageError(f"cannot tell what kind of data {data!r} holds; {fix}"
                         + (f"; installed, not loaded ({variable}): {_listed(blocked)}" if blocked else ""))
    get_source(best)  # refuses a scheme two plugins registered (ambiguous)
    return best, data


#: sources whose ``sniff`` failed, reported once per process: ``scheme`` (``scheme@plugin`` for a
#: registration a conflict shadows)
_sniff_failed: set[str] = set()


def _sniff(scheme: str, path: Path) -> float:
    """Source ``scheme``'s score for ``path``: where two plugins registered ``scheme``, the higher of
    their scores (a bare path either claims then reports the conflict, not a wrong hint); 0 for a
    sniff that raises or scores no number, reported once (one line naming the source and its
    plugin): one plugin's bug must not break bare paths."""
    entries = get_plugins().registrations("sources", scheme)
    return max((_sniff_one(scheme, e, path, i > 0) for i, e in enumerate(entries)), default=0.0)


def _sniff_one(scheme: str, entry: Any, path: Path, shadowed: bool) -> float:
    import math
    import sys

    from sslkit.errors import first_line, without_quoted

    try:
        score = float(entry.obj.sniff(path))
        if not math.isfinite(score):
            raise ValueError(f"scored {score}")
    except Exception as exc:
        key = f"{scheme}@{entry.plugin}" if shadowed else scheme
        if key not in _sniff_failed:
            _sniff_failed.add(key)
            print(f"sslkit: source {scheme!r} (plugin {entry.plugin!r}): sniff failed, ignored: "
                  f"{type(exc).__name__}: {without_quoted(first_line(exc))}", file=sys.stderr)  # no data path
        return 0.0
    return score


def create_source(data: str, /, **options: Any) -> Any:
    """Build the source for ``--data`` (``scheme:location`` or a bare path)."""
    from sslkit.options import build_options

    scheme, location = resolve_data(data)
    cls = get_source(scheme)
    return cls(location, build_options(cls.Options, options, f"source {scheme!r}"))


# --- exporters -------------------------------------------------------------------------
def list_exporters() -> list[str]:
    return _names("exporters")


# --- callbacks -------------------------------------------------------------------------
def list_callbacks() -> list[str]:
    """Registered run callbacks (``--callbacks a,b``)."""
    return _names("callbacks")


def get_exporter(fmt: str) -> Any:
    return _get("exporters", "export format", fmt)

