"""Input sizes in multiples of the output stride: the export default, the refusal of other sizes, and the
--size that would match a video's aspect ratio."""

from __future__ import annotations

import pytest

from ciss.errors import CissError
from ciss.sizes import aspect_change, check_stride, matching_size, stride_size, typical_size


def test_the_typical_size_keeps_the_median_aspect_at_the_median_area():
    assert typical_size([(180, 240)] * 5) == (180, 240)
    # VOC-like: landscape and portrait mixed; the majority's aspect ratio, not a square of the larger sides.
    assert typical_size([(375, 500)] * 3 + [(500, 375)] * 2) == (375, 500)
    assert stride_size((180, 240), 16, 32, 4096) == (176, 240)
    assert stride_size((10, 9000), 16, 32, 4096) == (32, 4096)
    assert stride_size((182, 236), 8, 32, 4096) == (184, 240)


def test_a_size_off_the_stride_names_the_sizes_to_give():
    check_stride((176, 240), 16)
    with pytest.raises(CissError, match=r"^--size 180x240 is not a multiple of the model's output stride 16 "
                                        r"\(its mask would drift against the image\); "
                                        r"give --size 176x240 or --size 192x240$"):
        check_stride((180, 240), 16)
    with pytest.raises(CissError, match=r"give --size 352x480 or --size 368x480$"):
        check_stride((360, 480), 16)
    with pytest.raises(CissError, match=r"give --size 176x240$"):  # nearest and next up coincide
        check_stride((170, 240), 16)


def test_a_video_gets_the_size_of_its_own_aspect_at_the_same_area():
    assert aspect_change((540, 960), (176, 240)) == pytest.approx(960 / 540 / (240 / 176) - 1)
    assert aspect_change((176, 240), (540, 960)) == pytest.approx(aspect_change((540, 960), (176, 240)))
    h, w = matching_size((540, 960), (176, 240), 16)
    assert (h % 16, w % 16) == (0, 0) and aspect_change((540, 960), (h, w)) < 0.05
    assert abs(h * w / (176 * 240) - 1) < 0.15
