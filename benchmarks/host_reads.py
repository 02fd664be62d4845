"""The ops of a training step whose result the host must read, with where dsom calls them: each is a host sync on a
GPU (the host waits for the device to finish everything queued before it) and something a CUDA graph cannot hold.
Found without a GPU: the step (loss and backward) runs once on ``meta`` tensors (shapes, no values), as it would on a
GPU (the non-CPU code paths), under a dispatch mode that records every such op (``nonzero``, boolean-mask indexing,
``unique``, ``item``, ``bincount``, ``repeat_interleave`` without an output size, ...) and stands in a result of a
plausible shape so the step can go on to the next.

    python benchmarks/host_reads.py                       # synthetic graph: ComplEx, stage 1, stage 2
    python benchmarks/host_reads.py --phases distill --set distill.policy_state=summary

A stand-in result has an invented size, so what follows it runs on invented shapes: an op found after the first is
real code on the step's path, but the list may miss an op on a branch the invented values did not take. On a GPU,
``benchmarks/cuda_graphs.py --sync-scan`` lists the syncs a real epoch makes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed import base_config, phase_trainer  # noqa: E402  (next door)

from dsom.config import set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.train.loop import Trainer  # noqa: E402

PHASES = ("complex", "teachers", "distill")
aten = torch.ops.aten
META = torch.device("meta")


def _guess(n: int) -> int:
    """The invented size of a data-dependent result drawn from ``n`` elements."""
    return max(1, n // 4)


class HostReads(TorchDispatchMode):
    """Records each op whose result the host must read (``found``: ``(op, dsom file:line)`` -> count) and returns a
    stand-in; every other op runs as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[tuple[str, str]] = Counter()
        self.last: str | None = None  # where the last read was

    def _record(self, op: str) -> None:
        frames = [f for f in traceback.extract_stack() if os.sep + "dsom" + os.sep in f.filename
                  and "host_reads" not in f.filename]
        where = f"{frames[-1].filename.split(os.sep + 'src' + os.sep)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.found[(op, where)] += 1
        self.last = where

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not any(isinstance(a, torch.Tensor) and a.device == META
                   for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            return func(*args, **kwargs)  # host work on host tensors (a CPU lookup): no wait for the device
        if func is aten.nonzero.default:
            self._record("nonzero")
            x = args[0]
            return torch.zeros(_guess(x.numel()), x.dim(), dtype=torch.int64, device=x.device)
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self._record("boolean-mask indexing")
            idx = [None if i is None else (torch.zeros(_guess(i.numel()), dtype=torch.int64, device=i.device)
                                           if i.dtype == torch.bool else i) for i in args[1]]
            return func(args[0], idx)
        if func is aten._local_scalar_dense.default:
            self._record("item / bool / int of a tensor")
            x = args[0]
            return True if x.dtype == torch.bool else (1.0 if x.is_floating_point() else 1)
        if func in (aten.is_nonzero.default, aten.equal.default):
            self._record(func.__name__)
            return True
        if func in (aten._unique2.default, aten.unique_consecutive.default):
            self._record("unique")
            x = args[0]
            n = _guess(x.numel())
            vals = torch.zeros(n, dtype=x.dtype, device=x.device)
            return vals, torch.zeros(x.shape, dtype=torch.int64, device=x.device), torch.zeros(n, dtype=torch.int64,
                                                                                                device=x.device)
        if func is aten.unique_dim.default:  # (x, dim, ...): distinct slices along dim
            self._record("unique")
            x, dim = args[0], args[1] % max(args[0].dim(), 1)
            n = _guess(x.shape[dim])
            shape = list(x.shape)
            shape[dim] = n
            return (torch.zeros(shape, dtype=x.dtype, device=x.device),
                    torch.zeros(x.shape[dim], dtype=torch.int64, device=x.device),
                    torch.zeros(n, dtype=torch.int64, device=x.device))
        if func is aten.masked_select.default:
            self._record("masked_select")
            return torch.zeros(_guess(args[0].numel()), dtype=args[0].dtype, device=args[0].device)
        if func is aten.bincount.default:
            self._record("bincount")
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return torch.zeros(max(int(minlength), 1), dtype=torch.int64, device=args[0].device)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
            r = args[0]
            return torch.zeros(2 * r.numel(), dtype=torch.int64, device=r.device)
        if kwargs.get("generator") is not None:  # meta kernels draw nothing and take no generator
            kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        return func(*args, **kwargs)


def _to_meta(x: Any) -> Any:
    """A meta tensor of ``x``'s shape and dtype (``None`` stays)."""
    return None if x is None else torch.zeros(x.shape, dtype=x.dtype, device=META)


def _tensors_to_meta(obj: Any) -> None:
    """Every tensor attribute of ``obj`` as a meta tensor."""
    for k, v in list(vars(obj).items()):
        if torch.is_tensor(v):
            setattr(obj, k, _to_meta(v))


def trainer_to_meta(tr: Trainer) -> None:
    """Put ``tr``'s device-side state on ``meta``: the model (and a distiller's frozen teachers), the device copy of
    the training queries, and a student trainer's device indices and caches. Host copies stay on the CPU."""
    tr.model.to_empty(device=META)
    teachers = getattr(tr.model, "teachers", None)
    if teachers is not None and not isinstance(teachers, torch.nn.Module):
        _tensors_to_meta(teachers)
    tr.train_queries = _to_meta(tr.train_queries)
    for name in ("reward_rows", "_query_pair_ids", "_reward_slots"):
        if hasattr(tr, name):
            setattr(tr, name, _to_meta(getattr(tr, name)))
    if hasattr(tr, "neighbours"):
        _tensors_to_meta(tr.neighbours)
    for _, cache in getattr(tr, "_caches", lambda: [])():
        _tensors_to_meta(cache)


def make_trainer(phase: str, ds: Any, args: argparse.Namespace, tmp: str) -> Trainer:
    ns = argparse.Namespace(rank=args.rank, batch_size=args.batch_size, precision=args.precision,
                            batching=args.batching, compile="off")
    cfg = base_config(ns, torch.device("cpu"))
    for kv in args.set:
        key, value = kv.split("=", 1)
        set_value(cfg, key, value)
    return phase_trainer(phase, ds, cfg, args.modalities, tmp)


def host_reads(tr: Trainer, epoch: int = 1, sealed: bool = False, captured: bool = False) -> Counter[tuple[str, str]]:
    """The host reads of one training step (loss and backward) of ``tr`` on the first batch of ``epoch``, on meta
    tensors; ``sealed``: with a student trainer's caches marked full, as from its second epoch; ``captured``: the step
    as a CUDA graph records it (the trainer's host inputs prepared first, then the loss run while ``capturing``)."""
    order, offsets = tr.epoch_batches(epoch)
    sl = slice(offsets[0], offsets[1])
    trainer_to_meta(tr)
    if sealed:
        for _, cache in getattr(tr, "_caches", lambda: [])():
            cache.sealed = True
    tr.current_epoch, tr.current_batch = epoch, 0
    tr.current_batch_cpu = tr.train_queries_cpu[order[sl]]  # the host copy, as the epoch loop sets it
    tr.current_batch_index = torch.zeros(sl.stop - sl.start, dtype=torch.int64, device=META)
    tr.current_batch_index_cpu = order[sl]
    if captured:
        tr.graph_inputs()  # (host work before a replay: outside the recorded step)
    mode = HostReads()
    tr.capturing = captured
    try:
        with mode:
            step = tr.loss(tr.train_queries[tr.current_batch_index])
            step.total.backward()
    except Exception as exc:  # noqa: BLE001 - an invented size ran into a real one: report what was found
        mode.found[(f"(the step stopped here on invented sizes: {type(exc).__name__})", mode.last or "?")] += 1
    finally:
        tr.capturing = False
    return mode.found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="synthetic")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batching", default="triples", choices=["triples", "pairs"])
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--epoch", type=int, default=1, help="the epoch whose first step is read")
    p.add_argument("--sealed", action="store_true", help="stage 2's caches (summary states, reward CEs) marked "
                   "full, as they are from the second epoch on (they fill during the first)")
    p.add_argument("--captured", action="store_true", help="the step as train.cuda_graphs records it (stage 2 then "
                   "builds its neighbour pairs on the device in fixed-size tensors)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides (repeatable)")
    args = p.parse_args(argv)
    if not set(args.phases.split(",")) <= set(PHASES):
        raise SystemExit(f"--phases: of {', '.join(PHASES)} (got {args.phases!r})")
    ds = registry.load(args.dataset)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in args.phases.split(","):
            found = host_reads(make_trainer(phase, ds, args, os.path.join(tmp, phase)), args.epoch, args.sealed,
                               args.captured)
            out[phase] = [{"op": op, "where": where, "calls": n} for (op, where), n in found.items()]
            print(f"{phase}: {len(found)} host read{'s' if len(found) != 1 else ''} in one step "
                  f"({args.precision}, batching {args.batching}{', sealed caches' if args.sealed else ''}"
                  f"{', as captured' if args.captured else ''}"
                  f"{', ' + ' '.join(args.set) if args.set else ''})")
            for (op, where), n in found.items():
                print(f"    {where:<40} {op}" + (f" (x{n})" if n > 1 else ""))
    return out


if __name__ == "__main__":
    main()
