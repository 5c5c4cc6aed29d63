"""The installed h5bank's version (a leaf: the writer records it in every bank)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("h5bank")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
