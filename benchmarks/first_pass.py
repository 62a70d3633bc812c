"""The first pass (index + decode + cache write), timed the way a run pays it.

Each measurement runs ``load_data`` into a fresh, empty cache folder in a new process
started like the ``sslkit`` command (``python -c``: spawned decode workers re-import no
benchmark script and its torch), with sslkit and its plugins imported before the clock
starts, as ``sslkit pretrain`` has them by then, and glibc's malloc set as the command sets it
at its start (``sslkit.host_malloc.tune_host_malloc``: without it, a fresh process page-faults
~1,000 times per 512 x 512 RLE file, 6.3 against 3.7 ms of CPU per sample). Spawned decode
workers are started by sslkit itself, as in a run. Used by data_pipeline.py and volumes.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CODE = """
import json, resource, sys, tempfile, time
from sslkit.host_malloc import tune_host_malloc
tune_host_malloc()  # as sslkit's command does first (sslkit/cli.py)
from sslkit.data.pipeline import load_data
from sslkit.registry import create_source
data, size, options, workers = json.loads(sys.argv[1])
size = size if isinstance(size, int) else tuple(size)
create_source(data, **options)  # plugins loaded before the clock, as in a run
def cpu():  # this process and its waited-for children (the decode workers, once shut down)
    k = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + k.ru_utime + k.ru_stime
with tempfile.TemporaryDirectory() as cache:
    c0, t0 = cpu(), time.perf_counter()
    loaded = load_data(data, size, None, options, cache, progress=False, workers=workers)
    print(json.dumps([len(loaded.prepared), time.perf_counter() - t0, cpu() - c0]))
"""


def parse_workers(text: str) -> list[int]:
    """``"1,2,all"`` -> ``[1, 2, N]`` (N: the CPUs this process may use), duplicates dropped."""
    from sslkit.data.parallel import default_workers

    out: list[int] = []
    for item in text.split(","):
        n = default_workers() if item.strip() == "all" else int(item)
        if n not in out:
            out.append(n)
    return out


def first_pass(data: str, size, options: dict, workers: int) -> tuple[int, float, float]:
    """``(samples, wall seconds, CPU seconds)`` of one first pass with ``workers`` decode
    processes (CPU: the process and its workers; not the process's start and imports)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CODE, json.dumps([data, size, options, workers])], env=env,
                         cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"first pass failed: {out.stderr[-2000:]}")
    samples, seconds, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return samples, seconds, cpu


def compare(naive, ours, workers: list[int], repeats: int, unit: str) -> dict[int, list[float]]:
    """Alternate ``naive()`` (samples/s, in this process) and ``ours(w)`` (``(samples, wall s,
    CPU s)``) for every worker count ``w``, ``repeats`` times, the order swapped each time so
    load drifts hit both alike; print each pair and the medians, in wall time and in CPU
    time per sample (the work done, which no other process's load changes).
    Returns ``{workers: [wall ratio, ...]}``."""
    import statistics
    import time

    def run_naive() -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        rate = naive()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return rate, cpu / (rate * wall)

    ratios: dict[int, list[float]] = {w: [] for w in workers}
    rates: dict[int, list[float]] = {w: [] for w in workers}
    cpu_ratios: dict[int, list[float]] = {w: [] for w in workers}
    naive_rates: list[float] = []
    turn = 0
    for r in range(repeats):
        for w in workers:
            if turn % 2 == 0:
                a, a_cpu = run_naive()
                n, wall, cpu = ours(w)
            else:
                n, wall, cpu = ours(w)
                a, a_cpu = run_naive()
            turn += 1
            b, b_cpu = n / wall, cpu / n
            naive_rates.append(a)
            rates[w].append(b)
            ratios[w].append(b / a)
            cpu_ratios[w].append(a_cpu / b_cpu)
            print(f"  repeat {r + 1}, {w} worker(s): naive {a:.2f} {unit}/s ({1000 * a_cpu:.1f} ms CPU each), "
                  f"first pass {b:.2f} {unit}/s ({1000 * b_cpu:.1f} ms CPU each) -> {b / a:.2f}x wall, "
                  f"{a_cpu / b_cpu:.2f}x CPU", flush=True)
    print(f"naive loop (1 process), median of {len(naive_rates)}: {statistics.median(naive_rates):.2f} {unit}/s")
    for w in workers:
        print(f"first pass, {w} worker(s): median {statistics.median(rates[w]):.2f} {unit}/s, ratio to the naive "
              f"run beside it: median {statistics.median(ratios[w]):.2f}x wall (each: "
              f"{', '.join(f'{x:.2f}' for x in ratios[w])}), {statistics.median(cpu_ratios[w]):.2f}x in CPU per "
              f"{unit}; target >= 1x wall", flush=True)
    return ratios


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import not_a_script

    not_a_script("first_pass.py", "data_pipeline.py or volumes.py")
