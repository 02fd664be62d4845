"""How many score rows an epoch of ``train.batching=pairs`` computes, per ``train.pair_max_queries`` K: the (entity,
relation) pairs of the training queries cut into pieces of at most K queries (:meth:`~dsom.data.pairs.PairIndex.pieces`),
against whole pairs and one row per query (``triples``). Also the largest pair and the share of queries in pairs with
more than K, which whole-pair batching puts into one step per epoch.

    python benchmarks/pair_pieces.py FB15K-237 DB15K MKG-Y --k 4,8,16

A batch of pieces scores slightly fewer rows than this count where two pieces of one pair meet in it.
"""

from __future__ import annotations

import argparse

import torch

from dsom.data import registry
from dsom.data.pairs import PairIndex


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Prints the table; returns, per dataset, the score rows per epoch (``pairs``, ``K=k``, ``triples``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+")
    p.add_argument("--k", default="4,8,16", help="comma-separated values of train.pair_max_queries")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.k.split(",")]
    print("| dataset (queries) | largest pair | whole pairs | " + " | ".join(f"K = {k}" for k in ks) + " | triples |")
    print("|---|---|---|" + "---|" * len(ks) + "---|")
    out: dict[str, dict[str, int]] = {}
    for name in args.datasets:
        q = torch.from_numpy(registry.load(name).queries("train"))
        idx = PairIndex(q)
        n = len(q)
        cells = []
        out[name] = {"pairs": idx.num_pairs, "triples": n}
        for k in ks:
            _, counts = idx.pieces(k)
            out[name][f"K={k}"] = len(counts)
            share = float(idx.counts[idx.counts > k].sum()) / n
            cells.append(f"{len(counts):,} ({n / len(counts):.2f} q/row; {share:.0%} in pairs > K)")
        print(f"| {name} ({n:,}) | {int(idx.counts.max()):,} | {idx.num_pairs:,} ({n / idx.num_pairs:.2f} q/row) | "
              + " | ".join(cells) + f" | {n:,} |")
    return out


if __name__ == "__main__":
    main()
