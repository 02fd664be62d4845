"""fp32 score layouts A/B in one process: stage-2 steps with the teachers' and the student's scores computed as
``q @ T^T`` ("row") or as ``T @ q^T`` in row blocks copied into place ("column", :func:`~dsom.models.products.
column_scores`), interleaved so that both see the same machine state.

    DSOM_DATA=../shared/data python benchmarks/score_layout.py DB15K --rank 500 --rounds 6 --steps 4

Each round runs ``--steps`` stage-2 steps per layout (the order of the two alternating from round to round) on the
same batches, after untimed warm-up steps of both (compilation, the summary-state cache of a later epoch), and
prints every step time; the result is each layout's median step and their ratio. Stage 2 is ``benchmarks/speed.py``'s
(random rank ``--rank`` teachers, dsom's defaults: summary policy, held-out rewards, calibrated teachers; ``--rewards
all``: every row rewarded). The products are fp32 (the layouts differ only there, on a CPU); set the AVX2 emulation
variables (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``) to time the AVX2 path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed import stage2_trainer, sync, trainer_step  # noqa: E402  (the benchmark next door)

from dsom.config import Config, set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.models import products  # noqa: E402
from dsom.perf import tune_allocator  # noqa: E402

LAYOUTS = {"row": 10**12, "column": products.COLUMN_MIN_QUERIES}  # COLUMN_MIN_QUERIES per layout


def use(layout: str) -> None:
    products.COLUMN_MIN_QUERIES = LAYOUTS[layout]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--rewards", default="holdout", choices=["holdout", "all"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", help="write every step time and the medians here")
    p.add_argument("--steps", type=int, default=4, help="stage-2 steps per layout per round")
    args = p.parse_args(argv)
    tune_allocator()
    ds = registry.load(args.dataset)
    cfg = Config()
    for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": "fp32",
                 "train.device": "cpu", "train.valid_every": 0, "distill.policy_state": "summary"}.items():
        set_value(cfg, k, v)
    tr, _, _ = stage2_trainer(ds, cfg, args.modalities, args.rewards, f"/tmp/dsom-layout-{os.getpid()}")
    order, offsets = tr.epoch_batches(1)
    perm = order.to(tr.device)
    n_steps = args.steps

    def step(k: int) -> float:
        sync(tr.device)
        t0 = time.perf_counter()
        trainer_step(tr, order, perm, offsets, k, k)
        sync(tr.device)
        return time.perf_counter() - t0

    policy = tr.model.policy
    for layout in LAYOUTS:  # warm-up: compile both, fill the summary-state cache of the batches timed
        use(layout)
        for k in range(n_steps + 1):
            step(k)
    if getattr(policy, "cache", None) is not None:
        policy.cache.sealed = True
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for layout in (list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]):
            use(layout)
            got = [step(k) for k in range(1, n_steps + 1)]
            times[layout] += got
            print(f"round {r + 1} {layout:6s} " + " ".join(f"{t:.3f}" for t in got), flush=True)
    res: dict[str, Any] = {"stage2_median_step_s": {k: float(np.median(v)) for k, v in times.items()}}
    med = res["stage2_median_step_s"]
    print(f"stage 2 median step: row {med['row']:.3f} s, column {med['column']:.3f} s, "
          f"row/column {med['row'] / med['column']:.2f}x ({len(times['row'])} steps each)")
    use("column")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "steps_s": times, "args": vars(args)}, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
