"""Where ``--init`` weights come from: a local file, a run directory, a Hugging Face Hub id or a
timm pretrained tag, resolved offline from the local Hugging Face cache unless downloading is allowed.

Forms of ``--init``:

* ``PATH.safetensors`` / ``PATH.pth`` / ``PATH.pt`` / ``PATH.bin`` / ``PATH.ckpt``: a local file
  (``.ckpt``: a PyTorch Lightning checkpoint, as solo-learn and lightly write).
* ``RUN_DIR``: an sslkit run directory (its ``encoder.safetensors``), or one of its
  checkpoints (``RUN_DIR/checkpoints/step-N``).
* ``MODEL_DIR``: a Hugging Face model folder (``save_pretrained``, ``hf download --local-dir``,
  a ``git clone`` of the repository): its ``model.safetensors`` or ``pytorch_model.bin``.
* ``timm:MODEL.TAG`` (e.g. ``timm:vit_small_patch14_dinov2.lvd142m``): timm's
  ``pretrained_cfg`` names the Hub repository (``hf_hub_id``) that holds the weights.
* ``ORG/NAME`` or ``hf-hub:ORG/NAME[@REVISION]``: a Hugging Face Hub model repository
  (``model.safetensors``, else ``pytorch_model.bin``).

A model stored in shards (``model.safetensors.index.json`` and the files its ``weight_map``
names, as ``save_pretrained`` writes models over its shard size) is read whole, in the Hub
cache and in a model folder alike.

Hub files are looked up in the local cache only (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``); ``allow_download=True`` fetches a
missing one with ``huggingface_hub`` (:mod:`.hub`), once per process.

A run records a local ``--init`` as an absolute path (:func:`recorded_init`); ``--resume`` takes
another spelling of the same file as the same ``--init`` (:func:`same_init`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sslkit.errors import UsageError, first_line
from sslkit.init.hub import HUB_FILES, INDEX_SUFFIX, hub_cache_dir, hub_endpoint  # noqa: F401 (re-exported)

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
REMOTE_PREFIXES = ("timm:", "hf-hub:", "hf:")


@dataclass(frozen=True)
class InitFile:
    """A resolved ``--init``: the weights file and what it was named as."""

    path: Path  # the file on disk (a shard index: the files it names hold the weights)
    kind: str  # "file" | "run" | "hub" | "timm"
    name: str  # what to record: the Hub id / timm tag, or the file's name (never a full local path)
    arch: str | None = None  # timm architecture of a timm tag (e.g. vit_small_patch14_dinov2)

    def files(self) -> list[Path]:
        """The files that hold the weights: ``path``, or the shards its index names."""
        return shard_files(self.path, self.name) if self.path.name.endswith(INDEX_SUFFIX) else [self.path]

    def sha256(self) -> str:
        """Of the weights' bytes: the file's, or the shards' one after another in name order."""
        from sslkit.output_file import file_sha256

        return file_sha256(self.files())


def shard_names(index: Path, name: str) -> list[str]:
    """The shard file names of a ``*.index.json`` (its ``weight_map`` values), sorted; one line if it is
    unreadable, or names a file elsewhere (a path, ``..``)."""
    from sslkit.output_file import read_json

    weight_map = read_json(index).get("weight_map")  # {} when unreadable or not JSON
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in names):
        raise UsageError(f"--init {name}: {index.name} is not a shard index with a weight_map of file names "
                         f"beside it")
    return names


def shard_files(index: Path, name: str) -> list[Path]:
    """The shards an index names, each beside it; one line naming the first that is missing."""
    files = [index.parent / n for n in shard_names(index, name)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"--init {name}: {len(missing)} of the {len(files)} shards that {index.name} names are "
                         f"missing (first: {missing[0]})")
    return files


def resolve_init(spec: str, allow_download: bool = False) -> InitFile:
    """``--init`` text -> :class:`InitFile`; a usage error (one line) when it cannot be found.

    A Hub id or timm tag is resolved (and downloaded) once per process: the files found are
    remembered by the text, ``allow_download``, the cache and the endpoint, while they exist."""
    spec = spec.strip()
    if not spec:
        raise UsageError("--init is empty; give a weights file, a run directory, ORG/NAME or timm:MODEL.TAG")
    path = local_path(spec)
    if path is not None:
        return _local(spec, path)
    key = (spec, bool(allow_download), str(hub_cache_dir()), hub_endpoint())
    hit = _RESOLVED.get(key)
    if hit is not None and _still_there(hit):
        return hit
    if spec.startswith("timm:"):
        found = _timm(spec[5:], allow_download)
    else:
        found = _hub(spec.split(":", 1)[1] if spec.startswith(REMOTE_PREFIXES) else spec, allow_download, what=spec)
    _RESOLVED[key] = found
    return found


_RESOLVED: dict[tuple, InitFile] = {}  # resolve_init's Hub and timm answers of this process


def _still_there(found: InitFile) -> bool:
    """Whether a remembered answer's files (an index and its shards) are all still in the cache."""
    try:
        return found.path.is_file() and all(f.is_file() for f in found.files())
    except UsageError:  # a shard the index names is gone
        return False


def local_path(spec: str) -> Path | None:
    """The local path that ``--init`` text names, as :func:`resolve_init` reads it; None for a Hub id
    (``ORG/NAME`` that is not a local file or folder, ``hf-hub:``) or a timm tag."""
    spec = spec.strip()
    if spec.startswith(REMOTE_PREFIXES):
        return None
    from sslkit.run import checkpoint_path

    path = checkpoint_path(Path(spec).expanduser())  # RUN/checkpoints/step-N as its folder step-0000000N
    if path.exists():
        return path
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and \
        path.suffix.lower() not in FILE_SUFFIXES
    return None if looks_like_hub else path


def recorded_init(spec: str) -> str:
    """``--init`` as a run records it (run.json ``config.init``): an existing local file or folder as an
    absolute path, so that the run's ``init`` row resolves from any directory; other text as given."""
    path = local_path(spec)
    return os.path.abspath(path) if path is not None and path.exists() else spec


def same_init(a: str, b: str) -> bool:
    """Whether two ``--init`` texts name the same weights: equal text, or paths of the same file or folder
    (a relative and an absolute spelling alike)."""
    if a.strip() == b.strip():
        return True
    pa, pb = local_path(a), local_path(b)
    if pa is None or pb is None:
        return False
    if os.path.abspath(pa) == os.path.abspath(pb):
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:  # one of them is not there
        return False


def _local(spec: str, path: Path) -> InitFile:
    """A local weights file, sslkit run directory (or checkpoint) or model folder."""
    if path.is_dir():
        return _folder(spec, path)
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UsageError(f"--init {spec!r}: expected a {', '.join(FILE_SUFFIXES)} file")
        return InitFile(path, "file", path.name)
    if path.exists():  # a FIFO, a socket, /dev/zero: never read (it could block or never end)
        raise UsageError(f"--init {spec!r} is not a regular file or folder; give a weights file")
    raise UsageError(f"--init {spec!r} does not exist; give a weights file ({', '.join(FILE_SUFFIXES)}), a run "
                     f"directory, a Hub id ORG/NAME or timm:MODEL.TAG")


def _folder(spec: str, path: Path) -> InitFile:
    from sslkit.checkpoint import MODEL_FILE
    from sslkit.run import CHECKPOINTS, ENCODER_FILE, split_checkpoint

    name = Path(os.path.abspath(path)).name  # "." or "run/" named as the folder itself
    run, step = split_checkpoint(path)
    if step is not None and (step / MODEL_FILE).is_file():  # RUN/checkpoints/step-N
        return InitFile(step / MODEL_FILE, "file", f"{Path(os.path.abspath(run)).name}/{CHECKPOINTS}/{step.name}")
    if (path / ENCODER_FILE).is_file():
        return InitFile(path / ENCODER_FILE, "run", f"{name}/{ENCODER_FILE}")
    model = next((path / n for n in HUB_FILES if (path / n).is_file()), None)
    if model is None:
        raise UsageError(f"--init {spec!r} is a folder without {ENCODER_FILE} or {HUB_FILES[0]}; give a weights "
                         f"file, a finished sslkit run directory, one of its checkpoints (RUN/{CHECKPOINTS}/step-N)"
                         f" or a Hugging Face model folder")
    return InitFile(model, "file", f"{name}/{model.name}")


def _timm(tag: str, allow_download: bool) -> InitFile:
    import timm
    from timm.models import get_pretrained_cfg

    from sslkit.errors import unknown_name_message

    arch = tag.split(".", 1)[0]
    if not arch.strip():
        raise UsageError("--init timm: names no model; give timm:MODEL.TAG, e.g. timm:vit_small_patch14_dinov2.lvd142m")
    if not timm.is_model(arch):
        raise UsageError("--init: " + unknown_name_message("timm model", arch, timm.list_models(),
                                                           "; see timm.list_models()", suggestions=3, listed=0))
    try:
        cfg = get_pretrained_cfg(tag if "." in tag else arch)
    except RuntimeError:  # timm: "Invalid pretrained tag (x) for arch."
        raise UsageError("--init: " + unknown_name_message("timm pretrained tag", tag,
                                                           timm.list_pretrained(f"{arch}.*"))) from None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        tags = [t for t in timm.list_pretrained(f"{arch}.*")][:4]
        hint = f"; tags with Hub weights: {', '.join(tags)}" if tags else ""
        raise UsageError(f"--init timm:{tag}: timm names no Hugging Face Hub weights for it{hint}")
    filename = getattr(cfg, "hf_hub_filename", None)
    found = _hub(hub_id, allow_download, (filename,) if filename else HUB_FILES, what=f"timm:{tag}")
    return InitFile(found.path, "timm", f"timm:{tag}", arch)


def _hub(repo: str, allow_download: bool, files: tuple[str, ...] = HUB_FILES, what: str | None = None) -> InitFile:
    from sslkit.init import hub

    repo, _, revision = repo.partition("@")
    what, label = what or repo, f"{repo}@{revision}" if revision else repo
    if not repo.strip():
        raise UsageError(f"--init {what!r} names no Hub repository; give ORG/NAME")
    local = "" if what.startswith("timm:") or ":" in what else "no local file or folder of that name, and "
    try:
        hit = hub.cached(repo, revision, files)
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a repository id at all
        raise UsageError(f"--init {what}: {local}not a Hub id ORG/NAME ({first_line(exc)}); give a weights file, "
                         "a run directory, ORG/NAME or timm:MODEL.TAG") from None
    if hit is None and not allow_download:
        raise UsageError(f"--init {what}: {local}{label} is not in the local Hugging Face cache ({hub_cache_dir()}); "
                         f"pass --allow-download to fetch it, or give a local weights file")
    if hit is None:
        hit = hub.download(repo, revision, files, what)
    return _with_shards(InitFile(hit, "hub", label), repo, revision, allow_download, what)


def _with_shards(found: InitFile, repo: str, revision: str, allow_download: bool, what: str) -> InitFile:
    """``found``, once every shard its index names is in the cache (fetched with ``allow_download``)."""
    if not found.path.name.endswith(INDEX_SUFFIX):
        return found
    names = shard_names(found.path, what)
    missing = [n for n in names if not (found.path.parent / n).is_file()]
    if missing and not allow_download:
        raise UsageError(f"--init {what}: {len(missing)} of the {len(names)} shards of {repo} are not in the local "
                         f"Hugging Face cache (first: {missing[0]}); pass --allow-download to fetch them")
    if missing:
        from sslkit.init import hub

        hub.download_shards(repo, revision, missing, what)
    return found
