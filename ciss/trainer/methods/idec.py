"""IDEC: Inherit with Distillation and Evolve with Contrast (Zhao et al., TPAMI 2023, arXiv 2309.15413).

The release builds on SSUL's sigmoid head with an "unknown" channel filled from saliency maps, which
our data does not have; here "unknown" means a ground-truth background pixel the old model is not
confident about. The logits are trained as the softmax every method shares (activation = "softmax"),
or as the release's per-class sigmoids (activation = "sigmoid": BCE summed over channels, a sigmoid
KD, sigmoid scores for the pseudo-labels); both predict the argmax, so export and runtime are the same.

Step 0: plain cross-entropy (BCE under "sigmoid"). Steps t > 0, each part switchable by its option:
- pseudo: a background pixel takes the old model's argmax ĉ when its confidence s ≥ τ_ĉ, where
  τ_c = max(floor, EMA over batches of the mean s of the background pixels the old model assigns to c)
  (summed over processes); the other background pixels are unknown: ignored in the CE, or with
  unknown = "not_new" given MiB's "none of this step's classes" term. New-class ground truth is never
  overwritten. With pseudo_targets = "soft" a pseudo-labelled pixel's target is the old model's scores
  over the old classes (0 for the new ones) instead of its argmax. old_labels = "agreed" is a
  reference, not the method: on data.labels = "seen" the gate is replaced by the best any gate could
  be, the old model's call kept wherever it is right and the pixel unknown wherever it is wrong.
- feature_kd: DADA, a distance between the old and the new model's raw features of stage1..3 and of
  the ASPP output (no trainable adapter in between, which could absorb the drift), per-layer weights,
  the stage weights times feature_decay ** progress.
- logit_kd: MiB's unbiased KD on the old channels, teacher logits times kd_alpha (`sigmoid_kd` under
  "sigmoid"); kd_on_new = false leaves out the pixels labelled with this step's classes. With
  unknown_kd_weight > 0 the same KD on the unknown pixels alone is added with that weight: there the
  CE says nothing of the old classes.
- contrast: ARCL, an InfoNCE between region embeddings (mean of projected ASPP features over each
  pseudo-label region of each image, unknown regions included): anchors from the frozen old model
  (old-class regions), positives and negatives from the current model over the whole batch.
Provenance of every choice: docs/methods.md ("IDEC") and configs/methods.toml [idec].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ciss.classmap import IGNORE
from ciss.errors import CissError
from ciss.trainer.methods.base import Method, StepContext, TrainBatch, saved
from ciss.trainer.methods.losses import (ACTIVATIONS, OLD_LABEL_SOURCES, PSEUDO_TARGETS, REDUCTIONS, UNKNOWN_PIXELS,
                                         agreed_labels, binary_cross_entropy, class_scores, cross_entropy,
                                         outside_new_classes, pixel_binary_cross_entropy, pixel_cross_entropy_not_new,
                                         pixel_soft_cross_entropy, reduce_pixels, sigmoid_kd, unbiased_kd)
from ciss.trainer.methods.options import resolve_options
from ciss.trainer.models.features import DECODER, STAGES

DECAYED = STAGES[:3]  # the backbone stages whose distillation decays with progress
FEATURE_LAYERS = DECAYED + (DECODER,)  # option "<layer>_weight" weighs each
FEATURE_DISTANCES = ("cosine", "channel_kd")


class LateConv1x1(nn.Module):
    """A 1x1 convolution whose input width is set by `build` in `setup`.

    The method's modules exist from its construction, before any step's model is known, so the
    parameters are created uninitialised and materialised in place (whoever holds them keeps the same
    objects). At step 0, where nothing is distilled, they are materialised empty so checkpoints hold them.
    Initialised as nn.Conv2d's default.
    """

    def __init__(self, out_channels: int | None = None):
        super().__init__()
        self.out_channels = out_channels  # None: as wide as the input
        self.weight = nn.UninitializedParameter()
        self.bias = nn.UninitializedParameter()

    def build(self, in_channels: int, device: torch.device) -> None:
        out = (self.out_channels or in_channels) if in_channels else 0
        shape = (out, in_channels, 1, 1)
        if not isinstance(self.weight, nn.UninitializedParameter):
            if tuple(self.weight.shape) != shape:
                raise RuntimeError(f"projection built as {tuple(self.weight.shape)}, now asked for {shape}")
            return
        self.weight.materialize(shape, device=device)
        self.bias.materialize((out,), device=device)
        if out:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                nn.init.uniform_(self.bias, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


# --- pure parts, tested by hand ------------------------------------------------------------------

def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                     alpha: float = 2.0) -> torch.Tensor:
    """Mean over pixels of a distance between channel vectors of N,C,H,W maps; the teacher is detached.

    "cosine": ½‖x/‖x‖ − y/‖y‖‖² (= 1 − cos(x, y); 0 where both vectors are zero), blind to the
    feature scale, which differs by orders of magnitude between layers.
    "channel_kd": the release's KD_loss, −(1/C) Σ_c softmax(α·y)_c log softmax(x)_c.
    """
    x, y = student.float(), teacher.float().detach()
    if kind == "cosine":
        per_pixel = 0.5 * (F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).sum(dim=1)
    elif kind == "channel_kd":
        per_pixel = -(torch.softmax(alpha * y, dim=1) * torch.log_softmax(x, dim=1)).mean(dim=1)
    else:
        raise ValueError(f"feature distance must be one of {FEATURE_DISTANCES}, got {kind!r}")
    return per_pixel.mean()


@torch.no_grad()
def class_confidence(old_logits: torch.Tensor, labels: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """(2, n_old) float32: per old class c, the sum and the count of the old model's score
    (`class_scores`) over background pixels (label < n_old, not 255) whose old argmax is c."""
    n_old = old_logits.shape[1]
    conf, pred = class_scores(old_logits, activation)
    bg = (labels < n_old) & (labels != IGNORE)
    sums = torch.bincount(pred[bg], weights=conf[bg], minlength=n_old)
    counts = torch.bincount(pred[bg], minlength=n_old).float()
    return torch.stack([sums.float(), counts])


@torch.no_grad()
def region_labels(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                  unknown: int, activation: str = "softmax") -> torch.Tensor:
    """Pseudo-labels as regions: a background pixel takes the old argmax ĉ when the old model's score
    (`class_scores`) is ≥ thresholds[ĉ], else `unknown`; new-class and 255 labels are kept."""
    n_old = old_logits.shape[1]
    conf, pred = class_scores(old_logits, activation)
    bg = (labels < n_old) & (labels != IGNORE)
    confident = conf >= thresholds.to(conf.device)[pred]
    return torch.where(bg, torch.where(confident, pred, torch.full_like(pred, unknown)), labels)


def region_embeddings(features: torch.Tensor, regions: torch.Tensor, n_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of every region id k < n_ids in every image: (N, n_ids, D) and pixel counts (N, n_ids).

    `regions` (N,H,W) is resized to the feature map with nearest; 255 and ids ≥ n_ids are left out.
    """
    if regions.shape[-2:] != features.shape[-2:]:
        regions = F.interpolate(regions[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()
    onehot = F.one_hot(regions.clamp(0, n_ids), n_ids + 1)[..., :n_ids].float()  # N,h,w,K
    sums = torch.einsum("nhwk,ndhw->nkd", onehot, features.float())
    counts = onehot.sum(dim=(1, 2))
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def region_info_nce(anchors: torch.Tensor, embeddings: torch.Tensor, classes: torch.Tensor,
                    is_anchor: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """ARCL as an InfoNCE over the R regions of a batch (rows of the (R, D) inputs, L2-normalised here).

    For every region i with is_anchor[i]: the anchor is anchors[i] (old model, no gradient), the
    positive embeddings[i] (current model, same region), the negatives embeddings[j] of every region
    of another class, in any image; same-class regions of other images are neither. Loss
    −log(exp(a·p/τ) / (exp(a·p/τ) + Σ_n exp(a·n/τ))), averaged over anchors (0 without one).
    """
    e = F.normalize(embeddings.float(), dim=1)
    idx = is_anchor.nonzero().squeeze(1)
    if idx.numel() == 0:
        return e.sum() * 0.0
    a = F.normalize(anchors.detach().float()[idx], dim=1)
    logits = a @ e.T / temperature
    positive = idx[:, None] == torch.arange(len(e), device=e.device)[None]
    other = classes[idx][:, None] != classes[None]
    logits = logits.masked_fill(~(positive | other), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[positive]).mean()


# --- the method ----------------------------------------------------------------------------------

class IDEC(Method):
    name = "idec"
    uses_old_model = True
    init_new_heads = True  # MiB init (SSUL's unknown-head transfer has no unknown head to copy here)
    defaults: dict[str, Any] = {
        "reduction": "all",
        "activation": "softmax",
        "pseudo": True,
        "unknown": "ignore",
        "pseudo_targets": "hard",
        "old_labels": "pseudo",
        "feature_kd": True,
        "logit_kd": True,
        "contrast": True,
        "threshold_init": 0.7,
        "threshold_floor": 0.5,
        "threshold_momentum": 0.9,
        "feature_distance": "cosine",
        "stage1_weight": 0.5,
        "stage2_weight": 1.0,
        "stage3_weight": 2.0,
        "aspp_weight": 1.0,
        "feature_decay": 1.0,
        "kd_alpha": 2.0,
        "logit_kd_weight": 1.0,
        "kd_on_new": True,
        "unknown_kd_weight": 0.0,
        "contrast_weight": 1.0,
        "contrast_temperature": 0.1,
        "contrast_dim": 128,
    }
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS, "feature_distance": FEATURE_DISTANCES,
                                           "unknown": UNKNOWN_PIXELS, "activation": ACTIVATIONS,
                                           "pseudo_targets": PSEUDO_TARGETS, "old_labels": OLD_LABEL_SOURCES}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))
        o = self.options
        for key in ("stage1_weight", "stage2_weight", "stage3_weight", "aspp_weight", "logit_kd_weight",
                    "unknown_kd_weight", "contrast_weight"):
            _require(o[key] >= 0, key, "must not be negative", o[key])
        for key in ("threshold_init", "threshold_floor"):
            _require(0 <= o[key] <= 1, key, "must be in [0, 1]", o[key])
        _require(o["unknown_kd_weight"] == 0 or o["pseudo"], "unknown_kd_weight",
                 "needs idec.pseudo (the unknown pixels are those pseudo-labelling leaves out): drop --no idec.pseudo, "
                 "or leave it at 0", o["unknown_kd_weight"])
        _require(o["pseudo_targets"] == "hard" or o["pseudo"], "pseudo_targets",
                 "needs idec.pseudo (it says what the pseudo-labels ask for): drop --no idec.pseudo, "
                 "or leave it at \"hard\"", o["pseudo_targets"])
        _require(o["old_labels"] == "pseudo" or o["pseudo"], "old_labels",
                 "needs idec.pseudo (it says where the pseudo-labels come from): drop --no idec.pseudo, "
                 "or leave it at \"pseudo\"", o["old_labels"])
        # The oracle gate reads the old classes' true labels, which only data.labels = "seen" loads.
        self.needs_seen_labels = self.agreed = o["old_labels"] == "agreed"
        _require(0 <= o["threshold_momentum"] < 1, "threshold_momentum", "must be in [0, 1)", o["threshold_momentum"])
        for key in ("feature_decay", "kd_alpha", "contrast_temperature", "contrast_dim"):
            _require(o[key] > 0, key, "must be positive", o[key])
        self.layer_weights = {k: o[f"{k}_weight"] for k in FEATURE_LAYERS
                              if o["feature_kd"] and o[f"{k}_weight"] > 0}
        projections: dict[str, nn.Module] = {}
        if o["contrast"]:
            projections["contrast"] = nn.Sequential(LateConv1x1(), nn.ReLU(), LateConv1x1(o["contrast_dim"]))
        self.projections = nn.ModuleDict(projections)
        self.thresholds: torch.Tensor | None = None  # (n_old,) EMA of per-class confidence

    def modules(self) -> nn.ModuleDict:
        return self.projections

    @property
    def activation(self) -> str:
        return self.options["activation"]

    @property
    def sigmoid(self) -> bool:
        return self.activation == "sigmoid"

    def features(self) -> tuple[str, ...]:
        wanted = set(self.layer_weights) | ({DECODER} if self.options["contrast"] else set())
        return tuple(k for k in FEATURE_LAYERS if k in wanted)

    def setup(self, ctx: StepContext) -> None:
        o = self.options
        incremental = ctx.step > 0
        for conv in self.projections.modules():
            if isinstance(conv, LateConv1x1):  # the contrast head reads the ASPP output; its hidden layer is as wide
                conv.build(ctx.model.head.in_channels if incremental else 0, ctx.device)
        use_thresholds = incremental and (o["pseudo"] or o["contrast"]) and not self.agreed
        self.thresholds = torch.full((ctx.n_old,), o["threshold_init"], device=ctx.device) if use_thresholds else None

    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        o = self.options
        logits, labels = batch.out.logits, batch.labels
        old, n_old, n_total = batch.old_logits, batch.n_old, logits.shape[1]
        regions, unknown = None, None
        if self.agreed:
            regions = agreed_labels(labels, old, fill=n_total, background=True)
        elif self.thresholds is not None:
            self._update_thresholds(old, labels)
            regions = region_labels(labels, old, self.thresholds.clamp(min=o["threshold_floor"]), unknown=n_total,
                                    activation=self.activation)
        if o["pseudo"]:
            assert regions is not None
            unknown = regions == n_total
            target = torch.where(unknown, torch.full_like(regions, IGNORE), regions)
            not_new = unknown if o["unknown"] == "not_new" else None
            per_pixel, counted = pixel_binary_cross_entropy(logits, target, not_new, n_old) if self.sigmoid \
                else pixel_cross_entropy_not_new(logits, target, not_new, n_old)
            if o["pseudo_targets"] == "soft":
                relabelled = (labels < n_old) & ~unknown
                per_pixel = torch.where(relabelled, pixel_soft_cross_entropy(logits, old, self.activation), per_pixel)
            ce = reduce_pixels(per_pixel, counted, o["reduction"])
        else:
            ce = self._supervised(logits, labels)
        terms = {"ce": ce}
        if o["feature_kd"]:
            terms["feature_kd"] = self._feature_kd(batch)
        if o["logit_kd"]:
            mask = None if o["kd_on_new"] else outside_new_classes(labels, n_old)
            terms["logit_kd"] = o["logit_kd_weight"] * self._logit_kd(logits, old, mask)
        if o["unknown_kd_weight"] > 0:
            assert unknown is not None  # the option needs pseudo (checked in __init__)
            terms["unknown_kd"] = o["unknown_kd_weight"] * self._logit_kd(logits, old, unknown)
        if o["contrast"]:
            assert regions is not None
            terms["contrast"] = o["contrast_weight"] * self._contrast(batch, regions, n_old, n_total)
        return terms

    def _logit_kd(self, logits: torch.Tensor, old: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """MiB's unbiased KD as the activation trains the logits, times `mask` per pixel if given."""
        if self.sigmoid:
            return sigmoid_kd(logits, old, mask)
        return unbiased_kd(logits, old, alpha=self.options["kd_alpha"], mask=mask)

    def base_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return {"ce": self._supervised(batch.out.logits, batch.labels)}

    def _supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss on labels alone, as the activation trains them."""
        if self.sigmoid:
            return binary_cross_entropy(logits, labels, self.options["reduction"])
        return cross_entropy(logits, labels, self.options["reduction"])

    @torch.no_grad()
    def _update_thresholds(self, old_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One EMA step of τ_c towards this batch's mean confidence of class c (all processes)."""
        assert self.thresholds is not None
        stats = class_confidence(old_logits, labels, self.activation)
        assert self.ctx is not None
        reduced = self.ctx.all_reduce(stats)
        stats = stats if reduced is None else reduced
        seen = stats[1] > 0
        mean = stats[0] / stats[1].clamp(min=1)
        m = self.options["threshold_momentum"]
        tau = self.thresholds.to(stats.device)
        self.thresholds = torch.where(seen, m * tau + (1 - m) * mean, tau)

    def _feature_kd(self, batch: TrainBatch) -> torch.Tensor:
        assert batch.old is not None
        o = self.options
        decay = o["feature_decay"] ** batch.progress
        total = batch.out.logits.new_zeros((), dtype=torch.float32)
        for layer, weight in self.layer_weights.items():
            new, old = batch.out.features[layer], batch.old.features[layer]
            if layer in DECAYED:
                weight = weight * decay
            total = total + weight * feature_distance(new, old, o["feature_distance"], o["kd_alpha"])
        return total

    def _contrast(self, batch: TrainBatch, regions: torch.Tensor, n_old: int, n_total: int) -> torch.Tensor:
        assert batch.old is not None
        head = self.projections["contrast"]
        new = head(batch.out.features[DECODER])
        with torch.no_grad():
            old = head(batch.old.features[DECODER])
        n_ids = n_total + 1  # classes, then the unknown region
        emb_new, counts = region_embeddings(new, regions, n_ids)
        emb_old, _ = region_embeddings(old, regions, n_ids)
        present = counts > 0
        classes = torch.arange(n_ids, device=counts.device).expand_as(counts)[present]
        is_anchor = classes < n_old
        if not bool(is_anchor.any()):
            # Still reach the head: under DDP every process must give its parameters a gradient.
            return new.float().sum() * 0.0
        return region_info_nce(emb_old[present], emb_new[present], classes, is_anchor,
                               self.options["contrast_temperature"])

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["thresholds"] = saved(self.thresholds)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After `setup`, which sizes the projections (`prepare` calls them in that order)."""
        if self.ctx is None:
            raise RuntimeError("IDEC.load_state_dict needs prepare() first: it sizes the projections")
        super().load_state_dict(state)
        t = state["thresholds"]
        expected = 0 if self.thresholds is None else self.thresholds.numel()
        if t.numel() != expected:
            raise RuntimeError(f"IDEC thresholds in the state are for {t.numel()} classes, this step has {expected}")
        if expected:
            self.thresholds = t.detach().float().to(self.ctx.device).clone()


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise CissError(f"option '{key}' of method 'idec' {what}; got {value!r}")
