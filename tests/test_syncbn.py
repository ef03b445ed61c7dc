"""BatchNorm over the global batch on CPU: two gloo processes with half the chips each give what one process gives
with all of them (outputs, input and parameter gradients, running statistics); eval mode and checkpoints unchanged."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ray_hrc.models import build_model
from ray_hrc.models.syncbn import CpuSyncBatchNorm, local_batchnorm, sync_batchnorm

CHANNELS = 3


def _layer() -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _data(channels_last: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, CHANNELS, 9, 7, generator=g) * 2.0 + 3.0  # a mean off 0: the variance must not cancel
    r = torch.randn(4, CHANNELS, 9, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, r


def _worker(rank: int, world: int, port: int, out: str, channels_last: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bn = sync_batchnorm(_layer())
        x, r = _data(channels_last)
        part = slice(rank * 4 // world, (rank + 1) * 4 // world)
        xs = x[part].clone().requires_grad_()
        y = bn.train()(xs)
        (y * r[part]).sum().backward()
        result = {"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                  "mean": bn.running_mean.clone(), "var": bn.running_var.clone()}  # fmt: skip
        # momentum None: a cumulative average over forwards, as torch.optim.swa_utils.update_bn uses it
        bn.reset_running_stats()
        bn.momentum = None
        with torch.no_grad():
            for seed in (2, 3):
                bn(_data(channels_last, seed)[0][part])
        result["cumulative"] = (bn.running_mean.clone(), bn.running_var.clone())
        # local_batchnorm: each worker alone, as many forwards as it likes (rank 1 two, rank 0 one): no collective waits
        bn.reset_running_stats()
        with local_batchnorm(bn), torch.no_grad():
            for _ in range(rank + 1):
                local = bn(x[part])
        assert type(bn) is CpuSyncBatchNorm
        result["local"] = local
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("channels_last", [False, True])
def test_two_workers_of_two_chips_are_one_batch_of_four(tmp_path, channels_last):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), channels_last), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]

    bn = _layer()
    x, r = _data(channels_last)
    x = x.clone().requires_grad_()
    y = bn.train()(x)
    (y * r).sum().backward()

    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), x.grad, **tol)
    # each worker keeps its own share of the parameter gradients; data-parallel training sums (averages) them
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], bn.weight.grad, **tol)
    torch.testing.assert_close(parts[0]["db"] + parts[1]["db"], bn.bias.grad, **tol)
    for p in parts:  # every worker's running statistics are the global batch's
        torch.testing.assert_close(p["mean"], bn.running_mean, **tol)
        torch.testing.assert_close(p["var"], bn.running_var, **tol)
    bn.reset_running_stats()
    bn.momentum = None
    with torch.no_grad():
        for seed in (2, 3):
            bn(_data(channels_last, seed)[0])
    for p in parts:
        torch.testing.assert_close(p["cumulative"], (bn.running_mean, bn.running_var), **tol)
    for rank, p in enumerate(parts):
        half = x.detach()[rank * 2 : rank * 2 + 2]
        torch.testing.assert_close(p["local"], _layer().train()(half), **tol)


def test_one_process_and_eval_mode_are_plain_batchnorm_and_checkpoints_are_unchanged():
    model = build_model("hrcelestialnet", width=1 / 32, input_shape=(1322, 1322))
    plain = copy.deepcopy(model)
    synced = sync_batchnorm(model, "cpu")
    assert sum(isinstance(m, CpuSyncBatchNorm) for m in synced.modules()) == 12
    assert synced.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 1, 1322, 1322)
    torch.testing.assert_close(synced.train()(x), plain.train()(x))  # no process group: BatchNorm over its own chips
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(x), plain.eval()(x))
    build_model("hrcelestialnet", width=1 / 32, input_shape=(1322, 1322)).load_state_dict(synced.state_dict(), strict=True)
