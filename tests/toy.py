"""Small in-memory graphs for tests (independent of the readers)."""

from __future__ import annotations

import textwrap

import numpy as np
import torch

from dsom.config import Config, set_value
from dsom.data import KGDataset, Vocabulary
from dsom.models.teachers import FrozenTeachers


def random_graph(num_entities: int = 60, num_relations: int = 4, num_triples: int = 400, seed: int = 0,
                 valid: int = 40, test: int = 40) -> KGDataset:
    """Random distinct triples split into train/valid/test."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, num_entities, num_triples * 2)
    r = rng.integers(0, num_relations, num_triples * 2)
    t = rng.integers(0, num_entities, num_triples * 2)
    trip = np.unique(np.stack([h, r, t], 1), axis=0)[:num_triples]
    rng.shuffle(trip)
    n_train = len(trip) - valid - test
    return KGDataset(
        "toy",
        Vocabulary([f"e{i}" for i in range(num_entities)], [f"entity {i}" for i in range(num_entities)]),
        Vocabulary([f"r{i}" for i in range(num_relations)], [f"relation {i}" for i in range(num_relations)]),
        {"train": trip[:n_train], "valid": trip[n_train:n_train + valid], "test": trip[n_train + valid:]},
    )


def clustered_graph(num_entities: int = 200, num_relations: int = 3, clusters: int = 10, per_head: int = 6,
                    seed: int = 0, holdout: float = 0.15) -> KGDataset:
    """A learnable graph: relation r maps cluster c to cluster (c + r + 1) % clusters."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(num_entities) % clusters
    members = [np.flatnonzero(cluster == c) for c in range(clusters)]
    rows = []
    for e in range(num_entities):
        for r in range(num_relations):
            target = members[(cluster[e] + r + 1) % clusters]
            for t in rng.choice(target, size=min(per_head, len(target)), replace=False):
                rows.append((e, r, int(t)))
    trip = np.array(rows, dtype=np.int64)
    rng.shuffle(trip)
    n_hold = int(len(trip) * holdout)
    return KGDataset(
        "clustered",
        Vocabulary([f"e{i}" for i in range(num_entities)]),
        Vocabulary([f"r{i}" for i in range(num_relations)]),
        {"train": trip[2 * n_hold:], "valid": trip[:n_hold], "test": trip[n_hold:2 * n_hold]},
    )


def write_canonical(ds: KGDataset, folder) -> None:
    """Write a dataset in the canonical TSV layout (see shared/data/README.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "entities.tsv", "w", encoding="utf-8") as fh:
        fh.write("entity\tname\tdescription\n")
        for i, label in enumerate(ds.entities.labels):
            fh.write(f"{label}\t{ds.entities.name(i)}\t\n")
    with open(folder / "relations.tsv", "w", encoding="utf-8") as fh:
        fh.write("relation\tname\n")
        for i, label in enumerate(ds.relations.labels):
            fh.write(f"{label}\t{ds.relations.name(i)}\n")
    for split in ("train", "valid", "test"):
        with open(folder / f"{split}.tsv", "w", encoding="utf-8") as fh:
            for h, r, t in ds.splits[split]:
                fh.write(f"{ds.entities.labels[h]}\t{ds.relations.labels[r]}\t{ds.entities.labels[t]}\n")


#: ``python -c KILL_LAUNCHER STAGE EPOCH BATCH ARGS...``: the ``dsom`` command with ARGS, SIGKILLed after batch BATCH
#: of epoch EPOCH of the trainer of stage STAGE (any batch hook already there still runs); for resume tests
KILL_LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    from dsom.train import loop

    stage, epoch, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    init = loop.Trainer.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        if self.stage == stage:
            inner = self.batch_hook

            def hook(e, b):
                if (e, b) == (epoch, batch):
                    os.kill(os.getpid(), signal.SIGKILL)
                if inner is not None:
                    inner(e, b)
            self.batch_hook = hook

    loop.Trainer.__init__ = patched
    from dsom.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def random_teachers(ds: KGDataset, M: int = 3, d: int = 8, seed: int = 7, scale: float = 0.3) -> FrozenTeachers:
    """``M`` frozen teachers ``m0 .. m{M-1}`` with random rank-``d`` tables for ``ds`` (entries ~ N(0, scale^2))."""
    g = torch.Generator().manual_seed(seed)
    return FrozenTeachers([f"m{i}" for i in range(M)], torch.randn(M, ds.num_entities, 2 * d, generator=g) * scale,
                          torch.randn(M, 2 * ds.num_relations, 2 * d, generator=g) * scale)


def config(base: dict, **overrides) -> Config:
    """A default :class:`Config` with the dotted keys of ``base``, then of ``overrides``, set."""
    cfg = Config()
    for k, v in {**base, **overrides}.items():
        set_value(cfg, k, v)
    return cfg
