"""``check_backbone``: pixels (or voxels) in, one finite embedding per image out, for 1 and 3 channels."""

from __future__ import annotations

from typing import Any

from sslkit.testing.registry import resolve


def check_backbone(factory: Any, model: str, *, options: dict | None = None, image_size: int = 32,
                   channels: tuple[int, ...] = (1, 3), batch: int = 2) -> dict[str, Any]:
    """Check backbone ``factory`` (a registered prefix or the factory) building ``model``.

    For each of ``channels``: ``factory(model, in_chans=C, image_size=S, **options)`` is an
    ``nn.Module`` with ``in_chans == C`` and ``num_features = D``, maps ``(B, C, S, S)`` to
    finite ``(B, D)`` and passes gradients back to its parameters. A backbone that declares
    ``spatial_dims = 3`` (volumes, e.g. ``monai:resnet10``) is checked on ``(B, C, S, S, S)``
    instead. A token backbone (``sslkit.api.is_token_backbone``) also gives ``patchify:
    input -> (B, N, E)`` (``N = (S / patch_size) ** spatial_dims``) and ``encode_tokens:
    (B, n, E) -> (B, prefix + n, E)``. An unknown model name, and an unknown option
    (``--backbone-opt``) for ``model``, raise a one-line ``UsageError``. Returns
    ``{"model", "num_features", "token", "spatial_dims"}``.
    """
    _, factory = resolve("backbones", factory)
    report: dict[str, Any] = {"model": model}
    for c in channels:
        net = factory(model, in_chans=c, image_size=image_size, **(options or {}))
        report.update(_check_one(net, f"{model} ({c} channel{'s' if c > 1 else ''})", c, image_size, batch))
    _check_refused(lambda: factory("no_such_model_for_sslkit_testing", in_chans=1, image_size=image_size),
                   "an unknown model name")
    _check_refused(lambda: factory(model, in_chans=1, image_size=image_size, **(options or {}),
                                   no_such_option_for_sslkit_testing=1),
                   f"an unknown option (no_such_option_for_sslkit_testing=1 for {model}, as --backbone-opt gives it)")
    return report


def _check_refused(build: Any, what: str) -> None:
    """``build()`` raises a one-line ``UsageError`` (a factory that ignores ``what`` builds
    something the user did not ask for, silently)."""
    from sslkit.api import UsageError, first_line

    try:
        build()
    except UsageError as exc:
        assert "\n" not in str(exc).strip(), f"the error for {what} must be one line"
    except Exception as exc:
        raise AssertionError(f"{what} must raise sslkit.api.UsageError (one line), not "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    else:
        raise AssertionError(f"{what} must raise sslkit.api.UsageError (one line), but the factory built a backbone")


def _check_one(net: Any, what: str, c: int, image_size: int, batch: int) -> dict[str, Any]:
    """One built backbone: shapes, finiteness, gradients and the token interface."""
    import torch
    from torch import nn

    from sslkit.api import first_line, is_token_backbone

    assert isinstance(net, nn.Module), f"{what}: the factory returned {type(net).__name__}, not an nn.Module"
    for attr in ("in_chans", "num_features"):
        assert hasattr(net, attr), f"{what}: {type(net).__name__} has no attribute {attr!r} (a backbone has " \
                                   f"in_chans, the input channels, and num_features, the embedding size D)"
    assert net.in_chans == c, f"{what}: in_chans is {net.in_chans!r}, expected {c}"
    dims = int(getattr(net, "spatial_dims", 2))
    assert dims in (2, 3), f"{what}: spatial_dims must be 2 (images) or 3 (volumes), not {dims}"
    assert isinstance(net.num_features, int) and net.num_features > 0, \
        f"{what}: num_features must be a positive int (the embedding size D), not {net.num_features!r}"
    d = net.num_features
    x = torch.rand(batch, c, *(image_size,) * dims)
    layout = "(B, C, D, H, W)" if dims == 3 else "(B, C, H, W)"
    try:
        out = net.train()(x)
    except Exception as exc:
        raise AssertionError(f"{what}: spatial_dims {dims}, but {layout} input {tuple(x.shape)} fails: "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    assert out.shape == (batch, d), f"{what}: {layout} -> {tuple(out.shape)}, expected {(batch, d)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite embedding"
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), f"{what}: no gradient"
    token = is_token_backbone(net)
    if token:
        with torch.no_grad():
            tokens = net.patchify(x)
            n = (image_size // net.patch_size) ** dims
            assert tokens.shape == (batch, n, net.embed_dim), f"{what}: patchify gives {tuple(tokens.shape)}"
            enc = net.encode_tokens(tokens[:, : n // 2])
            assert enc.shape == (batch, net.num_prefix_tokens + n // 2, net.embed_dim), \
                f"{what}: encode_tokens gives {tuple(enc.shape)}"
    return {"num_features": d, "token": token, "spatial_dims": dims}
