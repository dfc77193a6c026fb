"""ciss: class-incremental semantic segmentation, from training to a live, hot-swapping runtime.

`ciss.Run` trains and exports (needs the `train` extra when called); `ciss.runtime.Segmenter` serves.
Importing `ciss` imports neither torch nor ONNX, so the runtime-only install can use it.
"""

from ciss.api import Run
from ciss.errors import CissError

__version__ = "0.1.0"
__all__ = ["CissError", "Run", "__version__"]
