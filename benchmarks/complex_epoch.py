"""Time structural ComplEx training batches and filtered evaluation on a dataset.

Prints the matmul peak of this machine (fp32 and bf16), seconds per training batch, the projected
seconds per epoch, and the seconds to evaluate the test split, for each requested precision.

    DSOM_DATA=../shared/data python benchmarks/complex_epoch.py DB15K --rank 500 --batches 10
"""

from __future__ import annotations

import argparse
import time

import torch

from dsom.config import Config, set_value
from dsom.data import registry
from dsom.evaluate import evaluate
from dsom.train.loop import ComplExTrainer


def matmul_tflops(dtype: torch.dtype, m: int = 1000, k: int = 1000, n: int = 12842, reps: int = 3) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    a @ b.T
    t = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=10, help="training batches to time (after one warm-up batch)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"matmul peak: fp32 {matmul_tflops(torch.float32):.3f} TFLOP/s, bf16 {matmul_tflops(torch.bfloat16):.3f} TFLOP/s")
    ds = registry.load(args.dataset)
    n_queries = 2 * len(ds.train)
    n_batches = -(-n_queries // args.batch_size)
    flop_per_batch = 3 * 2 * args.batch_size * 2 * args.rank * ds.num_entities  # forward + 2 backward products
    print(f"{ds.name}: E={ds.num_entities}, {n_queries} training queries, {n_batches} batches/epoch, "
          f"{flop_per_batch * n_batches / 1e12:.1f} TFLOP/epoch in matrix products")
    for prec in args.precisions.split(","):
        cfg = Config()
        for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": prec}.items():
            set_value(cfg, k, v)
        tr = ComplExTrainer(ds, cfg, "/tmp/dsom-bench", progress=False)
        q = tr.train_queries
        perm = torch.randperm(len(q))
        times = []
        for b in range(args.batches + 1):
            batch = q[perm[b * args.batch_size:(b + 1) * args.batch_size]]
            t = time.perf_counter()
            loss = tr.loss(batch).total
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            tr.optimizer_step()
            if b > 0:
                times.append(time.perf_counter() - t)
        per = sum(times) / len(times)
        print(f"[{prec}] train: {per:.3f} s/batch -> {per * n_batches:.1f} s/epoch projected, "
              f"{flop_per_batch / per / 1e12:.3f} TFLOP/s achieved")
        if not args.no_eval:
            t = time.perf_counter()
            evaluate(tr.model, ds, "test")
            print(f"[{prec}] filtered evaluation of test ({2 * len(ds.test)} queries, fp32 scoring): "
                  f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
