"""Non-linkable, stable keys for things that must not be named (series, files of a patient).

A constant-salt hash of a SeriesInstanceUID can be recomputed by anyone who has the UID,
and so links a key back to it. :func:`keyed_hash` is HMAC-SHA256 under a secret that
never leaves this machine's user account:

1. ``$SSLKIT_KEY``: the secret itself, at least 32 characters (e.g. ``openssl rand -hex 32``);
2. ``$SSLKIT_KEY_FILE``: a file holding it;
3. else ``$XDG_CONFIG_HOME/sslkit/key`` (``~/.config/sslkit/key``): 32 random bytes,
   created on first use with mode 0600, atomically (a temporary 0600 file hard-linked to
   the name, so two processes starting at once end up with the same one).

The secret is read, never written anywhere else: not into run folders, logs, checkpoints,
caches or exported files. Keys are stable for as long as the secret is: the same machine
and user gives the same keys across runs (resume, embed ids, header caches). Processes
that must agree on keys (``torchrun`` across several machines, an ``embed`` on another
host) must see the same secret: a shared home folder, ``SSLKIT_KEY_FILE`` on a shared
file system, or the same ``SSLKIT_KEY`` exported on every node.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path

from sslkit.errors import UsageError

KEY_BYTES = 32
MIN_ENV_CHARS = 32
_cache: dict[tuple, bytes] = {}


def key_file() -> Path:
    """Where the secret lives: ``$SSLKIT_KEY_FILE``, else ``$XDG_CONFIG_HOME/sslkit/key``."""
    if os.environ.get("SSLKIT_KEY_FILE"):
        return Path(os.environ["SSLKIT_KEY_FILE"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "sslkit" / "key"


def secret() -> bytes:
    """This user's secret (see the module docstring), created on first use."""
    env = os.environ.get("SSLKIT_KEY", "")
    # what key_file() depends on, read without building paths (this runs once per hashed value)
    where = (env, *(os.environ.get(k, "") for k in ("SSLKIT_KEY_FILE", "XDG_CONFIG_HOME", "HOME")))
    if where not in _cache:
        if env:
            if len(env) < MIN_ENV_CHARS:
                raise UsageError(f"SSLKIT_KEY holds {len(env)} characters; give at least {MIN_ENV_CHARS} "
                                 f"(e.g. the output of: openssl rand -hex 32)")
            _cache[where] = env.encode()
        else:
            _cache[where] = _read_or_create(key_file())
    return _cache[where]


def _read_or_create(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        named = bool(os.environ.get("SSLKIT_KEY_FILE"))
        if named and not path.parent.is_dir():  # a mistyped path, a share not mounted: not a key of its own
            raise UsageError(f"SSLKIT_KEY_FILE {str(path)!r}: its folder does not exist; give an existing "
                             "key file, or a path in an existing folder for a new one") from None
        data = _create(path)
        print(f"sslkit: created a new secret key at {str(path)!r} (series and file keys are HMACs under it; "
              "processes that must agree on keys need this same file)", file=sys.stderr)
    except OSError as exc:
        raise UsageError(f"cannot read the sslkit key {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) < 16:
        raise UsageError(f"the sslkit key {str(path)!r} holds {len(data)} bytes (at least 16 needed); "
                         f"remove it to have a new one made")
    return data


def _create(path: Path) -> bytes:
    """32 random bytes at ``path`` (0600), or the file another process made first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.parent / f".tmp-key-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process got there first: theirs is the key
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: create-exclusive, then move in
            if not path.exists():
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                os.unlink(tmp)
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot create the sslkit key {str(path)!r}: {exc.strerror or exc}; "
                         f"set SSLKIT_KEY or SSLKIT_KEY_FILE") from None


def keyed_hash(value: str, purpose: str = "", length: int = 16) -> str:
    """HMAC-SHA256 of ``value`` under this user's secret key, ``length`` hex digits: a stable,
    non-linkable name for something that must not be named (e.g. a SeriesInstanceUID).
    ``purpose`` separates uses (the same value gives unrelated keys for two purposes).
    Stable across runs with the same secret ($SSLKIT_KEY, $SSLKIT_KEY_FILE, else
    ~/.config/sslkit/key, created 0600 on first use); all processes that must agree
    (multi-node torchrun, embed elsewhere) need the same secret."""
    digest = hmac.new(secret(), f"{purpose}\0{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return digest[:length]


def file_key(relative_path: str) -> str:
    """A file below the data root as stored reports name it (``data_report.json``): ``file:`` and
    the keyed hash of its path relative to the root, since folder and file names below the root
    can carry patient names (``DOE_JOHN_19610301/IM_DOE_1.dcm``). ``sslkit data inspect`` prints
    each unusable file's path with its key."""
    return "file:" + keyed_hash(relative_path, "file", 12)
