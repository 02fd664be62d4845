"""Multi-process runs on ``torch.distributed``, launched with ``torchrun`` (issue 14; docs/distributed.md).

Evaluation: ``torchrun --nproc_per_node N -m dsom evaluate RUN`` shards the distinct (entity, relation) pairs of
the split over the N processes; each ranks its share against all entities and the per-query counts are summed over
processes (every other process contributed zeros there), so every process ends with the exact counts of a
one-process run.

Training (``run``, ``pretrain``, ``distill``): data parallel with replicated tables. Every process computes the same
epoch order, takes its contiguous share (:func:`share`) of each global batch, weights its loss by its share of the
batch and sums the gradients over processes (:func:`reduce_gradients`) before every optimizer step, so each step
applies the gradient of the whole batch, as one process would.

Only rank 0 prints and writes files. The backend is NCCL on CUDA and gloo otherwise (``DSOM_DIST_BACKEND``
overrides); each process uses ``cuda:LOCAL_RANK`` when CUDA is there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsom.errors import DsomError

#: commands that run on several processes; the others refuse to start under torchrun
DISTRIBUTED_COMMANDS = ("evaluate", "run", "pretrain", "distill")


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(command: str) -> None:
    """Join the process group torchrun describes in the environment (a no-op for a single process)."""
    if not launched() or dist.is_initialized():
        return
    if command not in DISTRIBUTED_COMMANDS:
        raise DsomError(f"dsom {command} runs in one process; under torchrun only "
                        f"{', '.join(f'dsom {c}' for c in DISTRIBUTED_COMMANDS)} are distributed")
    backend = os.environ.get("DSOM_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> tuple[int, int]:
    """This process's contiguous share ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
    r, w = rank(), world()
    return n * r // w, n * (r + 1) // w


def share(lo: int, hi: int) -> tuple[int, int]:
    """This process's contiguous share of the rows ``[lo, hi)`` (of a global batch), as absolute offsets."""
    a, b = shard(hi - lo)
    return lo + a, lo + b


def sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (the tensor itself when running alone)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def merge_filled(values: torch.Tensor, filled: torch.Tensor) -> None:
    """Every process's rows of a per-row cache, in place: ``values (N, ...)`` becomes, on each row some process filled
    (``filled (N,)`` bool), the mean of those processes' values (equal up to float rounding: the rows are functions of
    frozen models), and zeros elsewhere; ``filled`` becomes the union. One all-reduce (nothing when running alone).
    Under torchrun each process fills the rows of its share of every batch: merged after an epoch, the cache holds
    every row, as one process's does."""
    if not active():
        return
    flat = values.reshape(len(values), -1)
    both = torch.cat([filled.to(flat.dtype).unsqueeze(1), flat * filled.unsqueeze(1)], 1)
    sum_(both)
    count = both[:, 0]
    have = count > 0
    flat.copy_(both[:, 1:] / count.clamp(min=1).unsqueeze(1))
    filled.copy_(have)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (a picklable value, e.g. the run directory's name)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every process's tensors with rank 0's, in place (e.g. the selected weights rank 0 read back).
    With NCCL a CPU tensor travels through this process's GPU."""
    if not active():
        return
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        if nccl and t.device.type == "cpu":
            buf = t.data.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(buf, src=0)
            t.data.copy_(buf.cpu())
        else:
            dist.broadcast(t.data, src=0)


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers of ``module`` on every process."""
    broadcast_([*module.parameters(), *(b for b in module.buffers() if b is not None)])


@torch.no_grad()
def reduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes, in place (nothing when running alone).

    Each process has weighted its loss by its share of the global batch, so the sum is the gradient of the whole
    batch. A parameter that got no gradient on a process takes part with zeros; one that got none on any process
    keeps ``grad = None``, as in one process (an optimizer skips it rather than stepping it with zeros). Each
    gradient is reduced in place: a few tensors per step (the tables dominate), no flat copy of them all."""
    if not active():
        return
    params = list(params)
    if not params:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(had, op=dist.ReduceOp.SUM)
    for p, h in zip(params, had.tolist()):
        if h == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            raise DsomError("distributed training needs dense gradients; sparse gradients are not reduced")
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def device(default: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA process of a distributed run, else ``default``."""
    if active() and default.type == "cuda":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return default


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DISTRIBUTED_COMMANDS", "active", "barrier", "broadcast_", "broadcast_module", "broadcast_object", "device",
           "finish", "init_from_env", "is_main", "launched", "rank", "reduce_gradients", "share", "shard", "sum_",
           "world"]
