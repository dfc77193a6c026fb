"""Loss functions against values worked out by hand on tiny tensors, plus their key properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ciss.trainer.methods.losses import (
    binary_cross_entropy, class_scores, cross_entropy, local_pod, merge_extra_channels, outside_new_classes,
    pixel_cross_entropy_not_new, pixel_soft_cross_entropy, plop_median_thresholds, plop_uncertainty, pod_embedding,
    pod_layer, pseudo_label, quantile_thresholds, reduce_pixels, sigmoid_kd, unbiased_cross_entropy, unbiased_kd,
    uncertainty_histogram, unlabelled_background)

E = math.e


def logits_1x3x1x2() -> torch.Tensor:
    # pixel 0: z = (1, 2, 3); pixel 1: z = (0, 0, 0)
    return torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[3.0, 0.0]]]], requires_grad=True)


def lab(*values: int) -> torch.Tensor:
    return torch.tensor([[list(values)]], dtype=torch.long)


S = E + E**2 + E**3  # softmax denominator of pixel 0


# --- cross-entropy -----------------------------------------------------------------------------

def test_cross_entropy_by_hand():
    z = logits_1x3x1x2()
    p0 = -math.log(E**3 / S)  # pixel 0 labelled 2
    p1 = math.log(3)  # pixel 1 labelled 1, uniform
    assert cross_entropy(z, lab(2, 1), "valid").item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    # one ignored pixel: "valid" averages over 1 pixel, "all" over 2 (the ignored one counts as 0)
    assert cross_entropy(z, lab(2, 255), "valid").item() == pytest.approx(p0, rel=1e-6)
    assert cross_entropy(z, lab(2, 255), "all").item() == pytest.approx(p0 / 2, rel=1e-6)


def test_losses_finite_without_valid_pixels():
    z = logits_1x3x1x2()
    none = lab(255, 255)
    for value in (cross_entropy(z, none, "valid"), cross_entropy(z, none, "all"),
                  unbiased_cross_entropy(z, none, 2, "valid"), unbiased_cross_entropy(z, none, 2, "all")):
        assert torch.isfinite(value) and value.item() == 0.0
        value.backward()
        assert torch.isfinite(z.grad).all()


def test_bad_reduction():
    with pytest.raises(ValueError):
        cross_entropy(logits_1x3x1x2(), lab(0, 0), "sum")


# --- MiB UNCE ----------------------------------------------------------------------------------

def test_unce_by_hand():
    z = logits_1x3x1x2()
    bg = -math.log((E + E**2) / S)  # pixel 0, background: mass of channels {0, 1} (n_old = 2)
    new = math.log(3)  # pixel 1, new class 2: ordinary CE
    assert unbiased_cross_entropy(z, lab(0, 2), 2, "valid").item() == pytest.approx((bg + new) / 2, rel=1e-6)
    # a label of an old class (< n_old) is treated as background
    assert unbiased_cross_entropy(z, lab(1, 2), 2, "valid").item() == pytest.approx((bg + new) / 2, rel=1e-6)
    assert unbiased_cross_entropy(z, lab(0, 255), 2, "all").item() == pytest.approx(bg / 2, rel=1e-6)


def test_unce_properties():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, 4)
    y = torch.randint(0, 5, (2, 3, 4))
    y[0, 0, 0] = 255
    # n_old = 1: only background is "old", so UNCE is the plain CE
    assert torch.allclose(unbiased_cross_entropy(z, y, 1, "valid"), cross_entropy(z, y, "valid"))
    # new-class pixels are plain CE whatever n_old; background pixels cost no more than plain CE
    y_new = torch.full_like(y, 4)
    assert torch.allclose(unbiased_cross_entropy(z, y_new, 3, "all"), cross_entropy(z, y_new, "all"))
    y_bg = torch.zeros_like(y)
    assert unbiased_cross_entropy(z, y_bg, 3, "all") <= cross_entropy(z, y_bg, "all")
    # n_old = C: a background pixel holds all the mass, zero loss
    assert unbiased_cross_entropy(z, y_bg, 5, "all").abs().item() < 1e-6


# --- MiB UNKD ----------------------------------------------------------------------------------

def test_unkd_by_hand():
    z = logits_1x3x1x2()  # student: bg, old class 1, new class 2
    old = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])  # teacher: pixel 0 p' = (1/4, 3/4), pixel 1 (1/2, 1/2)
    # pixel 0: bg merged with the new class: log((e + e^3)/S); old class 1: log(e^2/S); average over n_old = 2
    px0 = -(0.25 * math.log((E + E**3) / S) + 0.75 * math.log(E**2 / S)) / 2
    # pixel 1: q = (1/3, 1/3, 1/3): merged bg 2/3, class 1 1/3
    px1 = -(0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3)) / 2
    assert unbiased_kd(z, old).item() == pytest.approx((px0 + px1) / 2, rel=1e-6)
    # mask: only pixel 0 counts, still averaged over both pixels (MiB)
    assert unbiased_kd(z, old, mask=torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(px0 / 2, rel=1e-6)
    # alpha = 2 multiplies the teacher logits before the softmax: pixel 0 p' = (1/10, 9/10)
    px0_a = -(0.1 * math.log((E + E**3) / S) + 0.9 * math.log(E**2 / S)) / 2
    assert unbiased_kd(z, old, alpha=2.0).item() == pytest.approx((px0_a + px1) / 2, rel=1e-6)


def test_unkd_at_mib_init_is_teacher_entropy_with_zero_gradient():
    torch.manual_seed(1)
    old = torch.randn(2, 3, 4, 4)  # n_old = 3
    n_new = 2
    shift = math.log(n_new + 1)
    # MiB init: bg and each new class get the old bg logit - log(n_new + 1); old classes unchanged
    new = torch.cat([old[:, :1] - shift, old[:, 1:], (old[:, :1] - shift).repeat(1, n_new, 1, 1)], dim=1)
    new.requires_grad_(True)
    kd = unbiased_kd(new, old)
    p = torch.softmax(old, dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean() / 3
    assert kd.item() == pytest.approx(entropy.item(), rel=1e-5)
    kd.backward()
    assert new.grad.abs().max().item() < 1e-6


# --- PLOP pseudo-labels ------------------------------------------------------------------------

def test_plop_uncertainty_by_hand():
    half = torch.zeros(1, 2, 1, 1)  # p = (1/2, 1/2): H = ln 2
    assert plop_uncertainty(half, n_total=3, mode="plop").item() == pytest.approx(
        math.log(2) / (2 * math.log(2) * math.log(3)), rel=1e-6)  # = 1 / (2 ln 3)
    assert plop_uncertainty(half, n_total=3, mode="median").item() == pytest.approx(1.0, rel=1e-6)
    conf = torch.tensor([5.0, 0.0]).view(1, 2, 1, 1)
    p = 1 / (1 + math.exp(-5))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert plop_uncertainty(conf, 3, "median").item() == pytest.approx(h / math.log(2), rel=1e-5)
    with pytest.raises(ValueError):
        plop_uncertainty(conf, 3, "other")


def test_uncertainty_histogram():
    u = torch.tensor([[[0.05, 0.15, 0.99, 1.0, 0.3]]])
    pred = torch.tensor([[[0, 0, 1, 1, 1]]])
    mask = torch.tensor([[[True, True, True, True, False]]])
    h = uncertainty_histogram(u, pred, mask, n_classes=2, bins=10)
    expected = torch.zeros(2, 10, dtype=torch.long)
    expected[0, 0] = expected[0, 1] = 1
    expected[1, 9] = 2  # 0.99 -> bin 9, 1.0 clamped into the last bin; 0.3 masked out
    assert torch.equal(h, expected)


def test_faithful_and_median_thresholds_on_fixed_histograms():
    hist = torch.tensor([
        [2, 1, 4, 3],  # total 10, half 5
        [1, 1, 1, 1],  # total 4, half 2
        [0, 0, 0, 0],  # never predicted
        [8, 0, 0, 0],  # everything in bin 0
    ])
    # faithful: running sum after bins 0, 1 = 0 + 1 = 1 (indices, not counts); stops in bin 2 since
    # 1 <= 5 <= 1 + 4: 0.5 + (5 - 1)/4 * 0.25 = 0.75.   Count-based: 2 + 1 = 3 before bin 2: 0.5 + (2/4) * 0.25.
    # row 1: faithful stops in bin 2 (1 <= 2 <= 2): 0.5 + (2 - 1)/1 * 0.25 = 0.75; count-based: bin 1 ends at 2: 0.5.
    # row 3: both: 4/8 of bin 0 = 0.125.
    plop = plop_median_thresholds(hist, floor=0.001)
    clean = quantile_thresholds(hist, 0.5, floor=0.001)
    assert plop.tolist() == pytest.approx([0.75, 0.75, 0.001, 0.125])
    assert clean.tolist() == pytest.approx([0.625, 0.5, 0.001, 0.125])
    # quantile 0.2 of row 0: target 2 = all of bin 0 -> its upper edge
    assert quantile_thresholds(hist[:1], 0.2, floor=0.0).tolist() == pytest.approx([0.25])


def test_faithful_thresholds_reproduce_the_released_quirks():
    # ADE-like: every pixel in bin 0 of 100 -> 0.005, above every value in that bin
    h = torch.zeros(1, 100, dtype=torch.long)
    h[0, 0] = 1000
    assert plop_median_thresholds(h).item() == pytest.approx(0.005)
    # uniform over 100 bins: the walk never stops (no bin holds half - index sum); the last step gives
    # 0.99 + (5e5 - (0 + 1 + ... + 99)) / 1e4 * 0.01
    u = torch.full((1, 100), 10_000, dtype=torch.long)
    assert plop_median_thresholds(u).item() == pytest.approx(0.99 + (500_000 - 4950) / 10_000 * 0.01, rel=1e-6)
    assert quantile_thresholds(u).item() == pytest.approx(0.5)
    # step k = 29 reads bin 28 (int(0.29 * 100) == 28). 100 pixels in bin 28, 900 in bin 90, half = 500:
    # k = 28: running = 0 + 1 + ... + 27 = 378 and 500 > 378 + 100, so running becomes 406;
    # k = 29 looks at bin 28 again: 406 <= 500 <= 506 stops there: 0.29 + (500 - 406) / 100 * 0.01
    q = torch.zeros(1, 100, dtype=torch.long)
    q[0, 28], q[0, 90] = 100, 900
    assert plop_median_thresholds(q).item() == pytest.approx(0.29 + (500 - 406) / 100 * 0.01, rel=1e-6)


def test_pseudo_labels_by_hand():
    # n_old = 2 (bg, class 1), n_total = 3 (class 2 new); five pixels in one row
    labels = torch.tensor([[[0, 0, 0, 2, 255]]])
    old = torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 6.0], [0.0, 9.0], [0.0, 9.0]]).T.reshape(1, 2, 1, 5)
    tau = torch.tensor([0.1, 0.1])
    # u (plop) = H / (2 ln 2 ln 3): pixel 0 ~ 0.026 -> keeps bg (argmax 0); pixel 1 = 1/(2 ln 3) ~ 0.455 -> 255;
    # pixel 2 ~ 0.011 -> old class 1; pixel 3 is a new-class GT pixel and stays 2; pixel 4 stays ignored
    out, nu = pseudo_label(labels, old, tau, n_total=3, mode="plop")
    assert out.tolist() == [[[0, 255, 1, 2, 255]]]
    assert nu.tolist() == pytest.approx([2 / (3 + 1e-6)])
    # an image without background pixels: PLOP's nu = 0, or empty_factor
    labels2 = torch.tensor([[[2, 2, 2, 2, 255]]])
    out2, nu2 = pseudo_label(labels2, old, tau, 3, "plop")
    assert torch.equal(out2, labels2) and nu2.item() == 0.0
    assert pseudo_label(labels2, old, tau, 3, "plop", empty_factor=1.0)[1].item() == 1.0


def test_pseudo_labels_only_touch_background():
    torch.manual_seed(2)
    labels = torch.randint(0, 6, (3, 8, 8))
    labels[labels == 1] = 0  # old classes are background in training labels
    labels[:, 0] = 255
    old = torch.randn(3, 4, 8, 8) * 4  # n_old = 4, new classes 4, 5
    tau = torch.rand(4)
    out, nu = pseudo_label(labels, old, tau, 6, "median")
    keep = labels >= 4  # new classes and ignore
    assert torch.equal(out[keep], labels[keep])
    bg = labels == 0
    assert ((out[bg] < 4) | (out[bg] == 255)).all()
    assert ((nu >= 0) & (nu <= 1)).all()


# --- Local POD ---------------------------------------------------------------------------------

def test_pod_by_hand():
    old = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared: [[1, 4], [9, 16]]
    new = torch.zeros_like(old)
    # scale 1: width-pooled rows (2.5, 12.5), height-pooled columns (5, 10)
    # scale 2: four 1x1 regions, each gives its value twice: 1, 1, 4, 4, 9, 9, 16, 16
    expected = math.sqrt(2.5**2 + 12.5**2 + 5**2 + 10**2 + 2 * (1 + 16 + 81 + 256))
    assert pod_layer(new, old, scales=(1, 2)).item() == pytest.approx(expected, rel=1e-6)
    emb = pod_embedding(old.pow(2), scales=(1,))
    assert emb.tolist() == [[2.5, 12.5, 5.0, 10.0]]
    # weights, schedule and the division by the number of layers
    total = local_pod([new, new], [old, old], weights=[0.5, 0.0], scales=(1, 2), schedule=2.0)
    assert total.item() == pytest.approx(0.5 * expected * 2.0 / 2, rel=1e-6)


def test_pod_properties():
    torch.manual_seed(3)
    a = torch.randn(2, 3, 8, 8, requires_grad=True)
    b = torch.randn(2, 3, 8, 8)
    same = local_pod([a], [a.detach().clone()])
    assert same.item() == 0.0
    same.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().max().item() == 0.0
    # squared activations: scaling both maps by k scales the distance by k^2
    d1 = pod_layer(a.detach(), b)
    d3 = pod_layer(3 * a.detach(), 3 * b)
    assert d3.item() == pytest.approx(9 * d1.item(), rel=1e-5)
    # per-image norm, then batch mean
    per_image = [pod_layer(a.detach()[i:i + 1], b[i:i + 1]).item() for i in range(2)]
    assert d1.item() == pytest.approx(sum(per_image) / 2, rel=1e-5)


def test_pod_regions_clean_vs_released():
    torch.manual_seed(4)
    sq, sq2 = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)
    clean_sq, plop_sq = pod_embedding(sq, regions="clean"), pod_embedding(sq, regions="plop")
    assert torch.allclose(clean_sq.sort(dim=1).values, plop_sq.sort(dim=1).values)  # same profiles, other order
    assert pod_layer(sq, sq2, regions="clean").item() == pytest.approx(pod_layer(sq, sq2, regions="plop").item(),
                                                                      rel=1e-5)
    # the clean grid on a side not divisible by the scale: regions [0, 2) and [1, 3) of a side of 3
    odd = torch.arange(9.0).view(1, 1, 3, 3)
    assert pod_embedding(odd, scales=(2,)).tolist()[0][:6] == pytest.approx(
        [0.5, 1.5, 3.5, 4.5, 6.5, 7.5])  # width-pooled: each row's column blocks {0,1} and {1,2}
    wide = torch.rand(1, 2, 6, 12)  # non-square: the released grid leaves empty regions (NaN)
    assert torch.isnan(pod_embedding(wide, regions="plop")).any()
    clean = pod_embedding(wide, regions="clean")
    assert torch.isfinite(clean).all()
    # scale 1 covers the whole map: first profile = per-row means over all 12 columns
    assert torch.allclose(clean[0, :12], wide[0].mean(dim=2).reshape(-1))


def test_merge_extra_channels():
    z = torch.arange(5.0).view(1, 5, 1, 1)  # n_old = 3: bg 0, old 1, 2; new 3, 4
    assert merge_extra_channels(z, 3, "sum").flatten().tolist() == [0 + 3 + 4, 1, 2]
    assert merge_extra_channels(z, 3, "trim").flatten().tolist() == [0, 1, 2]


def test_cross_entropy_not_new_by_hand_and_its_gradient_sides():
    z = torch.tensor([[1.0, 0.5, 2.0], [0.2, -1.0, 1.5], [0.3, 0.1, 0.9]]).T.reshape(1, 3, 1, 3).requires_grad_()
    labels = lab(2, 255, 255)
    not_new = torch.tensor([[[False, True, False]]])
    loss = reduce_pixels(*pixel_cross_entropy_not_new(z, labels, not_new, n_old=2), "all")
    q0, q1 = torch.softmax(z.detach()[0, :, 0, 0], 0), torch.softmax(z.detach()[0, :, 0, 1], 0)
    # pixel 0: CE on its label; pixel 1: -log(q_bg + q_old); pixel 2 ignored but counted by "all"
    assert loss.item() == pytest.approx((-math.log(q0[2]) - math.log(q1[0] + q1[1])) / 3, rel=1e-5)
    valid = reduce_pixels(*pixel_cross_entropy_not_new(z, labels, not_new, n_old=2), "valid")
    assert valid.item() == pytest.approx(loss.item() * 3 / 2, rel=1e-5)
    loss.backward()
    g = z.grad[0, :, 0, 1]
    assert g[2] > 0 and g[0] < 0 and g[1] < 0  # the new class loses there; background and the old class share
    assert z.grad[0, :, 0, 2].abs().sum() == 0


def test_soft_cross_entropy_by_hand_and_where_it_equals_the_hard_label():
    """n_old = 2 (bg, a), one new class. The target is the old softmax over bg and a, 0 for the new
    class; under a sure old model it is the hard label's CE; its gradient keeps a's share and still
    tells the new class "no" (as the hard label does)."""
    z = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1).requires_grad_()
    old = torch.tensor([0.3, -0.4]).view(1, 2, 1, 1)
    p, q = torch.softmax(old.flatten(), 0).tolist(), torch.softmax(z.detach().flatten(), 0).tolist()
    loss = pixel_soft_cross_entropy(z, old)
    assert loss.item() == pytest.approx(-(p[0] * math.log(q[0]) + p[1] * math.log(q[1])), rel=1e-6)
    loss.sum().backward()
    assert z.grad.flatten().tolist() == pytest.approx([q[0] - p[0], q[1] - p[1], q[2]], rel=1e-5)
    sure = torch.tensor([0.0, 60.0]).view(1, 2, 1, 1)
    hard = F.cross_entropy(z.detach(), torch.tensor([[[1]]]), reduction="none")
    assert pixel_soft_cross_entropy(z.detach(), sure).item() == pytest.approx(hard.item(), rel=1e-6)
    # sigmoid: BCE against the old sigmoids on the old channels, BCE against 0 on the new one
    s = [1 / (1 + math.exp(-v)) for v in (0.3, -0.4)]
    want = sum(softplus(x) - t * x for x, t in zip((1.0, 2.0), s)) + softplus(0.5)
    assert pixel_soft_cross_entropy(z.detach(), old, "sigmoid").item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        pixel_soft_cross_entropy(z[:, :1], old)


# --- sigmoid head ------------------------------------------------------------------------------

def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_binary_cross_entropy_by_hand():
    """BCE(z, t) = softplus(z) - t z per channel, summed over channels; "not_new" pixels tell only the
    new channels (here channel 2, n_old = 2) "no"."""
    z = torch.tensor([[1.0, 0.5, 2.0], [0.2, -1.0, 1.5], [0.3, 0.1, 0.9]]).T.reshape(1, 3, 1, 3).requires_grad_()
    labels = lab(2, 255, 255)
    pixel0 = softplus(1.0) + softplus(0.5) + softplus(2.0) - 2.0
    assert binary_cross_entropy(z, labels, "valid").item() == pytest.approx(pixel0, rel=1e-6)
    assert binary_cross_entropy(z, labels, "all").item() == pytest.approx(pixel0 / 3, rel=1e-6)
    not_new = torch.tensor([[[False, True, False]]])
    loss = binary_cross_entropy(z, labels, "all", not_new, n_old=2)
    assert loss.item() == pytest.approx((pixel0 + softplus(1.5)) / 3, rel=1e-6)
    loss.backward()
    g = z.grad[0, :, 0, 1]
    assert g[2] > 0 and g[0] == 0 and g[1] == 0  # only the new class is pushed down; old scores untouched
    assert z.grad[0, :, 0, 2].abs().sum() == 0
    none = binary_cross_entropy(z, lab(255, 255, 255), "valid")
    assert torch.isfinite(none) and none.item() == 0.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce_p(p: float, t: float) -> float:
    return -t * math.log(p) - (1 - t) * math.log(1 - p)


def test_outside_new_classes_keeps_background_old_and_ignored_pixels():
    y = torch.tensor([[[0, 2, 3, 4, 255]]])
    assert outside_new_classes(y, n_old=3).tolist() == [[[True, True, False, False, True]]]


def test_unlabelled_background_is_gt_background_the_pseudo_labels_left_at_255():
    y = torch.tensor([[[0, 0, 0, 3, 255]]])
    target = torch.tensor([[[255, 1, 0, 3, 255]]])
    assert unlabelled_background(y, target, n_old=3).tolist() == [[[True, False, False, False, False]]]


def test_sigmoid_kd_mask_drops_pixels_from_the_sum_not_from_the_mean():
    z, old = logits_1x3x1x2(), torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])
    px1 = bce_p(0.75, 0.5) + softplus(0.0)  # pixel 1 of the test below
    assert sigmoid_kd(z, old, mask=torch.tensor([[[False, True]]])).item() == pytest.approx(px1 / 2, rel=1e-6)


def test_sigmoid_kd_by_hand_and_zero_gradient_at_the_teacher():
    z = logits_1x3x1x2()  # student: bg, old class 1, new class 2
    old = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])  # teacher sigmoids: (1/2, 3/4) and (1/2, 1/2)
    # background against "background or the new class" 1 - (1 - σ(z_bg))(1 - σ(z_new)); class 1 channel by channel
    px0 = bce_p(1 - (1 - sigmoid(1.0)) * (1 - sigmoid(3.0)), 0.5) + softplus(2.0) - 0.75 * 2.0
    px1 = bce_p(0.75, 0.5) + softplus(0.0)
    assert sigmoid_kd(z, old).item() == pytest.approx((px0 + px1) / 2, rel=1e-6)
    # a student that agrees with the teacher and scores no new class has nothing left to learn
    at_teacher = torch.cat([old, torch.full((1, 2, 1, 2), -40.0)], dim=1).requires_grad_()
    sigmoid_kd(at_teacher, old).backward()
    assert at_teacher.grad.abs().max().item() < 1e-6
    # where the teacher said background, a student that says "new class" instead is not pulled back
    # (a per-channel KD would push its background channel up by σ(4) - σ(-4) = 0.96)
    z = torch.tensor([[[[-4.0]], [[-4.0]], [[4.0]]]], requires_grad=True)
    sigmoid_kd(z, torch.tensor([[[[4.0]], [[-4.0]]]])).backward()
    assert z.grad.abs().max().item() < 0.02
    # finite, gradient included, where background and new class are all but ruled out (there 1 - P
    # rounds to 1 in float32) and where they are certain
    for bg in (-200.0, -40.0, -20.0, -18.5, -16.0, 0.0, 40.0):
        z = torch.tensor([[[[bg]], [[0.0]], [[bg]]]], requires_grad=True)
        loss = sigmoid_kd(z, torch.tensor([[[[4.0]], [[0.0]]]]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), bg


def test_class_scores_softmax_and_sigmoid_agree_on_the_class():
    z = logits_1x3x1x2()
    for activation, top in (("softmax", E**3 / S), ("sigmoid", 1 / (1 + math.exp(-3)))):
        score, pred = class_scores(z, activation)
        assert pred.tolist() == [[[2, 0]]] and score[0, 0, 0].item() == pytest.approx(top, rel=1e-6)
    with pytest.raises(ValueError, match="activation"):
        class_scores(z, "tanh")
