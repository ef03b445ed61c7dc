"""BatchNorm statistics over the global batch of data-parallel workers, on CPU as well as on GPU. No Ray.

A BatchNorm layer in train mode normalises each forward with the statistics of its own chips: with the demo's two
workers of two chips, the statistics of two. Measured on the demo's archive and split (`bench/recipe_study.py`, the
same recipe, one process): BatchNorm over 2 chips left the training loss at 0.61-0.69 after 8 epochs, while the same
steps with BatchNorm over the 4 chips of the global batch (`--bn-batch 4`) reached 0.31 by epoch 5. With two same-label
chips in a forward, the deep layers normalise a chip against its partner and the class signal in a channel's level
is removed; what is learnt does not hold in eval mode (`bench/loss_probe.py`: 0.64 in train mode, 0.51 in eval mode,
same weights and chips).

`nn.SyncBatchNorm` pools the statistics across the process group but runs on CUDA (and XPU) only. `CpuSyncBatchNorm`
does the same on CPU over gloo: the forward all-reduces each channel's count, sum and sum of squared deviations
(float64, one small tensor per layer), the backward all-reduces the two sums of the gradient BatchNorm's backward
needs. Both are `nn.BatchNorm2d` with the same parameters, buffers and state_dict keys, so checkpoints, BatchNorm
folding and the predictor are unchanged, and in eval mode (or in a single process) they are plain BatchNorm.
`sync_batchnorm` picks the one for a device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group):
        c = x.shape[1]
        n_l = x.numel() // c
        if x.is_contiguous(memory_format=torch.channels_last):
            # a (pixels, channels) matrix: a sum and a norm down its columns take a third of var_mean's time here
            # (85 against 225 ms for the demo's conv1 output, 2 x 2 x 2042 x 4090, one thread). The variance is
            # E[x^2] - E[x]^2 from float32 sums (cascade-summed) combined in float64: it loses precision only for
            # channels whose mean is thousands of standard deviations from 0, which BatchNorm'd layers do not have
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)
            total_l = rows.sum(0).double()
            squares_l = torch.linalg.vector_norm(rows, dim=0).double() ** 2
        else:
            planes = x.reshape(x.shape[0], c, -1)  # a view when contiguous
            total_l = planes.sum((0, 2)).double()
            squares_l = torch.linalg.vector_norm(planes, dim=(0, 2)).double() ** 2
        # per channel: count, sum and sum of squares over every worker's chips; on the activations' device, as every
        # collective's tensor must be (tests/test_collectives.py)
        stats = torch.cat([torch.full((c,), float(n_l), dtype=torch.float64, device=x.device), total_l, squares_l])
        dist.all_reduce(stats, group=group)
        n, total, squares = stats[:c], stats[c : 2 * c], stats[2 * c :]
        mean = total / n
        var = (squares / n - mean**2).clamp_min(0.0)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(running_var.dtype), momentum)
        mean_f, var_f = mean.to(x.dtype), var.to(x.dtype)
        invstd = torch.rsqrt(var_f + eps)
        ctx.save_for_backward(x, weight, mean_f, invstd, n)
        ctx.eps, ctx.group = eps, group
        return F.batch_norm(x, mean_f, var_f, weight, bias, False, 0.0, eps)  # the fused kernel, with the global statistics

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, n = ctx.saved_tensors
        c = x.shape[1]
        grad = grad.contiguous(
            memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        )
        # BatchNorm's own backward gives this worker's sums: dL/dweight = sum(g * xhat), dL/dbias = sum(g)
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        sums = torch.cat([grad_bias, grad_weight]).double()
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_gx = (sums[:c] / n).to(x.dtype), (sums[c:] / n).to(x.dtype)
        a = (weight if weight is not None else torch.ones_like(invstd)) * invstd
        # dx = a * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * invstd; as g * a + x * k + b per channel
        k = -a * invstd * mean_gx
        b = -a * mean_g - k * mean
        shape = (1, c, 1, 1)
        grad_x = torch.addcmul(torch.addcmul(b.view(shape), x, k.view(shape)), grad, a.view(shape))
        # parameter gradients stay this worker's share: data-parallel training averages them across workers
        return grad_x, grad_weight if weight is not None else None, grad_bias if weight is not None else None, None, None, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose train-mode statistics are those of every worker's batch together (gloo, CPU tensors)."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) == 1:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a cumulative average, as BatchNorm's (torch.optim.swa_utils.update_bn sets it)
            momentum = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked is not None else 0.0
        else:
            momentum = self.momentum
        group = self.process_group or dist.group.WORLD
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, momentum, group)


@contextlib.contextmanager
def local_batchnorm(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s synchronised BatchNorm layers are plain ones: statistics of this worker's chips only.

    For work that workers do unequally or on their own, where a collective per layer would wait forever for a worker
    that does not call it (recomputing BatchNorm statistics from each worker's last chips, then averaging them).
    """
    synced = [(m, type(m)) for m in model.modules() if isinstance(m, (CpuSyncBatchNorm, nn.SyncBatchNorm))]
    for module, _ in synced:
        module.__class__ = nn.BatchNorm2d
    try:
        yield
    finally:
        for module, cls in synced:
            module.__class__ = cls


def sync_batchnorm(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """`model` with every `nn.BatchNorm2d` computing its statistics over all data-parallel workers' chips.

    CUDA: `nn.SyncBatchNorm` (NCCL). CPU: `CpuSyncBatchNorm`, in place. Either way the state_dict keys are unchanged.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CpuSyncBatchNorm
    return model
