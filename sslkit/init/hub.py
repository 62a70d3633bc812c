"""Hugging Face Hub files of ``--init``: looked up in the local cache, or fetched with ``--allow-download``.

A download starts with one request to the Hub's endpoint (``$HF_ENDPOINT``, read at call time,
else https://huggingface.co) with a short timeout and no retry: a Hub that cannot be reached is one
line in a few seconds, not ``huggingface_hub``'s minutes of retries with a warning each. Each file
name is then asked for once the same way (its metadata, no retry) before it is fetched: a Hub that
answers its address but not for the file (a stalled proxy) is one line too, not a minute of
retries per file name. Its log lines and warnings are silenced while it downloads (its progress
bars are kept). A download that fails says why in a few words (:func:`why_not`: ``HF_HUB_OFFLINE``
is set, the Hub was not reached, no such repository, revision or file), not the client's paragraph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

from sslkit.errors import UsageError, first_line

HUB_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
INDEX_SUFFIX = ".index.json"
REACH_TIMEOUT = 5.0  # seconds for the reachability check before a download
DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment at call time."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str:
    """The Hub's address: ``$HF_ENDPOINT`` read at call time, else what ``huggingface_hub`` read at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return env or str(getattr(constants, "ENDPOINT", "") or DEFAULT_ENDPOINT).rstrip("/")


def _endpoint_kw() -> dict[str, str]:
    """``endpoint=`` for ``hf_hub_download`` when it differs from the one its client was imported with."""
    from huggingface_hub import constants

    endpoint = hub_endpoint()
    return {} if endpoint == str(getattr(constants, "ENDPOINT", "")).rstrip("/") else {"endpoint": endpoint}


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (as ``huggingface_hub`` read it, or set since): its client refuses at once."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cached(repo: str, revision: str, files: tuple[str, ...]) -> Path | None:
    """The first of ``files`` of ``repo`` in the local cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        hit = try_to_load_from_cache(repo, name, cache_dir=str(hub_cache_dir()), revision=revision or None)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def download(repo: str, revision: str, files: tuple[str, ...], what: str) -> Path:
    """The first of ``files`` that ``repo`` holds, fetched into the cache; one line when none can be."""
    check_reachable(what)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: Exception | None = None
    with quiet_hub():
        for name in files:
            try:
                check_file(repo, revision, name)
                return Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=str(hub_cache_dir()),
                                            **_endpoint_kw()))
            except LocalEntryNotFoundError as exc:  # offline or no answer (an EntryNotFoundError too): none will do
                last = exc
                break
            except EntryNotFoundError as exc:  # this file name is not there: the next one
                last = exc
            except Exception as exc:  # no repository or revision, no answer, a broken connection: no other will do
                last = exc
                break
    raise UsageError(f"--init {what}: cannot download {repo} ({', '.join(files)}): {why_not(last)}")


def why_not(exc: Exception | None) -> str:
    """Why a download failed, in a few plain words: the Hub client's own messages run to several
    sentences (``first_line`` would quote the first 200 characters of them)."""
    from huggingface_hub import errors

    if exc is None:
        return "no file tried"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        if offline():
            return "HF_HUB_OFFLINE is set, so nothing is downloaded; unset it, or give a local weights file"
        return (f"the Hugging Face Hub ({hub_endpoint()}) could not be reached; check the network "
                "(HF_ENDPOINT, proxy settings) or give a local weights file")
    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository on the Hub (a private one needs a login: hf auth login)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return "the repository has no such revision"
    if isinstance(exc, errors.EntryNotFoundError):
        return "the repository holds none of these files"
    return first_line(exc)


def check_file(repo: str, revision: str, name: str) -> None:
    """Ask the Hub for one file's metadata once (short timeout, no retry); raises what the Hub said
    (``EntryNotFoundError``: no such file) or a timeout or connection error. Skipped offline, where
    the client refuses at once."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if offline():
        return

    try:
        url = hf_hub_url(repo, name, revision=revision or None, endpoint=hub_endpoint())
        get_hf_file_metadata(url, timeout=REACH_TIMEOUT, endpoint=hub_endpoint(), retry_on_errors=False)
    except Exception as exc:  # the HTTP client's timeouts and connection errors; what the Hub said passes
        if type(exc).__module__.startswith("huggingface_hub"):
            raise
        raise TimeoutError(f"the Hub did not answer for {name} within {REACH_TIMEOUT:g} s "
                           f"({type(exc).__name__}: {first_line(exc)})") from None


def download_shards(repo: str, revision: str, names: list[str], what: str) -> None:
    """Fetch the shards ``names`` of ``repo`` into the cache."""
    check_reachable(what)
    from huggingface_hub import hf_hub_download

    with quiet_hub():
        for n in names:
            try:
                hf_hub_download(repo, n, revision=revision or None, cache_dir=str(hub_cache_dir()), **_endpoint_kw())
            except Exception as exc:
                raise UsageError(f"--init {what}: cannot download {repo}'s shard {n}: {first_line(exc)}") from None


def check_reachable(what: str) -> None:
    """One request to the Hub (short timeout, no retry); one line when it cannot be reached. Skipped
    offline (``HF_HUB_OFFLINE``), where the client itself refuses at once."""
    if offline():
        return
    endpoint = hub_endpoint()
    try:
        from huggingface_hub.utils import get_session

        with quiet_hub():
            get_session().request("HEAD", endpoint, timeout=REACH_TIMEOUT)  # any answer: the Hub is there
    except Exception as exc:  # refused, unknown host, timed out, proxy or TLS failure
        raise UsageError(f"--init {what}: cannot reach the Hugging Face Hub ({endpoint}: {first_line(exc)}); "
                         f"check the network (HF_ENDPOINT, proxy settings) or give a local weights file") from None


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """``huggingface_hub``'s log lines (retries, redirects) and Python warnings off for the block."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
