"""Collectives run on the training device: NCCL (Ray Train's backend for GPU workers) takes no CPU tensors.

gloo, the only backend here, takes tensors on any device, so a run on CPU cannot show the bug by itself. Two checks
together can:
- statically, every torch.distributed collective in the package is called from `train.all_reduce_tensor` alone,
  which takes the device as a required argument, and every call of the helpers passes one;
- dynamically, in a real two-process gloo group whose collectives are wrapped by a checker, the helpers hand the
  collective a tensor on the device they are given -- also a device that is not the CPU ('meta': the checker records
  it and stops there, as gloo cannot reduce it) -- and the sums and BatchNorm averages are right on the CPU.
"""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "ray_hrc"
COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "broadcast_object_list",
    "scatter_object_list", "gather_object", "send", "recv", "isend", "irecv",
}  # fmt: skip
HELPERS = {"all_reduce_tensor", "all_reduce"}  # ray_hrc.train's collective helpers; both take the device explicitly
CALLER_OF_TORCH = "all_reduce_tensor"  # the one function that calls torch.distributed
# Object collectives pickle to a byte tensor that torch itself places on the current CUDA device under NCCL (Ray Train sets
# it per worker), so they are NCCL-safe without a device argument; only this one is allowed, only here.
OBJECT_COLLECTIVES = {("train.py", "_gather_rng_states", "all_gather_object")}
# The CPU BatchNorm of the global batch reduces tensors made from the activations themselves (on their device) inside
# the autograd function, in the core, which cannot import train's helper; on GPUs nn.SyncBatchNorm is used instead.
ACTIVATION_COLLECTIVES = {("syncbn.py", "forward", "all_reduce"), ("syncbn.py", "backward", "all_reduce")}


def _is_torch_distributed(node: ast.expr, aliases: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in aliases
    return isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch"


def _functions(tree: ast.AST):
    """(function name, node) for every function, with the innermost function enclosing each node."""
    parents: dict[ast.AST, str] = {}

    def visit(node: ast.AST, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else owner
            parents[child] = name
            visit(child, name)

    visit(tree, "<module>")
    return parents


def test_every_collective_goes_through_the_device_helper():
    found_helper_call = False
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name == "torch.distributed"
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                names = {a.name for a in node.names} & COLLECTIVES
                assert not names, f"{path.name}:{node.lineno} imports {names} from torch.distributed; use ray_hrc.train.{CALLER_OF_TORCH}"
        owners = _functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr in COLLECTIVES and _is_torch_distributed(node.func.value, aliases):
                where = owners.get(node)
                if (path.name, where, node.func.attr) in OBJECT_COLLECTIVES | ACTIVATION_COLLECTIVES:
                    continue
                assert (path.name, where) == ("train.py", CALLER_OF_TORCH), (
                    f"{path.name}:{node.lineno} calls torch.distributed.{node.func.attr} in {where}(); every collective must go "
                    f"through train.{CALLER_OF_TORCH}(tensor, device), which moves the tensor to the model's device"
                )
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                direct = isinstance(node.func, ast.Attribute) and _is_torch_distributed(node.func.value, aliases)  # checked above
                if name in HELPERS and owners.get(node) not in HELPERS and not direct:
                    found_helper_call = True
                    given = len(node.args) + len([k for k in node.keywords if k.arg == "device"])
                    assert given >= 2, f"{path.name}:{node.lineno} calls {name} without a device"
    assert found_helper_call, "no call of the collective helpers found: the check checked nothing"

    from ray_hrc import train

    for name in HELPERS:
        param = inspect.signature(getattr(train, name)).parameters["device"]
        assert param.default is param.empty, f"train.{name}'s device must be required, not defaulted"


class _Reached(Exception):
    """Raised by the checker for a tensor gloo cannot reduce (not on the CPU), once its device is recorded."""


def _install_checker(seen: list[tuple[str, torch.device]]) -> None:
    """Wrap torch.distributed's collectives: record each tensor's device; stop at a non-CPU one (gloo runs CPU only)."""
    for name in COLLECTIVES & set(dir(dist)):
        real = getattr(dist, name)

        def checked(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            for t in tensors:
                seen.append((_name, t.device))
            if any(t.device.type != "cpu" for t in tensors):
                raise _Reached(tensors[0].device)
            return _real(*args, **kwargs)

        setattr(dist, name, checked)


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))


def _worker(rank: int, store: str) -> None:
    from ray_hrc.train import all_reduce, all_reduce_tensor, recalibrate_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen: list[tuple[str, torch.device]] = []
    _install_checker(seen)
    cpu, meta = torch.device("cpu"), torch.device("meta")

    # sums, on the CPU: real gloo
    out = all_reduce(np.array([rank + 1.0, 2.0, 0.5 * rank]), cpu)
    np.testing.assert_allclose(out, [3.0, 4.0, 0.5])
    assert seen and all(d == cpu for _, d in seen), seen

    # a device that is not the CPU: the collective must receive the tensor there
    for helper, value in ((all_reduce, np.arange(3.0)), (all_reduce_tensor, torch.arange(3.0))):
        seen.clear()
        with pytest.raises(_Reached):
            helper(value, meta)
        assert [d for _, d in seen] == [meta], f"{helper.__name__}(..., meta) handed the collective tensors on {seen}"

    # BatchNorm recalibration averages the statistics of both workers' inputs, on the module's device
    torch.manual_seed(0)
    model = _bn_model()
    inputs = [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10 * rank + i)) + rank for i in range(3)]
    seen.clear()
    recalibrate_batchnorm(model, inputs)
    assert seen and all(d == cpu for _, d in seen), seen
    for other in range(2):  # what each worker would get alone; the result must be their mean
        alone = _bn_model()
        alone.load_state_dict(model.state_dict())
        torch.optim.swa_utils.update_bn(
            [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10 * other + i)) + other for i in range(3)], alone
        )
        if other == 0:
            expected = [m.running_mean.clone() / 2 for m in alone.modules() if isinstance(m, nn.BatchNorm2d)]
        else:
            expected = [
                e + m.running_mean / 2 for e, m in zip(expected, [m for m in alone.modules() if isinstance(m, nn.BatchNorm2d)], strict=True)
            ]
    got = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_collectives_receive_tensors_on_the_given_device(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
