"""cppo.rl.clip.clip_grad_norm: on two gloo processes under FSDP2 it gives the norm and the clipped
gradients of torch's clip_grad_norm_ on the same sharded model and of the unsharded full gradients,
with one scalar all-reduce; a non-finite gradient in one process's shard is non-finite on both (so
both skip the step). Unsharded, it is torch's clip.

The model: Linear(5, 7) -> tanh -> Linear(7, 3), each Linear its own FSDP unit, so dim 0 splits
unevenly (7 rows: 4 + 3; 3 rows: 2 + 1). Each process backpropagates its own batch; FSDP sums the
gradients (divide factor 1, as cppo.rl.fsdp sets), so the full gradient is the sum of both batches'."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cppo.rl.clip import clip_grad_norm

# (case, max_norm as a fraction of the unsharded norm, norm_type)
CASES = [("clipped", 0.5, 2.0), ("not clipped", 10.0, 2.0), ("inf-norm clipped", 0.3, math.inf)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _loss(model: nn.Module, rank: int) -> torch.Tensor:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + rank))  # (4, 5) this rank's batch
    return (model(x) ** 2).sum()


def _unsharded(max_norm_frac: float, norm_type: float):
    """(norm, max_norm, clipped full gradients) of torch's clip on one unsharded model fed both batches."""
    ref = _model()
    for rank in (0, 1):
        _loss(ref, rank).backward()
    params = list(ref.parameters())
    whole = float(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm_frac * whole, norm_type)
    return float(norm), max_norm_frac * whole, [p.grad.clone() for p in params]


def _worker(rank: int, init: str, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model = _model()
    units = [model[0], model[2], model]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    _loss(model, rank).backward()
    params = list(model.parameters())
    saved = [p.grad.detach().clone() for p in params]

    def restore():
        for p, g in zip(params, saved):
            p.grad = g.clone()

    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kw):
        calls.append((tensor.numel(), tensor.device.type))
        return all_reduce(tensor, *args, **kw)

    def max_diff(want):  # max |diff| of the clipped full gradients against `want`
        return max(float((p.grad.full_tensor() - w).abs().max()) for p, w in zip(params, want))

    out = {"local_rows": [p.to_local().shape[0] for p in params]}
    for case, frac, norm_type in CASES:
        ref_norm, max_norm, ref_grads = _unsharded(frac, norm_type)
        restore()
        norm_torch = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type).full_tensor()
        grads_torch = [p.grad.full_tensor() for p in params]
        restore()
        calls.clear()
        dist.all_reduce = counting
        try:
            norm = clip_grad_norm(params, max_norm, norm_type)
        finally:
            dist.all_reduce = all_reduce
        out[case] = {
            "ref": ref_norm,
            "torch": float(norm_torch),
            "ours": float(norm),
            "plain": type(norm) is torch.Tensor,
            "calls": list(calls),
            "vs_ref": max_diff(ref_grads),
            "vs_torch": max_diff(grads_torch),
            "equal_torch": all(torch.equal(p.grad.full_tensor(), t) for p, t in zip(params, grads_torch)),
        }
    non_finite = [("nan", math.nan, 2.0), ("inf", math.inf, 2.0), ("nan inf-norm", math.nan, math.inf)]
    for case, bad, norm_type in non_finite:
        restore()
        if rank == 1:  # only in rank 1's rows of the first weight
            params[0].grad.to_local()[0, 0] = bad
        out[case] = float(clip_grad_norm(params, 1.0, norm_type))
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = tmp_path_factory.mktemp("clip") / "store"
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{store}", results), nprocs=2)
    return dict(results)


def test_the_gradients_are_sharded_unevenly(two_processes):
    # Linear(5, 7): weight and bias 7 rows = 4 + 3; Linear(7, 3): 3 rows = 2 + 1
    assert two_processes[0]["local_rows"] == [4, 4, 2, 2]
    assert two_processes[1]["local_rows"] == [3, 3, 1, 1]


@pytest.mark.parametrize("case", [c for c, _, _ in CASES])
def test_sharded_clip_equals_torch_and_the_unsharded_gradients(two_processes, case):
    for rank in (0, 1):
        got = two_processes[rank][case]
        assert got["plain"]  # a plain tensor, not a DTensor
        assert got["ours"] == pytest.approx(got["torch"], rel=1e-6)
        assert got["ours"] == pytest.approx(got["ref"], rel=1e-6)
        assert got["vs_torch"] < 1e-6 and got["vs_ref"] < 1e-6  # clipped gradients, max |diff|
        assert got["calls"] == [(1, "cpu")]  # one scalar all-reduce, on gloo's device
    assert two_processes[0][case]["ours"] == two_processes[1][case]["ours"]


def test_clipping_scales_only_when_the_norm_exceeds_max_norm(two_processes):
    clipped, kept = two_processes[0]["clipped"], two_processes[0]["not clipped"]
    assert clipped["ours"] == pytest.approx(kept["ours"], rel=1e-6)  # the norm before clipping
    assert kept["equal_torch"]  # factor 1: the gradients are untouched, as torch leaves them


def test_a_non_finite_gradient_on_one_process_is_non_finite_on_both(two_processes):
    for rank in (0, 1):
        assert math.isnan(two_processes[rank]["nan"])
        assert two_processes[rank]["inf"] == math.inf
        assert two_processes[rank]["nan inf-norm"] == math.inf  # a MAX all-reduce cannot drop it


def test_unsharded_parameters_use_torch_clip():
    a, b = _model(), _model()
    for m in (a, b):
        _loss(m, 0).backward()
    norm = clip_grad_norm(a.parameters(), 0.1)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    assert torch.equal(norm, want)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
