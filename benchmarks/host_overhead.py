"""The host's cost of a training step: steps at a shape so small that the products cost nothing (the synthetic graph,
rank 8, batch 16 by default), so the time per step is what dispatching the step's operations costs. On a GPU (and on
AMX, where the products are fast) this cost sets the speed of a step whose products are smaller than it: on one
H200 a DB15K ComplEx step took 7.6 ms at rank 500 and 8.2 ms at rank 2000 (docs/performance.md, "GPU").

For each phase (``complex``: one structural ComplEx; ``teachers``: stage 1 with ``--modalities``; ``distill``: stage 2,
speed.py's random teachers) and each ``--compile`` setting, it times ``--steps`` steps after ``--warmup`` steps
(compilation) and prints the median and mean ms per step, then profiles ``--profile-steps`` more steps and prints the
operations dispatched per step (``aten::`` ops at every level of the call tree, and the compiled graphs called) and the
largest by self time.

    python benchmarks/host_overhead.py --phases complex,distill --compile on,off --precision bf16
    python benchmarks/host_overhead.py --device cuda --compile on        # where a GPU is
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed import base_config, phase_trainer, sync, trainer_step  # noqa: E402  (next door)

from dsom.config import set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.train.loop import Trainer, resolve_device  # noqa: E402

PHASES = ("complex", "teachers", "distill")
COMPILED = "## Call CompiledFxGraph"


def make_trainer(phase: str, ds: Any, args: argparse.Namespace, compile: str, device: torch.device,
                 tmp: str) -> Trainer:
    ns = argparse.Namespace(rank=args.rank, batch_size=args.batch_size, precision=args.precision,
                            batching=args.batching, compile=compile)
    cfg = base_config(ns, device)
    if phase == "distill":
        set_value(cfg, "distill.policy_hidden", args.policy_hidden)
    return phase_trainer(phase, ds, cfg, args.modalities, tmp)


def measure(tr: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """Median and mean seconds per step over ``args.steps`` steps after ``args.warmup``, then the operations
    dispatched per step over ``args.profile_steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    order, offsets = tr.epoch_batches(1)
    perm = order.to(tr.train_queries.device)
    n = len(offsets) - 1
    b = 0

    def step() -> None:
        nonlocal b
        trainer_step(tr, order, perm, offsets, b % n, b)
        b += 1

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(tr.device)
        t0 = time.perf_counter()
        step()
        sync(tr.device)
        times.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(tr.device)
    k = max(args.profile_steps, 1)
    aten, graphs, self_us = 0, 0, {}
    for ev in prof.events():
        if ev.name.startswith("aten::"):
            aten += 1
        elif ev.name.startswith(COMPILED):
            graphs += 1
        self_us[ev.name] = self_us.get(ev.name, 0.0) + ev.self_cpu_time_total
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:args.top]
    return {"median_step_ms": 1e3 * float(np.median(times)), "mean_step_ms": 1e3 * float(np.mean(times)),
            "aten_ops_per_step": aten / k, "compiled_graphs_per_step": graphs / k,
            "top_self_us_per_step": {name[:70]: round(us / k, 1) for name, us in top}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="synthetic")
    p.add_argument("--phases", default="complex,teachers,distill", help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--compile", default="on,off", help="comma-separated train.compile settings to time (auto,on,off)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--policy-hidden", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--batching", default="triples", choices=["triples", "pairs"])
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--top", type=int, default=8, help="the largest ops by self time to list")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    phases = args.phases.split(",")
    compiles = args.compile.split(",")
    if not set(phases) <= set(PHASES) or not set(compiles) <= {"auto", "on", "off"}:
        raise SystemExit(f"--phases: of {', '.join(PHASES)}; --compile: of auto, on, off "
                         f"(got {args.phases!r}, {args.compile!r})")
    device = resolve_device(args.device)
    ds = registry.load(args.dataset)
    print(f"host cost per step: {ds.name} (E={ds.num_entities}), rank {args.rank}, batch {args.batch_size}, "
          f"{args.precision} products, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'phase':<10} {'compile':>7} {'median ms':>9} {'mean ms':>8} {'aten ops':>8} {'graphs':>6}  largest (us self)")
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            for c in compiles:
                r = measure(make_trainer(phase, ds, args, c, device, tmp), args)
                res[f"{phase}/{c}"] = r
                top = ", ".join(f"{k.removeprefix('aten::')[:28]} {v:.0f}"
                                for k, v in list(r["top_self_us_per_step"].items())[:4])
                print(f"{phase:<10} {c:>7} {r['median_step_ms']:9.3f} {r['mean_step_ms']:8.3f} "
                      f"{r['aten_ops_per_step']:8.0f} {r['compiled_graphs_per_step']:6.1f}  {top}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
