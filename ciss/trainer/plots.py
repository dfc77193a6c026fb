"""The run's plots, drawn with matplotlib: the forgetting curve of a run, and per step the per-class IoU
bars and the confusion matrix.

Only matplotlib's object API is used (`matplotlib.figure.Figure`, saved through the Agg renderer): no
pyplot, so no GUI backend is chosen, no window can open, the global backend of a notebook that imports
ciss is left alone, and a figure is freed like any object once saved (pyplot keeps figures until
closed). Every figure is drawn under matplotlib's default style (a user's matplotlibrc does not change
the files) with mathtext off, so a class called `$x` is drawn as typed. Sizes are fixed in pixels
(`DPI`, no tight bounding box); the bars and the confusion matrix grow with the number of classes
past 40 and 16 so that names stay readable, the same classes always giving the same size.

matplotlib comes with the `train` extra; the runtime (`ciss live`, `ciss models`) never imports this.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
import matplotlib.patheffects as patheffects
import matplotlib.style
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ciss.classmap import UNLEARNED_IOU, ClassMap

DPI = 100
MIOU_COLOR = "0.35"
# Legend entries of the forgetting curve that fit in one column of its 500-pixel height.
LEGEND_ROWS = 24
LEGEND_COLUMNS = 2
ANNOTATE_BARS = 40        # per-class IoU bars: value labels up to this many classes
ANNOTATE_CONFUSION = 12   # confusion matrix: percentages in the cells up to this many classes


@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.style.context("default"), matplotlib.rc_context({"text.parse_math": False}):
        yield


def _rgb(color: Sequence[int]) -> tuple[float, float, float]:
    return color[0] / 255, color[1] / 255, color[2] / 255


def _light(color: Sequence[int]) -> bool:
    """Too pale to see on white without an outline."""
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 200


def _outline(color: Sequence[int]) -> list[Any]:
    return [patheffects.withStroke(linewidth=4, foreground="0.55")] if _light(color) else []


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes at `DPI`, its pixel size exactly the figure's size (no tight bounding box);
    no Software metadata, so the same figure gives the same bytes across matplotlib versions' headers."""
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _figure(width_px: int, height_px: int) -> Figure:
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


# --- forgetting curve ---------------------------------------------------------------------------

def forgetting_figure(rows: Sequence[Sequence[float | None]], cmap: ClassMap) -> Figure:
    """Every class's IoU (%) across steps in its class-map colour, mIoU (all) dashed, legend at the right.

    `rows`: one per step, [step, miou_old, miou_new, miou_all, IoU of each class of `cmap` in order],
    IoUs in [0, 1] or None (class not learned yet, or no pixels of it in the eval split). A class never
    scored at any step has no line and no legend entry; a step on its own is a point.
    """
    with _style():
        fig = _figure(900, 500)
        ax = fig.add_subplot()
        steps = [int(r[0]) for r in rows]  # type: ignore[arg-type]
        k0, k1 = (min(steps), max(steps)) if steps else (0, 0)

        def series(col: int) -> tuple[list[int], list[float]]:
            # gaps (None) break the line, as they did in the table
            return steps, [np.nan if r[col] is None else 100 * float(r[col]) for r in rows]  # type: ignore[arg-type]

        handles = []
        x, y = series(3)
        handles += ax.plot(x, y, color=MIOU_COLOR, linestyle="--", linewidth=2, marker="o", markersize=4,
                           label="mIoU (all)", zorder=1)
        for i, c in enumerate(cmap):
            x, y = series(4 + i)
            if all(np.isnan(y)):
                continue  # never scored (e.g. a background nobody labels): no line
            handles += ax.plot(x, y, color=_rgb(c.color), linewidth=2, marker="o", markersize=5, label=c.name,
                               path_effects=_outline(c.color), zorder=2)
        ax.set_xlim(k0 - 0.3, k1 + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=15))
        ax.set_ylim(0, 100)
        ax.grid(True, color="0.9")
        ax.set_axisbelow(True)
        ax.set_xlabel("step")
        ax.set_ylabel("IoU (%)")
        ax.set_title("Per-class IoU across steps")
        fit = LEGEND_ROWS * LEGEND_COLUMNS
        labels = [h.get_label() for h in handles]
        if len(handles) > fit:
            more = len(handles) - (fit - 1)
            handles = handles[:fit - 1] + [Patch(visible=False)]
            labels = labels[:fit - 1] + [f"+{more} more"]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False,
                   ncols=1 if len(handles) <= LEGEND_ROWS else LEGEND_COLUMNS)
    return fig


def forgetting_png(rows: Sequence[Sequence[float | None]], cmap: ClassMap) -> bytes:
    return png(forgetting_figure(rows, cmap))


# --- per-class IoU of one step ------------------------------------------------------------------

def iou_figure(metrics: Mapping[str, Any], cmap: ClassMap, step: int) -> Figure:
    """One bar per class of `cmap` (its IoU in % at `step`, in its colour): the classes `step` added are
    hatched, a class it added that scored under UNLEARNED_IOU says NOT LEARNED above its (near-empty)
    bar, and a class without pixels in the eval split says "no pixels" instead of a bar. The step's
    mIoU of old, new and all classes are horizontal lines."""
    per_class = metrics.get("per_class") or {}
    n = len(cmap)
    with _style():
        fig = _figure(max(900, 160 + 18 * n), 500)
        ax = fig.add_subplot()
        x = np.arange(n)
        values = [100 * per_class[c.name] if per_class.get(c.name) is not None else 0.0 for c in cmap]
        added = [c.step == step and step > 0 for c in cmap]
        bars = ax.bar(x, values, width=0.75, color=[_rgb(c.color) for c in cmap], edgecolor="0.3", linewidth=0.8,
                      hatch=None, zorder=2)
        for b, new in zip(bars, added):
            if new:
                b.set_hatch("///")
        small = max(1, int(round(9 - n / 10)))
        for i, c in enumerate(cmap):
            v = per_class.get(c.name)
            if v is None:
                ax.text(i, 1.5, "no pixels", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
            elif added[i] and v < UNLEARNED_IOU:
                ax.text(i, 100 * v + 1.5, f"NOT LEARNED ({100 * v:.1f})", rotation=90, ha="center", va="bottom",
                        fontsize=8, color="#c00000", fontweight="bold")
            elif n <= ANNOTATE_BARS:
                ax.text(i, 100 * v + 1, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=small + 1, color="0.2")
        handles = []
        for key, label, style in (("miou_old", "mIoU old", ":"), ("miou_new", "mIoU new", "-."),
                                  ("miou_all", "mIoU all", "--")):
            if metrics.get(key) is not None:
                handles.append(ax.axhline(100 * metrics[key], color=MIOU_COLOR, linestyle=style, linewidth=1.2,
                                          label=f"{label} {100 * metrics[key]:.1f}", zorder=1))
        if any(added):
            handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label=f"added at step {step}"))
            handles.append(Patch(facecolor="white", edgecolor="0.3", label="earlier steps"))
        ax.set_xticks(x, cmap.names, rotation=45 if n <= ANNOTATE_BARS else 90, ha="right" if n <= ANNOTATE_BARS
                      else "center", fontsize=9 if n <= ANNOTATE_BARS else 7)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
        ax.grid(True, axis="y", color="0.9")
        ax.set_axisbelow(True)
        split = metrics.get("split")
        ax.set_title(f"Per-class IoU after step {step}" + (f" ({split} split)" if split else ""))
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    return fig


def iou_png(metrics: Mapping[str, Any], cmap: ClassMap, step: int) -> bytes:
    return png(iou_figure(metrics, cmap, step))


# --- confusion matrix of one step ---------------------------------------------------------------

def confusion_figure(matrix: np.ndarray | Any, cmap: ClassMap, step: int) -> Figure:
    """The confusion matrix with each ground-truth row normalised to 100 % of its pixels (rows: ground
    truth, columns: prediction, class names on both axes), percentages in the cells up to
    ANNOTATE_CONFUSION classes; a class without ground-truth pixels has a grey row."""
    m = np.asarray(matrix, dtype=np.float64)
    n = len(cmap)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix {m.shape} does not match the {n} classes of the class map")
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, 100 * m / np.where(totals > 0, totals, 1), np.nan)
    side = max(600, 220 + 16 * n)
    with _style():
        fig = _figure(side + 110, side)
        ax = fig.add_subplot()
        palette = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
        image = ax.imshow(np.ma.masked_invalid(share), cmap=palette, vmin=0, vmax=100, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="% of the ground-truth class's pixels")
        font = 9 if n <= 20 else 7 if n <= 60 else 5
        ax.set_xticks(np.arange(n), cmap.names, rotation=90, fontsize=font)
        ax.set_yticks(np.arange(n), cmap.names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(f"Confusion after step {step} (rows normalised)")
        if n <= ANNOTATE_CONFUSION:
            for r in range(n):
                for c in range(n):
                    v = share[r, c]
                    text = "-" if np.isnan(v) else f"{v:.0f}" if v >= 9.95 or v == 0 else f"{v:.1f}"
                    ax.text(c, r, text, ha="center", va="center", fontsize=8,
                            color="white" if not np.isnan(v) and v > 55 else "0.15")
    return fig


def confusion_png(matrix: np.ndarray | Any, cmap: ClassMap, step: int) -> bytes:
    return png(confusion_figure(matrix, cmap, step))
