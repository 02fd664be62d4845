"""In-memory knowledge graph: vocabularies, id-triple splits, reciprocal queries and CSR indices."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dsom.data.csr import CSRIndex

SPLITS = ("train", "valid", "test")


@dataclass
class Vocabulary:
    """Labels in id order (row i = id i), with optional display names and descriptions."""

    labels: list[str]
    names: list[str] | None = None
    descriptions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def index(self) -> dict[str, int]:
        """Label -> id."""
        return {label: i for i, label in enumerate(self.labels)}

    def name(self, i: int) -> str:
        """Display name of id ``i`` (the label when no name is known)."""
        if self.names is not None and self.names[i]:
            return self.names[i]
        return self.labels[i]

    def digest(self) -> str:
        """Short stable hash of the label sequence, used to check checkpoint/dataset compatibility."""
        h = hashlib.sha256()
        for label in self.labels:
            h.update(label.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()[:16]


@dataclass
class KGDataset:
    """A knowledge graph with train/valid/test splits of ``(head, relation, tail)`` id triples.

    ``num_relations`` is R, the number of *original* relations; models use ``2R`` relation ids where
    ``r + R`` is the reciprocal of ``r``. Feature modalities (``dsom.data.modality.ModalityTable``) may be
    attached in ``modalities``; ``extras`` holds anything else a source provides (for example the
    synthetic generator's ground truth).
    """

    name: str
    entities: Vocabulary
    relations: Vocabulary
    splits: dict[str, np.ndarray]
    root: Path | None = None
    layout: str = "canonical"
    modalities: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in SPLITS:
            arr = np.asarray(self.splits.get(s, np.empty((0, 3))), dtype=np.int64).reshape(-1, 3)
            self.splits[s] = arr

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def valid(self) -> np.ndarray:
        return self.splits["valid"]

    @property
    def test(self) -> np.ndarray:
        return self.splits["test"]

    def reciprocal(self, triples: np.ndarray) -> np.ndarray:
        """Tail queries followed by head queries as reciprocal tail queries: ``(2n, 3)`` rows (e, r', answer)."""
        t = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        inv = np.stack([t[:, 2], t[:, 1] + self.num_relations, t[:, 0]], axis=1)
        return np.concatenate([t, inv], axis=0)

    def queries(self, split: str) -> np.ndarray:
        """Reciprocal queries of a split (see :meth:`reciprocal`)."""
        return self.reciprocal(self.splits[split])

    @cached_property
    def filter_index(self) -> CSRIndex:
        """Known answers over train ∪ valid ∪ test, both directions (filtered evaluation, SPEC §4)."""
        allq = np.concatenate([self.queries(s) for s in SPLITS], axis=0)
        return CSRIndex.from_queries(allq, self.num_entities, 2 * self.num_relations)

    @cached_property
    def neighbour_index(self) -> CSRIndex:
        """Known answers over train only, both directions (the NDKD neighbour sets, SPEC §5.6)."""
        return CSRIndex.from_queries(self.queries("train"), self.num_entities, 2 * self.num_relations)

    def with_split(self, split: str, triples: np.ndarray) -> KGDataset:
        """A copy with one split replaced. Filtering keeps using every triple of the original files."""
        splits = dict(self.splits)
        splits[split] = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        out = dataclasses.replace(self, splits=splits)
        out.__dict__["filter_index"] = self.filter_index
        if split != "train" and "neighbour_index" in self.__dict__:
            out.__dict__["neighbour_index"] = self.neighbour_index
        return out

    def clean_valid(self) -> tuple[KGDataset, int]:
        """Drop valid triples that also occur in train or test, and repeated valid triples (DB15K's valid
        split mostly repeats train and test); returns the new dataset and the number of triples dropped."""
        valid = self.valid
        k_train, k_test, k = triple_keys([self.train, self.test, valid], self.num_entities, self.num_relations)
        seen = np.concatenate([k_train, k_test])
        first = np.zeros(len(valid), dtype=bool)
        first[np.unique(k, return_index=True)[1]] = True
        keep = ~np.isin(k, seen) & first
        return self.with_split("valid", valid[keep]), int((~keep).sum())

    def fingerprint(self) -> dict[str, str]:
        return {"entities": self.entities.digest(), "relations": self.relations.digest()}

    def summary(self) -> dict[str, Any]:
        """The ``dataset`` block of ``results.json`` (DESIGN §5)."""
        return {
            "name": self.name,
            "entities": self.num_entities,
            "relations": self.num_relations,
            "train": int(len(self.train)),
            "valid": int(len(self.valid)),
            "test": int(len(self.test)),
        }


def triple_keys(arrays: list[np.ndarray], num_entities: int, num_relations: int) -> list[np.ndarray]:
    """One int64 key per ``(h, r, t)`` row of each array; equal keys = equal triples, across all the arrays.

    The key is ``(h * R + r) * E + t`` when that cannot overflow int64 (``E * E * R < 2**62``), else a dense id from
    ``np.unique`` over the rows of all arrays together (so keys of different calls are not comparable then)."""
    num_e, num_r = max(num_entities, 1), max(num_relations, 1)
    arrays = [np.asarray(a, dtype=np.int64).reshape(-1, 3) for a in arrays]
    if num_e * num_e * num_r < 2**62:
        return [(a[:, 0] * num_r + a[:, 1]) * num_e + a[:, 2] for a in arrays]
    _, inv = np.unique(np.concatenate(arrays, axis=0), axis=0, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    bounds = np.cumsum([0, *(len(a) for a in arrays)])
    return [inv[bounds[i]:bounds[i + 1]] for i in range(len(arrays))]

