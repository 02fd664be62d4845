"""Scale benchmark: structural ComplEx training and filtered evaluation on random graphs of growing size.

For each entity count E a uniform random graph is generated in memory (``--triples-per-entity`` training
triples per entity, ``--test`` test triples), then:

* ``train``: ``--batches`` Adagrad steps of the 1-vs-all loss after one warm-up step. Graphs whose
  ``B x E`` score block exceeds ``train.block_mb`` use the entity-chunked loss automatically;
* ``eval``: filtered evaluation of the test split within ``eval.memory_budget_mb``.

Each phase prints its throughput and its peak resident memory (reset between phases), next to the size of
the model state (entity table + its gradient + Adagrad's accumulator) that any trainer must hold.

    python benchmarks/scale.py --entities 10000,100000,1000000 --rank 64 --batches 3
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

sys.path.insert(0, os.path.dirname(__file__))
from speed import peak_mb, reset_peak, time_trainer_steps  # noqa: E402

from dsom.config import Config, set_value  # noqa: E402
from dsom.data.graph import KGDataset, Vocabulary  # noqa: E402
from dsom.evaluate import evaluate  # noqa: E402
from dsom.models.chunked import entity_chunk  # noqa: E402
from dsom.perf import tune_allocator  # noqa: E402
from dsom.train.loop import ComplExTrainer  # noqa: E402


def random_graph(num_entities: int, num_relations: int, num_train: int, num_test: int, seed: int = 0) -> KGDataset:
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    trip = np.stack([rng.integers(0, num_entities, n), rng.integers(0, num_relations, n),
                     rng.integers(0, num_entities, n)], 1).astype(np.int64)
    ents = Vocabulary([f"e{i}" for i in range(num_entities)])
    rels = Vocabulary([f"r{i}" for i in range(num_relations)])
    return KGDataset(f"random-{num_entities}", ents, rels,
                     {"train": trip[:num_train], "valid": trip[:0], "test": trip[num_train:]})


def point(num_entities: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    t0 = time.perf_counter()
    ds = random_graph(num_entities, args.relations, args.triples_per_entity * num_entities, args.test)
    build_s = time.perf_counter() - t0
    cfg = Config()
    for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": args.precision,
                 "train.device": str(device), "train.valid_every": 0, "train.block_mb": args.block_mb,
                 "eval.memory_budget_mb": args.eval_budget_mb, "train.batching": args.batching}.items():
        set_value(cfg, k, v)
    out: dict[str, Any] = {"entities": num_entities, "train_triples": len(ds.train), "graph_build_s": build_s,
                           "chunk": entity_chunk(args.batch_size, num_entities, args.block_mb),
                           "model_state_mb": 3 * num_entities * 2 * args.rank * 4 / 2**20}
    reset_peak(device)
    tr = ComplExTrainer(ds, cfg, f"/tmp/dsom-scale-{os.getpid()}", progress=False)
    seconds, timed, _ = time_trainer_steps(tr, args.batches, device)
    n_epoch = len(tr.epoch_batches(1)[1]) - 1  # batches per epoch (each about batch_size queries)
    out["train"] = {"s_per_batch": seconds / timed, "queries_per_s": timed * len(tr.train_queries) / n_epoch / seconds,
                    "epoch_s_projected": seconds / timed * n_epoch, "batching": tr.batching, **peak_mb(device)}
    model = tr.model
    reset_peak(device)
    t0 = time.perf_counter()
    evaluate(model, ds, "test", batch_size=args.batch_size, memory_budget_mb=args.eval_budget_mb, device=device)
    secs = time.perf_counter() - t0
    out["eval"] = {"seconds": secs, "queries_per_s": 2 * len(ds.test) / secs, **peak_mb(device)}
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", default="10000,100000,1000000")
    p.add_argument("--relations", type=int, default=100)
    p.add_argument("--triples-per-entity", type=int, default=4)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--block-mb", type=float, default=256.0, help="train.block_mb")
    p.add_argument("--eval-budget-mb", type=float, default=1024.0, help="eval.memory_budget_mb")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batching", default="auto", choices=["auto", "triples", "pairs"], help="train.batching")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    tune_allocator()
    rows = []
    print(f"rank {args.rank}, batch {args.batch_size}, batching {args.batching}, train.block_mb {args.block_mb}, eval budget "
          f"{args.eval_budget_mb} MB, {torch.get_num_threads()} threads")
    print(f"{'entities':>9} {'chunk':>7} {'state MB':>9} {'train q/s':>10} {'s/batch':>8} {'train peak MB':>13} "
          f"{'eval q/s':>9} {'eval peak MB':>12}")
    for n in (int(x) for x in args.entities.split(",")):
        r = point(n, args)
        rows.append(r)
        print(f"{n:9d} {r['chunk']:7d} {r['model_state_mb']:9.0f} {r['train']['queries_per_s']:10.0f} "
              f"{r['train']['s_per_batch']:8.2f} {r['train']['peak_rss_mb']:13.0f} {r['eval']['queries_per_s']:9.0f} "
              f"{r['eval']['peak_rss_mb']:12.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "points": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
