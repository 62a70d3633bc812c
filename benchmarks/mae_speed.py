"""MAE's asymmetric encoder: cost of one MAE training step against a full ViT step.

One run, one machine, interleaved timings (median of ``--repeats``):

* MAE step: masking (ratio 0.75), the encoder on the visible 25 % of the patches, the
  decoder (sslkit defaults: depth 2, width 256) on all of them, the loss, backward;
* reference: the same ViT's forward on all patches (pooled embedding), a scalar loss and
  backward - the cost of any task that runs the encoder on the whole image;
* the MAE step with pixel targets instead of the default HOG targets (``target=pixels``), so
  the HOG target's own cost is a ratio measured in the same run.

Target (issue 5): ratio <= 0.40.

    .venv/bin/python benchmarks/mae_speed.py [--model vit_tiny_patch16_224] [--image-size 224]
        [--batch-size 16] [--repeats 5] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslkit.registry import create_backbone, create_task
from sslkit.spec import InputSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (1 gives stable timings on a shared CPU machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    spec = InputSpec(a.channels, a.image_size, (0.5,) * a.channels, (0.25,) * a.channels)
    backbone = create_backbone(f"timm:{a.model}", a.channels, a.image_size)
    task = create_task("mae", backbone, spec, mask_ratio=a.mask_ratio).to(dev).train()
    pixels = create_task("mae", create_backbone(f"timm:{a.model}", a.channels, a.image_size), spec,
                         mask_ratio=a.mask_ratio, target="pixels").to(dev).train()
    x = torch.randn(a.batch_size, a.channels, a.image_size, a.image_size, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def mae_step() -> None:
        task.zero_grad(set_to_none=True)
        task((x,))["loss"].backward()

    def pixels_step() -> None:
        pixels.zero_grad(set_to_none=True)
        pixels((x,))["loss"].backward()

    def full_step() -> None:
        task.zero_grad(set_to_none=True)
        task.encoder(x).square().mean().backward()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for fn in (mae_step, pixels_step, full_step):  # warm-up
        fn()
    mae, pix, full = [], [], []
    for _ in range(a.repeats):  # interleaved, so load changes hit all alike
        mae.append(timed(mae_step))
        pix.append(timed(pixels_step))
        full.append(timed(full_step))
    m, px, f = statistics.median(mae), statistics.median(pix), statistics.median(full)
    n = (a.image_size // backbone.patch_size) ** 2
    print(f"timm:{a.model} {a.channels}x{a.image_size}px batch {a.batch_size} on {dev} "
          f"({torch.get_num_threads()} threads), {n} patches, "
          f"MAE sees {int(round(n * (1 - a.mask_ratio)))}; decoder depth {task.options.decoder_depth} "
          f"width {task.decoder_dim}")
    print(f"MAE step (mask {a.mask_ratio}, {task.target} targets): {m * 1000:.0f} ms   full ViT fwd+bwd: "
          f"{f * 1000:.0f} ms   ratio {m / f:.3f} (target <= 0.40)")
    print(f"MAE step with pixel targets: {px * 1000:.0f} ms   ratio to full {px / f:.3f}   "
          f"{task.target} / pixels {m / px:.3f}")


if __name__ == "__main__":
    main()
