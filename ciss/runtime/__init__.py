"""Live segmentation without torch: `Segmenter` serves the newest version of a model repository."""

from ciss.runtime.segmenter import Result, Segmenter

__all__ = ["Result", "Segmenter"]
