"""Filtered evaluation with a single model's scores in the row layout (``q @ T^T``) against the column layout
(:func:`~dsom.models.products.column_scores`, dsom's choice for fp32 without autograd), alternating in one process on
the same random ComplEx model, so both see the same machine state.

    python benchmarks/eval_layout.py DB15K --rank 500 --rounds 2
    python benchmarks/eval_layout.py --entities 1000000 --rank 64 --rounds 2     # scale.py's random graph

Prints each round's seconds per layout and the realistic MRR of each (the layouts must rank alike).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scale import random_graph  # noqa: E402

import dsom.models.interaction as interaction  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.evaluate import evaluate  # noqa: E402
from dsom.models.complex import ComplEx  # noqa: E402
from dsom.models.products import matmul_scores  # noqa: E402
from dsom.perf import tune_allocator  # noqa: E402


def _row_layout(query: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Stands in for ``column_scores`` inside :func:`~dsom.models.interaction.score_all`: the plain product."""
    return matmul_scores(query, table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K", help="a dataset name (ignored with --entities)")
    p.add_argument("--entities", type=int, default=0, help="a random graph of this many entities instead")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1000)
    args = p.parse_args(argv)
    tune_allocator()
    ds = (random_graph(args.entities, 100, 4 * args.entities, 1000) if args.entities
          else registry.load(args.dataset))
    model = ComplEx(ds.num_entities, 2 * ds.num_relations, args.rank, 0.1, generator=torch.Generator().manual_seed(0))
    column = interaction.column_scores
    seconds: dict[str, list[float]] = {"row": [], "column": []}
    mrr: dict[str, float] = {}
    print(f"{ds.name}: E={ds.num_entities}, rank {args.rank}, test triples {len(ds.test)}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    try:
        for r in range(args.rounds):
            for layout in ("row", "column"):
                interaction.column_scores = _row_layout if layout == "row" else column  # type: ignore[assignment]
                t0 = time.perf_counter()
                m = evaluate(model, ds, "test", batch_size=args.batch_size)
                seconds[layout].append(time.perf_counter() - t0)
                mrr[layout] = m["realistic"]["mrr"]
                print(f"round {r + 1} {layout:6s} {seconds[layout][-1]:7.2f} s  MRR {mrr[layout]:.6f}", flush=True)
    finally:
        interaction.column_scores = column  # type: ignore[assignment]
    return {"seconds": seconds, "mrr": mrr}


if __name__ == "__main__":
    main()
