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
missing one with ``huggingface_hub``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sslkit.errors import UsageError, first_line

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
INDEX_SUFFIX = ".index.json"


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
        h = hashlib.sha256()
        for path in self.files():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


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


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment at call time."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_init(spec: str, allow_download: bool = False) -> InitFile:
    """``--init`` text -> :class:`InitFile`; a usage error (one line) when it cannot be found."""
    spec = spec.strip()
    if not spec:
        raise UsageError("--init is empty; give a weights file, a run directory, ORG/NAME or timm:MODEL.TAG")
    if spec.startswith("timm:"):
        return _timm(spec[5:], allow_download)
    if spec.startswith("hf-hub:") or spec.startswith("hf:"):
        return _hub(spec.split(":", 1)[1], allow_download)
    path = Path(spec).expanduser()
    if path.is_dir():
        from sslkit.checkpoint import MODEL_FILE
        from sslkit.run import CHECKPOINTS, ENCODER_FILE, split_checkpoint

        run, step = split_checkpoint(path)
        if step is not None and (step / MODEL_FILE).is_file():  # RUN/checkpoints/step-N
            return InitFile(step / MODEL_FILE, "file", f"{run.name}/{CHECKPOINTS}/{step.name}")
        if (path / ENCODER_FILE).is_file():
            return InitFile(path / ENCODER_FILE, "run", f"{path.name}/{ENCODER_FILE}")
        model = next((path / n for n in HUB_FILES if (path / n).is_file()), None)
        if model is None:
            raise UsageError(f"--init {spec!r} is a folder without {ENCODER_FILE} or {HUB_FILES[0]}; give a weights "
                             f"file, a finished sslkit run directory, one of its checkpoints (RUN/{CHECKPOINTS}/step-N)"
                             f" or a Hugging Face model folder")
        return InitFile(model, "file", f"{path.name}/{model.name}")
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UsageError(f"--init {spec!r}: expected a {', '.join(FILE_SUFFIXES)} file")
        return InitFile(path, "file", path.name)
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and \
        path.suffix.lower() not in FILE_SUFFIXES
    if looks_like_hub:
        return _hub(spec, allow_download)
    raise UsageError(f"--init {spec!r} does not exist; give a weights file ({', '.join(FILE_SUFFIXES)}), a run "
                     f"directory, a Hub id ORG/NAME or timm:MODEL.TAG")


def _timm(tag: str, allow_download: bool) -> InitFile:
    import timm
    from timm.models import get_pretrained_cfg

    from sslkit.errors import unknown_name_message

    arch = tag.split(".", 1)[0]
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
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo.partition("@")
    what, cache, label = what or repo, hub_cache_dir(), f"{repo}@{revision}" if revision else repo
    for name in files:
        hit = try_to_load_from_cache(repo, name, cache_dir=str(cache), revision=revision or None)
        if isinstance(hit, str) and Path(hit).is_file():
            return _with_shards(InitFile(Path(hit), "hub", label), repo, revision, allow_download, what)
    if not allow_download:
        raise UsageError(f"--init {what}: {repo} is not in the local Hugging Face cache ({cache}); pass "
                         f"--allow-download to fetch it, or give a local weights file")
    from huggingface_hub import hf_hub_download

    last = None
    for name in files:
        try:
            path = hf_hub_download(repo, name, revision=revision or None, cache_dir=str(cache))
        except Exception as exc:  # not found, offline, gated: try the next file name, then report
            last = exc
            continue
        return _with_shards(InitFile(Path(path), "hub", label), repo, revision, allow_download, what)
    msg = first_line(last) if last else "no file tried"
    raise UsageError(f"--init {what}: cannot download {repo} ({', '.join(files)}): {msg}")


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
        from huggingface_hub import hf_hub_download

        for n in missing:
            try:
                hf_hub_download(repo, n, revision=revision or None, cache_dir=str(hub_cache_dir()))
            except Exception as exc:
                raise UsageError(f"--init {what}: cannot download {repo}'s shard {n}: {first_line(exc)}") from None
    return found
