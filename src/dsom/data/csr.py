"""CSR answer indices: (query entity, relation) -> sorted answer entities.

Built once from an array of (query_entity, relation, answer) rows; looked up for a whole batch with
``searchsorted`` and scattered into a boolean ``B x E`` mask without a Python loop over queries
(SPEC §9.5). Relations use the reciprocal numbering: relation ``r + R`` answers head queries.
"""

from __future__ import annotations

import numpy as np
import torch


class CSRIndex:
    """Sorted, deduplicated answer lists keyed by ``entity * num_relations + relation``.

    Attributes:
        num_entities: E, the number of entity ids (answers are in ``[0, E)``).
        num_relations: number of relation ids including reciprocals (2R).
        keys: ``(K,)`` int64, sorted unique keys.
        offsets: ``(K + 1,)`` int64; answers of key ``keys[k]`` are ``answers[offsets[k]:offsets[k+1]]``.
        answers: ``(nnz,)`` int64, sorted within each key.
    """

    def __init__(self, keys: torch.Tensor, offsets: torch.Tensor, answers: torch.Tensor,
                 num_entities: int, num_relations: int) -> None:
        self.keys = keys
        self.offsets = offsets
        self.answers = answers
        self.num_entities = int(num_entities)
        self.num_relations = int(num_relations)

    @classmethod
    def from_queries(cls, queries: np.ndarray, num_entities: int, num_relations: int) -> CSRIndex:
        """Build from an ``(n, 3)`` integer array of ``(query_entity, relation, answer)`` rows.

        Duplicate rows are collapsed, so answer lists are sets.
        """
        q = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
        key = q[:, 0] * num_relations + q[:, 1]
        # Sort by (key, answer) and drop duplicate pairs.
        order = np.lexsort((q[:, 2], key))
        key, ans = key[order], q[order, 2]
        if len(key):
            keep = np.ones(len(key), dtype=bool)
            keep[1:] = (key[1:] != key[:-1]) | (ans[1:] != ans[:-1])
            key, ans = key[keep], ans[keep]
        uniq, starts = np.unique(key, return_index=True)
        offsets = np.append(starts, len(key)).astype(np.int64)
        return cls(torch.from_numpy(uniq.astype(np.int64)), torch.from_numpy(offsets),
                   torch.from_numpy(ans.astype(np.int64)), num_entities, num_relations)

    def __len__(self) -> int:
        return int(self.keys.numel())

    @property
    def nnz(self) -> int:
        return int(self.answers.numel())

    def to(self, device: torch.device | str) -> CSRIndex:
        return CSRIndex(self.keys.to(device), self.offsets.to(device), self.answers.to(device),
                        self.num_entities, self.num_relations)

    def lookup(self, entity: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """Row index of each query's key, or -1 where the query has no answers. Shapes ``(B,)``."""
        key = entity.to(torch.int64) * self.num_relations + relation.to(torch.int64)
        pos = torch.searchsorted(self.keys, key)
        pos_c = pos.clamp(max=max(len(self) - 1, 0))
        found = (pos < len(self)) & (self.keys[pos_c] == key) if len(self) else torch.zeros_like(key, dtype=torch.bool)
        return torch.where(found, pos_c, torch.full_like(pos, -1))

    def counts(self, entity: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """Number of answers per query, ``(B,)`` int64 (0 where absent)."""
        row = self.lookup(entity, relation)
        rc = row.clamp(min=0)
        n = self.offsets[rc + 1] - self.offsets[rc]
        return torch.where(row >= 0, n, torch.zeros_like(n))

    def pairs(self, entity: torch.Tensor, relation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All (batch_row, answer) pairs for a batch of queries, as two ``(nnz_batch,)`` int64 tensors."""
        row = self.lookup(entity, relation)
        rc = row.clamp(min=0)
        start = self.offsets[rc]
        n = torch.where(row >= 0, self.offsets[rc + 1] - start, torch.zeros_like(start))
        batch_rows = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
        total = int(n.sum())
        if total == 0:
            return batch_rows, torch.empty(0, dtype=torch.int64, device=n.device)
        # Position inside each query's answer list: 0..n_i-1, then offset by that list's start.
        first = torch.cumsum(n, 0) - n
        within = torch.arange(total, device=n.device) - torch.repeat_interleave(first, n)
        cols = self.answers[torch.repeat_interleave(start, n) + within]
        return batch_rows, cols

    def padded_pairs(self, entity: torch.Tensor, relation: torch.Tensor, capacity: int,
                     fill: tuple[int | torch.Tensor, int | torch.Tensor] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pairs` in ``(capacity,)`` tensors of a fixed size, the slots past the batch's pairs set to ``fill``
        (a (row, answer) the caller sets anyway). Computed where the index lives with fixed shapes and no host read
        (each slot finds its query by a binary search of the running counts): what a CUDA graph can hold. The caller
        must know the batch has at most ``capacity`` pairs (:meth:`counts` on the host); pairs past it are dropped."""
        row = self.lookup(entity, relation)
        rc = row.clamp(min=0)
        start = self.offsets[rc]
        n = torch.where(row >= 0, self.offsets[rc + 1] - start, torch.zeros_like(start))
        ends = torch.cumsum(n, 0)  # (B,): one past each query's last slot
        slot = torch.arange(capacity, device=n.device)
        q = torch.searchsorted(ends, slot, right=True)  # the query of each slot; B past the last pair
        used = q < len(n)
        q = q.clamp(max=max(len(n) - 1, 0))
        pos = start[q] + slot - (ends[q] - n[q])
        cols = self.answers[pos.clamp(0, max(self.nnz - 1, 0))] if self.nnz else torch.zeros_like(pos)
        fill_row, fill_col = fill
        return torch.where(used, q, fill_row), torch.where(used, cols, fill_col)

    def mask(self, entity: torch.Tensor, relation: torch.Tensor, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """Boolean ``(B, stop - start)`` mask of known answers restricted to entity ids ``[start, stop)``."""
        stop = self.num_entities if stop is None else stop
        rows, cols = self.pairs(entity, relation)
        out = torch.zeros(len(entity), stop - start, dtype=torch.bool, device=entity.device)
        if start != 0 or stop != self.num_entities:
            keep = (cols >= start) & (cols < stop)
            rows, cols = rows[keep], cols[keep]
        out[rows, cols - start] = True
        return out

    def answers_of(self, entity: int, relation: int) -> np.ndarray:
        """Sorted answers of one query (empty if none)."""
        row = int(self.lookup(torch.tensor([entity]), torch.tensor([relation]))[0])
        if row < 0:
            return np.empty(0, dtype=np.int64)
        return self.answers[self.offsets[row]:self.offsets[row + 1]].cpu().numpy()
