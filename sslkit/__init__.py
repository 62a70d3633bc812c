"""sslkit: self-supervised pretraining of image encoders on your own unlabeled images."""

from importlib.metadata import PackageNotFoundError, version as _version

from sslkit.hookspecs import hookimpl

try:
    __version__ = _version("sslkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "hookimpl"]
