"""Scoring the frozen teachers only where a query reads them, A/B in one process: stage-2 steps in two or three modes
(``--modes``), interleaved so that all see the same machine state: every teacher scored on every row into the
``(M, B, E)`` block ("all"), each teacher scored only on the rows whose chosen subset holds it and on the reward rows,
written into the block ("stacked"), and the same rows kept as one block per teacher, read in place by the loss
("chosen", ``Distiller.teacher_row_blocks``; under pair batching it is the same as "stacked"), and "chosen" with
the rewards' subset CEs read from the policy's reward cache ("cached", dsom's code from the second epoch on,
``distill.reward_cache``): the teachers are then not scored on the reward rows beyond the chosen subsets.

    DSOM_DATA=../shared/data python benchmarks/teacher_rows.py DB15K --rank 500 --rounds 6 --steps 4
    DSOM_DATA=../shared/data python benchmarks/teacher_rows.py DB15K --modes stacked,chosen
    DSOM_DATA=../shared/data python benchmarks/teacher_rows.py DB15K --selector single:structure
    DSOM_DATA=../shared/data python benchmarks/teacher_rows.py DB15K --modes chosen,cached --rewards all

Stage 2 is ``benchmarks/speed.py``'s (random rank ``--rank`` teachers, dsom's defaults: summary policy, held-out
rewards, calibrated teachers; ``--rewards all``: every row rewarded, where every teacher is scored on every row either
way). The policy chooses without the teachers' logits once its summary-state cache is sealed (from the second epoch
on): untimed warm-up steps fill the cache of the batches timed and seal it. Each round runs ``--steps`` steps per mode
(the order alternating from round to round) on the same batches and prints every step time; the result is each mode's
median step, its ratio to the first mode's, and the share of the ``M x rows`` teacher rows it scored. A fresh policy picks
its subsets about uniformly (a teacher is in 4 of the 7 subsets of 3 teachers); a trained one may pick fewer or more
teachers. Set the AVX2 emulation variables (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``) and ``--precision fp32`` to time the AVX2 path.

``--widths 1000,839,700,600`` times instead one teacher's fp32 product (:func:`~dsom.models.products.column_scores`,
a random ``--rank`` table of the dataset's size) on that many queries, with the queries padded to a multiple of
``COLUMN_PAD`` (dsom's code) and unpadded, interleaved over ``--rounds`` rounds (median and minimum, ms): a teacher
scored on the queries that chose it multiplies a block of any width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed import count_teacher_rows, stage2_trainer, sync, trainer_step  # noqa: E402  (the benchmark next door)

from dsom.config import Config, set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.models import products  # noqa: E402
from dsom.perf import tune_allocator  # noqa: E402

MODES = ("all", "stacked", "chosen", "cached")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--selector", default="rl", help="distill.selector (rl, single:structure, ...)")
    p.add_argument("--rewards", default="holdout", choices=["holdout", "all"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batching", default="triples", choices=["triples", "pairs"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="stage-2 steps per mode per round")
    p.add_argument("--modes", default="all,chosen",
                   help="two to four of: all (every teacher on every row), stacked (the chosen rows written into the "
                        "(M, B, E) block), chosen (the chosen rows, one block per teacher), cached (chosen, the "
                        "reward CEs read from the reward cache: dsom's code from the second epoch)")
    p.add_argument("--json", help="write every step time and the medians here")
    p.add_argument("--widths", help="comma-separated query counts: time column_scores padded and unpadded instead")
    args = p.parse_args(argv)
    tune_allocator()
    ds = registry.load(args.dataset)
    if args.widths:
        return widths(ds.num_entities, args.rank, [int(w) for w in args.widths.split(",")], args.rounds, args.json)
    cfg = Config()
    for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": args.precision,
                 "train.device": "cpu", "train.valid_every": 0, "distill.batching": args.batching,
                 "distill.policy_state": "summary", "distill.selector": args.selector}.items():
        set_value(cfg, k, v)
    tr, _, _ = stage2_trainer(ds, cfg, args.modalities, args.rewards, f"/tmp/dsom-rows-{os.getpid()}")
    order, offsets = tr.epoch_batches(1)
    perm = order.to(tr.device)
    modes = tuple(args.modes.split(","))
    if len(modes) < 2 or len(set(modes)) < len(modes) or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: two to four of {', '.join(MODES)}, got {args.modes!r}")
    mode = {"now": modes[0]}
    sel = tr.model.selector
    rewards_cached = getattr(sel, "reward_cache", None) is not None
    sealed = [False]  # the caches hold every batch timed (after the warm-up)
    count = count_teacher_rows(tr.model.teachers, lambda: mode["now"] == "all")  # [rows scored, rows in the blocks]

    def step(k: int) -> float:
        tr.model.teacher_row_blocks = mode["now"] in ("chosen", "cached")
        if rewards_cached:  # read in "cached" once filled; else computed (and stored again) every step
            sel.reward_cache.sealed = sealed[0] and mode["now"] == "cached"
        sync(tr.device)
        t0 = time.perf_counter()
        trainer_step(tr, order, perm, offsets, k, k)
        sync(tr.device)
        return time.perf_counter() - t0

    n_steps = args.steps
    for name in modes:  # warm-up: compile, fill the summary-state and reward caches of the batches timed
        mode["now"] = name
        for k in range(n_steps + 1):
            step(k)
    policy = tr.model.policy
    sealed[0] = True
    if getattr(policy, "cache", None) is not None or rewards_cached:
        if getattr(policy, "cache", None) is not None:
            policy.cache.sealed = True  # as from the second epoch on
        for name in modes:  # (a sealed cache takes other compiled paths: compiled here, untimed)
            mode["now"] = name
            step(1)
    scored = {name: [0, 0] for name in modes}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(args.rounds):
        for name in (modes if r % 2 == 0 else modes[::-1]):
            mode["now"] = name
            count[:] = [0, 0]
            got = [step(k) for k in range(1, n_steps + 1)]
            scored[name] = [scored[name][0] + float(count[0]), scored[name][1] + count[1]]
            times[name] += got
            print(f"round {r + 1} {name:7s} " + " ".join(f"{t:.3f}" for t in got), flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    share = {k: c[0] / max(c[1], 1) for k, c in scored.items()}
    base = modes[0]
    print(f"stage 2 median step ({args.selector}, rewards {args.rewards}, {tr.precision}, {tr.batching}, "
          f"{len(times[base])} steps each): " + ", ".join(
              f"{k} {med[k]:.3f} s ({med[base] / med[k]:.2f}x {base}; teacher rows scored {share[k]:.3f})"
              for k in modes))
    res = {"stage2_median_step_s": med, "teacher_rows_scored": share,
           "speedup": {k: med[base] / med[k] for k in modes}}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "steps_s": times, "args": vars(args)}, fh, indent=2)
    return res


def widths(num_entities: int, rank: int, counts: list[int], rounds: int, json_path: str | None) -> dict[str, Any]:
    """Milliseconds of :func:`column_scores` on ``counts`` queries against an ``(E, 2 * rank)`` table, padded to
    ``COLUMN_PAD`` (dsom's code) and not (``COLUMN_PAD = 1``), every case once per round in alternating order."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(num_entities, 2 * rank, generator=g) * 0.1
    queries = torch.randn(max(counts), 2 * rank, generator=g)
    pad = products.COLUMN_PAD
    cases = [(n, p) for n in counts for p in (pad, 1)]
    outs = {n: torch.empty(n, num_entities) for n in counts}
    times: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    try:
        for r in range(rounds):
            for n, p in (cases if r % 2 == 0 else cases[::-1]):
                products.COLUMN_PAD = p
                t0 = time.perf_counter()
                products.column_scores(queries[:n], table, outs[n])
                times[(n, p)].append((time.perf_counter() - t0) * 1e3)
    finally:
        products.COLUMN_PAD = pad
    res: dict[str, Any] = {}
    for n in counts:
        row = {}
        for p, name in ((pad, "padded"), (1, "unpadded")):
            v = times[(n, p)]
            row[name] = {"median_ms": float(np.median(v)), "min_ms": float(min(v))}
        res[str(n)] = row
        print(f"{n} queries: padded to {-(-n // pad) * pad} median {row['padded']['median_ms']:.1f} ms (min "
              f"{row['padded']['min_ms']:.1f}), unpadded median {row['unpadded']['median_ms']:.1f} ms (min "
              f"{row['unpadded']['min_ms']:.1f})", flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"widths": res, "times_ms": {f"{n}/{p}": v for (n, p), v in times.items()}}, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
