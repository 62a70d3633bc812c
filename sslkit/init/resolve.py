"""Where ``--init`` weights come from: a local file, a run directory, a Hugging Face Hub id or a
timm pretrained tag, resolved offline from the local Hugging Face cache unless downloading is allowed.

Forms of ``--init``:

* ``PATH.safetensors`` / ``PATH.pth`` / ``PATH.pt`` / ``PATH.bin``: a local file.
* ``RUN_DIR``: an sslkit run directory (its ``encoder.safetensors``).
* ``timm:MODEL.TAG`` (e.g. ``timm:vit_small_patch14_dinov2.lvd142m``): timm's
  ``pretrained_cfg`` names the Hub repository (``hf_hub_id``) that holds the weights.
* ``ORG/NAME`` or ``hf-hub:ORG/NAME[@REVISION]``: a Hugging Face Hub model repository
  (``model.safetensors``, else ``pytorch_model.bin``).

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

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class InitFile:
    """A resolved ``--init``: the weights file and what it was named as."""

    path: Path  # the file on disk
    kind: str  # "file" | "run" | "hub" | "timm"
    name: str  # what to record: the Hub id / timm tag, or the file's name (never a full local path)
    arch: str | None = None  # timm architecture of a timm tag (e.g. vit_small_patch14_dinov2)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


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
        if not (path / ENCODER_FILE).is_file():
            raise UsageError(f"--init {spec!r} is a folder without {ENCODER_FILE}; give a weights file, a "
                             f"finished sslkit run directory or one of its checkpoints (RUN/{CHECKPOINTS}/step-N)")
        return InitFile(path / ENCODER_FILE, "run", f"{path.name}/{ENCODER_FILE}")
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
    what = what or repo
    cache = hub_cache_dir()
    for name in files:
        hit = try_to_load_from_cache(repo, name, cache_dir=str(cache), revision=revision or None)
        if isinstance(hit, str) and Path(hit).is_file():
            return InitFile(Path(hit), "hub", f"{repo}@{revision}" if revision else repo)
    if not allow_download:
        raise UsageError(f"--init {what}: {repo} is not in the local Hugging Face cache ({cache}); pass "
                         f"--allow-download to fetch it, or give a local weights file")
    from huggingface_hub import hf_hub_download

    last = None
    for name in files:
        try:
            path = hf_hub_download(repo, name, revision=revision or None, cache_dir=str(cache))
            return InitFile(Path(path), "hub", f"{repo}@{revision}" if revision else repo)
        except Exception as exc:  # not found, offline, gated: try the next file name, then report
            last = exc
    msg = first_line(last) if last else "no file tried"
    raise UsageError(f"--init {what}: cannot download {repo} ({', '.join(files)}): {msg}")
