"""Writing a matplotlib figure as a PNG: the one way every picture sslkit draws is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.output_file import write_atomic


def drawable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (Python's surrogate escapes,
    which no font can draw) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def save_png(fig: Any, out: Path, dpi: int,
             tight_rect: tuple[float, float, float, float] | None = None) -> tuple[int, int]:
    """Write ``fig`` to ``out`` atomically, every text drawable first; ``tight_rect``: lay it
    out with ``tight_layout`` inside that rectangle (after the texts are fixed: laying out draws them).
    Returns the PNG's ``(W, H)`` in pixels."""
    from matplotlib.text import Text

    for artist in fig.findobj(Text):
        artist.set_text(drawable(artist.get_text()))
    if tight_rect is not None:
        fig.tight_layout(rect=tight_rect)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    w, h = fig.get_size_inches()
    return int(round(w * dpi)), int(round(h * dpi))
