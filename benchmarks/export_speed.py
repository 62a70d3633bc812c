"""onnxruntime CPU latency / PyTorch eager latency of an exported encoder (one run).

For each backbone: build it (random init: latency does not depend on the weights), export
it with sslkit's onnx exporter (dynamo, checker, parity), then time the same inputs in
PyTorch eager (``torch.inference_mode``) and onnxruntime (CPU provider, all graph
optimisations), with the same number of threads, interleaving the two so that load from
other processes hits both alike. Prints median latencies and the ratio ORT / torch
(target <= 0.8) at batch 1 and 32.

    .venv/bin/python benchmarks/export_speed.py                       # resnet18, vit_small at 224
    .venv/bin/python benchmarks/export_speed.py --size 224 --reps 20 --backbones timm:resnet18
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sslkit.registry import create_backbone, get_exporter
from sslkit.spec import InputSpec


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(name: str, size: int, batches: list[int], reps: int, threads: int, folder: Path) -> list[dict]:
    encoder = create_backbone(name, in_chans=3, image_size=size).eval()
    spec = InputSpec(3, size, (0.5,) * 3, (0.25,) * 3, "folder", {})
    path = folder / (name.replace(":", "_") + ".onnx")
    t0 = time.perf_counter()
    get_exporter("onnx")(encoder, spec, {"task": "bench", "backbone": name, "embedding_dim": encoder.num_features},
                         path)
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x)
        n = max(3, reps if b == 1 else reps // 4)
        with torch.inference_mode():
            run_torch = lambda: encoder(xt)  # noqa: E731
            run_ort = lambda: session.run(["embedding"], {"pixels": x})  # noqa: E731
            run_torch(), run_ort()  # warm-up
            t_torch, t_ort = [], []
            for _ in range(n):  # interleaved
                t_torch += _time(run_torch, 1)
                t_ort += _time(run_ort, 1)
        mt, mo = statistics.median(t_torch), statistics.median(t_ort)
        rows.append({"backbone": name, "size": size, "batch": b, "torch_ms": round(mt * 1e3, 2),
                     "ort_ms": round(mo * 1e3, 2), "ratio": round(mo / mt, 3), "reps": n,
                     "export_s": round(export_s, 1)})
        print(f"{name:32s} {size}px batch {b:3d}: torch {mt * 1e3:9.2f} ms  onnxruntime {mo * 1e3:9.2f} ms  "
              f"ratio {mo / mt:.3f}  ({n} reps)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["timm:resnet18", "timm:vit_small_patch16_224"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--reps", type=int, default=20, help="repetitions at batch 1 (a quarter at larger batches)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            rows += bench(name, args.size, args.batches, args.reps, args.threads, Path(tmp))
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio onnxruntime / torch: {worst:.3f} (target <= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
