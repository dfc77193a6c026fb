"""ciss: class-incremental semantic segmentation, from training to a live, hot-swapping runtime."""

from ciss.errors import CissError

__version__ = "0.1.0"
__all__ = ["CissError", "__version__"]
