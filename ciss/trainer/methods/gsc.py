"""GSC: Gradient-Semantic Compensation (Cong et al., IEEE TMM 2024, arXiv 2307.10822), reconstructed.

The paper's code is not public. This follows shared/research/methods.md section 2: the abstract fixes
the three components; their formulas come from FBL (JiahuaDong/FISS, same group) where it has them
and are our decisions elsewhere (docs/methods.md gives each part's provenance). GSC sits on FBL's
base, which is PLOP's pipeline, so the class extends `PLOP` and reuses its entropy thresholds,
adaptive factor, Local POD and resume logic.

Step 0: plain cross-entropy. Steps t > 0, every part switchable by an option:
- pseudo: prototypical pseudo re-labelling. PLOP's entropy labels, then a GT-background pixel keeps
  old class ĉ only when its old-model feature is nearest (cosine) to ĉ's prototype with similarity
  >= proto_threshold; a pixel PLOP's entropy labels keep as background stays background, the rest
  is 255, so the prototype test only ever removes labels from PLOP's. Off: PLOP's entropy labels alone.
- compensation: the CE of each pixel × w, the gradient magnitude at its target (1 − p_ỹ) raised to
  κ = n_old / n_total and divided by its mean over the pixels of classes from the same step, clamped
  to [0.5, 1.2] as HFC does (1 for this step's classes and, unless compensate_background, for
  background).
- soft: CE towards a soft-sharp target (old softmax on old channels, one-hot on a GT new class);
  sharp: entropy sharpening; both divided by the number of classes as FBL's are; relation:
  class-mean old-class distributions match the old model's.
- pod: PLOP's Local POD.
old_labels = "agreed" is a reference, not the method: on data.labels = "seen" both tests are replaced
by the best gate the old model allows, its call kept wherever it is right and ignored wherever it is
wrong; ν is then the share kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ciss.classmap import IGNORE
from ciss.errors import CissError
from ciss.trainer.methods.base import StepContext, TrainBatch, restored, saved
from ciss.trainer.methods.losses import (OLD_LABEL_SOURCES, accepted_share, agreed_labels,
                                         pixel_cross_entropy_not_new, plop_uncertainty, pseudo_label, reduce_pixels)
from ciss.trainer.methods.plop import PLOP, POD_FEATURES, POD_LOGITS
from ciss.trainer.models.features import DECODER, STAGE4

PROTO_FEATURES = (STAGE4, DECODER)


# --- loss terms (pure functions) -----------------------------------------------------------------

def compensation_weights(logits: torch.Tensor, target: torch.Tensor, class_steps: torch.Tensor, step: int,
                         background: bool = False, bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """Step-aware gradient compensation weights (N,H,W), constants.

    g = 1 − softmax(z)_ỹ is |∂CE/∂z_ỹ|; ĝ = g^κ with κ = |C^{0:t−1}| / |C^{0:t}| (background counted)
    lifts small gradients. For a pixel of an earlier step's class, w = ĝ / mean of ĝ over the pixels
    whose class came in the same step (disjoint groups), clamped to `bounds` when given; this step's
    classes get 1, ignored pixels 0. Background pixels get 1 and stay out of step 0's mean unless
    `background`. `class_steps[c]` is the step that introduced class c.
    """
    with torch.no_grad():
        valid = target != IGNORE
        y = torch.where(valid, target, torch.zeros_like(target))
        p = torch.softmax(logits.detach().float(), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        steps = class_steps.to(y.device)
        kappa = int((steps < step).sum()) / steps.numel()
        g = (1 - p).clamp(min=0).pow(kappa)
        group = steps[y]
        fixed = group == step if background else (group == step) | (y == 0)
        grouped = valid & ~fixed
        sums = g.new_zeros(step + 1).index_add_(0, group[grouped], g[grouped])
        counts = torch.bincount(group[grouped], minlength=step + 1)
        mean = sums / counts.clamp(min=1)
        w = g / mean[group].clamp(min=1e-12)
        if bounds is not None:
            w = w.clamp(*bounds)
        w = torch.where(fixed, torch.ones_like(g), w)
        return torch.where(valid, w, torch.zeros_like(w))


def soft_sharp_distillation(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy −Σ_c T_c log softmax(z)_c towards a soft-sharp target T, averaged over the
    pixels whose ground truth is not 255.

    Sharp: T is one-hot on a pixel whose ground truth is a new class (the old model calls it
    background). Soft elsewhere: T is the old model's softmax on the old channels and 0 on the new
    ones (the ground truth says the pixel is none of them). T is never materialised.
    """
    n_old = old_logits.shape[1]
    log_p = torch.log_softmax(logits.float(), dim=1)
    soft = -(torch.softmax(old_logits.detach().float(), dim=1) * log_p[:, :n_old]).sum(dim=1)
    valid = labels != IGNORE
    new = valid & (labels >= n_old)
    sharp = -log_p.gather(1, torch.where(new, labels, torch.zeros_like(labels)).unsqueeze(1)).squeeze(1)
    per_pixel = torch.where(new, sharp, soft)
    return reduce_pixels(per_pixel * valid, valid, "valid")


def entropy_sharpening(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) (nats), averaged over the pixels in `mask`."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    per_pixel = -(log_p.exp() * log_p).sum(dim=1)
    return reduce_pixels(per_pixel * mask, mask, "valid")


def relation_distillation(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Class-level relations among the old classes.

    For each old class c among `labels` (background included): ω_c · CE(T̄_c, P̄_c), where T̄_c is
    the mean of the old model's softmax and P̄_c the mean of the student's softmax over the *old*
    channels, both over the pixels labelled c, and ω_c the mean of `weights` there; averaged over
    the classes present. New channels get no gradient: the old model knows no relation to them.
    """
    n_old = old_logits.shape[1]
    valid = (labels != IGNORE) & (labels < n_old)
    y = labels[valid]
    p = torch.softmax(logits[:, :n_old].float(), dim=1).permute(0, 2, 3, 1)[valid]
    t = torch.softmax(old_logits.detach().float(), dim=1).permute(0, 2, 3, 1)[valid]
    counts = torch.bincount(y, minlength=n_old).to(p.dtype)
    per = counts.clamp(min=1)
    p_bar = p.new_zeros(n_old, n_old).index_add(0, y, p) / per[:, None]
    t_bar = t.new_zeros(n_old, n_old).index_add(0, y, t) / per[:, None]
    omega = p.new_zeros(n_old).index_add(0, y, weights[valid].float()) / per
    ce = -(t_bar * torch.log(p_bar.clamp(min=1e-12))).sum(dim=1)
    present = counts > 0
    return (omega * ce * present).sum() / present.sum().clamp(min=1)


def prototype_relabel(labels: torch.Tensor, plop_labels: torch.Tensor, old_logits: torch.Tensor,
                      old_features: torch.Tensor, prototypes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Prototypical pseudo re-labelling; only GT-background pixels change.

    Such a pixel keeps PLOP's label ĉ > 0 (the old model's class, accepted by the entropy test) only
    when its nearest prototype by cosine is ĉ's and that cosine >= `threshold`, else it becomes 255.
    PLOP's background (0) and ignored (255) labels stay as they are, so the prototype test only
    narrows PLOP's labels and never trains as background a pixel PLOP ignores. `prototypes`
    (n_old, D) has unit rows; zero rows (background, classes never seen) are never nearest. Features
    are L2-normalised, compared at their own resolution and the similarities upsampled bilinearly
    to the labels'.
    """
    n_old = old_logits.shape[1]
    with torch.no_grad():
        protos = prototypes[1:].to(old_features.device, torch.float32)
        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(old_features.float(), dim=1), protos)
        known = protos.norm(dim=1) > 0
        cos = torch.where(known[None, :, None, None], cos, torch.full_like(cos, -2.0))
        cos = F.interpolate(cos, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        best, nearest = cos.max(dim=1)
        background = (labels < n_old) & (labels != IGNORE)
        old_class = (plop_labels > 0) & (plop_labels != IGNORE)
        confirmed = (nearest + 1 == plop_labels) & (best >= threshold)
        out = torch.where(old_class & ~confirmed, torch.full_like(labels, IGNORE), plop_labels)
        return torch.where(background, out, labels)


def _class_feature_sums(feats: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Σ over the pixels in `mask` of the feature (N,D,h,w) under each pixel (N,H,W), per class `pred`:
    (n_classes, D). A pixel reads the feature cell it falls in (nearest upsampling), computed as
    per-class counts of cells times the features, never at full resolution."""
    n, d, h, w = feats.shape
    H, W = pred.shape[-2:]
    rows = torch.arange(H, device=pred.device) * h // H
    cols = torch.arange(W, device=pred.device) * w // W
    cell = (rows[:, None] * w + cols[None, :]) + torch.arange(n, device=pred.device)[:, None, None] * (h * w)
    index = pred[mask] * (n * h * w) + cell.expand(n, H, W)[mask]
    counts = torch.bincount(index, minlength=n_classes * n * h * w).view(n_classes, n * h * w)
    return counts.to(feats.dtype) @ feats.permute(0, 2, 3, 1).reshape(n * h * w, d)


# --- the method ----------------------------------------------------------------------------------

class GSC(PLOP):
    name = "gsc"
    defaults: dict[str, Any] = {
        **PLOP.defaults,
        "threshold_mode": "median",
        "threshold_quantile": 0.8,
        "compensation": True,
        "compensate_background": False,
        "compensation_min": 0.5,
        "compensation_max": 1.2,
        "soft": True,
        "sharp": True,
        "relation": True,
        "pseudo": True,
        "pod": True,
        "soft_weight": 0.3,
        "sharp_weight": 0.1,
        "relation_weight": 0.5,
        "proto_feature": STAGE4,
        "proto_threshold": 0.5,
        "old_labels": "pseudo",
    }
    choices: dict[str, tuple[str, ...]] = {**PLOP.choices, "proto_feature": PROTO_FEATURES,
                                           "old_labels": OLD_LABEL_SOURCES}

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        for key in ("soft_weight", "sharp_weight", "relation_weight"):
            if o[key] < 0:
                raise CissError(f"option '{key}' of method 'gsc' must not be negative; got {o[key]}")
        if not 0 <= o["compensation_min"] <= 1 <= o["compensation_max"]:
            raise CissError(f"options 'compensation_min' and 'compensation_max' of method 'gsc' bound weights whose "
                            f"mean is 1: need 0 <= min <= 1 <= max; got {o['compensation_min']} and "
                            f"{o['compensation_max']} (e.g. --opt gsc.compensation_max=1.2)")
        if not -1.0 <= o["proto_threshold"] <= 1.0:
            raise CissError(f"option 'proto_threshold' of method 'gsc' is a cosine, in [-1, 1]; "
                            f"got {o['proto_threshold']}")
        if o["old_labels"] == "agreed" and not o["pseudo"]:
            raise CissError("option 'old_labels' of method 'gsc' needs gsc.pseudo (it replaces the pseudo-labels' "
                            "gate): drop --no gsc.pseudo, or leave it at \"pseudo\"")
        # The oracle gate reads the old classes' true labels, which only data.labels = "seen" loads.
        self.needs_seen_labels = self.agreed = o["old_labels"] == "agreed"
        self.prototypes: torch.Tensor | None = None  # (n_old, D) float32 on the CPU, unit or zero rows
        self._class_steps: torch.Tensor | None = None
        self._proto_cache: torch.Tensor | None = None

    # --- once per step -------------------------------------------------------------------------
    def _uses_pod(self) -> bool:
        o = self.options
        return bool(o["pod"]) and (o["pod_weight"] > 0 or o["pod_logits_weight"] > 0)

    def features(self) -> tuple[str, ...]:
        # PLOP._pod reads its layers from feature_names; the prototype feature is one of them.
        if self._uses_pod():
            return POD_FEATURES + (POD_LOGITS,)
        return (self.options["proto_feature"],) if self.options["pseudo"] and not self.agreed else ()

    def setup(self, ctx: StepContext) -> None:
        super().setup(ctx)
        self._class_steps = torch.tensor([c.step for c in ctx.classmap])
        self._proto_cache = None

    def clear_estimates(self) -> None:
        super().clear_estimates()
        self.prototypes = None

    def estimate(self, ctx: StepContext) -> None:
        """PLOP's thresholds, then the prototypes they select pixels for (neither under the oracle gate)."""
        if self.agreed:
            return
        super().estimate(ctx)
        if self.options["pseudo"] and self.prototypes is None:
            self.prototypes = self.estimate_prototypes(ctx)

    @torch.no_grad()
    def estimate_prototypes(self, ctx: StepContext) -> torch.Tensor:
        """One pass of the old model over `ctx.batches()`: a unit prototype per old class (n_old, D) on
        the CPU, the direction of the summed L2-normalised features of the GT-background pixels it
        predicts as that class and passes the entropy test on; zero rows for background and unseen
        classes. Sums are reduced over processes, so every rank gets the same prototypes.
        """
        old = ctx.old_model
        assert old is not None and self.thresholds is not None
        n_old, n_total = ctx.n_old, len(ctx.classmap)
        name, mode = self.options["proto_feature"], self.mode
        tau = self.thresholds.to(ctx.device)
        sums: torch.Tensor | None = None
        was_training = old.training
        old.eval()
        try:
            for images, labels in ctx.batches():
                out = old(images, features=True)
                logits = out.logits.float()
                feats = F.normalize(out.features[name].float(), dim=1)
                if logits.shape[-2:] != labels.shape[-2:]:
                    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
                pred = logits.argmax(dim=1)
                u = plop_uncertainty(logits, n_total, mode)
                confident = (labels < n_old) & (labels != IGNORE) & (pred > 0) & (u < tau[pred])
                part = _class_feature_sums(feats, pred, confident, n_old)
                sums = part if sums is None else sums + part
        finally:
            old.train(was_training)
        if sums is None:
            raise RuntimeError("GSC prototypes: ctx.batches() gave no batch")
        reduced = ctx.all_reduce(sums)
        sums = sums if reduced is None else reduced
        return F.normalize(sums, dim=1).cpu()

    # --- every batch ---------------------------------------------------------------------------
    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        assert self.ctx is not None
        o = self.options
        logits, labels = batch.out.logits, batch.labels
        old, n_old, n_total = batch.old_logits, batch.n_old, logits.shape[1]
        if self._class_steps is None or self._class_steps.numel() != n_total:
            raise RuntimeError("GSC was not prepared for this step's classes: call prepare() before losses()")
        if self.agreed:
            target = agreed_labels(labels, old, background=True)
            nu = accepted_share(labels, target, n_old, empty_factor=1.0)
        else:
            # ν is PLOP's: the share of background pixels the entropy test accepts, before the prototype
            # test; pixels that test rejects are ignored by the CE, and need not shrink the image's loss.
            mode = self.mode
            target, nu = pseudo_label(labels, old, self._tau(n_old, logits.device), n_total, mode,
                                      empty_factor=1.0 if mode == "median" else 0.0)
            if o["pseudo"]:
                target = prototype_relabel(labels, target, old, self._old_feature(batch),
                                           self._protos(logits.device), o["proto_threshold"])
        if o["compensation"]:
            weights = compensation_weights(logits, target, self._class_steps, self.ctx.step,
                                           o["compensate_background"], (o["compensation_min"], o["compensation_max"]))
        else:
            weights = (target != IGNORE).float()
        unknown = self.not_new_pixels(labels, target, n_old)
        if unknown is not None:  # weight 1: compensation weighs labelled pixels only
            weights = weights + unknown.float()
        per_pixel, counted = pixel_cross_entropy_not_new(logits, target, unknown, n_old)
        per_pixel = per_pixel * weights
        if o["adaptive_factor"]:
            per_pixel = per_pixel * nu[:, None, None]
        terms = {"ce": reduce_pixels(per_pixel, counted, o["reduction"]),
                 **self.unknown_kd(logits, old, labels, target)}
        # FBL divides both by the number of channels C (methods.md 2.4); its weights 0.3 and 0.1 were
        # tuned with that factor, so it stays with them.
        if o["soft"]:
            terms["soft"] = o["soft_weight"] / n_total * soft_sharp_distillation(logits, old, labels)
        if o["sharp"]:
            terms["sharp"] = o["sharp_weight"] / n_total * entropy_sharpening(logits, labels != IGNORE)
        if o["relation"]:
            terms["relation"] = o["relation_weight"] * relation_distillation(logits, old, target, weights)
        if self._uses_pod():
            terms["pod"] = self._pod(batch, n_old, n_total)
        return terms

    def _old_feature(self, batch: TrainBatch) -> torch.Tensor:
        assert batch.old is not None
        name = self.options["proto_feature"]
        if name not in batch.old.features:
            raise RuntimeError(f"GSC needs the old model's feature '{name}'")
        return batch.old.features[name]

    def _protos(self, device: torch.device) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("GSC has no prototypes: call prepare() (or load_state_dict) before losses()")
        if self._proto_cache is None or self._proto_cache.device != device:
            self._proto_cache = self.prototypes.to(device)
        return self._proto_cache

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prototypes"] = saved(self.prototypes)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As PLOP's thresholds: the prototypes are kept with them, for the step they were estimated for."""
        super().load_state_dict(state)
        prototypes = restored(state.get("prototypes"))
        if prototypes is not None:
            self.prototypes, self._proto_cache = prototypes, None
