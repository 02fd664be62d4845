"""The expected baseline's reward CEs (every action's combined teacher on the target), interleaved in one process: the
one-expression function compiled whole (``_all_action_ces``, which stores the ``(A, n, E)`` block) against dsom's two
compiled passes that recompute it row by row (:class:`~dsom.distill.selectors.AllActionCEs`).

    DSOM_DATA=../shared/data python benchmarks/reward_ces.py DB15K --rows 1000,100 --rounds 8

Random teacher logits (scale 3) of ``--teachers`` teachers over the dataset's entities, laid out ``(n, M, E)`` as fp32
stage 2 writes them; ``--rows``: how many rewarded rows a batch has (1,000: every row of a DB15K batch; about 100 with
the default held-out rewards). Prints the median and the minimum of ``--rounds`` calls per function (ms) and checks that
both give the same CEs.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from dsom.data import registry
from dsom.distill.actions import subset_matrix
from dsom.distill.selectors import AllActionCEs, _all_action_ces
from dsom.perf import MaybeCompiled, tune_allocator


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--rows", default="1000,100", help="comma-separated rewarded rows per batch")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", help="write every time here")
    args = p.parse_args(argv)
    tune_allocator()
    E = registry.load(args.dataset).num_entities
    M = args.teachers
    subsets = subset_matrix(M)
    fns = {"whole": MaybeCompiled(_all_action_ces, True), "two passes": AllActionCEs()}
    g = torch.Generator().manual_seed(0)
    res: dict[str, Any] = {}
    for n in [int(x) for x in args.rows.split(",")]:
        tea = (torch.randn(n, M, E, generator=g) * 3).permute(1, 0, 2)
        target = torch.randint(0, E, (n,), generator=g)
        got = {name: fn(tea, subsets, target, args.tau) for name, fn in fns.items()}  # compiles
        torch.testing.assert_close(got["two passes"], got["whole"], rtol=1e-5, atol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[name](tea, subsets, target, args.tau)
                times[name].append((time.perf_counter() - t0) * 1e3)
        row = {name: {"median_ms": float(np.median(v)), "min_ms": float(min(v)), "times_ms": v}
               for name, v in times.items()}
        res[str(n)] = row
        print(f"{n} rows x {len(subsets)} actions x {E} entities: whole median {row['whole']['median_ms']:.1f} ms "
              f"(min {row['whole']['min_ms']:.1f}), two passes median {row['two passes']['median_ms']:.1f} ms "
              f"(min {row['two passes']['min_ms']:.1f}), {row['whole']['median_ms'] / row['two passes']['median_ms']:.2f}x",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": res, "args": vars(args)}, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
