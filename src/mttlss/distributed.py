"""The one place that knows about multiple processes: torchrun ranks or a local process pool.

Everything else is written for a single process and asks this module for "my share of the work"
(``shard``) and "everyone's results" (``gather``), so single-process code never branches on it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(device: str | None = None) -> str:
    """``device`` if given, else the first GPU when one is present, else the CPU."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun, else describe a single process.

    Under torchrun each rank gets one GPU (``cuda:LOCAL_RANK``) when GPUs are present; the CPU-only
    backend is gloo so the same command also works on a laptop.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=default_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = default_device(device)
    if dev.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shard(items: Sequence[Any], info: DistInfo) -> list[Any]:
    """This rank's share of ``items`` (round robin, so shares differ in size by at most one)."""
    return list(items)[info.rank :: info.world_size]


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` for one process)."""
    if info.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _call(args: tuple[Callable, Any, int]) -> Any:
    fn, item, threads = args
    torch.set_num_threads(threads)  # N processes share the cores instead of each grabbing all of them
    return fn(item)


def map_in_processes(fn: Callable[[Any], Any], items: Sequence[Any], *, workers: int = 1) -> list[Any]:
    """``[fn(x) for x in items]``, in ``workers`` spawned processes when workers > 1 (results in input order).

    ``fn`` must be a module-level function (it is pickled). Each process gets an equal share of the CPU threads.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    workers = min(workers, len(items))
    threads = max(1, torch.get_num_threads() // workers)
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    with ctx.Pool(workers) as pool:
        return pool.map(_call, [(fn, x, threads) for x in items], chunksize=1)


# ---------------------------------------------------------------------------------------------------------
# one distillation over several ranks: each rank computes the inner loss on its slice of the synthetic batch
#
# The matching loss is computed identically on every rank (theta, alpha and the expert segment are
# replicated), so the collectives below have "replicated loss" semantics: a sum of per-rank partial inner
# gradients whose backward is the identity, and a replicated parameter vector whose backward sums the
# per-rank partial cotangents. With one process every function here returns its input.


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_positions(batch_size: int) -> slice:
    """This rank's contiguous share of positions 0 .. batch_size - 1 (shares differ in size by at most one)."""
    rank, size = world()
    base, extra = divmod(batch_size, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no graph); ``t`` itself with one process."""
    if world()[1] == 1:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out


class _SumOfPartials(torch.autograd.Function):
    """Forward: the sum over ranks of a partial result. Backward: identity (the loss above it is replicated)."""

    @staticmethod
    def forward(ctx, t):
        return all_reduce_sum(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Replicated(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: the sum of every rank's partial cotangent."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad)


def sum_of_partials(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks of per-rank partial results, e.g. the inner gradient of a sliced batch."""
    return t if world()[1] == 1 else _SumOfPartials.apply(t)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """Mark a replicated tensor (theta_n) that every rank uses on its own slice: its gradient is summed."""
    return t if world()[1] == 1 else _Replicated.apply(t)


def reduce_partial_grads(tensors: list[torch.Tensor]) -> None:
    """Sum the ``.grad`` of tensors whose gradient each rank holds only a part of (the synthetic factors, the
    label logits), so that every rank takes the same outer update."""
    if world()[1] == 1:
        return
    for t in tensors:
        if t.grad is not None:
            torch.distributed.all_reduce(t.grad)
