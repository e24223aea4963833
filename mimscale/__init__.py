"""mimscale: masked-image-modeling pre-training of Vision Transformers at scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mimscale")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
