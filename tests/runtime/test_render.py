"""Overlay colours and blending, the legend's NEW tags, and the HUD, checked on pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ciss.classmap import ClassMap
from ciss.runtime.model import Result
from ciss.runtime.pipeline import annotate
from ciss.runtime.render import NEW_COLOR, UNLEARNED_COLOR, class_lut, hud, legend, overlay

CLASSES = ClassMap.initial(["road", "car"], [(200, 10, 10), (10, 200, 10)]).extend(["bike"], [(10, 10, 200)])


def scene(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, len(CLASSES), (h, w)).astype(np.uint8)
    return frame, mask


def test_lut_is_the_class_map_in_bgr():
    assert class_lut(CLASSES).tolist() == [[0, 0, 0], [10, 10, 200], [10, 200, 10], [200, 10, 10]]


def test_overlay_exact_at_alpha_one_and_zero_background_untouched():
    frame, mask = scene()
    lut = class_lut(CLASSES)
    full = overlay(frame, mask, lut, alpha=1.0)
    fg = mask > 0
    assert np.array_equal(full[fg], lut[mask[fg]])
    assert np.array_equal(full[~fg], frame[~fg])
    assert np.array_equal(overlay(frame, mask, lut, alpha=0.0), frame)
    assert full is not frame and not np.array_equal(full, frame)


def test_overlay_blends_halfway_at_alpha_half():
    frame, mask = scene()
    lut = class_lut(CLASSES)
    half = overlay(frame, mask, lut, alpha=0.5).astype(int)
    expected = (frame.astype(int) + lut[mask].astype(int)) / 2
    fg = mask > 0
    assert np.abs(half[fg] - expected[fg]).max() <= 0.5 + 1e-9  # rounding only
    assert np.array_equal(half[~fg], frame[~fg])


def test_overlay_takes_uint16_masks_beyond_256_classes():
    many = ClassMap.initial([f"c{i}" for i in range(299)])
    lut = class_lut(many)
    frame = np.zeros((20, 30, 3), np.uint8)
    mask = np.arange(600, dtype=np.uint16).reshape(20, 30) % 300
    out = overlay(frame, mask, lut, alpha=1.0)
    fg = mask > 0
    assert np.array_equal(out[fg], lut[mask[fg]])


def test_overlay_refuses_a_mask_of_another_size():
    frame, mask = scene()
    with pytest.raises(ValueError, match="does not match"):
        overlay(frame, mask[:10], class_lut(CLASSES))


def near(image: np.ndarray, bgr: tuple[int, int, int], tol: int = 8) -> int:
    return int((np.abs(image.astype(int) - np.array(bgr)).max(axis=2) <= tol).sum())


def tinted(image: np.ndarray, bgr: tuple[int, int, int], tol: int = 8) -> int:
    """Pixels of text in `bgr` on black: small text is anti-aliased, so its pixels are `bgr` dimmed (k * bgr)."""
    c = np.array(bgr, float)
    k = image.astype(float) @ c / (c @ c)
    return int(((np.abs(image - k[..., None] * c).max(axis=2) <= tol) & (k > 0.4)).sum())


def test_legend_lists_classes_with_their_colours_and_tags_new_ones():
    image = np.zeros((240, 320, 3), np.uint8)
    entries = legend(image, CLASSES, new_ids=[3])
    assert entries == ["1 road", "2 car", "3 bike NEW"]
    for c in CLASSES.classes[1:]:
        assert near(image, c.color[::-1], 0) >= 25, c.name  # a filled swatch per class
    assert tinted(image, NEW_COLOR) > 10
    assert image[:, :160].max() == 0  # top right only

    plain = np.zeros_like(image)
    assert "NEW" not in " ".join(legend(plain, CLASSES))
    assert tinted(plain, NEW_COLOR) == 0


def test_legend_tags_unlearned_classes_over_new_ones():
    image = np.zeros((240, 320, 3), np.uint8)
    entries = legend(image, CLASSES, new_ids=[2, 3], unlearned_ids=[3])
    assert entries == ["1 road", "2 car NEW", "3 bike NOT LEARNED"]
    assert tinted(image, UNLEARNED_COLOR) > 10 and tinted(image, NEW_COLOR) > 10


def test_legend_wraps_into_columns_when_the_frame_is_short():
    many = ClassMap.initial([f"class{i}" for i in range(30)])
    image = np.zeros((120, 640, 3), np.uint8)
    assert len(legend(image, many, new_ids=[30])) == 30
    for c in (many[1], many[30]):
        assert near(image, c.color[::-1], 0) > 0, c.name
    assert tinted(image, NEW_COLOR) > 0


CAMVID = ClassMap.initial(["sky", "building", "pole", "road", "sidewalk", "tree", "signsymbol", "fence", "car",
                           "pedestrian", "bicyclist"])


def covered(image: np.ndarray) -> float:
    return float((image.max(axis=2) < 255).mean())


def test_legend_and_hud_leave_most_of_a_small_frame_to_the_scene():
    """Issue 14.7: on 240x180 they covered about 45 % (64 % with CamVid's 11 classes)."""
    mask = np.zeros((180, 240), np.uint8)
    mask[:60], mask[60:120, :80], mask[120:] = 1, 9, 4  # sky, a car, road
    image = np.full((180, 240, 3), 255, np.uint8)
    entries = legend(image, CAMVID, new_ids=[10, 11], mask=mask)
    hud(image, 30.0, 12, 3, "onnxruntime:CPUExecutionProvider")
    assert entries == ["1 sky", "4 road", "9 car", "10 pedestrian NEW", "11 bicyclist NEW"]  # in the frame, or tagged
    assert covered(image) < 0.2
    big = np.full((720, 960, 3), 255, np.uint8)  # room for them all: every class listed
    assert len(legend(big, CAMVID, mask=cv2.resize(mask, (960, 720), interpolation=cv2.INTER_NEAREST))) == 11
    assert covered(big) < 0.15


def test_legend_rows_are_shaded_only_as_wide_as_their_text():
    image = np.full((180, 240, 3), 255, np.uint8)
    legend(image, CAMVID, new_ids=[10, 11], mask=np.ones((180, 240), np.uint8))
    shaded = image.max(axis=2) < 255
    short, long = shaded[8].sum(), shaded[20].sum()  # rows "1 sky" and "10 pedestrian NEW" (12 px each)
    assert 0 < short < long / 2
    assert shaded[:, -1].sum() > 0 and not shaded[:, :120].any()  # against the right edge


def test_legend_and_hud_can_be_hidden():
    frame, mask = scene(180, 240)
    result = Result(mask, None, CLASSES, 1, 0, {}, backend="ort CPU")
    bare = annotate(frame, result, {}, 30.0, 5.0, 0.5, show_legend=False, show_hud=False)
    assert np.array_equal(bare, overlay(frame, mask, class_lut(CLASSES), 0.5))
    assert not np.array_equal(annotate(frame, result, {}, 30.0, 5.0, 0.5), bare)


def test_hud_shows_fps_latency_version_and_backend():
    image = np.full((240, 320, 3), 200, np.uint8)
    lines = hud(image, 29.71, 33.4, 3, "onnxruntime:CUDAExecutionProvider")
    assert lines == ["29.7 FPS  33 ms", "model v3  ort CUDA"]
    assert (image[:30, :60] != 200).any() and (image[-30:, -60:] == 200).all()
    assert hud(image, None, None, None, "tensorrt") == ["-- FPS  -- ms", "no model  tensorrt"]
