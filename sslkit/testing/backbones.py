"""``check_backbone``: pixels in, one finite embedding per image out, for 1 and 3 channels."""

from __future__ import annotations

from typing import Any

from sslkit.testing.registry import resolve


def check_backbone(factory: Any, model: str, *, options: dict | None = None, image_size: int = 32,
                   channels: tuple[int, ...] = (1, 3), batch: int = 2) -> dict[str, Any]:
    """Check backbone ``factory`` (a registered prefix or the factory) building ``model``.

    For each of ``channels``: ``factory(model, in_chans=C, image_size=S, **options)`` is an
    ``nn.Module`` with ``in_chans == C`` and ``num_features = D``, maps ``(B, C, S, S)`` to
    finite ``(B, D)`` and passes gradients back to its parameters; a token backbone
    (``sslkit.api.is_token_backbone``) also gives ``patchify: (B, C, S, S) -> (B, N, E)`` and
    ``encode_tokens: (B, n, E) -> (B, prefix + n, E)``. An unknown model name raises
    ``UsageError``. Returns ``{"model", "num_features", "token"}``.
    """
    import torch
    from torch import nn

    from sslkit.api import UsageError, is_token_backbone

    _, factory = resolve("backbones", factory)
    report: dict[str, Any] = {"model": model}
    for c in channels:
        net = factory(model, in_chans=c, image_size=image_size, **(options or {}))
        what = f"{model} ({c} channel{'s' if c > 1 else ''})"
        assert isinstance(net, nn.Module), f"{what}: the factory returned {type(net).__name__}, not an nn.Module"
        assert net.in_chans == c, f"{what}: in_chans is {getattr(net, 'in_chans', None)}"
        d = int(net.num_features)
        x = torch.rand(batch, c, image_size, image_size)
        out = net.train()(x)
        assert out.shape == (batch, d), f"{what}: (B, C, H, W) -> {tuple(out.shape)}, expected {(batch, d)}"
        assert torch.isfinite(out).all(), f"{what}: non-finite embedding"
        out.square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), f"{what}: no gradient"
        report["num_features"], report["token"] = d, is_token_backbone(net)
        if report["token"]:
            with torch.no_grad():
                tokens = net.patchify(x)
                n = (image_size // net.patch_size) ** 2
                assert tokens.shape == (batch, n, net.embed_dim), f"{what}: patchify gives {tuple(tokens.shape)}"
                enc = net.encode_tokens(tokens[:, : n // 2])
                assert enc.shape == (batch, net.num_prefix_tokens + n // 2, net.embed_dim), \
                    f"{what}: encode_tokens gives {tuple(enc.shape)}"
    try:
        factory("no_such_model_for_sslkit_testing", in_chans=1, image_size=image_size)
    except UsageError as exc:
        assert "\n" not in str(exc), "the unknown-model error must be one line"
    else:
        raise AssertionError("an unknown model name must raise sslkit.api.UsageError (one line)")
    return report
