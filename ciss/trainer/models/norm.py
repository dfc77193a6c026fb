"""BatchNorm across processes (CUDA and CPU/gloo) and BatchNorm freezing for small-batch steps.

torch's SyncBatchNorm refuses CPU tensors, so multi-process CPU runs get `GlooSyncBatchNorm`: the
same global statistics, computed from per-channel count, sum and sum of squares summed over ranks
with an autograd-aware all_reduce, so each rank's gradient includes every rank's use of the shared
mean and variance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients too: every rank's loss depends on every input.

    The same as `torch.distributed.nn.functional.all_reduce`, which torch 2.13 deprecates.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes; plain BatchNorm2d otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        # float64 sums: var = E[x^2] - mean^2 cancels badly in float32 when |mean| >> std.
        xd = x.double()
        local = torch.cat([xd.new_full((1,), x.numel() // c), xd.sum(dim=(0, 2, 3)),
                           (xd * xd).sum(dim=(0, 2, 3))])
        total = _AllReduceSum.apply(local)
        n = total[0]
        mean = total[1:c + 1] / n
        var = (total[c + 1:] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        if self.weight is not None:
            scale = scale * self.weight
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        return y if self.bias is None else y + self.bias[None, :, None, None]

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "GlooSyncBatchNorm":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        if bn.affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        return new


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm2d made process-synchronised: torch's SyncBatchNorm on CUDA, GlooSyncBatchNorm on CPU."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if type(model) is nn.BatchNorm2d:
        return GlooSyncBatchNorm.from_batchnorm(model)
    for name, child in model.named_children():
        new = convert_sync_batchnorm(child, device)
        if new is not child:
            setattr(model, name, new)
    return model


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode with frozen affine parameters (call after each `model.train()`).

    Steps after the first often train on few images per batch, whose statistics would drift the
    running estimates the old classes rely on.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return model
