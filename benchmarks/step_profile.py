"""Where a plain ComplEx training step spends its time, op by op and by operand shape (``torch.profiler`` with
``record_shapes``): the view that found the unaligned forward product of pair batches (docs/performance.md, twentieth
session). A dataset by name, or ``scale.py``'s random graph (``--entities``; large ones train through the
entity-chunked loss).

    python benchmarks/step_profile.py DB15K --rank 500 --batching pairs --precision fp32
    python benchmarks/step_profile.py --entities 100000 --rank 500 --batching triples --precision fp32

Prints the seconds of each warm-up and timed step, the timed steps' score rows, then the profiled steps' largest ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scale import random_graph  # noqa: E402
from speed import batch_rows, trainer_step  # noqa: E402

from dsom.config import Config, set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.perf import tune_allocator  # noqa: E402
from dsom.train.loop import ComplExTrainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K", help="a dataset name (ignored with --entities)")
    p.add_argument("--entities", type=int, default=0, help="scale.py's random graph of this many entities instead")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batching", default="auto", choices=["auto", "triples", "pairs"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps, then as many profiled")
    p.add_argument("--rows", type=int, default=15, help="ops printed")
    args = p.parse_args(argv)
    tune_allocator()
    ds = (random_graph(args.entities, 100, 4 * args.entities, 1000) if args.entities
          else registry.load(args.dataset))
    cfg = Config()
    for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": args.precision,
                 "train.valid_every": 0, "train.batching": args.batching}.items():
        set_value(cfg, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        tr = ComplExTrainer(ds, cfg, tmp, progress=False)
        order, offsets = tr.epoch_batches(1)
        n = len(offsets) - 1
        seconds = []
        for b in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            trainer_step(tr, order, order, offsets, b % n, b)
            seconds.append(time.perf_counter() - t0)
        timed = seconds[args.warmup:]
        rows = [batch_rows(tr, order, offsets, b % n) for b in range(args.warmup, args.warmup + args.steps)]
        print(f"{ds.name}: E={ds.num_entities}, rank {args.rank}, {tr.batching}, {tr.precision}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print("warm-up steps s:", " ".join(f"{s:.3f}" for s in seconds[:args.warmup]))
        print("timed steps s:  ", " ".join(f"{s:.3f}" for s in timed), " rows:", rows)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for b in range(args.warmup + args.steps, args.warmup + 2 * args.steps):
                trainer_step(tr, order, order, offsets, b % n, b)
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=30, max_shapes_column_width=70))
    return {"warmup_s": seconds[:args.warmup], "step_s": timed, "rows": rows}


if __name__ == "__main__":
    main()
