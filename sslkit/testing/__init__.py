"""sslkit.testing: the contract kit a plugin's CI runs (and sslkit's own registry-wide tests).

Each check builds the plugin's object the way sslkit does, exercises it on tiny generated
data on the CPU and raises ``AssertionError`` (with what was wrong) on a broken rule; it
returns a small report dict when everything holds::

    import pytest
    from sslkit.testing import check_source, check_task, registered

    @pytest.mark.parametrize("name", registered("tasks", "my-sslkit-plugin"))
    def test_task_contract(name, tmp_path):
        check_task(name, tmp_path=tmp_path)

* :func:`check_task`: trains a few steps through ``sslkit pretrain`` (in-process) with 1-
  and 3-channel input, finite losses; a loss that reaches the encoder (some encoder parameter
  is in its autograd graph); ``views(spec)`` has ``override``; the trained
  encoder exports to ONNX (verified by onnxruntime); a run resumed from a mid-run
  checkpoint logs the same losses as the uninterrupted run; with ``volume=(D, H, W)``, the same
  on generated volumes (a task that trains on them, a MONAI network).
* :func:`check_source`: indexes (real files), loads float32 ``(C, H, W)`` in [0, 1],
  raises on a damaged file, pickles, sniffs in [0, 1]; ``graph_preprocessing()`` reads
  back unchanged from run.json and export accepts it.
* :func:`check_backbone`: ``(B, C, H, W) -> (B, D)`` for 1 and 3 channels (``(B, C, D, H,
  W)`` for ``spatial_dims = 3``), gradients, the token interface where offered, a one-line
  error for an unknown model and for an unknown option.
* :func:`check_exporter`: writes one file (nothing else left behind), returns a JSON-able
  report, refuses an unknown option, takes the keywords sslkit always passes; with
  ``volume=(D, H, W)``, for a 3D encoder of a ``--sample volume`` run.
* :func:`check_callback`: a run callback takes every event of a short ``sslkit pretrain`` run,
  of the same run resumed from a checkpoint, and of a run that fails, without raising.
* :func:`registered`: the names an installed distribution registers, for parametrize.
* :func:`crashed_copy`: a copy of a run folder as a crash after its k-th checkpoint leaves
  it (for resume tests: ``--resume`` on it must repeat the original's losses).

Everything here is public, versioned with :data:`sslkit.api.API_VERSION`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_task", "check_source", "check_backbone", "check_exporter", "check_callback", "registered",
           "crashed_copy"]

_WHERE = {"check_task": "tasks", "check_source": "sources", "check_backbone": "backbones",
          "check_exporter": "exporters", "check_callback": "callbacks", "registered": "registry",
          "crashed_copy": "runs"}


def __getattr__(name: str) -> Any:
    """Import a check on first use, so ``import sslkit.testing`` stays light."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"sslkit.testing.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sslkit.testing' has no attribute {name!r}")
