"""PLOP: pseudo-labels and Local POD (Douillard et al., CVPR 2021).

Step 0: plain cross-entropy. Steps t > 0:
- once per step (`prepare`), a pass of the frozen old model over the step's training images gives,
  for every background pixel, the old argmax ĉ and its entropy-based uncertainty u; per-class
  histograms of u (summed over processes with `ctx.all_reduce`, so every rank gets the same
  numbers) give one threshold τ_c per old class;
- every batch, background pixels become ĉ where u < τ_ĉ and 255 elsewhere, new-class labels stay;
  plain CE on these labels, each image's loss scaled by ν = accepted / background pixels;
- Local POD between old and new features: backbone stages 1-4 and ASPP (weight `pod_weight`) and
  the low-resolution logits (`pod_logits_weight`, new-class logits summed into background),
  × √(n_total / n_new) when `pod_schedule`, divided by the number of layers. By default each
  image's embedding is L2-normalised (`pod_normalize`) and the weights are ten times PLOP's, so the
  term's gradient is a fraction of the CE's whatever the feature scale (docs/methods.md); PLOP's
  configuration is pod_normalize false, 0.01 and 0.0005.

threshold_mode "auto" (the default) runs the released routine and falls back to "median" for the whole
step when it breaks (see `degenerate_classes`); which one ran is in `report()`. "plop" reproduces the
released code: u = H / (n_old · ln n_old · ln n_total), a
100-bin histogram and its approximate median with the bin-index running sum, floor 0.001 (needed to
compare with published PLOP numbers). "median" is the clean version: u = H / ln n_old, the per-class
quantile `threshold_quantile` (0.5 = median) from counts, floor `threshold_floor`; there an image
without background pixels keeps its full loss (ν = 1) instead of PLOP's ν = 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ciss.classmap import IGNORE
from ciss.errors import CissError
from ciss.trainer.methods.base import Method, StepContext, TrainBatch, restored, saved
from ciss.trainer.methods.losses import (REDUCTIONS, UNCERTAINTY_MODES, UNKNOWN_PIXELS, local_pod,
                                         merge_extra_channels, pixel_cross_entropy_not_new,
                                         plop_median_thresholds, plop_uncertainty, pseudo_label,
                                         quantile_thresholds, reduce_pixels, unbiased_kd, uncertainty_histogram,
                                         unlabelled_background)
from ciss.trainer.methods.options import resolve_options
from ciss.trainer.models.features import DECODER, LOGITS_LOWRES, STAGES
from ciss.trainer.models.outputs import logits_of

POD_FEATURES = STAGES + (DECODER,)
THRESHOLD_MODES = ("auto",) + UNCERTAINTY_MODES
POD_LOGITS = LOGITS_LOWRES


def degenerate_classes(thresholds: torch.Tensor, counts: torch.Tensor, n_old: int, n_total: int,
                       floor: float) -> list[int]:
    """Old classes with pixels whose released-routine threshold cannot be a median of their
    uncertainties: not finite, at the floor (the walk found nothing above it: all rejected), or at
    least the largest u the "plop" formula can give, 1 / (n_old · ln n_total) (all accepted). A weak old
    model's flat histograms produce these (+inf and 0.001 were seen)."""
    if n_old < 2:
        return []
    top = 1 / (n_old * math.log(n_total))
    bad = ~torch.isfinite(thresholds) | (thresholds <= floor) | (thresholds >= top)
    return [c for c in range(n_old) if bool(bad[c]) and counts[c] > 0]


class PLOP(Method):
    name = "plop"
    uses_old_model = True
    init_new_heads = True
    defaults: dict[str, Any] = {
        "threshold_mode": "auto",
        "threshold_floor": 0.001,
        "threshold_bins": 100,
        "threshold_quantile": 0.5,
        "adaptive_factor": True,
        "unknown": "ignore",
        "unknown_kd_weight": 0.0,
        "reduction": "all",
        "pod_weight": 0.1,
        "pod_logits_weight": 0.005,
        "pod_scales": [1, 2, 4],
        "pod_schedule": True,
        "pod_extra_channels": "sum",
        "pod_regions": "clean",
        "pod_normalize": True,
    }
    choices: dict[str, tuple[str, ...]] = {
        "threshold_mode": THRESHOLD_MODES,
        "reduction": REDUCTIONS,
        "unknown": UNKNOWN_PIXELS,
        "pod_extra_channels": ("sum", "trim"),
        "pod_regions": ("clean", "plop"),
    }

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))
        o = self.options
        if o["threshold_bins"] < 1:
            raise CissError(f"option 'threshold_bins' of method '{self.name}' must be at least 1; "
                            f"got {o['threshold_bins']}")
        if not 0.0 < o["threshold_quantile"] <= 1.0:
            raise CissError(f"option 'threshold_quantile' of method '{self.name}' must be in (0, 1]; "
                            f"got {o['threshold_quantile']}")
        if o["unknown_kd_weight"] < 0:
            raise CissError(f"option 'unknown_kd_weight' of method '{self.name}' must not be negative; "
                            f"got {o['unknown_kd_weight']}")
        if o["pod_weight"] < 0 or o["pod_logits_weight"] < 0:
            raise CissError(f"POD weights of method '{self.name}' must not be negative")
        self.thresholds: torch.Tensor | None = None  # (n_old,) float32 on the CPU
        self.histogram: torch.Tensor | None = None  # (n_old, bins) counts of the last estimation
        self.estimated_for = (-1, 0)  # (step, n_old) the thresholds were estimated (or restored) for
        self.mode = "median" if self.options["threshold_mode"] == "median" else "plop"  # the routine in use
        self.degenerate: list[int] = []  # classes whose released threshold was degenerate (auto mode)
        self._tau_cache: torch.Tensor | None = None

    # --- once per step -------------------------------------------------------------------------
    def features(self) -> tuple[str, ...]:
        o = self.options
        return POD_FEATURES + (POD_LOGITS,) if o["pod_weight"] > 0 or o["pod_logits_weight"] > 0 else ()

    def setup(self, ctx: StepContext) -> None:
        """Forget estimates made for another step (restored ones of this step stay)."""
        self._tau_cache = None
        if self.estimated_for != (ctx.step, ctx.n_old):
            self.clear_estimates()

    def clear_estimates(self) -> None:
        self.thresholds = None

    def estimate(self, ctx: StepContext) -> None:
        if self.thresholds is None:
            self.thresholds = self.estimate_thresholds(ctx)
            self.estimated_for = (ctx.step, ctx.n_old)

    @torch.no_grad()
    def estimate_thresholds(self, ctx: StepContext) -> torch.Tensor:
        """One pass of the old model over `ctx.batches()`: per-class thresholds (n_old,) on the CPU.

        Sets `mode` to the routine whose thresholds are returned ("plop" or "median") and, in "auto"
        mode, `degenerate` to the classes for which the released routine broke.
        """
        old = ctx.old_model
        assert old is not None
        n_old, n_total = ctx.n_old, len(ctx.classmap)
        option, bins = self.options["threshold_mode"], self.options["threshold_bins"]
        modes = UNCERTAINTY_MODES if option == "auto" else (option,)
        hists = {m: torch.zeros(n_old, bins, dtype=torch.long, device=ctx.device) for m in modes}
        was_training = old.training
        old.eval()
        try:
            for images, labels in ctx.batches():
                logits = logits_of(old(images)).float()
                if logits.shape[1] != n_old:
                    raise RuntimeError(f"old model has {logits.shape[1]} outputs, the step context says {n_old}")
                if logits.shape[-2:] != labels.shape[-2:]:
                    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
                mask = (labels < n_old) & (labels != IGNORE)
                pred = logits.argmax(dim=1)
                for m, hist in hists.items():
                    hist += uncertainty_histogram(plop_uncertainty(logits, n_total, m), pred, mask, n_old,
                                                  bins).to(hist.device)
        finally:
            old.train(was_training)
        for m, hist in hists.items():
            reduced = ctx.all_reduce(hist)
            hists[m] = (hist if reduced is None else reduced).cpu()
        self.mode = "median" if option == "median" else "plop"
        self.degenerate = []
        if option == "auto":
            plop = self.thresholds_from_histogram(hists["plop"], "plop")
            self.degenerate = degenerate_classes(plop, hists["plop"].sum(dim=1), n_old, n_total,
                                                 self.options["threshold_floor"])
            if not self.degenerate:
                self.histogram = hists["plop"]
                return plop
            self.mode = "median"
        self.histogram = hists[self.mode]
        return self.thresholds_from_histogram(self.histogram, self.mode)

    def thresholds_from_histogram(self, hist: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        floor = self.options["threshold_floor"]
        if (mode or self.mode) == "plop":
            return plop_median_thresholds(hist, floor)
        return quantile_thresholds(hist, self.options["threshold_quantile"], floor)

    def report(self) -> dict[str, Any]:
        """Which threshold routine ran this step, for the log and the step manifest."""
        if self.thresholds is None:
            return {}
        return {"threshold_mode": self.options["threshold_mode"], "thresholds_from": self.mode,
                "degenerate_classes": list(self.degenerate),
                "thresholds": [round(float(t), 6) for t in self.thresholds]}

    # --- every batch ---------------------------------------------------------------------------
    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        o = self.options
        logits, labels = batch.out.logits, batch.labels
        old, n_old, n_total = batch.old_logits, batch.n_old, logits.shape[1]
        if n_total <= n_old:
            raise RuntimeError(f"the current model has {n_total} outputs, not more than the old model's {n_old}")
        tau = self._tau(n_old, logits.device)
        mode = self.mode
        pseudo, nu = pseudo_label(labels, old, tau, n_total, mode, empty_factor=1.0 if mode == "median" else 0.0)
        per_pixel, counted = pixel_cross_entropy_not_new(logits, pseudo, self.not_new_pixels(labels, pseudo, n_old),
                                                         n_old)
        if o["adaptive_factor"]:
            per_pixel = per_pixel * nu[:, None, None]
        terms = {"ce": reduce_pixels(per_pixel, counted, o["reduction"]),
                 **self.unknown_kd(logits, old, labels, pseudo)}
        if self.feature_names:
            terms["pod"] = self._pod(batch, n_old, n_total)
        return terms

    def not_new_pixels(self, labels: torch.Tensor, target: torch.Tensor, n_old: int) -> torch.Tensor | None:
        """The unknown pixels, where option unknown = "not_new" asks for MiB's "none of this step's
        classes" term; None with "ignore" (PLOP)."""
        if self.options["unknown"] == "ignore":
            return None
        return unlabelled_background(labels, target, n_old)

    def unknown_kd(self, logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                   target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Option unknown_kd_weight > 0: MiB's unbiased KD (α = 1) on the unknown pixels alone, averaged
        over all pixels as MiB's, so weight 10 holds them as MiB holds every pixel; {} at 0 (PLOP, FBL)."""
        weight = self.options["unknown_kd_weight"]
        if weight == 0:
            return {}
        mask = unlabelled_background(labels, target, old_logits.shape[1])
        return {"unknown_kd": weight * unbiased_kd(logits, old_logits, mask=mask)}

    def _tau(self, n_old: int, device: torch.device) -> torch.Tensor:
        if self.thresholds is None:
            raise RuntimeError("PLOP has no thresholds: call prepare() (or load_state_dict) before losses()")
        if self.thresholds.numel() != n_old:
            raise RuntimeError(f"PLOP thresholds are for {self.thresholds.numel()} old classes, the old model has {n_old}")
        if self._tau_cache is None or self._tau_cache.device != device:
            self._tau_cache = self.thresholds.to(device)
        return self._tau_cache

    def _pod(self, batch: TrainBatch, n_old: int, n_total: int) -> torch.Tensor:
        o = self.options
        assert batch.old is not None
        names = self.feature_names
        new = [batch.out.features[k] for k in names]
        old = [batch.old.features[k] for k in names]
        new[-1] = merge_extra_channels(new[-1], n_old, o["pod_extra_channels"])
        weights = [o["pod_weight"]] * (len(names) - 1) + [o["pod_logits_weight"]]
        schedule = math.sqrt(n_total / (n_total - n_old)) if o["pod_schedule"] else 1.0
        return local_pod(new, old, weights, o["pod_scales"], schedule, o["pod_regions"], o["pod_normalize"])

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["thresholds"] = saved(self.thresholds)
        state["step"] = torch.tensor(self.estimated_for[0])
        state["n_old"] = torch.tensor(self.estimated_for[1])
        state["median"] = torch.tensor(self.mode == "median")
        state["degenerate"] = torch.tensor(self.degenerate, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before or after `prepare`: restored thresholds replace estimated ones, and `prepare` makes
        no pass for the step they were estimated for."""
        super().load_state_dict(state)
        thresholds = restored(state.get("thresholds"))
        if thresholds is None:
            return
        self.thresholds, self._tau_cache = thresholds, None
        self.estimated_for = (int(state["step"]), int(state["n_old"]))
        self.mode = "median" if bool(state["median"]) else "plop"
        self.degenerate = [int(c) for c in state["degenerate"]]
