"""sslkit/host_malloc.py: glibc's malloc keeps a step's large tensors' pages instead of page-faulting
them in again every step; left alone where the user chose an allocator or its settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sslkit.host_malloc import tune_host_malloc, why_not

# a step's pattern: multi-MiB tensors allocated, partly freed, allocated again; prints the minor page
# faults of 20 such cycles after 3 warm-up cycles
CYCLES = """
import resource, sys, torch
from sslkit.host_malloc import tune_host_malloc
print(tune_host_malloc(), file=sys.stderr)
def cycle():
    a = torch.ones(1024, 4096)          # 16 MiB
    b = torch.ones(256, 17, 768)        # 13 MiB: a ViT-Tiny MLP activation at batch 256
    c = a[:, :1024].contiguous()
    del a
    d = torch.ones(1024, 4096)
    del b, c, d
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


PAGES_PER_CYCLE = (2 * 1024 * 4096 + 256 * 17 * 768 + 1024 * 1024) * 4 // 4096  # 4 KiB pages of a cycle's tensors


def page_faults(env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip()), proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_malloc_reuses_large_blocks_where_fixed_small_thresholds_fault_them_in():
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SSLKIT_MALLOC"}
    tuned, said = page_faults(base)
    if said == "left as it is: not glibc":
        pytest.skip("not glibc")
    assert said == "tuned: mmap above 32 MiB, no trimming"
    # the control: glibc's static 128 KiB thresholds (set by the user, so sslkit leaves them) map every
    # block afresh, so each of the 20 cycles faults its 49 MiB in again (measured: 249,680 faults)
    control, said = page_faults({**base, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert said == "left as it is: MALLOC_MMAP_THRESHOLD_ is set"
    assert control > 15 * PAGES_PER_CYCLE
    # tuned, the pages stay with the process: at most a growth of the heap, never every cycle (measured over
    # 15 runs: 0, 3,264 or 11,456 faults; glibc's default dynamic thresholds: 3,264 to 161,248)
    assert tuned < 2 * PAGES_PER_CYCLE


def test_left_alone_where_someone_chose():
    assert why_not({"SSLKIT_MALLOC": "system"}) in ("SSLKIT_MALLOC=system", "not Linux")
    assert why_not({"MALLOC_TRIM_THRESHOLD_": "0"}) in ("MALLOC_TRIM_THRESHOLD_ is set", "not Linux")
    assert why_not({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) in ("an allocator is preloaded", "not Linux")
    assert tune_host_malloc({"SSLKIT_MALLOC": "system"}).startswith("left as it is: ")


def test_the_cli_tunes_it_before_any_command(monkeypatch):
    from click.testing import CliRunner

    import sslkit.host_malloc
    from sslkit.cli import main

    calls = []
    monkeypatch.setattr(sslkit.host_malloc, "tune_host_malloc", lambda: calls.append(1) or "tuned")
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0 and calls == [1]


# what a decoding pass leaves: many image buffers below 32 MiB (from the heap once tuned), freed; prints the
# process's resident bytes before and after release_freed() and what each call returned
FREED = """
import sys, numpy as np
from sslkit.host_malloc import release_freed, tune_host_malloc
tuned = tune_host_malloc({"SSLKIT_MALLOC": sys.argv[1]})
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
held = [np.ones(8 << 20, np.uint8) for _ in range(40)]  # 320 MiB in 8 MiB buffers
keep = np.ones(1 << 20, np.uint8)  # allocated last: the freed buffers are not the heap's top alone
del held
before = rss()
print(tuned, release_freed(), before, rss())
"""


@pytest.mark.skipif(why_not({}) is not None or not os.path.exists("/proc/self/statm"), reason="glibc on Linux only")
def test_release_freed_gives_a_decoding_pass_memory_back():
    """Tuned (no trimming), 320 MiB of freed decode buffers stay resident until release_freed(), which the
    run calls once its data is decoded (sslkit.engine.setup); untuned it does nothing (glibc trims itself)."""
    out = subprocess.run([sys.executable, "-c", FREED, ""], capture_output=True, text=True, check=True).stdout
    tuned, released, before, after = out.rsplit(" ", 3)
    assert tuned.startswith("tuned") and released == "True"
    assert int(before) - int(after) > 250 << 20, out  # resident until given back
    out = subprocess.run([sys.executable, "-c", FREED, "system"], capture_output=True, text=True, check=True).stdout
    tuned, released, _, _ = out.rsplit(" ", 3)
    assert tuned == "left as it is: SSLKIT_MALLOC=system" and released == "False", out


@pytest.mark.skipif(why_not({}) is not None, reason="glibc on Linux only")
def test_the_decode_workers_are_tuned_as_the_command_is(tmp_path):
    """The first pass's spawned decode workers ran with glibc's own thresholds (the sslkit process tunes its
    own at the CLI's start): ~3x the page faults of a tuned one on an RLE corpus."""
    from sslkit.data.prepare import _pool
    from sslkit.registry import create_source
    from tests.conftest import make_images

    source = create_source(f"folder:{make_images(tmp_path / 'img', n_per_class=1, size=8)}")
    pool = _pool(source, 3, 8, 1)
    try:
        tuned = pool.submit(eval, "__import__('sslkit.host_malloc', fromlist=['_tuned'])._tuned != []").result()
    finally:
        pool.shutdown()
    assert tuned
