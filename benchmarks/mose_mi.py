"""MoSE-MI's meta-learner step (forward + backward of the per-candidate MLP and the CE) on a DB15K-sized block:
the whole-block definition (``MetaLearner.reference``) against the blocked implementation (``forward``).

    python benchmarks/mose_mi.py [--teachers 3] [--batch 256] [--entities 12842] [--hidden 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsom.ensemble import MetaLearner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="queries per step (ensemble.mi_batch_size)")
    p.add_argument("--entities", type=int, default=12842)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = MetaLearner(args.teachers, args.hidden)
    scores = torch.randn(args.teachers, args.batch, args.entities)
    target = torch.randint(0, args.entities, (args.batch,))
    times = {}
    for name, fn in (("whole block (reference)", net.reference), ("blocked (forward)", net.forward)):
        for i in range(args.repeats + 1):  # the first call warms up
            if i == 1:
                t0 = time.perf_counter()
            net.zero_grad()
            F.cross_entropy(fn(scores), target).backward()
        times[name] = (time.perf_counter() - t0) / args.repeats
    print(f"MetaLearner step, M={args.teachers} B={args.batch} E={args.entities} hidden={args.hidden}, "
          f"{torch.get_num_threads()} threads:")
    for name, s in times.items():
        print(f"  {name:<26} {s * 1000:9.1f} ms")
    first, second = times.values()
    print(f"  speed-up {first / second:.2f}x")


if __name__ == "__main__":
    main()
