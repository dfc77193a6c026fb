"""GSC: each term against hand-worked values, its switches, prototypes, resume, and one two-step run."""

from __future__ import annotations

import io
import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciss.errors import CissError
from ciss.trainer.learn import learn
from ciss.trainer.methods import build_method
from ciss.trainer.methods.base import StepContext, TrainBatch
from ciss.trainer.methods.gsc import (_class_feature_sums, compensation_weights, entropy_sharpening,
                                      prototype_relabel, relation_distillation, soft_sharp_distillation)
from ciss.trainer.methods.losses import (accepted_share, agreed_labels, cross_entropy, pixel_cross_entropy,
                                         pseudo_label, reduce_pixels)
from ciss.trainer.models.outputs import Outputs
from conftest import write_config
from method_fixtures import N_OLD, N_TOTAL, classmap, images, labels, step0_labels
from method_fixtures import context as step_context, outputs as random_outputs

E = math.e


def lab(*values: int) -> torch.Tensor:
    return torch.tensor([[list(values)]], dtype=torch.long)


def logits(*pixels: tuple[float, ...], grad: bool = False) -> torch.Tensor:
    """1,C,1,W logits from one tuple of C values per pixel."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels)) \
        .requires_grad_(grad)


def softmax(*z: float) -> list[float]:
    s = sum(math.exp(v) for v in z)
    return [math.exp(v) / s for v in z]


def cross(t: list[float], p: list[float]) -> float:
    return -sum(a * math.log(b) for a, b in zip(t, p) if a > 0)


# --- step-aware gradient compensation ----------------------------------------------------------

def test_compensation_weights_by_hand():
    # classes: background and a from step 0, b from step 1; kappa = 2 / 3
    steps = torch.tensor([0, 0, 1])
    z = logits((0.0, 1.0, 0.0), (0.0, 3.0, 1.0), (1.0, 0.0, 2.0), (2.0, 0.0, 0.0), (0.0, 0.0, 0.0), grad=True)
    y = lab(1, 1, 2, 0, 255)
    k = 2 / 3
    g = [(1 - softmax(0, 1, 0)[1]) ** k, (1 - softmax(0, 3, 1)[1]) ** k, (1 - softmax(2, 0, 0)[0]) ** k]
    w = compensation_weights(z, y, steps, 1)
    assert not w.requires_grad
    mean_a = (g[0] + g[1]) / 2  # background stays out of the group: weight 1
    assert w.flatten().tolist() == pytest.approx([g[0] / mean_a, g[1] / mean_a, 1.0, 1.0, 0.0], rel=1e-6)
    mean_0 = (g[0] + g[1] + g[2]) / 3  # with background in step 0's group
    w = compensation_weights(z, y, steps, 1, background=True)
    assert w.flatten().tolist() == pytest.approx([g[0] / mean_0, g[1] / mean_0, 1.0, g[2] / mean_0, 0.0], rel=1e-6)


def test_compensation_weights_are_bounded_as_hfc_bounds_them():
    """Bounds clamp an earlier step's weights (HFC's [0.5, 1.2]); this step's classes and background keep 1.
    Unbounded, GSC diverged at iteration 20 of CamVid 6-1's step 1 from the pretrained base: a badly
    predicted old class (few pixels, all with large gradients) took a class-mean weight up to 10 in
    the relation term; bounded, the CE stayed under 0.2 (docs/methods.md)."""
    steps = torch.tensor([0, 0, 1])
    z = logits((0.0, 5.0, 0.0), (5.0, 0.0, 0.0), (0.0, 0.0, 5.0), (5.0, 0.0, 0.0), grad=True)
    y = lab(1, 1, 2, 0)  # the first pixel is confident, the second wrong: weights far from 1 either way
    free = compensation_weights(z, y, steps, 1).flatten().tolist()
    assert free[0] < 0.5 and free[1] > 1.2
    bounded = compensation_weights(z, y, steps, 1, bounds=(0.5, 1.2)).flatten().tolist()
    assert bounded == pytest.approx([0.5, 1.2, 1.0, 1.0])
    with pytest.raises(CissError, match="0 <= min <= 1 <= max"):
        build_method("gsc", {"compensation_max": 0.9})


def test_compensation_groups_are_disjoint_per_step():
    # step 2 of bg, a | b | c: each earlier step's pixels average to 1 on their own
    steps = torch.tensor([0, 0, 1, 2])
    z = logits((0.0, 2.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 3.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    w = compensation_weights(z, lab(1, 2, 2, 3), steps, 2).flatten().tolist()
    k = 3 / 4
    gb = [(1 - softmax(0, 0, 1, 0)[2]) ** k, (1 - softmax(0, 0, 3, 0)[2]) ** k]
    assert w == pytest.approx([1.0, 2 * gb[0] / sum(gb), 2 * gb[1] / sum(gb), 1.0], rel=1e-6)


def test_compensation_is_a_constant_factor_on_the_ce():
    m = build_method("gsc", {"soft": False, "sharp": False, "relation": False, "pod": False, "pseudo": False,
                             "adaptive_factor": False, "reduction": "valid"})
    ctx = context()
    m.prepare(ctx)
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    ce = m.losses(TrainBatch(images(0), y, out, old))["ce"]
    ce.backward()
    # PLOP's labels are what the CE sees; w is recomputed outside the graph
    target, _ = pseudo_label(y, old.logits, m.thresholds, N_TOTAL, "median")
    w = compensation_weights(out.logits, target, torch.tensor([0, 0, 0, 1, 1]), 1, bounds=(0.5, 1.2))
    z = out.logits.detach().requires_grad_(True)
    expected = (pixel_cross_entropy(z, target) * w).sum() / (target != 255).sum()
    expected.backward()
    assert ce.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(out.logits.grad, z.grad, atol=1e-7)


def test_unknown_pixels_as_not_new_add_mibs_term_with_weight_one():
    """unknown = "not_new": every GT-background pixel left at 255 (the entropy test rejected it) adds
    −log(q_bg + q_old) at weight 1, beside the compensated CE of the labelled pixels; nothing else changes."""
    opts = {"soft": False, "sharp": False, "relation": False, "pod": False, "pseudo": False,
            "adaptive_factor": False, "reduction": "valid"}
    ctx = context()
    m, plain = build_method("gsc", {**opts, "unknown": "not_new"}), build_method("gsc", opts)
    m.prepare(ctx)
    plain.prepare(ctx)
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    ce = m.losses(TrainBatch(images(0), y, out, old))["ce"]
    target, _ = pseudo_label(y, old.logits, m.thresholds, N_TOTAL, "median")
    unknown = (y < N_OLD) & (target == 255)
    assert unknown.any() and (target != 255).any()
    z = out.logits.detach()
    not_new = -(torch.logsumexp(z[:, :N_OLD], 1) - torch.logsumexp(z, 1))
    n_lab, n_unk = int((target != 255).sum()), int(unknown.sum())
    labelled = plain.losses(TrainBatch(images(0), y, out, old))["ce"].item() * n_lab  # the compensated CE's sum
    assert ce.item() == pytest.approx((labelled + not_new[unknown].sum().item()) / (n_lab + n_unk), rel=1e-5)


# --- soft-sharp semantic relation distillation -------------------------------------------------

def test_soft_sharp_distillation_by_hand():
    old = logits((0.0, 1.0), (3.0, 0.0), (1.0, 1.0))
    z = logits((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), grad=True)
    q = softmax(0, 1)
    p0 = softmax(1, 2, 3)
    soft0 = -(q[0] * math.log(p0[0]) + q[1] * math.log(p0[1]))  # old softmax on old channels, 0 on the new one
    sharp1 = math.log(3)  # GT new class 2: one-hot, whatever the old model says
    value = soft_sharp_distillation(z, old, lab(0, 2, 255))  # the 255 pixel is out of the mean
    assert value.item() == pytest.approx((soft0 + sharp1) / 2, rel=1e-6)
    value.backward()
    assert z.grad[0, :, 0, 2].abs().max() == 0
    # a pixel labelled with an old-class id (PLOP-style labels) gets the soft target as well
    assert soft_sharp_distillation(z, old, lab(1, 255, 255)).item() == pytest.approx(soft0, rel=1e-6)


def test_entropy_sharpening_by_hand():
    z = logits((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (5.0, 5.0, 5.0))
    p = softmax(1, 2, 3)
    h0 = -sum(v * math.log(v) for v in p)
    assert entropy_sharpening(z, lab(0, 1, 255) != 255).item() == pytest.approx((h0 + math.log(3)) / 2, rel=1e-6)


def test_relation_by_hand_and_no_gradient_to_new_channels():
    z = logits((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (2.0, 0.0, 1.0), (0.0, 0.0, 9.0), grad=True)
    old = logits((0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (4.0, 0.0))
    y = lab(0, 1, 1, 2)  # the last pixel is a new class: not in any old class's mean
    w = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]])
    # background: one pixel, student old-channel softmax softmax(1, 2) vs teacher softmax(0, 1)
    ce0 = cross(softmax(0, 1), softmax(1, 2))
    # class 1: means over pixels 1 and 2, omega = (2 + 4) / 2
    t1 = [(a + b) / 2 for a, b in zip(softmax(1, 0), softmax(0, 0))]
    p1 = [(a + b) / 2 for a, b in zip(softmax(0, 0), softmax(2, 0))]
    expected = (1 * ce0 + 3 * cross(t1, p1)) / 2
    value = relation_distillation(z, old, y, w)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert z.grad[:, 2].abs().max() == 0 and z.grad[:, :2].abs().sum() > 0


def test_distillation_terms_finite_without_valid_pixels():
    z = logits((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), grad=True)
    old = logits((0.0, 1.0), (3.0, 0.0))
    none = lab(255, 255)
    values = [soft_sharp_distillation(z, old, none), entropy_sharpening(z, none != 255),
              relation_distillation(z, old, none, torch.zeros(1, 1, 2))]
    for v in values:
        assert torch.isfinite(v) and v.item() == 0.0
    sum(values).backward()
    assert torch.isfinite(z.grad).all()


# --- prototypical pseudo re-labelling ----------------------------------------------------------

def test_prototype_relabel_by_hand():
    # n_old = 3 (background, a, b), new class 3; prototypes a = (1, 0), b = (0, 1)
    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    old = logits((0, 5, 0), (0, 0, 5), (5, 0, 0), (0, 5, 0), (0, 0, 5), (0, 5, 0), (1, 0, 0))
    feats = logits((1.0, 0.2), (1.0, 0.5), (0.0, 1.0), (1.0, 0.0), (0.1, 1.0), (3.0, 0.0), (0.0, 1.0))
    gt = lab(0, 0, 0, 3, 0, 0, 0)
    plop = lab(1, 2, 0, 3, 2, 255, 255)  # PLOP's entropy test rejected pixels 5 and 6
    out = prototype_relabel(gt, plop, old, feats, protos, 0.5)
    # 0: a, nearest a, cos 0.98 -> a; 1: b but nearest a -> 255; 2: PLOP kept it as background -> 0;
    # 3: GT new class is never overwritten; 4: b, nearest b -> b; 5: entropy test failed -> 255;
    # 6: the old model says background but the entropy test failed -> 255, not background
    assert out.flatten().tolist() == [1, 255, 0, 3, 2, 255, 255]
    # the similarity threshold: cos(pixel 0, a) = 1 / sqrt(1.04) = 0.981
    assert prototype_relabel(gt, plop, old, feats, protos, 0.99).flatten().tolist() == [255, 255, 0, 3, 2, 255, 255]
    # a class without a prototype (zero row) is never nearest
    unseen = protos.clone()
    unseen[2] = 0
    assert prototype_relabel(gt, plop, old, feats, unseen, 0.5).flatten().tolist() == [1, 255, 0, 3, 255, 255, 255]


def test_prototype_relabel_only_touches_background():
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([0, 0, 3, 4, 255])[torch.randint(0, 5, (2, 8, 8), generator=g)]
    old = torch.randn(2, 3, 8, 8, generator=g) * 3
    feats = torch.randn(2, 4, 4, 4, generator=g)  # lower resolution: similarities are upsampled
    protos = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    plop = torch.where(gt == 0, old.argmax(1), gt)
    out = prototype_relabel(gt, plop, old, feats, protos, -1.0)
    bg = (gt < 3) & (gt != 255)
    assert torch.equal(out[~bg], gt[~bg])  # new classes and 255 kept
    assert set(out[bg].unique().tolist()) <= {0, 1, 2, 255}
    assert (out[bg] == old.argmax(1)[bg]).sum() > 0  # something was re-labelled


def test_class_feature_sums_map_pixels_to_their_cell():
    feats = torch.tensor([[[[10.0, 100.0]]]])  # N=1, D=1, one row of two cells
    pred = torch.tensor([[[1, 1, 2]]])  # three pixels: columns 0, 1 fall in cell 0, column 2 in cell 1
    mask = torch.tensor([[[True, True, True]]])
    assert _class_feature_sums(feats, pred, mask, 3).flatten().tolist() == [0.0, 20.0, 100.0]
    mask[0, 0, 0] = False
    assert _class_feature_sums(feats, pred, mask, 3).flatten().tolist() == [0.0, 10.0, 100.0]


class ControlledOld(nn.Module):
    """Old model whose outputs are read off the input: channels 0-2 x 10 are the logits, channels
    3-4 average-pooled 2x2 are the 'stage4' features."""

    def forward(self, x: torch.Tensor, features: bool = False):
        z = 10 * x[:, :3]
        return Outputs(z, {"stage4": F.avg_pool2d(x[:, 3:5], 2)}) if features else z


def controlled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, 5, 4, 4)
    pred = torch.tensor([[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 2, 2], [1, 1, 2, 2]])
    x[0, :3] = F.one_hot(pred, 3).permute(2, 0, 1).float()
    x[0, :3, 0, 0] = torch.tensor([0.0, 0.01, 0.0])  # class 1 but uncertain: out of the prototype
    cells = {(0, 0): (1.0, 0.0), (0, 1): (3.0, 4.0), (1, 0): (0.0, 2.0), (1, 1): (4.0, 3.0)}
    for (i, j), (a, b) in cells.items():
        x[0, 3, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = a
        x[0, 4, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = b
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 2:, :2] = 3  # cell (1, 0) is a GT new class: never in a prototype
    y[0, 2, 2:] = 255  # half of cell (1, 1) is ignored
    return x, y


def test_prototypes_from_a_controlled_old_model():
    calls = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t * 2  # two identical ranks: the direction, hence the prototype, does not change

    m = build_method("gsc", {"pod": False})
    m.prepare(context(old=ControlledOld(), batches=lambda: iter([controlled_batch()]), all_reduce=all_reduce))
    assert m.feature_names == ("stage4",)
    assert torch.Size([N_OLD, 2]) in calls
    # class 1: 3 of cell (0,0)'s pixels (one is uncertain) with feature (1, 0) and 2 of cell (0,1)'s
    # with (3, 4) / 5; class 2: 2 pixels of cell (0,1) and the 2 non-ignored of cell (1,1), (4, 3) / 5
    a = [3 * 1.0 + 2 * 0.6, 3 * 0.0 + 2 * 0.8]
    b = [2 * 0.6 + 2 * 0.8, 2 * 0.8 + 2 * 0.6]
    unit = [[v / math.hypot(*r) for v in r] for r in (a, b)]
    assert m.prototypes[0].tolist() == [0.0, 0.0]
    assert m.prototypes[1:].tolist() == [pytest.approx(unit[0], rel=1e-5), pytest.approx(unit[1], rel=1e-5)]


# --- the method --------------------------------------------------------------------------------

class FakeOld(nn.Module):
    """Fixed 1x1 convs: logits and a 'stage4'/'aspp' feature at half resolution."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = nn.Conv2d(3, N_OLD, 1, bias=False)
        self.feat = nn.Conv2d(3, 6, 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(N_OLD, 3, 1, 1, generator=g) * 3)
            self.feat.weight.copy_(torch.randn(6, 3, 1, 1, generator=g))

    def forward(self, x: torch.Tensor, features: bool = False):
        z = self.head(x)
        f = F.avg_pool2d(self.feat(x), 2)
        return Outputs(z, {"stage4": f, "aspp": f}) if features else z


def context(step: int = 1, old: nn.Module | None = None, **kwargs) -> StepContext:
    return step_context(step, old or FakeOld(), **kwargs)


outputs = partial(random_outputs, scale=3.0)  # GSC's sharpening and relation terms want confident logits


def test_step0_is_plain_ce():
    m = build_method("gsc", {})
    assert m.init_new_heads and m.name == "gsc"
    m.prepare(context(step=0))
    assert not m.needs_old_model and m.feature_names == ()
    out = outputs(N_OLD, True, 0)
    y = step0_labels()
    terms = m.losses(TrainBatch(images(0), y, out, None))
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(cross_entropy(out.logits, y, "all").item())


def test_all_terms_and_switches():
    base = {"proto_threshold": -1.0}  # the fake features are random: accept any nearest prototype
    m = build_method("gsc", base)
    m.prepare(context())
    assert m.needs_old_model
    assert m.feature_names == ("stage1", "stage2", "stage3", "stage4", "aspp", "logits_lowres")
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    terms = m.losses(TrainBatch(images(0), labels(), out, old))
    assert set(terms) == {"ce", "soft", "sharp", "relation", "pod"}
    for v in terms.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
    sum(terms.values()).backward()
    assert torch.isfinite(out.logits.grad).all() and out.logits.grad.abs().sum() > 0
    full = {k: v.item() for k, v in terms.items()}

    def run(**opts) -> dict[str, float]:
        mm = build_method("gsc", {**base, **opts})
        mm.prepare(context())
        batch = TrainBatch(images(0), labels(), outputs(N_TOTAL, True, 1), old)
        return {k: v.item() for k, v in mm.losses(batch).items()}

    for name in ("soft", "sharp", "relation", "pod"):
        off = run(**{name: False})
        assert off == pytest.approx({k: v for k, v in full.items() if k != name}, rel=1e-6)
    # compensation and pseudo change the CE (and, through the weights or labels, the relation term)
    for name in ("compensation", "pseudo"):
        off = run(**{name: False})
        assert set(off) == set(full) and off["ce"] != pytest.approx(full["ce"])
        assert off["relation"] != pytest.approx(full["relation"])
    # weights scale their terms linearly
    scaled = run(soft_weight=0.6, sharp_weight=0.2, relation_weight=1.0)
    for name in ("soft", "sharp", "relation"):
        assert scaled[name] == pytest.approx(2 * full[name], rel=1e-5)
    # without POD and pseudo-labels only the old logits are needed
    mm = build_method("gsc", {"pod": False, "pseudo": False})
    mm.prepare(context())
    assert mm.feature_names == () and mm.prototypes is None
    batch = TrainBatch(images(0), labels(), outputs(N_TOTAL, True, 1), Outputs(old.logits))
    assert set(mm.losses(batch)) == {"ce", "soft", "sharp", "relation"}


def test_terms_finite_without_valid_pixels():
    m = build_method("gsc", {})
    m.prepare(context())
    out, old = outputs(N_TOTAL, True, 3), outputs(N_OLD, False, 4)
    terms = m.losses(TrainBatch(images(0), labels(all_ignored=True), out, old))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert torch.isfinite(out.logits.grad).all()


def test_state_dict_round_trip():
    m = build_method("gsc", {})
    m.prepare(context())
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "modules")
    buf = io.BytesIO()
    torch.save(state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    def no_pass():
        raise AssertionError("prepare should reuse the restored thresholds and prototypes")

    m2 = build_method("gsc", {})
    m2.load_state_dict(state)
    m2.prepare(context(batches=no_pass))
    assert torch.equal(m2.prototypes, m.prototypes) and torch.equal(m2.thresholds, m.thresholds)
    # loaded after prepare, the saved values replace the estimated ones
    m3 = build_method("gsc", {})
    m3.prepare(context())
    m3.prototypes = torch.zeros_like(m.prototypes)
    m3.load_state_dict(state)
    assert torch.equal(m3.prototypes, m.prototypes)
    out, old = outputs(N_TOTAL, False, 5), outputs(N_OLD, False, 6)
    a = m.losses(TrainBatch(images(0), labels(), out, old))
    b = m3.losses(TrainBatch(images(0), labels(), out, old))
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}


def test_options_errors():
    with pytest.raises(CissError, match="unknown option 'lambda_soft'.*soft_weight"):
        build_method("gsc", {"lambda_soft": 0.3})
    with pytest.raises(CissError, match="'proto_feature'.*'stage4', 'aspp'"):
        build_method("gsc", {"proto_feature": "stage3"})
    with pytest.raises(CissError, match="true or false"):
        build_method("gsc", {"compensation": 1})
    with pytest.raises(CissError, match="'relation_weight' of method 'gsc' must not be negative"):
        build_method("gsc", {"relation_weight": -0.5})
    with pytest.raises(CissError, match="'proto_threshold'.*cosine"):
        build_method("gsc", {"proto_threshold": 1.5})
    with pytest.raises(CissError, match="POD weights of method 'gsc'"):
        build_method("gsc", {"pod_weight": -1.0})
    with pytest.raises(CissError, match="method 'gsc' needs the model of step 0"):
        build_method("gsc", {}).prepare(StepContext(step=1, classmap=classmap(1), n_old=N_OLD, model=nn.Identity(),
                                                    old_model=None, device=torch.device("cpu"),
                                                    batches=lambda: iter([])))


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_gsc_keeps_old_classes_where_ft_forgets(tmp_path: Path):
    """Step 0 learns three stuff classes; step 1 adds sand and disk with a high learning rate, where
    every old-class pixel is labelled background. FT forgets the old classes entirely, GSC keeps them."""
    cfg0 = write_config(tmp_path / "c0.toml", size=40, epochs=20)
    cfg1 = write_config(tmp_path / "c1.toml", size=40, epochs=10)
    quiet = lambda s: None
    learn(tmp_path / "base", classes=["sky", "grass", "water"], config_file=cfg0, method="ft", log=quiet)
    step0 = json.loads((tmp_path / "base" / "step-0" / "metrics.json").read_text())["miou_old"]
    old_miou = {}
    for method in ("ft", "gsc"):
        shutil.copytree(tmp_path / "base", tmp_path / method)
        man = learn(tmp_path / method, new_classes=["sand", "disk"], config_file=cfg1, method=method,
                    overrides={"train": {"lr_next": 0.01}}, log=quiet)[-1]
        old_miou[method] = man["metrics"]["miou_old"]
    print(f"old-class mIoU: step 0 {step0:.3f}, after step 1 FT {old_miou['ft']:.3f}, GSC {old_miou['gsc']:.3f}")
    assert old_miou["gsc"] > old_miou["ft"] + 0.2
    assert old_miou["gsc"] > 0.6 * step0


def test_adaptive_factor_is_plops_and_ignores_the_prototype_test():
    """ν is the share of background pixels PLOP's entropy test accepts (FBL/PLOP); the pixels the
    prototype test then rejects are ignored by the CE but do not lower the image's factor."""
    opts = {"compensation": False, "soft": False, "sharp": False, "relation": False, "pod": False,
            "proto_threshold": 0.9}
    m = build_method("gsc", opts)
    m.prepare(context())
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    ce = m.losses(TrainBatch(images(0), y, out, old))["ce"]
    plop_target, nu = pseudo_label(y, old.logits, m.thresholds, N_TOTAL, "median", empty_factor=1.0)
    target = prototype_relabel(y, plop_target, old.logits, old.features["stage4"], m.prototypes, 0.9)
    background = (y < N_OLD) & (y != 255)
    kept = (background & (target != 255)).flatten(1).sum(1) / background.flatten(1).sum(1)
    assert not torch.allclose(kept.float(), nu)  # the prototype test rejected some accepted pixels
    per_pixel = pixel_cross_entropy(out.logits, target) * nu[:, None, None]
    assert ce.item() == pytest.approx(reduce_pixels(per_pixel, target != 255, "all").item(), rel=1e-6)


def test_unknown_kd_distils_the_pixels_both_tests_leave_unlabelled():
    """unknown_kd_weight: MiB's unbiased KD (α = 1) on the GT-background pixels left at 255 after the
    entropy and the prototype tests, averaged over all pixels and times the weight; its gradient
    touches no labelled pixel, and the other terms do not change."""
    opts = {"proto_threshold": 0.9}
    m, plain = build_method("gsc", {**opts, "unknown_kd_weight": 10.0}), build_method("gsc", opts)
    m.prepare(context())
    plain.prepare(context())
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    terms = m.losses(TrainBatch(images(0), y, out, old))
    plop_target, _ = pseudo_label(y, old.logits, m.thresholds, N_TOTAL, "median", empty_factor=1.0)
    target = prototype_relabel(y, plop_target, old.logits, old.features["stage4"], m.prototypes, 0.9)
    unknown = (y < N_OLD) & (y != 255) & (target == 255)
    assert unknown.any() and (unknown & (plop_target != 255)).any()  # the prototype test's rejections count
    z, t = out.logits.detach().double(), torch.softmax(old.logits.double(), 1)
    q = torch.softmax(z, 1)
    merged = torch.cat([q[:, :1] + q[:, N_OLD:].sum(1, keepdim=True), q[:, 1:N_OLD]], 1)
    per_pixel = -(t * merged.log()).sum(1) / N_OLD
    assert terms["unknown_kd"].item() == pytest.approx(10 * per_pixel[unknown].sum().item() / y.numel(), rel=1e-5)
    kept = plain.losses(TrainBatch(images(0), y, outputs(N_TOTAL, True, 1), old))
    assert set(terms) == set(kept) | {"unknown_kd"}
    for name, value in kept.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6)
    terms["unknown_kd"].backward()
    touched = out.logits.grad.abs().sum(1) > 0
    assert torch.equal(touched, unknown)
    with pytest.raises(CissError, match="unknown_kd_weight.*must not be negative"):
        build_method("plop", {"unknown_kd_weight": -1.0})


def test_agreed_old_labels_replace_both_tests():
    """old_labels = "agreed" (a reference on data.labels = "seen"): no thresholds or prototypes are
    estimated; the CE reads the old model's call where it is the true class and ignores the rest, ν is
    the share kept, and the unknown KD covers exactly the wrong calls. Refused without pseudo."""
    opts = {"compensation": False, "soft": False, "sharp": False, "relation": False, "pod": False,
            "old_labels": "agreed", "unknown_kd_weight": 10.0}
    m = build_method("gsc", opts)
    assert m.needs_seen_labels and not build_method("gsc", {}).needs_seen_labels
    m.prepare(context())
    assert m.thresholds is None and m.prototypes is None and m.feature_names == ()
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    y[0, 5:, :3] = 1  # old classes as data.labels = "seen" gives them
    y[1, 6:, :2] = 2
    terms = m.losses(TrainBatch(images(0), y, out, old))
    target = agreed_labels(y, old.logits, background=True)
    wrong = (y < N_OLD) & (target == 255)
    assert wrong.any() and ((target >= 1) & (target < N_OLD)).any()  # both kinds of old-class pixel occur
    nu = accepted_share(y, target, N_OLD, 1.0)
    per_pixel = pixel_cross_entropy(out.logits, target) * nu[:, None, None]
    assert terms["ce"].item() == pytest.approx(reduce_pixels(per_pixel, target != 255, "all").item(), rel=1e-6)
    terms["unknown_kd"].backward()
    assert torch.equal(out.logits.grad.abs().sum(1) > 0, wrong)
    with pytest.raises(CissError, match="old_labels.*needs gsc.pseudo.*--no gsc.pseudo"):
        build_method("gsc", {"old_labels": "agreed", "pseudo": False})


def test_soft_and_sharp_keep_fbls_one_over_c():
    """FBL's soft-label and entropy terms are averaged over the C channels; its weights assume it."""
    m = build_method("gsc", {"proto_threshold": -1.0})
    m.prepare(context())
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    y = labels()
    terms = m.losses(TrainBatch(images(0), y, out, old))
    soft = soft_sharp_distillation(out.logits, old.logits, y)
    sharp = entropy_sharpening(out.logits, y != 255)
    assert terms["soft"].item() == pytest.approx(0.3 / N_TOTAL * soft.item(), rel=1e-6)
    assert terms["sharp"].item() == pytest.approx(0.1 / N_TOTAL * sharp.item(), rel=1e-6)
