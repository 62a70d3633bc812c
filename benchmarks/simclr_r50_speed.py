"""SimCLR ResNet-50 in the sslkit engine beside a plain timm training step: img/s, MFU, kernel share.

The sslkit side is :mod:`mae_mfu`'s sweep for ``--task simclr --backbone timm:resnet50``
(bf16 autocast, channels-last, AdamW; eager / compile / graphs; batch 256 and 1024). Every
SimCLR image is two augmented views, so a SimCLR batch of B pushes 2B images through the
ResNet-50 (plus the projection head, NT-Xent and the augmentation).

The reference is what timm's own ``benchmark.py --bench train`` measures (that script ships
in timm's repository, not in its wheel, so its train step is re-implemented here): a
``timm.create_model`` ResNet-50 (1000 classes), channels-last, bf16 autocast, synthetic
inputs and labels already on the device, cross-entropy, backward, an SGD step (timm's
default ``--opt sgd``), eager and ``torch.compile``. The ratio printed compares images
through the backbone per second at the same images per step (SimCLR batch B vs timm 2B).

    .venv/bin/python benchmarks/simclr_r50_speed.py                   # batch 256 and 1024
    .venv/bin/python benchmarks/simclr_r50_speed.py --device cpu --batch-sizes 2 --steps 2 --warmup 1 \\
        --image-size 32 --modes eager,graphs --no-compile --precision fp32   # smoke
"""

from __future__ import annotations

import time

import torch

from mae_mfu import arguments, parse, release, sweep


def timm_train_speed(model_name: str, batch_size: int, image_size: int, device: torch.device, precision: str,
                     compile: bool, warmup: int, steps: int) -> float:
    """Images per second of timm's benchmark train step (see the module docstring)."""
    import timm

    model = timm.create_model(model_name, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    fwd = torch.compile(model) if compile else model

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch_size * steps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = arguments(__doc__.splitlines()[0], "timm:resnet50")
    ap.add_argument("--no-timm", action="store_true", help="skip timm's train-step reference")
    ap.add_argument("--timm-at", type=lambda v: [int(x) for x in v.split(",")], default=[256],
                    help="SimCLR batch sizes to compare with timm (timm runs at twice the batch)")
    args = parse(ap)
    device = torch.device(args.device)
    model = args.backbone.removeprefix("timm:")
    compare = [b for b in args.batch_sizes if b in args.timm_at] or args.batch_sizes[:1]
    reference: dict[tuple[int, bool], float | None] = {}

    def timm_point(b: int, compiled: bool) -> None:
        try:
            reference[b, compiled] = timm_train_speed(model, 2 * b, args.image_size, device, args.precision,
                                                      compiled, args.warmup, args.steps)
            print(f"timm train step {model}, batch {2 * b}, compile={compiled}: {reference[b, compiled]:,.0f} img/s",
                  flush=True)
        except torch.OutOfMemoryError:
            reference[b, compiled] = None
            print(f"timm train step {model}, batch {2 * b}, compile={compiled}: out of memory", flush=True)
        release(device)

    if not args.no_timm:  # eager first: the reference timm's benchmark.py measures by default
        for b in compare:
            timm_point(b, False)
    results = sweep(f"SimCLR {model}", "simclr", args.backbone, args, channels_last=True)
    if args.no_timm:
        return
    if not args.no_compile:
        for b in compare:
            timm_point(b, True)
    print(f"\ntimm train step ({model}, channels-last, {args.precision}, SGD, synthetic data on the device) "
          f"beside sslkit SimCLR at the same images through the backbone per step")
    print("| timm batch | torch.compile | timm img/s | sslkit best (SimCLR batch) | sslkit views/s | ratio |\n"
          "| ---: | --- | ---: | --- | ---: | ---: |")
    for (b, compiled), ref in reference.items():
        best = max((r for r in results if r["batch"] == b and "img_s" in r), key=lambda r: r["img_s"], default=None)
        if ref is None or best is None:
            print(f"| {2 * b} | {compiled} | {'-' if ref is None else f'{ref:,.0f}'} | - | - | - |")
            continue
        views = 2 * best["img_s"]
        print(f"| {2 * b} | {compiled} | {ref:,.0f} | {best['mode']} (batch {b}) | {views:,.0f} | {views / ref:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
