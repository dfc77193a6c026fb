"""Methods on tiny fake batches: named finite terms, gradients, PLOP's thresholds, the registry."""

from __future__ import annotations

import json

import math

import pytest
import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.methods import METHODS, build_method, load_presets, method_options
from ciss.trainer.methods.base import TrainBatch
from ciss.trainer.methods.losses import plop_uncertainty, pseudo_label, quantile_thresholds
from ciss.trainer.models.outputs import Outputs
from method_fixtures import N_OLD, N_TOTAL, context, images, labels, outputs, step0_labels

class FakeOld(nn.Module):
    """A fixed 1x1 conv old model with n_old outputs."""

    def __init__(self, n_old: int = N_OLD):
        super().__init__()
        self.conv = nn.Conv2d(3, n_old, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(n_old, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, features: bool = False):
        return self.conv(x)


def check_terms(terms: dict[str, torch.Tensor], names: set[str], out: Outputs) -> None:
    assert set(terms) == names
    for v in terms.values():
        assert v.dim() == 0 and torch.isfinite(v)
    sum(terms.values()).backward()
    assert out.logits.grad is not None and torch.isfinite(out.logits.grad).all()
    assert out.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ft", "joint"])
def test_ft_and_joint(name):
    m = build_method(name, {})
    assert m.name == name and not m.needs_old_model and not m.init_new_heads and m.feature_names == ()
    m.prepare(context(step=0))
    out = outputs(N_OLD, True, 0)
    check_terms(m.losses(TrainBatch(images(0), step0_labels(), out, None)), {"ce"}, out)


def test_mib_step0_and_step1():
    m = build_method("mib", {})
    assert m.init_new_heads
    m.prepare(context(step=0))
    assert not m.needs_old_model
    out = outputs(N_OLD, True, 0)
    check_terms(m.losses(TrainBatch(images(0), step0_labels(), out, None)), {"ce"}, out)

    m = build_method("mib", {"kd_weight": 100})
    m.prepare(context(step=1, old=FakeOld()))
    assert m.needs_old_model
    out, old = outputs(N_TOTAL, True, 1), outputs(N_OLD, False, 2)
    terms = m.losses(TrainBatch(images(0), labels(), out, old))
    unweighted = build_method("mib", {"kd_weight": 1.0}).losses(TrainBatch(images(0), labels(), out, old))
    assert terms["kd"].item() == pytest.approx(100 * unweighted["kd"].item(), rel=1e-5)
    check_terms(terms, {"ce", "kd"}, out)


def test_mib_kd_can_leave_out_the_new_class_pixels():
    """kd_on_new = false: no distillation gradient where this step's classes are labelled, the same
    gradient as MiB's everywhere else (the mean still runs over all pixels)."""
    old = outputs(N_OLD, False, 2)
    grads = {}
    for kd_on_new in (True, False):
        out = outputs(N_TOTAL, True, 1)
        build_method("mib", {"kd_on_new": kd_on_new}).losses(TrainBatch(images(0), labels(), out, old))["kd"].backward()
        grads[kd_on_new] = out.logits.grad.permute(0, 2, 3, 1)
    new = (labels() >= N_OLD) & (labels() != 255)
    assert new.any() and grads[False][new].abs().max().item() == 0.0
    assert grads[True][new].abs().max().item() > 0
    assert torch.allclose(grads[False][~new], grads[True][~new])


def test_mib_needs_the_old_model_at_step1():
    with pytest.raises(CissError, match="needs the model of step 0"):
        build_method("mib", {}).prepare(context(step=1, old=None))


@pytest.mark.parametrize("name", ["ft", "mib", "plop"])
def test_terms_finite_without_valid_pixels(name):
    m = build_method(name, {})
    ctx = context(step=1, old=FakeOld())
    m.prepare(ctx)
    out, old = outputs(N_TOTAL, True, 3), outputs(N_OLD, False, 4)
    terms = m.losses(TrainBatch(images(0), labels(all_ignored=True), out, old if name != "ft" else None))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert torch.isfinite(out.logits.grad).all()


def test_plop_prepare_losses_and_resume():
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        return t

    m = build_method("plop", {"threshold_mode": "plop"})  # the released routine, whatever it gives
    ctx = context(step=1, old=FakeOld(), all_reduce=all_reduce)
    m.prepare(ctx)
    assert m.needs_old_model and m.init_new_heads
    assert m.feature_names == ("stage1", "stage2", "stage3", "stage4", "aspp", "logits_lowres")
    assert len(calls) == 1 and calls[0].shape == (N_OLD, 100) and calls[0].dtype == torch.long
    # 3 batches x 2 images x (64 - 8 ignored - new-class pixels) background pixels were counted
    n_bg = sum(int(((y < N_OLD) & (y != 255)).sum()) for _, y in ctx.batches())
    assert int(m.histogram.sum()) == n_bg
    assert m.thresholds.shape == (N_OLD,) and (m.thresholds >= 0.001).all()

    # on so few pixels the released median walk never stops: every threshold is the 0.001 floor,
    # all background is rejected, nu = 0 and only POD trains (faithful, see plop_median_thresholds)
    assert torch.allclose(m.thresholds, torch.full((N_OLD,), 0.001))
    out, old = outputs(N_TOTAL, True, 5), outputs(N_OLD, False, 6)
    terms = m.losses(TrainBatch(images(0), labels(), out, old))
    assert set(terms) == {"ce", "pod"} and terms["ce"].item() == 0.0 and terms["pod"].item() > 0
    sum(terms.values()).backward()
    assert all(out.features[k].grad is not None for k in m.feature_names)
    # median mode accepts part of the background: the CE trains the logits
    med = build_method("plop", {"threshold_mode": "median"})
    med.prepare(context(step=1, old=FakeOld()))
    out = outputs(N_TOTAL, True, 5)
    check_terms(med.losses(TrainBatch(images(0), labels(), out, old)), {"ce", "pod"}, out)

    # resume: thresholds travel in state_dict as tensors; prepare then makes no pass over the data
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "modules")
    m2 = build_method("plop", {"threshold_mode": "plop"})
    m2.load_state_dict(state)

    def no_pass():
        raise AssertionError("prepare should reuse the restored thresholds")

    m2.prepare(context(step=1, old=FakeOld(), batches=no_pass))
    assert torch.equal(m2.thresholds, m.thresholds)
    # loaded after prepare, the saved thresholds replace the estimated ones
    m3 = build_method("plop", {"threshold_mode": "plop"})
    m3.prepare(context(step=1, old=FakeOld()))
    m3.thresholds = torch.ones(N_OLD)
    m3.load_state_dict(state)
    assert torch.equal(m3.thresholds, m.thresholds)


def test_plop_median_mode_thresholds_match_exact_medians():
    m = build_method("plop", {"threshold_mode": "median", "threshold_bins": 1000, "threshold_floor": 0.0})
    ctx = context(step=1, old=FakeOld())
    m.prepare(ctx)
    values = {c: [] for c in range(N_OLD)}
    for x, y in ctx.batches():
        z = FakeOld()(x)
        u, pred = plop_uncertainty(z, N_TOTAL, "median"), z.argmax(1)
        bg = (y < N_OLD) & (y != 255)
        for c in range(N_OLD):
            values[c] += u[bg & (pred == c)].tolist()
    for c, vs in values.items():
        if vs:
            exact = float(torch.tensor(vs).median())
            assert m.thresholds[c].item() == pytest.approx(exact, abs=2e-3)
    assert torch.equal(m.thresholds, quantile_thresholds(m.histogram, 0.5, 0.0))


def test_plop_unknown_pixels_as_not_new():
    """PLOP with unknown = "not_new": the pixels its entropy test rejects add MiB's −log(q_bg + q_old)."""
    opts = {"threshold_mode": "median", "pod_weight": 0.0, "pod_logits_weight": 0.0, "adaptive_factor": False}
    m, plain = build_method("plop", {**opts, "unknown": "not_new"}), build_method("plop", opts)
    ctx = context(step=1, old=FakeOld())
    m.prepare(ctx)
    plain.prepare(ctx)
    out, old, y = outputs(N_TOTAL, True, 5), outputs(N_OLD, False, 6), labels()
    target, _ = pseudo_label(y, old.logits, m.thresholds, N_TOTAL, "median")
    unknown = (y < N_OLD) & (target == 255)
    assert unknown.any()
    z = out.logits.detach()
    extra = -(torch.logsumexp(z[:, :N_OLD], 1) - torch.logsumexp(z, 1))[unknown].sum() / y.numel()  # "all"
    got = m.losses(TrainBatch(images(0), y, out, old))["ce"].item()
    assert got == pytest.approx(plain.losses(TrainBatch(images(0), y, out, old))["ce"].item() + extra.item(), rel=1e-5)


def test_plop_step0_is_plain_ce():
    m = build_method("plop", {})
    m.prepare(context(step=0))
    assert not m.needs_old_model and m.feature_names == ()
    out = outputs(N_OLD, True, 0)
    check_terms(m.losses(TrainBatch(images(0), step0_labels(), out, None)), {"ce"}, out)
    assert m.state_dict()["thresholds"].numel() == 0


def test_plop_pod_schedule_and_weights():
    base = {"pod_logits_weight": 0.0}
    out, old = outputs(N_TOTAL, False, 7), outputs(N_OLD, False, 8)
    vals = {}
    for sched in (True, False):
        m = build_method("plop", {**base, "pod_schedule": sched})
        m.prepare(context(step=1, old=FakeOld()))
        vals[sched] = m.losses(TrainBatch(images(0), labels(), out, old))["pod"].item()
    assert vals[True] == pytest.approx(vals[False] * math.sqrt(N_TOTAL / (N_TOTAL - N_OLD)), rel=1e-5)
    m = build_method("plop", {"pod_weight": 0.0, "pod_logits_weight": 0.0})
    m.prepare(context(step=1, old=FakeOld()))
    assert m.feature_names == ()
    assert set(m.losses(TrainBatch(images(0), labels(), out, Outputs(old.logits)))) == {"ce"}


def test_registry_and_presets():
    assert set(METHODS) == {"ft", "joint", "mib", "plop", "gsc", "idec"}
    presets = load_presets()
    for name, cls in METHODS.items():
        assert presets[name] == cls.defaults, f"configs/methods.toml [{name}] must list every option"
    assert method_options("mib", {"kd_weight": 100})["kd_weight"] == 100.0
    assert build_method("MiB", {"alpha": 2}).options["alpha"] == 2.0


def test_build_method_errors():
    with pytest.raises(CissError, match="unknown method 'nosuch'.*ft, gsc, idec, joint, mib, plop"):
        build_method("nosuch", {})
    with pytest.raises(CissError, match="'kd_wieght'.*valid options: alpha, kd_on_new, kd_weight, reduction"):
        build_method("mib", {"kd_wieght": 10})
    with pytest.raises(CissError, match="'reduction'.*'valid', 'all'"):
        build_method("ft", {"reduction": "sum"})
    with pytest.raises(CissError, match="must be a number"):
        build_method("mib", {"kd_weight": "ten"})
    with pytest.raises(CissError, match="true or false"):
        build_method("plop", {"pod_schedule": 1})
    with pytest.raises(CissError, match="positive integers"):
        build_method("plop", {"pod_scales": [1, 0]})


def test_plop_pod_preset_is_blind_to_the_feature_scale():
    """The preset's Local POD compares L2-normalised embeddings: scaling both models' features by 10
    leaves it unchanged (raw POD grows 100-fold, and its gradient with it)."""
    m = build_method("plop", {})
    m.prepare(context(step=1, old=FakeOld()))
    out, old = outputs(N_TOTAL, False, 7), outputs(N_OLD, False, 8)

    def scaled(o: Outputs, k: float) -> Outputs:
        return Outputs(o.logits, {n: f * k for n, f in o.features.items()})

    pod = [m.losses(TrainBatch(images(0), labels(), scaled(out, k), scaled(old, k)))["pod"].item() for k in (1, 10)]
    assert pod[1] == pytest.approx(pod[0], rel=1e-4) and pod[0] > 0


def test_every_method_defaults_to_one_reduction():
    """A comparison run averages every method's CE the same way (MiB/PLOP's mean over all pixels)."""
    assert {name: build_method(name, {}).options["reduction"] for name in METHODS} == dict.fromkeys(METHODS, "all")


def test_plop_auto_thresholds_fall_back_to_the_median_where_the_released_routine_breaks():
    """On the fake old model the released routine gives every class the 0.001 floor (all background
    rejected); the default "auto" mode detects it, runs the median routine and says so."""
    from ciss.trainer.methods.plop import degenerate_classes

    plop = build_method("plop", {"threshold_mode": "plop"})
    plop.prepare(context(step=1, old=FakeOld()))
    assert plop.report()["thresholds_from"] == "plop" and plop.report()["degenerate_classes"] == []
    auto = build_method("plop", {})
    auto.prepare(context(step=1, old=FakeOld()))
    median = build_method("plop", {"threshold_mode": "median"})
    median.prepare(context(step=1, old=FakeOld()))
    report = auto.report()
    assert report["threshold_mode"] == "auto" and report["thresholds_from"] == "median"
    assert report["degenerate_classes"] == [c for c in range(N_OLD) if auto.histogram[c].sum() > 0]
    assert torch.equal(auto.thresholds, median.thresholds) and auto.mode == "median"
    assert json.loads(json.dumps(report)) == report
    # the CE now trains: part of the background is accepted
    out, old = outputs(N_TOTAL, True, 5), outputs(N_OLD, False, 6)
    assert auto.losses(TrainBatch(images(0), labels(), out, old))["ce"].item() > 0
    # resume keeps the routine that ran
    again = build_method("plop", {})
    again.load_state_dict(auto.state_dict())
    again.prepare(context(step=1, old=FakeOld(), batches=lambda: iter(())))
    assert again.report() == report
    # what counts as degenerate: inf, the floor, above every possible u; classes without pixels never
    top = 1 / (4 * math.log(6))
    t = torch.tensor([float("inf"), 0.001, top, top / 2])
    assert degenerate_classes(t, torch.tensor([5, 5, 5, 5]), 4, 6, 0.001) == [0, 1, 2]
    assert degenerate_classes(t, torch.tensor([0, 5, 0, 5]), 4, 6, 0.001) == [1]


def test_agreed_labels_keep_an_old_label_only_where_the_old_model_calls_it():
    from ciss.trainer.methods.losses import agreed_labels

    # One image of 1x6 pixels: background (old says 1), old 1 (agreed), old 1 (old says 2), old 2
    # (agreed), new 3 (old says 1), ignored. The old model has background + 2 old classes.
    y = torch.tensor([[[0, 1, 1, 2, 3, 255]]])
    calls = torch.tensor([1, 1, 2, 2, 1, 0])
    old = torch.nn.functional.one_hot(calls, N_OLD).T.float().reshape(1, N_OLD, 1, 6)
    assert agreed_labels(y, old).tolist() == [[[0, 1, 255, 2, 3, 255]]]
    # IDEC's reference gates background too, and marks the wrong calls with its unknown id
    assert agreed_labels(y, old, fill=9, background=True).tolist() == [[[9, 1, 9, 2, 3, 255]]]


def test_ft_with_agreed_old_labels_runs_the_old_model_and_trains_on_the_gated_labels():
    from ciss.trainer.methods.losses import agreed_labels, cross_entropy

    assert not build_method("ft", {}).needs_seen_labels
    m = build_method("ft", {"old_labels": "agreed"})
    assert m.needs_seen_labels
    m.prepare(context(step=0))
    assert not m.needs_old_model  # step 0 has no old model to ask
    m = build_method("ft", {"old_labels": "agreed"})
    m.prepare(context(step=1, old=FakeOld()))
    assert m.needs_old_model
    y = labels()
    y[0, 5:, :3] = 1  # old classes as data.labels = "seen" gives them
    y[1, 6:, :2] = 2
    out, old = outputs(N_TOTAL, True, 3), outputs(N_OLD, False, 4)
    gated = agreed_labels(y, old.logits)
    assert (gated == 255).sum() > (y == 255).sum()  # the random old model disagrees somewhere
    terms = m.losses(TrainBatch(images(0), y, out, old))
    check_terms(terms, {"ce"}, out)
    assert torch.allclose(terms["ce"], cross_entropy(out.logits, gated, "all"))
    assert not torch.allclose(terms["ce"], cross_entropy(out.logits, y, "all"))
