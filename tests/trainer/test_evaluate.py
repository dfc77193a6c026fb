"""Confusion matrix and mIoU against a hand-computed example; reports on disk."""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from tqdm import tqdm

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.trainer.log import bar
from ciss.trainer.evaluate import ConfusionMatrix, compute_metrics, confusion_csv, evaluate, read_confusion_csv
from ciss.trainer.report import write_reports

# background, a, b at step 0; c at step 1; d at step 2
CMAP = ClassMap.initial(["a", "b"]).extend(["c"]).extend(["d"])
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 255, 255])
PRED = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3, 4, 2, 4])


def hand_matrix() -> torch.Tensor:
    m = torch.zeros(5, 5, dtype=torch.long)  # rows: ground truth, columns: prediction
    m[0, 0], m[0, 1] = 2, 1
    m[1, 1] = 2
    m[2, 2], m[2, 0] = 1, 1
    m[3, 3], m[3, 4] = 1, 1
    return m


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(5)
    cm.update(PRED[:6].view(2, 3), TARGET[:6].view(2, 3))
    cm.update(PRED[6:], TARGET[6:])  # 255 pixels are ignored whatever their prediction
    assert torch.equal(cm.matrix, hand_matrix())
    # summing over processes
    assert torch.equal(cm.reduce(lambda t: t * 2).matrix, 2 * hand_matrix())
    assert torch.equal(ConfusionMatrix(3).matrix, torch.zeros(3, 3, dtype=torch.long))


def test_metrics_by_hand():
    r = compute_metrics(hand_matrix(), CMAP)
    # background: TP 2, FP 1 (a "b" pixel), FN 1 -> 2/4; a: 2/(2+1); b: 1/(1+1); c: 1/(1+1); d has no GT
    assert r["per_class"] == pytest.approx({"background": 0.5, "a": 2 / 3, "b": 0.5, "c": 0.5})
    assert r["excluded"] == ["d"]
    assert r["miou_old"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)  # step-0 classes, background included
    assert r["miou_new"] == pytest.approx(0.5)  # c only: d is excluded
    assert r["miou_all"] == pytest.approx((0.5 + 2 / 3 + 0.5 + 0.5) / 4)
    assert r["pixel_acc"] == pytest.approx(6 / 9)


def test_a_joint_step_is_split_old_new_by_the_protocols_groups():
    joint = ClassMap.initial(["a", "b", "c", "d"])  # one step, as a joint run learns a 2-2 protocol
    r = compute_metrics(hand_matrix(), joint, old_names=["a", "b"])
    assert r["miou_old"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)  # background counts as old
    assert r["miou_new"] == pytest.approx(0.5)
    assert compute_metrics(hand_matrix(), joint)["miou_new"] is None


def test_metrics_step0_and_no_new_pixels():
    step0 = CMAP.until(0)
    r = compute_metrics(hand_matrix()[:3, :3], step0)
    assert r["miou_new"] is None and set(r["per_class"]) == {"background", "a", "b"}
    m = hand_matrix()
    m[3] = 0  # no ground truth of the new classes
    r = compute_metrics(m, CMAP)
    assert r["miou_new"] is None and r["excluded"] == ["c", "d"]
    with pytest.raises(ValueError):
        compute_metrics(hand_matrix(), step0)


class Fixed(nn.Module):
    """Logits whose argmax is given per image, at a chosen resolution."""

    def __init__(self, n: int, low_res: bool = False):
        super().__init__()
        self.n, self.low_res = n, low_res

    def forward(self, x):
        cls = x[:, 0].long().clamp(0, self.n - 1)  # channel 0 of the "image" holds the class to predict
        logits = torch.nn.functional.one_hot(cls, self.n).permute(0, 3, 1, 2).float()
        return logits[:, :, :1, :1] if self.low_res else logits


def test_evaluate_matches_confusion_and_restores_mode():
    images = torch.zeros(2, 3, 1, 11)
    images[:, 0] = PRED.float()
    labels = TARGET.view(1, 1, 11).repeat(2, 1, 1)
    model = Fixed(5).train()
    r = evaluate(model, [(images[:1], labels[:1]), (images[1:], labels[1:])], CMAP, "cpu")
    assert model.training
    expected = compute_metrics(2 * hand_matrix(), CMAP)
    assert r["per_class"] == pytest.approx(expected["per_class"]) and r["miou_all"] == pytest.approx(expected["miou_all"])
    # logits smaller than the labels are upsampled: a 1x1 map predicting class 2 everywhere
    img = torch.full((1, 3, 4, 4), 2.0)
    lab = torch.full((1, 4, 4), 2, dtype=torch.long)
    r = evaluate(Fixed(5, low_res=True), [(img, lab)], CMAP, "cpu")
    assert r["per_class"] == {"b": 1.0} and r["miou_old"] == 1.0 and r["miou_new"] is None
    with pytest.raises(CissError, match="3 outputs"):
        evaluate(Fixed(3), [(img, lab)], CMAP, "cpu")


class Strided(Fixed):
    """Fixed, with an output stride: records the input sizes it was given."""

    output_stride = 16

    def __init__(self, n: int):
        super().__init__(n)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().forward(x)


def test_an_off_stride_image_is_evaluated_at_the_nearest_stride_multiple():
    """A 180x240 CamVid frame reaches a stride-16 model as 176x240, as the runtime serves it; the
    logits come back to the labels' size, so a top/bottom split stays exact."""
    images = torch.zeros(1, 3, 180, 240)
    images[:, 0, 90:] = 2.0
    images[:, 0, :90] = 1.0
    labels = images[:, 0].long()
    model = Strided(5)
    r = evaluate(model, [(images, labels), (images[..., :176, :], labels[..., :176, :])], CMAP, "cpu")
    assert model.sizes == [(176, 240), (176, 240)]
    assert r["per_class"] == {"a": 1.0, "b": 1.0}


def test_evaluation_shows_its_progress_and_is_quiet_off_a_terminal():
    """Issue 14.8: a minute of silent evaluation looked like a hang."""
    images = torch.zeros(1, 3, 1, 11)
    labels = TARGET.view(1, 1, 11)
    shown = io.StringIO()
    progress = tqdm(total=3, file=shown, disable=False)
    evaluate(Fixed(5), [(images, labels)] * 3, CMAP, "cpu", progress=progress)
    assert progress.n == 3 and "3/3" in shown.getvalue()
    assert bar(3, "eval").disable  # pytest's stderr is no terminal: no bar in logs


def history() -> list[dict]:
    return [
        {"step": 0, "classes_added": ["a", "b"], "classes": CMAP.until(0).to_json(),
         "metrics": {"miou_all": 0.6, "miou_old": 0.6, "miou_new": None,
                     "per_class": {"background": 0.9, "a": 0.5, "b": 0.4}, "excluded": []}},
        {"step": 1, "classes_added": ["c"], "classes": CMAP.until(1).to_json(),
         "metrics": {"miou_all": 0.5, "miou_old": 0.5, "miou_new": 0.5,
                     "per_class": {"background": 0.8, "a": 0.3, "c": 0.5}, "excluded": ["b"]}},
        {"step": 2, "classes_added": ["d"], "classes": CMAP.to_json(),
         "metrics": {"miou_all": 0.4, "miou_old": 0.4, "miou_new": 0.3,
                     "per_class": {"background": 0.7, "a": 0.2, "b": 0.3, "c": 0.25, "d": 0.35}, "excluded": []}},
    ]


def test_write_reports(tmp_path):
    paths = write_reports(tmp_path / "run", history())
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "miou_old", "miou_new", "miou_all", "background", "a", "b", "c", "d"]
    assert rows[1] == ["0", "0.6000", "", "0.6000", "0.9000", "0.5000", "0.4000", "", ""]
    assert rows[2][6] == "" and rows[2][7] == "0.5000"  # b absent from the split at step 1; c learned
    assert len(rows) == 4
    md = paths["md"].read_text()
    assert "| step | added | mIoU old | mIoU new | mIoU all | background | a | b | c | d |" in md
    assert "| 1 | c | 50.0 | 50.0 | 50.0 | 80.0 | 30.0 |  | 50.0 |  |" in md
    img = cv2.imdecode(np.frombuffer(paths["png"].read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (500, 900, 3)
    assert (img < 250).any(axis=2).mean() > 0.02  # something was drawn
    # every class scored at some step has its line, in its colour (tests/trainer/test_plots.py: the figure)
    for c in CMAP:
        bgr = np.array(c.color[::-1])
        assert (np.abs(img.astype(int) - bgr).sum(axis=2) < 30).sum() > 50, c.name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["forgetting.png", "results.csv", "results.md"]


def test_write_reports_without_class_maps(tmp_path):
    h = [{k: v for k, v in e.items() if k != "classes"} for e in history()[:2]]
    paths = write_reports(tmp_path, h)
    assert paths["csv"].read_text().splitlines()[0] == "step,miou_old,miou_new,miou_all,background,a,b,c"
    # a single step still draws
    write_reports(tmp_path, history()[:1])
    assert cv2.imread(str(paths["png"])).shape == (500, 900, 3)


def test_confusion_csv_round_trips_and_refuses_a_foreign_table(tmp_path):
    path = tmp_path / "confusion.csv"
    path.write_bytes(confusion_csv(hand_matrix(), CMAP))
    assert path.read_text().splitlines()[:2] == ["ground_truth\\predicted,background,a,b,c,d", "background,2,1,0,0,0"]
    names, counts = read_confusion_csv(path)
    assert names == CMAP.names and (counts == hand_matrix().numpy()).all()
    with pytest.raises(ValueError, match="does not match the 5 classes"):
        confusion_csv(torch.zeros(4, 4), CMAP)
    path.write_text("step,a,b\na,1,0\nb,0,1\n")
    with pytest.raises(CissError, match="not a confusion matrix written by ciss"):
        read_confusion_csv(path)
