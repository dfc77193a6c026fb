"""The run's plots (matplotlib): what each figure shows, and the PNG files they become."""

from __future__ import annotations

import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from ciss.classmap import ClassMap
from ciss.trainer.plots import (
    ANNOTATE_CONFUSION,
    LEGEND_COLUMNS,
    LEGEND_ROWS,
    confusion_figure,
    confusion_png,
    forgetting_figure,
    forgetting_png,
    iou_figure,
    iou_png,
)

# background, sky, grass at step 0; triangle, ring at step 1
CMAP = ClassMap.initial(["sky", "grass"], colors=[(70, 130, 180), (250, 250, 240)]).extend(["triangle", "ring"])


def size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking that OpenCV decodes the whole file to it."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (height, width, 3)
    return width, height


def legend_labels(fig) -> list[str]:
    legends = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def lines_by_label(fig) -> dict[str, object]:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


# --- forgetting curve ---------------------------------------------------------------------------

def test_forgetting_curve_draws_each_scored_class_in_its_colour():
    # rows: step, mIoU old, new, all, then one IoU per class (None: not learned yet or no pixels of it)
    rows = [[0, 0.6, None, 0.6, None, 0.7, 0.5, None, None],
            [1, 0.5, 0.2, 0.4, None, 0.6, 0.4, 0.3, 0.1]]
    fig = forgetting_figure(rows, CMAP)
    # background was never scored (nobody labels it here): no line, no legend entry
    assert legend_labels(fig) == ["mIoU (all)", "sky", "grass", "triangle", "ring"]
    lines = lines_by_label(fig)
    assert lines["mIoU (all)"].get_linestyle() == "--"
    assert to_rgb(lines["sky"].get_color()) == pytest.approx((70 / 255, 130 / 255, 180 / 255))
    assert list(lines["sky"].get_ydata()) == pytest.approx([70, 60])
    # triangle only exists from step 1: its step 0 is a gap, not a zero
    assert np.isnan(lines["triangle"].get_ydata()[0]) and lines["triangle"].get_ydata()[1] == pytest.approx(30)
    assert lines["grass"].get_path_effects()  # near-white grass gets an outline to be seen on white
    assert size_of(forgetting_png(rows, CMAP)) == (900, 500)


def test_forgetting_curve_of_a_single_step():
    rows = [[0, 0.6, None, 0.6, 0.9, 0.7, 0.5, None, None]]
    cmap = CMAP.until(0)
    fig = forgetting_figure([r[:7] for r in rows], cmap)
    lines = lines_by_label(fig)
    assert list(lines["sky"].get_xdata()) == [0] and lines["sky"].get_marker() == "o"  # a point, visible
    assert fig.axes[0].get_xlim() == pytest.approx((-0.3, 0.3))
    assert size_of(forgetting_png([r[:7] for r in rows], cmap)) == (900, 500)


def test_forgetting_legend_of_many_classes_says_how_many_it_left_out():
    cmap = ClassMap.initial([f"class{i}" for i in range(60)])
    rows = [[0, 0.5, None, 0.5] + [0.5] * 61]
    labels = legend_labels(forgetting_figure(rows, cmap))
    fit = LEGEND_ROWS * LEGEND_COLUMNS
    assert len(labels) == fit and labels[-1] == f"+{62 - (fit - 1)} more"  # mIoU + 61 classes
    assert size_of(forgetting_png(rows, cmap)) == (900, 500)


def test_the_same_plot_gives_the_same_bytes():
    rows = [[0, 0.6, None, 0.6, 0.9, 0.7, 0.5, None, None], [1, 0.5, 0.2, 0.4, 0.8, 0.6, 0.4, 0.3, 0.1]]
    assert forgetting_png(rows, CMAP) == forgetting_png(rows, CMAP)


def test_class_names_are_drawn_as_typed():
    """No mathtext: `$x$` must not become an italic x, and `$\\nosuch$` (an unknown TeX symbol to
    mathtext) must not stop a step from being written."""
    cmap = ClassMap.initial(["$x$", "$\\nosuch$"])
    rows = [[0, 0.5, None, 0.5, 0.9, 0.4, 0.3]]
    fig = forgetting_figure(rows, cmap)
    assert legend_labels(fig)[2:] == ["$x$", "$\\nosuch$"]
    assert size_of(forgetting_png(rows, cmap)) == (900, 500)
    assert size_of(confusion_png(np.eye(3, dtype=np.int64), cmap, 0))


# --- per-class IoU bars -------------------------------------------------------------------------

METRICS = {"miou_all": 0.5, "miou_old": 0.6, "miou_new": 0.15, "split": "test",
           "per_class": {"background": 0.9, "sky": 0.6, "triangle": 0.3, "ring": 0.01}, "excluded": ["grass"]}


def test_iou_bars_mark_new_unlearned_and_unscored_classes():
    fig = iou_figure(METRICS, CMAP, step=1)
    ax = fig.axes[0]
    bars = ax.patches[:len(CMAP)]
    assert [b.get_height() for b in bars] == pytest.approx([90, 60, 0, 30, 1])
    assert [v for b in bars for v in to_rgb(b.get_facecolor())] == pytest.approx(
        [v / 255 for c in CMAP for v in c.color])
    assert [bool(b.get_hatch()) for b in bars] == [False, False, False, True, True]  # added at step 1
    assert [t.get_text() for t in ax.get_xticklabels()] == CMAP.names
    texts = [t.get_text() for t in ax.texts]
    assert "NOT LEARNED (1.0)" in texts          # ring: added now, under 5 % IoU
    assert "no pixels" in texts                  # grass: none in the test split, no bar to read
    assert "30.0" in texts and "60.0" in texts   # values above the other bars
    assert legend_labels(fig) == ["mIoU old 60.0", "mIoU new 15.0", "mIoU all 50.0", "added at step 1",
                                  "earlier steps"]
    assert size_of(iou_png(METRICS, CMAP, 1)) == (900, 500)


def test_iou_bars_of_step_0_have_no_new_classes_and_grow_with_many_classes():
    cmap = CMAP.until(0)
    fig = iou_figure({"miou_all": 0.7, "miou_old": 0.7, "per_class": {"background": 0.9, "sky": 0.01}}, cmap, 0)
    assert not any(b.get_hatch() for b in fig.axes[0].patches)
    assert not any("NOT LEARNED" in t.get_text() for t in fig.axes[0].texts)  # only a step's new classes
    many = ClassMap.initial([f"c{i}" for i in range(99)])
    width, height = size_of(iou_png({"per_class": {n: 0.5 for n in many.names}}, many, 0))
    assert (width, height) == (160 + 18 * 100, 500)


# --- confusion matrix ---------------------------------------------------------------------------

def test_confusion_matrix_is_row_normalised_with_the_class_names():
    m = np.array([[8, 2, 0, 0, 0],
                  [1, 3, 0, 0, 0],
                  [0, 0, 0, 0, 0],   # grass: no ground truth
                  [0, 0, 0, 5, 5],
                  [0, 0, 0, 0, 7]])
    fig = confusion_figure(m, CMAP, step=1)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CMAP.names
    assert [t.get_text() for t in ax.get_yticklabels()] == CMAP.names
    shown = ax.images[0].get_array()
    assert shown[0].tolist() == pytest.approx([80, 20, 0, 0, 0]) and shown[3, 3] == pytest.approx(50)
    assert shown.mask[2].all() and not shown.mask[[0, 1, 3, 4]].any()  # grass's row is grey, not zeros
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "ground truth"
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 25 and texts[:5] == ["80", "20", "0", "0", "0"] and texts[10] == "-"
    assert size_of(confusion_png(m, CMAP, 1)) == (710, 600)


def test_confusion_matrix_of_many_classes_has_no_cell_values():
    n = ANNOTATE_CONFUSION + 8
    cmap = ClassMap.initial([f"c{i}" for i in range(n - 1)])
    fig = confusion_figure(np.eye(n, dtype=np.int64), cmap, 0)
    assert not fig.axes[0].texts
    with pytest.raises(ValueError, match="does not match"):
        confusion_figure(np.eye(n - 1), cmap, 0)


def test_drawing_opens_no_window_and_leaves_the_backend_alone():
    """Only the object API: pyplot (which picks a GUI backend and keeps figures) is never imported."""
    code = ("import sys, numpy as np; from ciss.classmap import ClassMap; from ciss.trainer import plots; "
            "c = ClassMap.initial(['a']); plots.confusion_png(np.eye(2, dtype=int), c, 0); "
            "plots.iou_png({'per_class': {'a': 0.5}}, c, 0); plots.forgetting_png([[0, 0.5, None, 0.5, 0.5, 0.5]], c); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
