"""Loss building blocks shared by the methods: pure functions on tensors, no state.

Conventions (see methods/base.py): logits are N,C,H,W with channel 0 = background; at step t > 0
the first `n_old` channels are the previous model's (background included) and the rest are this
step's new classes. Labels are N,H,W int64 with old classes already mapped to 0 and 255 = ignore.

Sources, by function (formulas re-derived from the papers and the surveys in
shared/research/peers.md section 6 and methods.md sections 1.2-1.3; no code copied):
- `unbiased_cross_entropy`, `unbiased_kd`: MiB (Cermelli et al., CVPR 2020), fcdl94/MiB `utils/loss.py`.
- `plop_uncertainty`, `uncertainty_histogram`, `plop_median_thresholds`, `quantile_thresholds`,
  `pseudo_label`: PLOP (Douillard et al., CVPR 2021), arthurdouillard/CVPR2021_PLOP `train.py`.
- `local_pod`, `pod_embedding`, `merge_extra_channels`: PLOP's Local POD, same repository, `utils/loss.py`.
- `binary_cross_entropy`: SSUL/IDEC's per-channel BCE (YBIO/IDEC `BCEWithLogitsLossWithIgnoreIndex`),
  methods.md 3.5; `sigmoid_kd` is ours (the release has no logit distillation).

Every loss is computed in float32 (logits may arrive in fp16/bf16 under autocast) and stays finite,
with a gradient path, when a batch has no valid pixel.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ciss.classmap import IGNORE

REDUCTIONS = ("valid", "all")
UNKNOWN_PIXELS = ("ignore", "not_new")  # what a CE makes of a background pixel pseudo-labelling leaves unlabelled
PSEUDO_TARGETS = ("hard", "soft")  # what a CE asks of a pseudo-labelled pixel: the old argmax, or the old scores
ACTIVATIONS = ("softmax", "sigmoid")  # what a method trains the logits as: one distribution, or a score per class
# Who labels the old classes on new data: the method's gated old model, or the best possible gate on
# it (`agreed_labels`; a reference on data.labels = "seen", not class-incremental).
OLD_LABEL_SOURCES = ("pseudo", "agreed")


# --- helpers -----------------------------------------------------------------------------------

def reduce_pixels(per_pixel: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Average a per-pixel loss (zero where ignored).

    "valid": sum over the batch / number of non-ignored pixels (0 when there are none);
    "all":   MiB/PLOP's `reduction='none'` then `.mean()`: ignored pixels count as 0 in the mean.
    """
    if reduction == "all":
        return per_pixel.mean()
    if reduction == "valid":
        return per_pixel.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0] \
            or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"logits N,C,H,W and labels N,H,W must agree; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")


def _check_teacher(logits: torch.Tensor, old_logits: torch.Tensor) -> int:
    """The old model's channel count n_old, once its logits are known to match the student's
    (same batch and size, at least as many channels)."""
    n_old = old_logits.shape[1]
    if logits.shape[1] < n_old or logits.shape[0] != old_logits.shape[0] \
            or logits.shape[-2:] != old_logits.shape[-2:]:
        raise ValueError(f"student {tuple(logits.shape)} and teacher {tuple(old_logits.shape)} do not match")
    return n_old


# --- cross-entropies ---------------------------------------------------------------------------

def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel −log softmax(z)_y (N,H,W), 0 on ignored pixels."""
    _check_labels(logits, labels)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "valid") -> torch.Tensor:
    """Plain softmax cross-entropy over all channels, 255 ignored (FT, joint, MiB/PLOP at step 0).

    reduction "valid" = mean over non-ignored pixels (torchvision's reference); "all" = mean over
    all pixels with ignored ones as 0 (what MiB's and PLOP's trainers do).
    """
    per_pixel = pixel_cross_entropy(logits, labels)
    return reduce_pixels(per_pixel, labels != IGNORE, reduction)


def log_old_mass(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """log Σ_{k<n_old} q_k (N,H,W) in float32: the log-probability of "background or an old class",
    MiB's term for a pixel whose only label is "none of this step's classes"."""
    z = logits.float()
    return torch.logsumexp(z[:, :n_old], dim=1) - torch.logsumexp(z, dim=1)


def pixel_cross_entropy_not_new(logits: torch.Tensor, labels: torch.Tensor, not_new: torch.Tensor | None,
                                n_old: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel (N,H,W): −log q_y where labelled, −log Σ_{k<n_old} q_k where `not_new`, else 0; and
    the pixels that count (labelled or `not_new`). With `not_new` None the second term is not computed.

    Pseudo-labelling leaves GT-background pixels the old model is unsure of without a class. Ignoring
    them throws away what their label does say, that they are none of this step's classes; training
    them as background would bring back background shift. MiB's term keeps exactly that much: the new
    classes lose there, and the old classes and background share the rest as the model sees fit.
    """
    per_pixel, counted = pixel_cross_entropy(logits, labels), labels != IGNORE
    if not_new is None:
        return per_pixel, counted
    return torch.where(not_new, -log_old_mass(logits, n_old), per_pixel), counted | not_new


def pixel_binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, not_new: torch.Tensor | None = None,
                               n_old: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel (N,H,W): Σ_c BCE(z_c, [y = c]) over every channel where labelled (a sigmoid head: each
    class a yes/no of its own, summed over channels as in the release), Σ_{c ≥ n_old} BCE(z_c, 0) where
    `not_new` (only the new classes are told "no"), else 0; and the pixels that count."""
    _check_labels(logits, labels)
    z = logits.float()
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0), z.shape[1]).permute(0, 3, 1, 2).float()
    per_pixel = F.binary_cross_entropy_with_logits(z, onehot, reduction="none").sum(dim=1) * valid
    if not_new is None:
        return per_pixel, valid
    return torch.where(not_new, F.softplus(z[:, n_old:]).sum(dim=1), per_pixel), valid | not_new


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "all",
                         not_new: torch.Tensor | None = None, n_old: int = 0) -> torch.Tensor:
    """The sigmoid head's loss, `pixel_binary_cross_entropy` reduced over pixels; 255 ignored."""
    per_pixel, counted = pixel_binary_cross_entropy(logits, labels, not_new, n_old)
    return reduce_pixels(per_pixel, counted, reduction)


def pixel_soft_cross_entropy(logits: torch.Tensor, old_logits: torch.Tensor,
                             activation: str = "softmax") -> torch.Tensor:
    """Per pixel (N,H,W): the cross-entropy against the old model's scores rather than its argmax.

    softmax: −Σ_{k<n_old} p'_k log q_k, p' = softmax(z_old), q the student's softmax over every
    channel; sigmoid: Σ_{k<n_old} BCE(z_k, σ(z_old_k)) + Σ_{k≥n_old} BCE(z_k, 0). Either way the new
    classes' target is 0, as under a hard pseudo-label, but an old class the old model gives a share
    of the pixel keeps that share instead of being pushed to 0. Where the old model is sure this is
    the hard label's loss; it differs on classes the old model seldom calls with confidence.
    """
    n_old = _check_teacher(logits, old_logits)
    z, teacher = logits.float(), old_logits.float().detach()
    if activation == "softmax":
        return -(torch.softmax(teacher, dim=1) * torch.log_softmax(z, dim=1)[:, :n_old]).sum(dim=1)
    if activation == "sigmoid":
        old = F.binary_cross_entropy_with_logits(z[:, :n_old], torch.sigmoid(teacher), reduction="none")
        return old.sum(dim=1) + F.softplus(z[:, n_old:]).sum(dim=1)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_old: int,
                           reduction: str = "all") -> torch.Tensor:
    """MiB's unbiased cross-entropy (UNCE), peers.md 6.1.

    A background pixel (any label < n_old) is asked for the total mass of background *or any old
    class*: −log Σ_{k<n_old} q_k = −(logsumexp z[:n_old] − logsumexp z). A new-class pixel gets the
    ordinary −log q_y. With n_old = 1 this is exactly `cross_entropy`; with n_old = C background
    pixels cost nothing.
    """
    _check_labels(logits, labels)
    if not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"n_old must be in [1, {logits.shape[1]}], got {n_old}")
    z = logits.float()
    log_p = torch.cat([log_old_mass(z, n_old).unsqueeze(1), z[:, 1:] - torch.logsumexp(z, dim=1, keepdim=True)],
                      dim=1)  # channel 0 now means "bg or old"
    valid = labels != IGNORE
    target = torch.where(valid & (labels < n_old), torch.zeros_like(labels), labels)
    target = torch.where(valid, target, torch.zeros_like(labels))
    per_pixel = -log_p.gather(1, target.unsqueeze(1)).squeeze(1) * valid
    return reduce_pixels(per_pixel, valid, reduction)


# --- distillation ------------------------------------------------------------------------------

def unbiased_kd(logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiB's unbiased knowledge distillation (UNKD), peers.md 6.2; n_old = old_logits.shape[1].

    Teacher p' = softmax(alpha · z_old) over the n_old old channels. Student log-probabilities over
    the same channels, with the new classes merged into background (the old model saw them as
    background): log(q_0 + Σ_new q_c) for channel 0, log q_k for old classes k ≥ 1. Per pixel
    −(1/n_old) Σ_k p'_k log q̂_k (a class *average*, background included), times `mask` if given,
    then the mean over all pixels of the batch. At MiB initialisation q̂ = p', so the value is the
    teacher's entropy / n_old and the gradient is zero.
    """
    n_old = _check_teacher(logits, old_logits)
    z = logits.float()
    den = torch.logsumexp(z, dim=1)
    bg_and_new = torch.cat([z[:, :1], z[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - den
    log_old = z[:, 1:n_old] - den.unsqueeze(1)
    teacher = torch.softmax(old_logits.float().detach() * alpha, dim=1)
    per_pixel = -(teacher[:, 0] * log_bg + (teacher[:, 1:] * log_old).sum(dim=1)) / n_old
    if mask is not None:
        per_pixel = per_pixel * mask.to(per_pixel.dtype)
    return per_pixel.mean()


def unlabelled_background(labels: torch.Tensor, target: torch.Tensor, n_old: int) -> torch.Tensor:
    """The unknown pixels: ground-truth background (label < n_old, not 255) that pseudo-labelling left
    without a class (255 in `target`). Neither the labels nor a confident old-model call name them, so
    a method's CE says nothing there of the old classes."""
    return (labels < n_old) & (labels != IGNORE) & (target == IGNORE)


def agreed_labels(labels: torch.Tensor, old_logits: torch.Tensor, fill: int = IGNORE,
                  background: bool = False) -> torch.Tensor:
    """`labels` (data.labels = "seen": old classes carry their true ids) with each old-class pixel
    (1 <= id < the old model's channels; 0 too with `background`) set to `fill` where the old model's
    argmax is another class. What is left is the most any confidence gate on that model's calls can
    hand a step: its right calls, none of its wrong ones. New classes and 255 are kept."""
    first = 0 if background else 1
    old = (labels >= first) & (labels < old_logits.shape[1])
    return labels.masked_fill(old & (old_logits.argmax(1) != labels), fill)


def outside_new_classes(labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """Pixels not labelled with one of this step's classes: where the old model's view of a pixel
    does not contradict its label. A distillation masked with it leaves labelled new-class pixels to
    the CE: on data without a background class the old model can call them an old foreground class,
    which an unmasked KD defends against the label (docs/methods.md, `kd_on_new`)."""
    return (labels < n_old) | (labels == IGNORE)


def sigmoid_kd(logits: torch.Tensor, old_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation for a sigmoid head, unbiased as MiB's: per pixel, Σ over the old classes c ≥ 1 of
    BCE(z_c, σ(z_c^old)), plus BCE(P, σ(z_0^old)) for the background, where P = 1 − (1 − σ(z_0))
    Π_new (1 − σ(z_k)) is the student's "background or a new class": the old model saw the new
    classes as background, so its background score must not be held against them (MiB merges the
    same channels under softmax). Summed over channels as the BCE beside it is, times `mask` if given,
    then the mean over all pixels."""
    n_old = _check_teacher(logits, old_logits)
    z = logits.float()
    teacher = torch.sigmoid(old_logits.float().detach())
    old_classes = F.binary_cross_entropy_with_logits(z[:, 1:n_old], teacher[:, 1:], reduction="none").sum(dim=1)
    log_neither = -F.softplus(torch.cat([z[:, :1], z[:, n_old:]], dim=1)).sum(dim=1)  # log(1 - P)
    background = -teacher[:, 0] * _log1mexp(log_neither) - (1 - teacher[:, 0]) * log_neither
    per_pixel = background + old_classes
    if mask is not None:
        per_pixel = per_pixel * mask.to(per_pixel.dtype)
    return per_pixel.mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (Mächler 2012); x is kept below −1e-12. Each
    branch sees only inputs it is finite on: torch.where passes the other branch's gradient through
    as 0 · inf = NaN."""
    x = x.clamp(max=-1e-12)
    near = x > -math.log(2)
    cut = torch.full_like(x, -math.log(2))
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, cut))),
                       torch.log1p(-torch.exp(torch.where(near, cut, x))))


def class_scores(logits: torch.Tensor, activation: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(score, class) per pixel (N,H,W each): the largest softmax probability, or under "sigmoid" the
    largest per-class sigmoid, and its channel. The same argmax either way; the scores differ."""
    z = logits.float()
    if activation == "softmax":
        return torch.softmax(z, dim=1).max(dim=1)
    if activation == "sigmoid":
        top, pred = z.max(dim=1)
        return torch.sigmoid(top), pred
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# --- PLOP pseudo-labels ------------------------------------------------------------------------

UNCERTAINTY_MODES = ("plop", "median")


def plop_uncertainty(old_logits: torch.Tensor, n_total: int, mode: str = "plop") -> torch.Tensor:
    """Per-pixel uncertainty (N,H,W) of the old model's softmax, as compared with PLOP's thresholds.

    H = −Σ p log p (nats) over the n_old old channels.
    "plop":   u = H / (n_old · ln n_old · ln n_total): the released code's mean-over-classes entropy
              divided by ln n_old, then divided again by ln(n_total) (peers.md 6.4). The released
              code computes p·log(p + 1e-8); we use the exact log-softmax form (differences ~1e-8).
    "median": u = H / ln n_old, the normalised entropy in [0, 1].
    """
    n_old = old_logits.shape[1]
    z = old_logits.float()
    log_p = torch.log_softmax(z, dim=1)
    ent = (-(log_p.exp() * log_p).sum(dim=1)).clamp(min=0)
    if n_old < 2:
        return torch.zeros_like(ent)
    if mode == "plop":
        return ent / (n_old * math.log(n_old) * math.log(n_total))
    if mode == "median":
        return ent / math.log(n_old)
    raise ValueError(f"uncertainty mode must be one of {UNCERTAINTY_MODES}, got {mode!r}")


def uncertainty_histogram(u: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, n_classes: int,
                          bins: int) -> torch.Tensor:
    """Counts (n_classes, bins) int64 of u over [0, 1] per predicted class, pixels where `mask`.

    Bin of a value: clamp(floor(u · bins), 0, bins − 1), as in PLOP's `find_median`.
    """
    u, pred = u[mask], pred[mask]
    b = (u * bins).long().clamp(0, bins - 1)
    flat = pred.long() * bins + b
    return torch.bincount(flat, minlength=n_classes * bins).view(n_classes, bins)


def plop_median_thresholds(hist: torch.Tensor, floor: float = 0.001) -> torch.Tensor:
    """PLOP's released per-class "median" routine, reproduced with its quirks (peers.md 6.4).

    For each class with counts h[0..B-1] over [0, 1] and half = total / 2, walk k = 0..B-1 with
    lower = k / B and bin i = int(lower · B): stop when running <= half <= running + h[i], else add
    lower · B (the bin *index*, not the bin's count) to the running sum. Result
    lower + (half - running) / h[i] / B, 0 for a class without pixels, then max(·, floor).
    Reproduced as well: i is computed through floats, so for B = 100 the steps k = 29, 57, 58 look
    at bins 28, 56, 57; when no bin stops the walk the last step's formula is used (the value can
    then exceed 1); where the released code would divide 0 by an empty bin (NaN) we take 0 as the
    in-bin offset (±inf otherwise, as in torch, which the floor or the comparison then handles).
    """
    counts = hist.detach().to("cpu", torch.float64)
    n_classes, bins = counts.shape
    out = torch.zeros(n_classes, dtype=torch.float64)
    for c in range(n_classes):
        h = counts[c].tolist()
        total = sum(h)
        if total <= 0:
            continue
        half = total / 2
        running = 0.0
        lower, i = 0.0, 0
        for k in range(bins):
            lower = k / bins
            i = int(lower * bins)
            if running <= half <= running + h[i]:
                break
            running += lower * bins  # the quirk: the bin index, not its count
        diff = half - running
        if h[i] > 0:
            offset = diff / h[i]
        else:
            offset = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        out[c] = lower + offset * (1 / bins)
    return out.clamp(min=floor).float()


def quantile_thresholds(hist: torch.Tensor, quantile: float = 0.5, floor: float = 0.001) -> torch.Tensor:
    """Per-class quantile (median by default) of a count histogram over [0, 1], linear within a bin.

    The clean counterpart of `plop_median_thresholds`: the running sum accumulates counts, so the
    result is the true median up to the bin width (exact when values are uniform within the bin that
    crosses). Classes without pixels get 0, then max(·, floor).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    counts = hist.detach().to("cpu", torch.float64)
    n_classes, bins = counts.shape
    total = counts.sum(dim=1)
    target = quantile * total
    cum = counts.cumsum(dim=1)
    k = (cum < target.unsqueeze(1)).sum(dim=1).clamp(max=bins - 1)
    before = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                         torch.zeros_like(total))
    in_bin = counts.gather(1, k.unsqueeze(1)).squeeze(1)
    frac = torch.where(in_bin > 0, (target - before) / in_bin.clamp(min=1e-12), torch.zeros_like(total))
    value = (k.double() + frac.clamp(0, 1)) / bins
    value = torch.where(total > 0, value, torch.zeros_like(value))
    return value.clamp(min=floor).float()


def pseudo_label(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor, n_total: int,
                 mode: str = "plop", empty_factor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP relabelling (peers.md 6.4 step 2) and the per-image adaptive factor ν.

    Background pixels (label < n_old, not 255) take the old model's argmax ĉ when its uncertainty
    u < thresholds[ĉ], else 255. Every other label (new classes, 255) is kept. ν (N,) = accepted
    background pixels / (background pixels + 1e-6); PLOP's formula gives 0 to an image without
    background pixels, `empty_factor` replaces that value (PLOP: 0).
    Returns (new labels N,H,W, ν N).
    """
    n_old = old_logits.shape[1]
    with torch.no_grad():
        u = plop_uncertainty(old_logits, n_total, mode)
        pred = old_logits.argmax(dim=1)
        tau = thresholds.to(device=u.device, dtype=u.dtype)[pred]
        background = (labels < n_old) & (labels != IGNORE)
        accept = background & (u < tau)
        out = torch.where(accept, pred, labels)
        out = torch.where(background & ~accept, torch.full_like(labels, IGNORE), out)
    return out, accepted_share(labels, out, n_old, empty_factor)


@torch.no_grad()
def accepted_share(labels: torch.Tensor, target: torch.Tensor, n_old: int, empty_factor: float = 0.0) -> torch.Tensor:
    """PLOP's adaptive factor ν (N,): the share of each image's background pixels (label < n_old, not
    255) that relabelling left labelled in `target`, `empty_factor` for an image without any."""
    background = (labels < n_old) & (labels != IGNORE)
    n_bg = background.flatten(1).sum(dim=1).float()
    nu = (background & (target != IGNORE)).flatten(1).sum(dim=1).float() / (n_bg + 1e-6)
    return torch.where(n_bg > 0, nu, torch.full_like(nu, float(empty_factor)))


# --- Local POD ---------------------------------------------------------------------------------

def merge_extra_channels(new_logits: torch.Tensor, n_old: int, mode: str = "sum") -> torch.Tensor:
    """Bring the current model's logits to the old model's n_old channels (PLOP `extra_channels`).

    "sum": the new-class logits are summed into the background channel (logits, not probabilities);
    "trim": they are dropped.
    """
    if mode == "trim":
        return new_logits[:, :n_old]
    if mode == "sum":
        bg = new_logits[:, :1] + new_logits[:, n_old:].sum(dim=1, keepdim=True)
        return torch.cat([bg, new_logits[:, 1:n_old]], dim=1)
    raise ValueError(f"extra_channels must be 'sum' or 'trim', got {mode!r}")


def _pool_columns(x: torch.Tensor, s: int) -> torch.Tensor:
    """Means over s column blocks (N,C,H,s), blocks [floor(jW/s), ceil((j+1)W/s)).

    A reshape when s divides W (deterministic on CUDA, unlike adaptive pooling's backward).
    """
    n, c, h, w = x.shape
    if w % s == 0:
        return x.reshape(n, c, h, s, w // s).mean(dim=4)
    return F.adaptive_avg_pool2d(x, (h, s))


def pod_embedding(x: torch.Tensor, scales: Sequence[int] = (1, 2, 4), regions: str = "clean") -> torch.Tensor:
    """Local POD embedding (N, D) of a map x (N,C,H,W): pooled profiles over a spatial pyramid.

    For every scale s the map is cut into an s×s grid; each region gives its width-pooled profile
    (per channel and row, the mean over the region's columns) and its height-pooled profile (per
    channel and column, the mean over its rows). All are flattened and concatenated; the order of
    the elements does not matter to the distance (a Euclidean norm).

    regions="clean" (default): rows and columns are split separately, region i of an axis of length
    L spanning [floor(iL/s), ceil((i+1)L/s)), so non-square maps and sides not divisible by s are
    covered fully and no region is empty. The width-pooled profiles of all regions of a scale are
    then adaptive_avg_pool2d(x, (H, s)) and the height-pooled ones (s, W): two ops a scale.
    regions="plop": the released code's grid, region by region: side k = W // s used for *both*
    axes. It assumes square maps: with H > W the bottom rows are never looked at, with H < W the
    lower regions are empty (their mean is NaN), and a side not divisible by s drops the trailing
    rows/columns. Both give the same distances on square maps whose side every scale divides.
    """
    n, _, h, w = x.shape
    parts: list[torch.Tensor] = []
    for s in scales:
        if regions == "clean":
            parts.append(_pool_columns(x, s).reshape(n, -1))  # width-pooled, every region
            parts.append(_pool_columns(x.transpose(2, 3), s).reshape(n, -1))  # height-pooled, every region
        elif regions == "plop":
            k = w // s
            for i in range(s):
                for j in range(s):
                    region = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    parts.append(region.mean(dim=3).reshape(n, -1))
                    parts.append(region.mean(dim=2).reshape(n, -1))
        else:
            raise ValueError(f"regions must be 'clean' or 'plop', got {regions!r}")
    return torch.cat(parts, dim=1)


def pod_layer(new: torch.Tensor, old: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
              regions: str = "clean", normalize: bool = False) -> torch.Tensor:
    """One layer's Local POD distance: ‖Φ(old²) − Φ(new²)‖₂ per image, averaged over the batch.

    Squared activations (PLOP's `pod_prepro='pow'`); `normalize` L2-normalises each image's
    embedding first (off in PLOP's configuration).
    """
    if new.shape != old.shape:
        raise ValueError(f"POD needs maps of the same shape, got {tuple(new.shape)} and {tuple(old.shape)}")
    a = pod_embedding(new.float().pow(2), scales, regions)
    b = pod_embedding(old.float().detach().pow(2), scales, regions)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    # torch's norm has a zero (not NaN) gradient at 0, so identical maps (step start) are safe.
    return torch.linalg.vector_norm(a - b, dim=1).mean()


def local_pod(feats_new: Sequence[torch.Tensor], feats_old: Sequence[torch.Tensor],
              weights: Sequence[float] | float = 1.0, scales: Sequence[int] = (1, 2, 4),
              schedule: float = 1.0, regions: str = "clean", normalize: bool = False) -> torch.Tensor:
    """PLOP's Local POD over several layers (peers.md 6.5).

    Σ_l weights[l] · pod_layer(new_l, old_l) · schedule, divided by the number of layers (layers with
    weight 0 still count in the divisor, as released). PLOP: weights 0.01 for the backbone stages
    and ASPP, 0.0005 for the low-resolution logits (after `merge_extra_channels`), schedule
    √(n_total / n_new). Logits with more channels must be merged by the caller.
    """
    if len(feats_new) != len(feats_old) or not feats_new:
        raise ValueError(f"local_pod needs matching non-empty lists, got {len(feats_new)} and {len(feats_old)}")
    ws = [float(weights)] * len(feats_new) if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(ws) != len(feats_new):
        raise ValueError(f"{len(ws)} weights for {len(feats_new)} layers")
    total = feats_new[0].new_zeros((), dtype=torch.float32)
    for w, a, b in zip(ws, feats_new, feats_old):
        if w <= 0:
            continue
        total = total + w * pod_layer(a, b, scales, regions, normalize)
    return total * schedule / len(feats_new)
