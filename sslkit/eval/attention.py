"""``sslkit eval attention``: where does the encoder look? Pretrained beside random init.

* ViTs (token backbones): the last block's attention from the class token to every patch,
  one map per head (as in DINO, Caron et al. 2021, Fig. 1), recomputed from that block's
  ``qkv`` projection: ``A = softmax(q_cls k^T / sqrt(d_head))`` over the patch tokens.
  Without a class token, the attention each patch receives, averaged over queries.
* CNNs with a spatial feature map of at least 2x2 (timm ``forward_features``): Grad-CAM (Selvaraju
  et al. 2017) of the embedding norm ``s = ||f(x)||``: ``cam = ReLU(sum_k a_k A^k)`` with
  ``a_k = mean_ij ds/dA^k_ij``.
* Anything else (a 1x1 map too, e.g. a ResNet at 32 px, where Grad-CAM is one value scaled into
  noise): the input-gradient saliency ``max_c |ds/dx_c|``.

A volume run (``--sample volume``, a 3D encoder) is refused in one line before any data is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.backbone import is_token_backbone
from sslkit.eval.report import new_report, save_picture, save_report, skipped_summary
from sslkit.eval.tsne import _check_out, shorten
from sslkit.figure import save_png

CELL_INCHES = 2.0
DPI = 100
TITLE_TOP_IN = 0.08  # the title's top, inches below the figure's top edge
HEADER_IN = 0.3  # the column headers above the images


def vit_cls_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S)`` normalised pixels -> ``(B, heads, S/p, S/p)`` last-layer attention maps."""
    vit = backbone.model
    attn_mod = vit.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}
    handle = attn_mod.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        handle.remove()
    return _cls_maps(backbone, attn_mod, seen["x"], x.shape[-1] // backbone.patch_size)


@torch.no_grad()
def _cls_maps(backbone: nn.Module, attn_mod: nn.Module, t: torch.Tensor, g: int) -> torch.Tensor:
    """Attention probabilities of the block input ``t: (B, N, D)`` -> ``(B, heads, g, g)``."""
    vit = backbone.model
    b, n, _ = t.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(t).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
    scale = getattr(attn_mod, "scale", q.shape[-1] ** -0.5)
    a = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, N, N)
    p = int(getattr(vit, "num_prefix_tokens", 1))
    maps = a[:, :, 0, p:] if p > 0 else a.mean(2)
    return maps.reshape(b, h, g, g)


def gradcam(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, 1, h, w)`` Grad-CAM of ``||f(x)||`` on the last feature map."""
    net = backbone.model
    with torch.enable_grad():
        feat = net.forward_features(x).detach().requires_grad_(True)
        score = net.forward_head(feat).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(score, feat)
    return F.relu((grad.mean((2, 3), keepdim=True) * feat).sum(1, keepdim=True)).detach()


def input_saliency(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, 1, S, S)``: ``max_c |d||f(x)|| / dx|``."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(backbone(x).norm(dim=1).sum(), x)
    return grad.abs().amax(1, keepdim=True)


def saliency(backbone: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The method's name and ``(B, M, S, S)`` maps in [0, 1] (M heads, or 1)."""
    if is_token_backbone(backbone):
        kind, maps = "CLS attention, last layer", vit_cls_attention(backbone, x)
    elif hasattr(getattr(backbone, "model", None), "forward_features"):
        with torch.no_grad():
            feat = getattr(backbone, "model").forward_features(x[:1])
        is_map = feat.ndim == 4 and min(feat.shape[-2:]) > 1  # a 1x1 map (ResNet at 32 px) has no spatial detail
        kind, maps = ("Grad-CAM of ||f(x)||", gradcam(backbone, x)) if is_map else \
            ("input gradient of ||f(x)||", input_saliency(backbone, x))
    else:
        kind, maps = "input gradient of ||f(x)||", input_saliency(backbone, x)
    maps = F.interpolate(maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    lo = maps.amin((2, 3), keepdim=True)
    hi = maps.amax((2, 3), keepdim=True)
    return kind, ((maps - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)


def pick_across_classes(labels: list[str | None], n: int) -> list[int]:
    """Up to ``n`` sample indices, rows alternating between the classes (sorted names,
    unlabelled last); each class's picks are spread evenly over its samples."""
    by_class: dict[str | None, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    order = sorted(c for c in by_class if c is not None) + ([None] if None in by_class else [])
    quota = dict.fromkeys(order, 0)
    left = min(n, len(labels))
    while left:  # round robin over the classes that still have samples
        for c in order:
            if left and quota[c] < len(by_class[c]):
                quota[c] += 1
                left -= 1
    picks = {c: [by_class[c][int(j * len(by_class[c]) / quota[c])] for j in range(quota[c])] for c in order}
    return [picks[c][j] for j in range(max(quota.values(), default=0)) for c in order if j < len(picks[c])]


def draw_grid(images: np.ndarray, maps: dict[str, np.ndarray], title: str,
              row_labels: list[str] | None = None) -> Any:
    """The figure of :func:`plot_grid`. The title's top sits :data:`TITLE_TOP_IN` inches below the figure's top
    edge and the images start :func:`top_margin` inches below it, whatever the number of rows, so the title
    never reaches the column headers; a row label too wide for its cell is shortened (:func:`fit_in_cell`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(images)
    cols = 1 + sum(m.shape[1] for m in maps.values())
    fig_h = rows * CELL_INCHES
    fig = Figure(figsize=(cols * CELL_INCHES, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - top_margin(title) / fig_h,
                        wspace=0.04, hspace=0.04)  # first: a row label is fitted to its cell's width
    for r in range(rows):
        img = images[r].transpose(1, 2, 0)
        luma = img[..., 0] if img.shape[2] == 1 else img @ np.array([0.2989, 0.587, 0.114], dtype=img.dtype)
        axes[r, 0].imshow(luma if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=9)
        if row_labels:
            fit_in_cell(axes[r, 0], axes[r, 0].text(
                0.02, 0.98, row_labels[r], transform=axes[r, 0].transAxes, fontsize=9, va="top", color="yellow",
                clip_on=True, bbox=dict(facecolor="black", alpha=0.6, pad=1.5, linewidth=0)), row_labels[r])
        c = 0
        for name, m in maps.items():
            for head in range(m.shape[1]):
                c += 1
                ax = axes[r, c]
                ax.imshow(luma, cmap="gray", vmin=0, vmax=1)  # the map over the image's luminance
                ax.imshow(m[r, head], cmap="inferno", alpha=0.65, vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(name if m.shape[1] == 1 else f"{name} h{head + 1}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10, va="top", y=1 - TITLE_TOP_IN / fig_h)
    return fig


def fit_in_cell(ax: Any, text: Any, label: str) -> None:
    """Shorten ``text`` (``label`` with an ellipsis in the middle) until it ends inside ``ax``."""
    renderer = ax.figure.canvas.get_renderer()
    ax.apply_aspect()  # the image's square box, as drawn
    right = ax.get_window_extent(renderer).x1 - 2
    n = len(label)
    while n > 5 and text.get_window_extent(renderer).x1 > right:
        n -= 1
        text.set_text(shorten(label, n))


def top_margin(title: str) -> float:
    """Inches above the images: the title's lines (from :data:`TITLE_TOP_IN`) and the column headers."""
    return TITLE_TOP_IN + 0.18 * (title.count("\n") + 1) + HEADER_IN


def plot_grid(images: np.ndarray, maps: dict[str, np.ndarray], title: str, out: Path,
              row_labels: list[str] | None = None) -> tuple[int, int]:
    """Rows: images. Columns: input, then every map of each encoder (overlaid on the input).

    ``images: (B, C, S, S)`` in [0, 1]; ``maps[name]: (B, M, S, S)`` in [0, 1];
    ``row_labels``: each row's class, written in the top left of its input. The PNG is exactly
    ``(cols * CELL_INCHES * DPI, rows * CELL_INCHES * DPI)`` pixels.
    """
    fig = draw_grid(images, maps, title, row_labels)
    return save_png(fig, out, DPI)


def pooling_note(encoder: nn.Module) -> str:
    """A title line for a ViT whose embedding is the mean of its patch tokens (an MAE run): what is
    drawn (the class token's attention) is then not what the embedding is made of."""
    model = getattr(encoder, "model", None)
    if is_token_backbone(encoder) and getattr(model, "global_pool", "token") in ("avg", "mean"):
        return "\nclass-token attention; this encoder's embedding is the mean of its patch tokens"
    return ""


def refuse_volume(sample: str, model_path: str) -> None:
    """A volume run (3D encoder) is refused before any data is decoded: the maps are drawn over 2D images."""
    if sample == "volume":
        from sslkit.errors import UsageError

        raise UsageError(f"sslkit eval attention draws maps for 2D image encoders; {str(model_path)!r} is a volume "
                         f"run (sample=volume, a 3D encoder): try sslkit eval linear, knn or tsne on it instead")


def pick_rows(labels: list[str | None], n: int) -> Callable[[set[int]], list[int]]:
    """``choose(failed)`` for :func:`~sslkit.eval.features.decode_sample`: :func:`pick_across_classes` of the
    indexed samples that have not failed to decode (a pick that fails is replaced by picking again)."""
    def choose(failed: set[int]) -> list[int]:
        left = [i for i in range(len(labels)) if i not in failed]
        return [left[j] for j in pick_across_classes([labels[i] for i in left], n)]

    return choose


def decode_rows(model: Any, images: str, source_options: dict[str, Any] | None, max_images: int,
                progress: bool) -> tuple[torch.Tensor, list[int], list[str | None], int, list[tuple[str, str]]]:
    """The rows' pixels ``(B, C, S, S)`` in [0, 1], chosen across the classes from the index (:func:`pick_rows`)
    and only they decoded (:func:`~sslkit.eval.features.decode_sample`); their indices, every indexed sample's
    label, how many samples the data holds (less those found undecodable) and the files skipped."""
    from sslkit.data.pipeline import index_refs, sample_format
    from sslkit.data.prepare import SCALE
    from sslkit.eval.features import decode_sample, index_source

    source = index_source(model, images, source_options)
    refs = index_refs(source, images)
    labels = [r.label for r in refs]
    got: dict[int, np.ndarray] = {}
    rows, failed, skipped = decode_sample(source, refs, *sample_format(source, refs, model.spec.channels,
                                                                       model.spec.image_size),
                                          pick_rows(labels, max_images), lambda kept, px: got.update(zip(kept, px)),
                                          progress)
    pixels = torch.from_numpy(np.stack([got[i] for i in rows]).astype(np.float32) / SCALE)
    return pixels, rows, labels, len(refs) - failed, skipped


def evaluate_attention(model_path: str, images: str, out: str | None = None, max_images: int = 8,
                       baseline: bool = True, overwrite: bool = False,
                       source_options: dict[str, Any] | None = None, progress: bool = True,
                       max_pixels: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Saliency grid of ``max_images`` images of ``images``, picked across the classes (:func:`decode_rows`:
    only those are decoded); PNG plus report."""
    from sslkit.augment import Normalize
    from sslkit.eval.features import open_model

    model = open_model(model_path, device)  # the default, cpu, is enough for a few images
    model.max_pixels = max_pixels
    out_path = _check_out(out, overwrite)
    run = model.require_run("sslkit eval attention")
    spec = run.spec
    refuse_volume(spec.sample, model_path)
    pixels, rows, labels, samples, skipped = decode_rows(model, images, source_options, max_images, progress)
    x = Normalize(spec.mean, spec.std)(pixels)
    maps, kind, note = {}, "", ""
    builders = {"pretrained": run.build_encoder}
    if baseline:
        builders.update(random=model.build_random_encoder, init=model.build_init_encoder)
    for name, build in builders.items():
        encoder = build()
        if encoder is None:  # no --init weights
            continue
        kind, m = saliency(encoder.to(model.device), x.to(model.device))
        note = note or (pooling_note(encoder) if name == "pretrained" else "")
        maps[name] = m.cpu().numpy()
    desc = model.describe()
    row_labels = [labels[i] or "(unlabelled)" for i in rows] if any(labels) else None
    out_path, (width, height) = save_picture(out_path, model.report_dir, "attention", lambda path: plot_grid(
        pixels.numpy(), maps, f"{kind}: {desc['task']} {desc['backbone']}{note}", path, row_labels))
    report = new_report("attention", desc, {"method": kind, "max_images": max_images, "baseline": baseline})
    report["data"] = {"data": {"source": images, "samples": samples, "rows": len(rows),
                               "skipped": skipped_summary(skipped)}}
    report["classes"] = sorted({lab for lab in labels if lab is not None})
    report["class_counts"] = {"rows": {c: sum(labels[i] == c for i in rows) for c in report["classes"]}}
    report["files"] = [str(out_path)]
    report["image_size"] = [width, height]
    save_report(report, model.report_dir, picture=out_path, overwrite=overwrite and out is not None)
    return report
