"""Multi-process runs on ``torch.distributed``, launched with ``torchrun`` (issue 14; so far: evaluation).

``torchrun --nproc_per_node N -m dsom evaluate RUN`` shards the distinct (entity, relation) pairs of the split over
the N processes; each ranks its share against all entities and the per-query counts are summed over processes
(every other process contributed zeros there), so every process ends with the exact counts of a one-process run.
Only rank 0 prints and writes files. The backend is NCCL on CUDA and gloo otherwise (``DSOM_DIST_BACKEND``
overrides); each process uses ``cuda:LOCAL_RANK`` when CUDA is there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dsom.errors import DsomError

#: commands that run on several processes; the others refuse to start under torchrun
DISTRIBUTED_COMMANDS = ("evaluate",)


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(command: str) -> None:
    """Join the process group torchrun describes in the environment (a no-op for a single process)."""
    if not launched() or dist.is_initialized():
        return
    if command not in DISTRIBUTED_COMMANDS:
        raise DsomError(f"dsom {command} runs in one process; under torchrun only "
                        f"{', '.join(f'dsom {c}' for c in DISTRIBUTED_COMMANDS)} is distributed so far")
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


def sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (the tensor itself when running alone)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def device(default: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA process of a distributed run, else ``default``."""
    if active() and default.type == "cuda":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return default


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DISTRIBUTED_COMMANDS", "active", "device", "finish", "init_from_env", "is_main", "launched", "rank",
           "shard", "sum_", "world"]
