"""Live segmentation without torch: `Segmenter` serves the newest version of a model repository.

`Segmenter` and `Result` are imported on first use, so importing a part of the runtime that needs
no model (`ciss.runtime.sources`, the sinks) does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ciss.runtime.model import Result
    from ciss.runtime.segmenter import Segmenter

__all__ = ["Result", "Segmenter"]
_MODULES = {"Result": "ciss.runtime.model", "Segmenter": "ciss.runtime.segmenter"}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
