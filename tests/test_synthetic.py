"""The procedural scene generator: determinism, valid labels, class coverage, a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ciss import synthetic
from ciss.synthetic import CLASS_COLORS, CLASS_NAMES, SyntheticStream, render_scene

REPO = Path(__file__).resolve().parents[1]


def test_class_table():
    assert len(CLASS_NAMES) >= 10 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert len(CLASS_COLORS) == len(CLASS_NAMES) and len(set(CLASS_COLORS)) == len(CLASS_COLORS)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in CLASS_COLORS)


def test_render_scene_is_deterministic_and_labels_are_valid():
    a = render_scene(np.random.default_rng(3), 60, 80)
    b = render_scene(np.random.default_rng(3), 60, 80)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    image, label = a
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8
    assert label.shape == (60, 80) and label.dtype == np.uint8 and label.max() < len(CLASS_NAMES)


def test_every_class_appears_over_a_few_scenes():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(12):
        seen |= set(np.unique(render_scene(rng, 64, 80)[1]).tolist())
    assert seen == set(range(len(CLASS_NAMES)))


def test_classes_limit_the_things():
    rng = np.random.default_rng(1)
    allowed = {CLASS_NAMES.index(n) for n in synthetic.STUFF + ("disk", "star")}
    for _ in range(5):
        assert set(np.unique(render_scene(rng, 48, 64, classes=["disk", "star"])[1]).tolist()) <= allowed
    only_stuff = render_scene(rng, 48, 64, classes=["sky"])[1]
    assert only_stuff.max() < len(synthetic.STUFF)
    with pytest.raises(ValueError, match="unknown synthetic classes"):
        render_scene(rng, 48, 64, classes=["unicorn"])


def test_classes_differ_in_mean_colour():
    """A cheap proxy for learnability: per-class mean colours are far apart."""
    rng = np.random.default_rng(2)
    sums = np.zeros((len(CLASS_NAMES), 3))
    counts = np.zeros(len(CLASS_NAMES))
    for _ in range(10):
        image, label = render_scene(rng, 64, 80)
        for c in np.unique(label):
            sums[c] += image[label == c].sum(0)
            counts[c] += (label == c).sum()
    means = sums / counts[:, None]
    gaps = np.linalg.norm(means[:, None] - means[None], axis=2) + np.eye(len(means)) * 1e9
    assert gaps.min() > 40


def test_stream_is_deterministic_moves_things_and_keeps_stuff():
    s1, s2 = SyntheticStream(48, 64, seed=4, fps=10), SyntheticStream(48, 64, seed=4, fps=10)
    frames = [s1.read() for _ in range(30)]
    for frame, label in frames:
        other = s2.read()
        assert np.array_equal(frame, other[0]) and np.array_equal(label, other[1])
        assert frame.shape == (48, 64, 3) and label.max() < len(CLASS_NAMES)
    assert s1.frame_index == 30
    labels = [label for _, label in frames]
    assert not np.array_equal(labels[0], labels[5])  # things moved
    stuff = len(synthetic.STUFF)
    both = (labels[0] < stuff) & (labels[20] < stuff)
    assert both.any() and np.array_equal(labels[0][both], labels[20][both])  # stuff stayed
    assert any((label >= stuff).any() for label in labels)
    assert not np.array_equal(SyntheticStream(48, 64, seed=5).read()[1], labels[0])


def test_stream_frames_are_bgr():
    frame, label = SyntheticStream(48, 64, seed=0).read()
    sky = label == CLASS_NAMES.index("sky")
    if sky.any():  # sky is blue: in BGR the first channel dominates
        b, _, r = cv2.mean(frame, mask=sky.astype(np.uint8))[:3]
        assert b > r


def test_import_does_not_pull_in_torch():
    code = "import sys, ciss.synthetic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("kind", synthetic.THINGS)
def test_each_thing_is_solid_except_the_ring(kind):
    image, label = np.zeros((60, 60, 3), np.uint8), np.zeros((60, 60), np.uint8)
    cls = CLASS_NAMES.index(kind)
    thing = synthetic._Thing(cls=cls, x=30, y=30, size=40, angle=0.3, color=np.full(3, 100, np.float32), shade=0)
    synthetic._draw_thing(image, label, thing)
    assert (label == cls).sum() > 200
    assert (label[30, 30] == cls) == (kind != "ring")  # overlapping cross bars must not cancel out
