"""What stage 2 computes before the student's first step, timed: the teachers' temperatures (fitted on the held-out
queries) and the per-entity teacher reliability of the policy's state (:func:`~dsom.distill.holdout.
entity_reliability`: every teacher scored on every training query's (entity, relation) pair).

    python benchmarks/stage2_setup.py FB15K-237 --teachers runs/fb/triples-s1 [--save stats.pt]

``--teachers`` is a ``dsom pretrain`` (or ``dsom run``) directory. ``--save`` writes the reliability table, so that two
versions of the code can be compared (``PYTHONPATH=<other checkout>/src``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dsom.data import registry
from dsom.distill.holdout import entity_reliability
from dsom.runs.pipeline import selection_inputs
from dsom.runs.setup import build_config
from dsom.train.teachers import load_frozen_teachers


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Prints the timings; returns the last round's seconds (``temperatures``, ``reliability``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--teachers", required=True, help="a dsom pretrain or run directory")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--save", help="write the (E, M) reliability table here")
    args = p.parse_args(argv)
    ds = registry.load(args.dataset)
    cfg = build_config(args.dataset, config_file=str(Path(args.teachers) / "config.yaml"))  # its holdout
    frozen, _ = load_frozen_teachers(args.teachers)
    queries = torch.from_numpy(ds.queries("train"))
    print(f"{ds.name}: {ds.num_entities} entities, {len(queries):,} training queries, teachers "
          f"{'+'.join(frozen.modalities)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        _, temperatures, _ = selection_inputs(frozen, ds, cfg, torch.device("cpu"))
        t1 = time.perf_counter()
        stats = entity_reliability(frozen, queries, ds.num_entities, temperatures)
        t2 = time.perf_counter()
        print(f"round {r + 1}: temperatures {t1 - t0:.1f} s, entity reliability {t2 - t1:.1f} s")
    if args.save:
        torch.save(stats, args.save)
    return {"temperatures": t1 - t0, "reliability": t2 - t1}


if __name__ == "__main__":
    main()
