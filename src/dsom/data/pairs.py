"""The (entity, relation) pairs of reciprocal queries ``(N, 3)`` = (query entity, relation, answer).

Every query of one pair shares its 1-vs-all score row, its teachers' rows and its neighbour set, so training
(``train.batching=pairs``), stage 2's entity-reliability table and the policy analysis all score each pair once.
One grouping serves all of them: pairs are numbered in (entity, relation) order."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffling of epoch ``epoch`` (1-based): a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _pair_keys(queries: torch.Tensor, counts: bool = False) -> tuple[int, tuple[torch.Tensor, ...]]:
    """``(width, torch.unique(entity * width + relation, return_inverse=True[, return_counts=True]))``."""
    q = queries.to(torch.int64)
    width = int(q[:, 1].max()) + 1 if len(q) else 1
    return width, torch.unique(q[:, 0] * width + q[:, 1], return_inverse=True, return_counts=counts)


def group_pairs(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (entity, relation) pairs of a batch of queries ``(T, 3)``: their entities ``(P,)``, relations ``(P,)``
    and the pair of each query ``(T,)`` (pairs in (entity, relation) order)."""
    width, (keys, rows) = _pair_keys(batch)
    return keys // width, keys % width, rows


class PairIndex:
    """The distinct (entity, relation) pairs of a set of reciprocal queries ``(N, 3)``: ``pair_of (N,)`` the pair of
    each query, ``counts (P,)`` the queries per pair and ``entities``, ``relations (P,)`` the pairs themselves, pairs
    numbered in (entity, relation) order (on the queries' device)."""

    def __init__(self, queries: torch.Tensor) -> None:
        width, (keys, self.pair_of, self.counts) = _pair_keys(queries, counts=True)
        self.entities, self.relations = keys // width, keys % width
        self._order: torch.Tensor | None = None
        self._pieces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_pairs(self) -> int:
        return len(self.counts)

    @property
    def order(self) -> torch.Tensor:
        """``(N,)`` the queries sorted by pair (each pair's queries in their original order)."""
        if self._order is None:
            self._order = torch.argsort(self.pair_of, stable=True)
        return self._order

    def blocks(self, size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Pairs ``[p0, p1)`` in blocks of ``size`` pairs, each with its queries' indices (ordered as :attr:`order`)."""
        ends = torch.cumsum(self.counts, 0).tolist()
        for p0 in range(0, self.num_pairs, size):
            p1 = min(p0 + size, self.num_pairs)
            yield p0, p1, self.order[(ends[p0 - 1] if p0 else 0):ends[p1 - 1]]

    def pieces(self, max_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs cut into pieces of at most ``max_queries`` queries (0 = no cut): ``piece_of (N,)`` the piece of
        each query and ``counts (Q,)`` the queries per piece. A pair's queries fill its pieces in their original order;
        pieces are numbered pair by pair, so with no pair cut they are the pairs themselves."""
        if max_queries <= 0 or len(self.counts) == 0 or int(self.counts.max()) <= max_queries:
            return self.pair_of, self.counts
        if max_queries in self._pieces:  # the same every epoch
            return self._pieces[max_queries]
        order = self.order
        first = torch.cumsum(self.counts, 0) - self.counts  # each pair's first position in ``order``
        rank = torch.arange(len(order), device=order.device) - first[self.pair_of[order]]  # place among its pair's
        per_pair = (self.counts + max_queries - 1) // max_queries
        first_piece = torch.cumsum(per_pair, 0) - per_pair
        piece_of = torch.empty_like(self.pair_of)
        piece_of[order] = first_piece[self.pair_of[order]] + rank // max_queries
        self._pieces[max_queries] = piece_of, torch.bincount(piece_of, minlength=int(per_pair.sum()))
        return self._pieces[max_queries]

    def epoch_batches(self, seed: int, epoch: int, batch_size: int,
                      max_queries: int = 0) -> tuple[torch.Tensor, list[int]]:
        """Epoch ``epoch``'s query order and batch offsets: the pairs shuffled by :func:`epoch_permutation` (a function
        of (seed, epoch) only), each pair's queries together in their original order, cut into batches of about
        ``batch_size`` queries: batch ``b`` ends at the first pair boundary at or past ``(b + 1) * batch_size``
        queries, so an epoch has about as many steps of about as many triples as with ``triples`` batching (the
        boundaries do not drift; a batch holding a pair with more queries than ``batch_size`` covers several marks, and
        the last batch is short). ``max_queries`` > 0 shuffles the :meth:`pieces` of at most that many queries
        instead of whole pairs, so a pair with thousands of answers is spread over the epoch's steps as with
        ``triples`` batching (its pieces that meet in one batch are still scored once). CPU tensors."""
        piece_of, counts = (t.cpu() for t in self.pieces(max_queries))
        P = len(counts)
        perm = epoch_permutation(P, seed, epoch)
        position = torch.empty(P, dtype=torch.int64)
        position[perm] = torch.arange(P)
        order = torch.argsort(position[piece_of], stable=True)
        ends = torch.cumsum(counts[perm], 0)
        n = len(order)
        marks = torch.arange(batch_size, max(n, batch_size), batch_size, dtype=torch.int64)
        cuts = torch.unique_consecutive(ends[torch.searchsorted(ends, marks)]).tolist()
        offsets = [0, *cuts]
        if offsets[-1] != n:
            offsets.append(n)
        return order, offsets


__all__ = ["PairIndex", "epoch_permutation", "group_pairs"]
