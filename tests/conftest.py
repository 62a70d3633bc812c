"""Shared fixtures: small generated datasets, pydicom's shipped files, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pydicom

from sslkit import plugins

REPO = Path(__file__).resolve().parents[1]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: one intra-op thread (see ``one_thread``) in every process a test starts too: torchrun's ranks, the real
#: ``sslkit`` in a subprocess
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Every test sees the plugins of the current environment, loaded anew."""
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="session", autouse=True)
def _decoded_cache(tmp_path_factory):
    """The default decoded-pixel cache lives in a per-session temp dir, never in ~/.cache."""
    os.environ["SSLKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("sslkit-cache"))
    # the secret behind keyed hashes (sslkit.pseudonym): one per session, in the environment so that
    # every subprocess (even one run as another user) agrees; never ~/.config/sslkit/key
    os.environ["SSLKIT_KEY"] = os.urandom(32).hex()
    os.environ["SSLKIT_KEY_FILE"] = str(tmp_path_factory.mktemp("sslkit-config") / "key")
    yield


def install_plugin(root: Path, module: str, entry: str, source: str) -> Path:
    """Write ``source`` as module ``module`` of an installed distribution on ``root`` (its
    ``sslkit`` entry point named ``entry``), so adding ``root`` to sys.path installs it."""
    import textwrap

    dist = module.replace("_", "-")
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sslkit]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models, and ``make test`` runs one test process per core: torch's default of one intra-op
    thread per core oversubscribes the cores and spins (measured: files of in-process runs took 1.65 times
    as long on 2 cores). Each test starts with one thread, whatever an earlier test set."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _onnx_registry_built_once():
    """torch's dynamo ONNX exporter builds its table of ATen -> ONNX functions anew at every export (~0.8 s of a
    tiny network's ~4 s here), from torchlib and the opset alone. Once a test has loaded the exporter, this process
    builds the table once per opset and gives each later export its own copy (the exporter adds custom ops to the
    table it gets). Where torch has no such private method, exports run as they always do."""
    registration = sys.modules.get("torch.onnx._internal.exporter._registration")
    registry = getattr(registration, "ONNXRegistry", None)
    build = getattr(registry, "from_torchlib", None)
    if build is None or getattr(build, "built_once", False):
        return
    import copy
    import functools

    @functools.lru_cache(maxsize=None)
    def built(*args, **kwargs):  # (the opset)
        return build(*args, **kwargs)

    def from_torchlib(cls, *args, **kwargs):
        table = copy.copy(built(*args, **kwargs))
        table.functions = {op: list(metas) for op, metas in table.functions.items()}
        return table

    from_torchlib.built_once = True
    registry.from_torchlib = classmethod(from_torchlib)


@pytest.fixture
def restores_process_state():
    """For tests that call a script's ``main()`` in the test process: the environment (a benchmark sets
    ``OMP_NUM_THREADS=1`` for its subprocesses) and torch's thread count as they were, so that later tests'
    runs (an exact resume compared with an in-process reference) are not computed with other threads."""
    import torch

    environ, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pydicom_dir() -> Path:
    """The DICOM test files that pydicom's wheel ships (no download)."""
    return PYDICOM_FILES


def make_images(root: Path, n_per_class: int = 8, size: int = 40, channels: int = 3,
                classes=("a", "b"), seed: int = 0, bits: int = 8) -> Path:
    """Write class folders of random-ish images: class ``a`` smooth, class ``b`` striped."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = (np.sin((xx * (2 + 6 * ci) + rng.random()) * np.pi * 2) + 1) / 2
            img = np.clip(base * 0.8 + rng.random((size, size)) * 0.2, 0, 1)
            if bits == 16:
                Image.fromarray((img * 65535).astype(np.uint16)).save(root / cls / f"{i}.png")
            elif channels == 3:
                rgb = np.stack([img, np.roll(img, 3, 0), 1 - img], -1)
                Image.fromarray((rgb * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
            else:
                Image.fromarray((img * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def rgb_folder(tmp_path) -> Path:
    return make_images(tmp_path / "rgb", channels=3)


@pytest.fixture
def gray_folder(tmp_path) -> Path:
    return make_images(tmp_path / "gray", channels=1)


@pytest.fixture
def cli():
    """Run the sslkit CLI in-process: ``cli("list", "tasks")`` -> click Result."""
    from sslkit.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


def run_sslkit(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``sslkit`` executable in a subprocess (stdout/stderr captured)."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).parent / "sslkit"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=900)


def tiny_run(data: str, out: Path, size: int = 32, *extra: str) -> Path:
    """A finished one-step SimCLR run of ``timm:resnet10t`` on ``data`` (for export/embed tests).

    Trained by the CLI in-process: a subprocess would add ~5 s of imports and is not what these tests check."""
    from sslkit.cli import main

    args = ["pretrain", "--task", "simclr", "--data", data, "--out", out, "--backbone", "timm:resnet10t",
            "--image-size", size, "--batch-size", 8, "--max-steps", 1, "--epochs", 1, "--quiet", *extra]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def force_decode_pool(monkeypatch, n: int) -> None:
    """``prepare`` decodes with ``n`` processes however small the data: the first sample in this
    process (no timing probe), the rest shared with ``n - 1`` workers (no payoff threshold)."""
    from sslkit.data import prepare as prep

    monkeypatch.setattr(prep, "pool_size", lambda count, workers, **kw: n)
    monkeypatch.setattr(prep, "PROBE_S", 0.0)
    monkeypatch.setattr(prep, "POOL_PAYOFF_S", 0.0)


def one_line_error(result, *words: str) -> str:
    """The single ``error: ...`` line of a CLI result that must fail as a usage error (exit 2), holding ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
