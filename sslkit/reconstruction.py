"""The view recipe of the autoencoding tasks (autoencoder, denoising, inpainting, VAE, SimMIM)."""

from __future__ import annotations

from sslkit.views import MultiView, ViewRecipe


def reconstruction_views(spec, min_scale: float) -> MultiView:
    """One geometric-only view (crop + flip): what the autoencoding tasks reconstruct."""
    recipe = ViewRecipe(spec.image_size, scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                        gamma_p=0.0)
    return MultiView([recipe], spec.mean, spec.std)
