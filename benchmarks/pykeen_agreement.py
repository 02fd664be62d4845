"""Evaluate a trained dsom ComplEx checkpoint with dsom and with PyKEEN's RankBasedEvaluator; print both.

Tail queries are compared directly on the checkpoint's embeddings (PyKEEN stores complex embeddings
interleaved; they are converted). dsom answers head queries with learned reciprocal relations, which
PyKEEN's ComplEx cannot express, so head queries are not compared here (tests/test_pykeen_diff.py
covers both directions by tying each reciprocal relation to the conjugate of the original).

    DSOM_DATA=../shared/data python benchmarks/pykeen_agreement.py runs/db15k [--split test]
"""

from __future__ import annotations

import argparse
import time

import torch

from dsom.cli import _dataset_for_checkpoint
from dsom.evaluate import evaluate
from dsom.train.checkpoint import load_checkpoint

METRICS = (("mrr", "inverse_harmonic_mean_rank"), ("mr", "arithmetic_mean_rank"), ("hits@1", "hits_at_1"),
           ("hits@3", "hits_at_3"), ("hits@10", "hits_at_10"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset")
    args = p.parse_args()

    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import ComplEx as PKComplEx
    from pykeen.triples import TriplesFactory

    ck = load_checkpoint(args.checkpoint)
    ds = _dataset_for_checkpoint(ck.meta, args.dataset)
    t = time.perf_counter()
    ours = evaluate(ck.model, ds, args.split)
    t_ours = time.perf_counter() - t

    R, d = ds.num_relations, ck.model.rank

    def interleave(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, :d], x[:, d:]], dim=-1).reshape(x.shape[0], 2 * d)

    tf = TriplesFactory(mapped_triples=torch.from_numpy(ds.train),
                        entity_to_id={label: i for i, label in enumerate(ds.entities.labels)},
                        relation_to_id={label: i for i, label in enumerate(ds.relations.labels)})
    pk = PKComplEx(triples_factory=tf, embedding_dim=d, random_seed=0)
    with torch.no_grad():
        pk.entity_representations[0]._embeddings.weight.copy_(interleave(ck.model.entity))
        pk.relation_representations[0]._embeddings.weight.copy_(interleave(ck.model.relation[:R]))
    t = time.perf_counter()
    res = RankBasedEvaluator(filtered=True).evaluate(
        pk, mapped_triples=torch.from_numpy(ds.splits[args.split]), batch_size=1000, targets=("tail",),
        additional_filter_triples=[torch.from_numpy(ds.splits[s]) for s in ("train", "valid", "test")],
        use_tqdm=False)
    t_pk = time.perf_counter() - t

    print(f"{ds.name} {args.split}, tail queries, filtered; dsom (both directions) {t_ours:.1f} s, "
          f"PyKEEN (tail only) {t_pk:.1f} s")
    print(f"{'policy':<12} {'metric':<8} {'dsom':>12} {'pykeen':>12} {'abs diff':>10}")
    worst = 0.0
    for policy in ("realistic", "pessimistic", "optimistic"):
        for mine, theirs in METRICS:
            a = ours["tail"][policy][mine]
            b = res.get_metric(f"tail.{policy}.{theirs}")
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
            print(f"{policy:<12} {mine:<8} {a:12.6f} {b:12.6f} {abs(a - b):10.2e}")
    print(f"largest relative difference: {worst:.2e}")


if __name__ == "__main__":
    main()
