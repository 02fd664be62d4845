"""What a stage-2 step costs to find its batch's neighbour pairs (each query's known training answers: NDKD's mask).

Three ways, on ``--batches`` random training batches of the dataset (medians, ms per batch):

* ``host list``: the host's CSR lists the (row, answer) pairs (:meth:`~dsom.data.csr.CSRIndex.pairs`), as stage 2 did
  off a CPU before the sixteenth session (then copied to the device);
* ``host count``: the host only counts them (:meth:`~dsom.data.csr.CSRIndex.counts` of the batch's keys), what it
  does now off a CPU;
* ``device list``: :meth:`~dsom.data.csr.CSRIndex.padded_pairs` on ``--device`` in a tensor of the batch's count (an
  eager GPU step) and of a fixed capacity, 1.5x the mean batch's (a captured step); on CUDA the time includes a
  synchronisation.

    python benchmarks/neighbour_pairs.py DB15K
    python benchmarks/neighbour_pairs.py DB15K --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from dsom.data import registry


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", nargs="?", default="synthetic")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = registry.load(args.dataset)
    host = ds.neighbour_index
    dev = host.to(device)
    q = torch.from_numpy(ds.queries("train"))
    counts = host.counts(q[:, 0], q[:, 1])
    capacity = int(1.5 * float(counts.double().mean()) * args.batch_size) + 1
    order = torch.randperm(len(q), generator=torch.Generator().manual_seed(0))
    rows: dict[str, list[float]] = {"host list": [], "host count": [], "device list (count)": [],
                                    "device list (capacity)": []}
    pairs = []
    for b in range(min(args.batches, len(q) // args.batch_size)):
        batch = q[order[b * args.batch_size:(b + 1) * args.batch_size]]
        e, r = batch[:, 0], batch[:, 1]
        de, dr = e.to(device), r.to(device)
        total = int(host.counts(e, r).sum())
        pairs.append(total)
        if total > capacity:
            continue  # (a captured step would grow its capacity: not this benchmark's point)
        cpu = torch.device("cpu")
        ways: dict[str, tuple[Callable[[], object], torch.device]] = {
            "host list": (partial(host.pairs, e, r), cpu),
            "host count": (partial(host.counts, e, r), cpu),  # (and the sum: 1,000 numbers)
            "device list (count)": (partial(dev.padded_pairs, de, dr, total), device),
            "device list (capacity)": (partial(dev.padded_pairs, de, dr, capacity), device)}
        for name, (fn, where) in ways.items():
            rows[name].append(median_ms(fn, args.repeats, where))
    out: dict[str, Any] = {"dataset": args.dataset, "device": str(device), "batch_size": args.batch_size,
                           "pairs_per_batch": statistics.median(pairs), "capacity": capacity,
                           "ms": {k: round(statistics.median(v), 4) for k, v in rows.items() if v}}
    print(f"{args.dataset}: {out['pairs_per_batch']:.0f} neighbour pairs per batch of {args.batch_size} (median), "
          f"capacity {capacity}; ms per batch (median of {len(rows['host list'])} batches), device {device}:")
    for k, v in out["ms"].items():
        print(f"  {k:24s} {v:8.3f}")
    return out


if __name__ == "__main__":
    main()
