"""IDEC: every term against arithmetic done by hand, its gradient and labelling properties, the
training-only projections, resume state, options, and one end-to-end run against FT."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.trainer.methods import build_method
from ciss.trainer.methods.base import StepContext, TrainBatch
from ciss.trainer.methods.idec import (IDEC, class_confidence, feature_distance, region_embeddings,
                                       region_info_nce, region_labels)
from ciss.trainer.models import build_model
from ciss.trainer.models.outputs import Outputs

SIG10 = 1 / (1 + math.exp(-10))  # softmax confidence of logits (10, 0)
LAYERS = ("stage1", "stage2", "stage3", "aspp")


def lse(*v: float) -> float:
    return math.log(sum(math.exp(x) for x in v))


def hand_cosine(x: list[float], y: list[float]) -> float:
    nx, ny = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(b * b for b in y))
    return 0.5 * sum((a / nx - b / ny) ** 2 for a, b in zip(x, y))


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y))


# --- pure parts --------------------------------------------------------------------------------

def test_feature_distances_by_hand():
    x = torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.0]])[None, :, None, :]  # N=1, C=2, H=1, W=3
    y = torch.tensor([[4.0, 0.0, 0.0], [3.0, 2.0, 0.0]])[None, :, None, :]
    # pixel 1: cos = 24/25; pixel 2: orthogonal; pixel 3: both zero -> 0
    assert feature_distance(x, y, "cosine").item() == pytest.approx((0.04 + 1.0 + 0.0) / 3, abs=1e-6)
    s = torch.tensor([0.0, math.log(3)])[None, :, None, None]
    t = torch.tensor([0.0, math.log(2) / 2])[None, :, None, None]
    # softmax(s) = (1/4, 3/4); softmax(2t) = (1/3, 2/3); mean over the 2 channels
    want = -(1 / 3 * math.log(1 / 4) + 2 / 3 * math.log(3 / 4)) / 2
    assert feature_distance(s, t, "channel_kd", alpha=2.0).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError):
        feature_distance(s, t, "kl")


def test_region_embeddings_by_hand():
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 2.0]]])[None]  # N=1, D=2, 2x2
    regions = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 2], [255, 255, 0, 0], [255, 255, 0, 0]]])  # 4x4 -> 2x2
    emb, counts = region_embeddings(f, regions, n_ids=3)
    assert counts.tolist() == [[2.0, 0.0, 1.0]]  # the 255 cell is left out
    assert emb[0, 0].tolist() == pytest.approx([(1 + 4) / 2, (0 + 2) / 2])
    assert emb[0, 2].tolist() == pytest.approx([2.0, 0.0])


def test_info_nce_by_hand_over_the_whole_batch():
    # regions (image, class): (0, 1) (0, 2) (1, 0) (1, 3) (1, 1); classes 0 and 1 are old
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [0.6, 0.8]], requires_grad=True)
    old = torch.tensor([[2.0, 1.0], [9.0, 9.0], [1.0, 0.0], [9.0, 9.0], [0.0, 1.0]], requires_grad=True)
    classes = torch.tensor([1, 2, 0, 3, 1])
    is_anchor = torch.tensor([True, False, True, False, True])
    loss = region_info_nce(old, new, classes, is_anchor, temperature=0.1)
    e = [unit(v) for v in new.tolist()]
    a = [unit(v) for v in old.tolist()]

    def one(i: int, negatives: list[int]) -> float:
        pos = dot(a[i], e[i]) / 0.1
        return lse(pos, *[dot(a[i], e[j]) / 0.1 for j in negatives]) - pos

    # the other image's region of the same class is neither positive nor negative
    want = (one(0, [1, 2, 3]) + one(2, [0, 1, 3, 4]) + one(4, [1, 2, 3])) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert old.grad is None  # anchors carry no gradient
    assert new.grad is not None and new.grad.abs().sum() > 0
    empty = region_info_nce(old, new, classes, torch.zeros(5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_pseudo_labels_only_relabel_background():
    labels = torch.tensor([[[0, 0, 2, 255]]])
    old = torch.tensor([[[[0.0, 10.0, 0.0, 0.0]], [[10.0, 0.0, 10.0, 10.0]]]])  # 2 old channels
    thresholds = torch.tensor([0.9, 0.9])
    # bg pixel sure of class 1 -> 1; bg pixel sure of bg -> 0; GT new class 2 and 255 untouched
    assert region_labels(labels, old, thresholds, unknown=3).tolist() == [[[1, 0, 2, 255]]]
    # below the threshold of its class: unknown
    assert region_labels(labels, old, torch.tensor([1.0, 0.9]), unknown=3).tolist() == [[[1, 3, 2, 255]]]
    stats = class_confidence(old, labels)  # only the two background pixels count
    assert stats[1].tolist() == [1.0, 1.0]
    assert stats[0].tolist() == pytest.approx([SIG10, SIG10])


# --- the method on a hand-made batch ------------------------------------------------------------

def fake_model() -> nn.Module:
    m = nn.Module()
    m.backbone = SimpleNamespace(stage_channels=[2, 2, 2, 2])  # type: ignore[assignment]
    m.head = SimpleNamespace(in_channels=2)  # type: ignore[assignment]
    return m


def context(step: int = 1, model: nn.Module | None = None, all_reduce=lambda t: t) -> StepContext:
    cm = ClassMap.initial(["a"])
    cm = cm.extend(["n"]) if step else cm
    return StepContext(step=step, classmap=cm, n_old=2 if step else 0, model=model or fake_model(),
                       old_model=nn.Identity() if step else None, device=torch.device("cpu"),
                       batches=lambda: iter(()), all_reduce=all_reduce)


# Two images of 1x2 pixels; 2 old channels (bg, a), 1 new (n).
LABELS = [[[0, 2]], [[0, 0]]]
OLD_LOGITS = [[(0, 10), (0, 10)], [(10, 0), (0, 0)]]  # per image, per pixel, (bg, a)
NEW_LOGITS = [[(1, 2, 0), (0, 0, 1)], [(2, 0, 0), (0, 1, 0)]]
FEATS_NEW = {"stage1": [[(3, 4), (1, 0)], [(1, 1), (0, 2)]], "stage2": [[(1, 0), (1, 0)], [(2, 1), (1, 2)]],
             "stage3": [[(1, 1), (2, 0)], [(0, 1), (1, 3)]], "aspp": [[(1, 0), (0, 1)], [(1, 1), (-1, 2)]]}
FEATS_OLD = {"stage1": [[(4, 3), (1, 0)], [(1, 2), (0, 1)]], "stage2": [[(0, 2), (1, 1)], [(2, 1), (2, 1)]],
             "stage3": [[(1, 1), (1, 1)], [(1, 0), (3, 1)]], "aspp": [[(2, 1), (1, 1)], [(1, 0), (1, 1)]]}


def as_map(values, grad: bool = False) -> torch.Tensor:
    """[image][pixel][channel] -> N,C,1,W."""
    return torch.tensor(values, dtype=torch.float32).permute(0, 2, 1)[:, :, None, :].requires_grad_(grad)


def hand_batch(progress: float = 0.5, grad: bool = True) -> TrainBatch:
    out = Outputs(as_map(NEW_LOGITS, grad), {k: as_map(v, grad) for k, v in FEATS_NEW.items()})
    old = Outputs(as_map(OLD_LOGITS), {k: as_map(v) for k, v in FEATS_OLD.items()})
    return TrainBatch(torch.zeros(2, 3, 1, 2), torch.tensor(LABELS), out, old, epoch=0, progress=progress)


def hand_method(**options) -> IDEC:
    """Prepared for step 1, with the contrast head set to ReLU then the identity (hand-checkable)."""
    m = IDEC(**{"threshold_momentum": 0.5, "feature_decay": 0.25, "contrast_dim": 2, **options})
    m.prepare(context())
    if "contrast" in m.projections:
        with torch.no_grad():
            for i in (0, 2):
                m.projections["contrast"][i].weight.copy_(torch.eye(2)[:, :, None, None])
                m.projections["contrast"][i].bias.zero_()
    return m


def softmax(z) -> list[float]:
    s = sum(math.exp(v) for v in z)
    return [math.exp(v) / s for v in z]


def test_every_term_by_hand():
    m = hand_method()
    terms = m.losses(hand_batch())
    assert set(terms) == {"ce", "feature_kd", "logit_kd", "contrast"}

    # thresholds: EMA (m = 0.5, start 0.7) towards the mean confidence of the background pixels
    tau0 = 0.5 * 0.7 + 0.5 * (SIG10 + 0.5) / 2  # bg: (10, 0) and (0, 0); the GT-new pixel does not count
    tau1 = 0.5 * 0.7 + 0.5 * SIG10
    assert m.thresholds.tolist() == pytest.approx([tau0, tau1])
    # pseudo-labels: image 0 -> [a, n], image 1 -> [bg, unknown (0.5 < tau0) -> 255 in the CE]
    targets = [(0, 0, 1), (0, 1, 2), (1, 0, 0)]
    ce = sum(lse(*NEW_LOGITS[i][p]) - NEW_LOGITS[i][p][c] for i, p, c in targets) / 4  # mean over all 4 pixels
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)

    # logit KD: MiB unbiased KD, teacher softmax(2 z_old), new class merged into background, / n_old
    kd = 0.0
    for i in range(2):
        for p in range(2):
            t = softmax([2 * v for v in OLD_LOGITS[i][p]])
            q = softmax(NEW_LOGITS[i][p])
            kd += -(t[0] * math.log(q[0] + q[2]) + t[1] * math.log(q[1])) / 2
    assert terms["logit_kd"].item() == pytest.approx(kd / 4, rel=1e-5)

    # feature KD: raw features, 1 - cos per pixel, stages x 0.25 ** 0.5
    weights = {"stage1": 0.5, "stage2": 1.0, "stage3": 2.0, "aspp": 1.0}
    fkd = 0.0
    for layer, w in weights.items():
        d = sum(hand_cosine(FEATS_NEW[layer][i][p], FEATS_OLD[layer][i][p]) for i in range(2) for p in range(2)) / 4
        fkd += w * (0.5 if layer != "aspp" else 1.0) * d
    assert terms["feature_kd"].item() == pytest.approx(fkd, rel=1e-5)

    # ARCL: regions (0, a) (0, n) (1, bg) (1, unknown), one pixel each, ReLU'd features; anchors = old classes
    relu = [[max(v, 0.0) for v in FEATS_NEW["aspp"][i][p]] for i, p in ((0, 0), (0, 1), (1, 0), (1, 1))]
    e = [unit(v) for v in relu]
    anchors = {0: unit(FEATS_OLD["aspp"][0][0]), 2: unit(FEATS_OLD["aspp"][1][0])}
    arcl = 0.0
    for i, a in anchors.items():
        pos = dot(a, e[i]) / 0.1
        arcl += lse(pos, *[dot(a, e[j]) / 0.1 for j in range(4) if j != i]) - pos
    assert terms["contrast"].item() == pytest.approx(arcl / 2, rel=1e-5)


def test_logit_kd_can_leave_out_the_new_class_pixels():
    """kd_on_new = false: the pixel labelled with the new class (image 0, pixel 1) drops out of the
    logit KD, which is still averaged over all four pixels; the other terms do not change."""
    full, masked = hand_method().losses(hand_batch()), hand_method(kd_on_new=False).losses(hand_batch())
    kd = 0.0
    for i, p in ((0, 0), (1, 0), (1, 1)):
        t = softmax([2 * v for v in OLD_LOGITS[i][p]])
        q = softmax(NEW_LOGITS[i][p])
        kd += -(t[0] * math.log(q[0] + q[2]) + t[1] * math.log(q[1])) / 2
    assert masked["logit_kd"].item() == pytest.approx(kd / 4, rel=1e-5)
    assert masked["logit_kd"].item() < full["logit_kd"].item()
    for name in ("ce", "feature_kd", "contrast"):
        assert masked[name].item() == pytest.approx(full[name].item(), rel=1e-6)
    sigmoid = hand_method(activation="sigmoid", kd_on_new=False)
    batch = hand_batch()
    sigmoid.losses(batch)["logit_kd"].backward()
    assert batch.out.logits.grad[0, :, 0, 1].abs().max().item() == 0.0
    assert batch.out.logits.grad[1].abs().max().item() > 0


def test_unknown_kd_holds_the_unknown_pixels_by_hand():
    """unknown_kd_weight = 10: the logit KD of the one unknown pixel (image 1, pixel 1) is added again
    times 10 (averaged over all four pixels), so that pixel is distilled at weight 11 and the others
    at 1; nothing else changes. The sigmoid head's KD is masked the same way; without pseudo-labels
    there are no unknown pixels, and the option is refused."""
    full, held = hand_method().losses(hand_batch()), hand_method(unknown_kd_weight=10.0).losses(hand_batch())
    t = softmax([2 * v for v in OLD_LOGITS[1][1]])
    q = softmax(NEW_LOGITS[1][1])
    kd = -(t[0] * math.log(q[0] + q[2]) + t[1] * math.log(q[1])) / 2
    assert held["unknown_kd"].item() == pytest.approx(10 * kd / 4, rel=1e-5)
    assert set(held) == set(full) | {"unknown_kd"}
    for name in full:
        assert held[name].item() == pytest.approx(full[name].item(), rel=1e-6)
    batch = hand_batch()
    hand_method(activation="sigmoid", unknown_kd_weight=10.0).losses(batch)["unknown_kd"].backward()
    grad = batch.out.logits.grad
    assert grad[1, :, 0, 1].abs().max().item() > 0
    assert grad[0].abs().max().item() == 0.0 and grad[1, :, 0, 0].abs().max().item() == 0.0
    with pytest.raises(CissError, match="unknown_kd_weight.*needs idec.pseudo.*--no idec.pseudo"):
        IDEC(unknown_kd_weight=10.0, pseudo=False)
    with pytest.raises(CissError, match="unknown_kd_weight.*must not be negative"):
        IDEC(unknown_kd_weight=-1.0)


def test_soft_pseudo_targets_by_hand():
    """pseudo_targets = "soft": the two pseudo-labelled pixels (image 0 pixel 0, image 1 pixel 0) are
    trained towards the old softmax over (bg, a), 0 for the new class; the new-class pixel keeps its
    hard CE, the unknown pixel stays out; every other term is unchanged. Refused without pseudo."""
    full, soft = hand_method().losses(hand_batch()), hand_method(pseudo_targets="soft").losses(hand_batch())
    ce = lse(*NEW_LOGITS[0][1]) - NEW_LOGITS[0][1][2]
    for i in (0, 1):
        p, logq = softmax(OLD_LOGITS[i][0]), [v - lse(*NEW_LOGITS[i][0]) for v in NEW_LOGITS[i][0]]
        ce -= p[0] * logq[0] + p[1] * logq[1]
    assert soft["ce"].item() == pytest.approx(ce / 4, rel=1e-5)
    assert soft["ce"].item() == pytest.approx(full["ce"].item(), abs=1e-3)  # the old model is sure (10 against 0)
    for name in set(full) - {"ce"}:
        assert soft[name].item() == pytest.approx(full[name].item(), rel=1e-6)
    batch = hand_batch()
    hand_method(activation="sigmoid", pseudo_targets="soft").losses(batch)["ce"].backward()
    grad = batch.out.logits.grad
    assert grad[1, :, 0, 1].abs().max().item() == 0.0 and grad[1, :, 0, 0].abs().max().item() > 0
    with pytest.raises(CissError, match="pseudo_targets.*needs idec.pseudo.*--no idec.pseudo"):
        IDEC(pseudo_targets="soft", pseudo=False)
    with pytest.raises(CissError, match="pseudo_targets.*must be one of"):
        IDEC(pseudo_targets="argmax")


def test_agreed_old_labels_by_hand():
    """old_labels = "agreed" (a reference on data.labels = "seen"): image 0 is a (the old model says a)
    and the new class; image 1 is a (the old model says bg: unknown) and bg (the old model's tie goes
    to bg: kept). The CE covers a, n and bg, the unknown KD the one wrong call; no thresholds run,
    and the KD terms that read no labels are unchanged. Refused without pseudo."""
    seen = hand_batch()
    seen.labels = torch.tensor([[[1, 2]], [[1, 0]]])
    m = hand_method(old_labels="agreed", unknown_kd_weight=10.0)
    assert m.needs_seen_labels and not hand_method().needs_seen_labels
    terms = m.losses(seen)
    assert m.thresholds is None
    targets = [(0, 0, 1), (0, 1, 2), (1, 1, 0)]
    ce = sum(lse(*NEW_LOGITS[i][p]) - NEW_LOGITS[i][p][c] for i, p, c in targets)
    assert terms["ce"].item() == pytest.approx(ce / 4, rel=1e-5)
    t, q = softmax([2 * v for v in OLD_LOGITS[1][0]]), softmax(NEW_LOGITS[1][0])
    kd = -(t[0] * math.log(q[0] + q[2]) + t[1] * math.log(q[1])) / 2
    assert terms["unknown_kd"].item() == pytest.approx(10 * kd / 4, rel=1e-5)
    full = hand_method().losses(hand_batch())
    for name in ("feature_kd", "logit_kd"):
        assert terms[name].item() == pytest.approx(full[name].item(), rel=1e-6)
    with pytest.raises(CissError, match="old_labels.*needs idec.pseudo.*--no idec.pseudo"):
        IDEC(old_labels="agreed", pseudo=False)
    with pytest.raises(CissError, match="old_labels.*must be one of"):
        IDEC(old_labels="true")


def test_unknown_pixels_as_not_new_by_hand():
    """The same batch with unknown = "not_new": the one unknown pixel (image 1, pixel 1) adds MiB's
    -log(q_bg + q_old) instead of nothing; the labelled pixels' terms are unchanged."""
    terms = hand_method(unknown="not_new").losses(hand_batch())
    targets = [(0, 0, 1), (0, 1, 2), (1, 0, 0)]
    ce = sum(lse(*NEW_LOGITS[i][p]) - NEW_LOGITS[i][p][c] for i, p, c in targets)
    z = NEW_LOGITS[1][1]
    ce += lse(*z) - lse(z[0], z[1])  # n_old = 2: background and a
    assert terms["ce"].item() == pytest.approx(ce / 4, rel=1e-5)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(z, target: int | None) -> float:
    """Σ_c BCE(z_c, [c = target]) over a pixel's channels."""
    return sum(softplus(v) - (v if c == target else 0.0) for c, v in enumerate(z))


def test_sigmoid_head_terms_by_hand():
    """activation = "sigmoid": the old model's scores are its per-class sigmoids (here the same values
    as its softmax: σ(10) and σ(0) = 1/2, so the same thresholds and pseudo-labels), the CE is the BCE
    summed over channels, the logit KD a BCE towards the old sigmoids, with the new class merged into
    the background's."""
    m = hand_method(activation="sigmoid")
    terms = m.losses(hand_batch())
    tau0 = 0.5 * 0.7 + 0.5 * (SIG10 + 0.5) / 2
    assert m.thresholds.tolist() == pytest.approx([tau0, 0.5 * 0.7 + 0.5 * SIG10])
    targets = [(0, 0, 1), (0, 1, 2), (1, 0, 0)]  # the unknown pixel (1, 1) is ignored
    assert terms["ce"].item() == pytest.approx(sum(bce(NEW_LOGITS[i][p], c) for i, p, c in targets) / 4, rel=1e-5)
    kd = 0.0
    for i in range(2):
        for p in range(2):
            (bg, a, n), (old_bg, old_a) = NEW_LOGITS[i][p], OLD_LOGITS[i][p]
            either, t = 1 - (1 - sig(bg)) * (1 - sig(n)), sig(old_bg)  # background or the new class
            kd += -t * math.log(either) - (1 - t) * math.log(1 - either) + softplus(a) - a * sig(old_a)
    assert terms["logit_kd"].item() == pytest.approx(kd / 4, rel=1e-5)
    softmax_terms = hand_method().losses(hand_batch())  # the feature terms do not depend on the head
    for key in ("feature_kd", "contrast"):
        assert terms[key].item() == pytest.approx(softmax_terms[key].item(), rel=1e-6)

    not_new = hand_method(activation="sigmoid", unknown="not_new").losses(hand_batch())["ce"]
    extra = softplus(NEW_LOGITS[1][1][2])  # the unknown pixel: only the new class told "no"
    assert not_new.item() == pytest.approx(terms["ce"].item() + extra / 4, rel=1e-5)


def test_sigmoid_step0_is_bce():
    m = build_method("idec", {"activation": "sigmoid"})
    m.prepare(context(step=0, model=build_model("tiny", [2])))
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    labels = torch.randint(0, 2, (2, 4, 4))
    terms = m.losses(TrainBatch(torch.zeros(2, 3, 4, 4), labels, Outputs(logits), None))
    onehot = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / labels.numel()
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(want.item(), rel=1e-6)
    assert m.activation == "sigmoid" and build_method("idec").activation == "softmax"


def test_gradients_reach_the_student_only():
    m = hand_method()
    batch = hand_batch()
    for f in batch.old.features.values():
        f.requires_grad_(True)  # would show any gradient into the teacher's side
    sum(m.losses(batch).values()).backward()
    assert all(f.grad is None for f in batch.old.features.values())
    assert all(batch.out.features[k].grad is not None for k in LAYERS)
    assert all(p.grad is not None for p in m.parameters())


def test_pseudo_never_overwrites_new_ground_truth():
    m = hand_method(contrast=False, feature_kd=False, logit_kd=False)
    batch = hand_batch()
    batch.out.logits.retain_grad()
    m.losses(batch)["ce"].backward()
    g = batch.out.logits.grad
    # image 0 pixel 1 is GT "n" although the old model is sure of "a": the CE pulls it towards n
    assert g[0, 2, 0, 1] < 0 and g[0, 1, 0, 1] > 0
    # image 1 pixel 1 is an unsure background pixel: ignored, no gradient
    assert g[1, :, 0, 1].abs().sum() == 0


def test_thresholds_are_per_class_move_with_the_data_and_use_all_reduce():
    remote = torch.tensor([[0.6, 0.0], [1.0, 0.0]])  # another process saw one bg pixel at 0.6
    m = IDEC(threshold_momentum=0.5)
    m.prepare(context(model=fake_model(), all_reduce=lambda t: t + remote))
    assert m.thresholds.tolist() == pytest.approx([0.7, 0.7])
    m.losses(hand_batch())
    first = m.thresholds.clone()
    assert first.tolist() == pytest.approx([0.35 + 0.5 * (SIG10 + 0.5 + 0.6) / 3, 0.35 + 0.5 * SIG10])
    m.losses(hand_batch())
    assert m.thresholds[0] != first[0] and m.thresholds[1] > first[1]  # move again, class by class


def test_disabling_a_component_removes_its_term_and_module():
    full = IDEC()
    assert set(full.modules()) == {"contrast"}
    for flag, term in (("feature_kd", "feature_kd"), ("logit_kd", "logit_kd"), ("contrast", "contrast")):
        m = hand_method(**{flag: False})
        assert term not in m.losses(hand_batch())
    assert set(IDEC(feature_kd=False).modules()) == {"contrast"}
    assert set(IDEC(contrast=False).modules()) == set()
    # without pseudo-labels the CE sees the raw labels (3 bg pixels + the new one)
    m = hand_method(pseudo=False)
    raw = sum(lse(*NEW_LOGITS[i][p]) - NEW_LOGITS[i][p][LABELS[i][0][p]] for i in range(2) for p in range(2)) / 4
    assert m.losses(hand_batch())["ce"].item() == pytest.approx(raw, rel=1e-5)
    m = hand_method(pseudo=False, contrast=False)
    assert m.thresholds is None and set(m.losses(hand_batch())) == {"ce", "feature_kd", "logit_kd"}


def test_terms_finite_without_valid_pixels_or_regions():
    m = hand_method()
    batch = hand_batch()
    batch.labels = torch.full_like(batch.labels, 255)
    terms = m.losses(batch)
    assert set(terms) == {"ce", "feature_kd", "logit_kd", "contrast"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["contrast"].item() == 0.0
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in m.parameters())  # DDP averages every parameter's gradient


# --- with the real tiny model: projections, optimizer before prepare, resume ----------------

def tiny_setup():
    torch.manual_seed(0)
    old = build_model("tiny", [2]).eval()
    model = copy.deepcopy(old).eval()  # BN frozen, as the engine's freeze_bn_next
    model.add_step(1, init_from_background=True)
    ctx = StepContext(step=1, classmap=ClassMap.initial(["a"]).extend(["n"]), n_old=2, model=model,
                      old_model=old, device=torch.device("cpu"), batches=lambda: iter(()))
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:20, 8:20] = 2
    return ctx, images, labels


def tiny_batch(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, progress: float = 0.0) -> TrainBatch:
    out = ctx.model(images, features=True)
    with torch.no_grad():
        old = ctx.old_model(images, features=True)
    return TrainBatch(images, labels, out, old, 0, progress)


def test_projections_are_training_only_and_optimised_in_the_engine_order():
    ctx, images, labels = tiny_setup()
    method = build_method("idec", {"threshold_init": 0.5})  # some confident pixels for the random teacher
    # An optimizer built from method.parameters() before prepare sizes them keeps working.
    optimizer = torch.optim.SGD(list(ctx.model.parameters()) + list(method.parameters()), lr=0.1)
    method.prepare(ctx)
    assert method.feature_names == LAYERS
    assert method.projections["contrast"][2].weight.shape == (128, ctx.model.head.in_channels, 1, 1)
    before = {k: v.clone() for k, v in method.state_dict()["modules"].items()}
    assert set(before) == {f"contrast.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert not set(before) & set(ctx.model.state_dict())
    n_model = sum(p.numel() for p in ctx.model.parameters())
    terms = method.losses(tiny_batch(ctx, images, labels))
    assert terms["feature_kd"].item() == pytest.approx(0.0, abs=1e-6)  # same model, raw features
    with torch.no_grad():  # let the student drift from the teacher
        for p in ctx.model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    optimizer.zero_grad()
    sum(method.losses(tiny_batch(ctx, images, labels)).values()).backward()
    optimizer.step()
    after = method.state_dict()["modules"]
    assert all(not torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in ctx.model.parameters()) == n_model  # the model gained nothing


def test_state_dict_round_trip_resumes_exactly():
    ctx, images, labels = tiny_setup()
    a = build_method("idec")
    a.prepare(ctx)
    for progress in (0.0, 0.5):  # thresholds move, the contrast head changes
        terms = a.losses(tiny_batch(ctx, images, labels, progress))
        sum(terms.values()).backward()
        with torch.no_grad():
            for p in a.parameters():
                p -= 0.5 * p.grad
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = build_method("idec")
    with pytest.raises(RuntimeError, match="prepare"):
        b.load_state_dict(state)
    b.prepare(ctx)
    b.load_state_dict(state)
    assert torch.equal(a.thresholds, b.thresholds) and a.thresholds[0] != 0.7
    for k, v in a.state_dict()["modules"].items():
        assert torch.equal(v, b.state_dict()["modules"][k])
    ta, tb = (m.losses(tiny_batch(ctx, images, labels, 0.7)) for m in (a, b))
    assert {k: v.item() for k, v in ta.items()} == {k: v.item() for k, v in tb.items()}


def test_step0_is_plain_ce_and_checkpointable():
    model = build_model("tiny", [2])
    m = build_method("idec")
    m.prepare(context(step=0, model=model))
    assert not m.needs_old_model and m.feature_names == () and m.thresholds is None
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    labels = torch.randint(0, 2, (2, 4, 4))
    terms = m.losses(TrainBatch(torch.zeros(2, 3, 4, 4), labels, Outputs(logits), None))
    want = torch.nn.functional.cross_entropy(logits, labels)
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(want.item())
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)  # empty projections, storable and loadable with weights_only
    buf.seek(0)
    assert all(v.numel() == 0 for v in torch.load(buf, weights_only=True)["modules"].values())


def test_needs_the_old_model_and_checks_options():
    with pytest.raises(CissError, match="needs the model of step 0"):
        IDEC().prepare(StepContext(step=1, classmap=ClassMap.initial(["a"]).extend(["n"]), n_old=2,
                                   model=fake_model(), old_model=None, device=torch.device("cpu"),
                                   batches=lambda: iter(())))
    with pytest.raises(CissError, match="unknown option 'tau'"):
        build_method("idec", {"tau": 0.5})
    with pytest.raises(CissError, match="contrast_weight"):
        IDEC(contrast_weight=-1.0)
    with pytest.raises(CissError, match="threshold_momentum"):
        IDEC(threshold_momentum=1.0)
    with pytest.raises(CissError, match="threshold_floor"):
        IDEC(threshold_floor=1.5)
    with pytest.raises(CissError, match="contrast_temperature"):
        IDEC(contrast_temperature=0.0)
    with pytest.raises(CissError, match="feature_distance"):
        IDEC(feature_distance="kl")
    with pytest.raises(CissError, match="true or false"):
        IDEC(pseudo=1)
    with pytest.raises(CissError, match="activation"):
        IDEC(activation="tanh")


# --- end to end ---------------------------------------------------------------------------------

E2E_CONFIG = """seed = 0
[model]
preset = "tiny"
[data.options]
size = 24
height = 32
width = 40
[train]
batch_size = 4
crop = 32
epochs = 5
epochs_next = 3
lr = 0.05
lr_next = 0.01
workers = 0
checkpoint_every = 1000
log_every = 1
[eval]
batch_size = 16
"""


@pytest.mark.slow
def test_idec_keeps_old_classes_where_ft_forgets(tmp_path: Path):
    """Same step 0, then "disk" added with a learning rate at which FT overwrites sky and grass."""
    from ciss.trainer.learn import learn
    from ciss.trainer.store import RunStore

    cfg = tmp_path / "c.toml"
    cfg.write_text(E2E_CONFIG)
    learn(tmp_path / "ft", classes=["sky", "grass"], config_file=cfg, method="ft", log=lambda s: None)
    shutil.copytree(tmp_path / "ft", tmp_path / "idec")
    def learned(run: Path, step: int) -> float:
        # sky and grass: the run never learns the scenes' other classes, which are scored as background
        iou = RunStore(run).manifest(step).metrics["per_class"]
        return (iou["sky"] + iou["grass"]) / 2

    old = {}
    for method in ("ft", "idec"):
        learn(tmp_path / method, new_classes=["disk"], config_file=cfg, method=method, log=lambda s: None)
        old[method] = learned(tmp_path / method, 1)
    base = learned(tmp_path / "ft", 0)
    print(f"old-class mIoU: step 0 {base:.3f}, after step 1 ft {old['ft']:.3f}, idec {old['idec']:.3f}")
    rows = [json.loads(line) for line in (tmp_path / "idec" / "step-1" / "train_log.jsonl").read_text().splitlines()]
    assert {"ce", "feature_kd", "logit_kd", "contrast"} <= set(rows[-1])
    assert base > 0.3
    assert old["ft"] < 0.1 and old["idec"] > 0.75 * base and old["idec"] > old["ft"] + 0.2


@pytest.mark.slow
def test_sigmoid_idec_trains_from_its_own_step0_and_refuses_a_softmax_one(tmp_path: Path):
    """The release's head end to end: step 0 and step 1 as sigmoids keep the old classes (step 1 inherits
    the option with the method); a softmax step on a sigmoid-trained step 0 stops before anything is
    written, with the flag that fixes it."""
    from ciss.trainer.learn import learn
    from ciss.trainer.store import RunStore

    cfg = tmp_path / "c.toml"
    cfg.write_text(E2E_CONFIG)
    sigmoid = {"activation": "sigmoid"}
    run = tmp_path / "sig"
    learn(run, classes=["sky", "grass"], config_file=cfg, method="idec", method_options=sigmoid, log=lambda s: None)
    shutil.copytree(run, tmp_path / "mixed")
    learn(run, new_classes=["disk"], config_file=cfg, method="idec", method_options=sigmoid, log=lambda s: None)
    iou = [RunStore(run).manifest(k).metrics["per_class"] for k in (0, 1)]
    base, kept = ((m["sky"] + m["grass"]) / 2 for m in iou)
    assert base > 0.3 and kept > 0.75 * base

    with pytest.raises(CissError, match="step 0 was trained as a sigmoid head .* --opt idec.activation=sigmoid"):
        learn(tmp_path / "mixed", new_classes=["disk"], config_file=cfg, method="idec",
              method_options={"activation": "softmax"}, log=lambda s: None)
    with pytest.raises(CissError, match="method 'mib' trains a softmax one; continue with a method with the option"):
        learn(tmp_path / "mixed", new_classes=["disk"], config_file=cfg, method="mib", log=lambda s: None)
    assert not (tmp_path / "mixed" / "step-1").exists()


def test_feature_kd_distils_raw_features_through_no_trainable_module():
    """Nothing trainable sits between the student's features and the teacher's: the distance is on the
    raw maps, so it can only shrink by moving the model (trained adapters absorbed the drift)."""
    ctx, images, labels = tiny_setup()
    m = build_method("idec", {"contrast": False, "logit_kd": False})
    m.prepare(ctx)
    assert list(m.parameters()) == []
    with torch.no_grad():
        for p in ctx.model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = tiny_batch(ctx, images, labels)
    weights = {"stage1": 0.5, "stage2": 1.0, "stage3": 2.0, "aspp": 1.0}
    expected = sum(w * feature_distance(batch.out.features[k], batch.old.features[k]) for k, w in weights.items())
    feature_kd = m.losses(batch)["feature_kd"]
    assert feature_kd.item() == pytest.approx(expected.item(), rel=1e-6) and feature_kd.item() > 0
