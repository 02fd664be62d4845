"""Filtered link-prediction evaluation (SPEC §4): batched, vectorised, entity-chunked.

Every triple ``(h, r, t)`` of a split gives a tail query ``(h, r, ?)`` and a head query answered through
the reciprocal relation ``(t, r + R, ?)``. Known answers from train ∪ valid ∪ test other than the target
are filtered out via the dataset's CSR filter index. Metrics are reported per direction and for both
pooled (the average of head and tail, since both have the same number of queries).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from dsom import distributed
from dsom.data.csr import CSRIndex
from dsom.data.graph import KGDataset
from dsom.ranks import RankCounts, all_metrics, count_better


class Scorer(Protocol):
    """Anything that returns 1-vs-all scores for a batch of ``(entity, relation)`` queries."""

    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:  # (B, stop - start) float32
        ...


def plan_chunks(batch_size: int, num_entities: int, memory_budget_mb: float) -> tuple[int, int]:
    """Choose (queries per batch, entities per chunk) so ~3 ``B x chunk`` 4-byte temporaries fit the budget."""
    cells = max(int(memory_budget_mb * 2**20 / (4 * 3)), 1)
    batch = max(1, min(batch_size, cells))
    chunk = max(1, min(num_entities, cells // batch))
    return batch, chunk


@torch.no_grad()
def rank_queries(scorer: Scorer, queries: np.ndarray | torch.Tensor, filter_index: CSRIndex, *,
                 batch_size: int = 1000, memory_budget_mb: float = 1024, precision: str = "fp32",
                 device: torch.device | str = "cpu", progress: bool = False) -> RankCounts:
    """Rank counts for reciprocal queries ``(n, 3)`` = (entity, relation, answer) against all entities.

    ``scorer.score_all`` returns ``(B, N)`` scores, or ``(K, B, N)`` for K models scored together (for
    example every teacher at once); the counts then have shape ``(n,)`` or ``(K, n)``.

    Queries that share ``(entity, relation)`` share one score row: each distinct pair is scored once and
    every answer of it is ranked against that row (on DB15K's test split 19,804 queries have 14,303
    distinct pairs). Counts come back in the order of ``queries``.
    """
    q = torch.as_tensor(np.asarray(queries), dtype=torch.int64).to(device)
    if len(q) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return RankCounts(empty, empty)
    num_entities = filter_index.num_entities
    batch, chunk = plan_chunks(batch_size, num_entities, memory_budget_mb)
    key = q[:, 0] * filter_index.num_relations + q[:, 1]
    order = torch.argsort(key, stable=True)
    qs = q[order]
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    pair_e, pair_r = qs[first, 0], qs[first, 1]
    pair_of_query = torch.repeat_interleave(torch.arange(len(counts), device=q.device), counts)
    cum = torch.cumsum(counts, 0).cpu().numpy()
    # Results go into preallocated tensors (in sorted order), not a list of per-batch tensors: small tensors that
    # outlive a batch sit between the large score blocks in the heap and fragment it.
    g_sorted: torch.Tensor | None = None
    e_sorted: torch.Tensor | None = None
    # Under torchrun each process ranks a contiguous share of the pairs; the others' entries stay 0 and are summed in.
    sharded = distributed.active() and len(cum) >= distributed.world()
    u_lo, u_hi = distributed.shard(len(cum)) if sharded else (0, len(cum))
    bar = tqdm(total=len(q), desc="evaluate", disable=not progress, leave=False)
    u0 = u_lo
    while u0 < u_hi:
        q0 = int(cum[u0 - 1]) if u0 else 0
        u1 = max(u0 + 1, min(u0 + batch, int(np.searchsorted(cum, q0 + batch, side="right")), u_hi))
        q1 = int(cum[u1 - 1])
        c = _rank_block(scorer, pair_e[u0:u1], pair_r[u0:u1], pair_of_query[q0:q1] - u0, qs[q0:q1, 2],
                        filter_index, batch, chunk, precision)
        if g_sorted is None or e_sorted is None:
            alloc = torch.zeros if sharded else torch.empty
            g_sorted = alloc((*c.greater.shape[:-1], len(q)), dtype=torch.int64, device=c.greater.device)
            e_sorted = torch.zeros_like(g_sorted) if sharded else torch.empty_like(g_sorted)
        g_sorted[..., q0:q1] = c.greater
        e_sorted[..., q0:q1] = c.equal
        del c
        bar.update(q1 - q0)
        u0 = u1
    bar.close()
    assert g_sorted is not None and e_sorted is not None
    if sharded:
        distributed.sum_(g_sorted)
        distributed.sum_(e_sorted)
    g_out, e_out = torch.empty_like(g_sorted), torch.empty_like(e_sorted)
    g_out[..., order] = g_sorted
    e_out[..., order] = e_sorted
    return RankCounts(g_out.cpu(), e_out.cpu())


def _rank_block(scorer: Scorer, e: torch.Tensor, r: torch.Tensor, row: torch.Tensor, t: torch.Tensor,
                filter_index: CSRIndex, batch: int, chunk: int, precision: str) -> RankCounts:
    """Counts of the queries ``(row, t)`` over the distinct pairs ``(e, r)``: query i asks pair ``row[i]``."""
    num_entities = filter_index.num_entities
    rows, cols = filter_index.pairs(e, r)
    if chunk >= num_entities:
        scores = scorer.score_all(e, r, precision=precision)
        known = torch.zeros(scores.shape[-2:], dtype=torch.bool, device=scores.device)
        known[rows, cols] = True
        return _count_queries(scores, known, row, t, batch)
    # Pass 1 reads each target's score from the same chunked product used for counting.
    target_scores: torch.Tensor | None = None
    for lo in range(0, num_entities, chunk):
        hi = min(lo + chunk, num_entities)
        inside = ((t >= lo) & (t < hi)).nonzero().squeeze(1)
        if len(inside):
            sc = scorer.score_all(e[row[inside]], r[row[inside]], precision=precision, start=lo, stop=hi)
            if target_scores is None:
                target_scores = torch.empty((*sc.shape[:-2], len(t)), dtype=torch.float32, device=sc.device)
            target_scores[..., inside] = _gather_targets(sc, t[inside] - lo)
    assert target_scores is not None
    total: RankCounts | None = None
    for lo in range(0, num_entities, chunk):
        hi = min(lo + chunk, num_entities)
        sc = scorer.score_all(e, r, precision=precision, start=lo, stop=hi)
        known = torch.zeros(sc.shape[-2:], dtype=torch.bool, device=sc.device)
        sel = (cols >= lo) & (cols < hi)
        known[rows[sel], cols[sel] - lo] = True
        part = _count_queries(sc, known, row, t - lo, batch, target_scores)
        total = part if total is None else total + part
    assert total is not None
    return total


def _count_queries(scores: torch.Tensor, known: torch.Tensor, row: torch.Tensor, t: torch.Tensor, batch: int,
                   target_scores: torch.Tensor | None = None) -> RankCounts:
    """Counts of queries ``(row[i], t[i])`` against a block of pair scores ``(..., U, N)``.

    ``row`` is sorted and covers every pair (each pair's queries are contiguous). ``known (U, N)`` marks each
    pair's filtered answers; each query's own target (``t`` relative to the block, possibly outside it) is not
    counted either. ``target_scores`` (``(..., Q)``) defaults to reading the block.

    The first query of every pair is compared with the block in place; the other queries of shared pairs
    (about a quarter on DB15K) are compared on copied rows, ``batch`` at a time. The target is not masked:
    its own comparison is subtracted afterwards, so no per-query mask is built.
    """
    n_cand = scores.shape[-1]
    inside = (t >= 0) & (t < n_cand)
    t_in = t.clamp(0, n_cand - 1)
    lead = (slice(None),) * (scores.dim() - 2)
    own = scores[lead + (row, t_in)]  # (..., Q): each query's target read from this block
    if target_scores is None:
        target_scores = own
    keep = ~known
    first = torch.ones(len(row), dtype=torch.bool, device=row.device)
    first[1:] = row[1:] != row[:-1]
    greater = torch.empty(target_scores.shape, dtype=torch.int64, device=scores.device)
    equal = torch.empty_like(greater)
    firsts = first.nonzero().squeeze(1)
    c = count_better(scores, target_scores[..., firsts], keep, excluded=False)  # firsts are pairs 0..U-1 in order
    if torch.isnan(target_scores).any():
        raise FloatingPointError("model produced NaN scores; ranks are undefined (check the learning rate/precision)")
    greater[lead + (firsts,)], equal[lead + (firsts,)] = c.greater, c.equal
    rest = (~first).nonzero().squeeze(1)
    for s in range(0, len(rest), batch):
        idx = rest[s:s + batch]
        c = count_better(scores.index_select(-2, row[idx]), target_scores[..., idx], keep.index_select(0, row[idx]),
                         excluded=False, check_nan=False)
        greater[lead + (idx,)], equal[lead + (idx,)] = c.greater, c.equal
    # The target itself, where it lies in this block and is not already filtered out.
    counted = inside & keep[row, t_in]
    greater -= ((own > target_scores) & counted).long()
    equal -= ((own == target_scores) & counted).long()
    return RankCounts(greater, equal)


def _gather_targets(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scores[..., i, t[i]]`` for ``(..., B, N)`` scores."""
    idx = t.view(*([1] * (scores.dim() - 2)), -1, 1).expand(*scores.shape[:-1], 1)
    return scores.gather(-1, idx).squeeze(-1)


def split_metrics(counts: RankCounts, num_triples: int) -> dict[str, Any]:
    """The result dict of :func:`evaluate` from the counts of ``2n`` queries (tail queries first)."""
    n = num_triples
    out: dict[str, Any] = dict(all_metrics(counts))
    out["head"] = all_metrics(RankCounts(counts.greater[n:], counts.equal[n:]))
    out["tail"] = all_metrics(RankCounts(counts.greater[:n], counts.equal[:n]))
    out["queries"] = int(counts.greater.shape[-1])
    return out


def split_counts(scorer: Scorer, dataset: KGDataset, split: str = "test", *, batch_size: int = 1000,
                 memory_budget_mb: float = 1024, precision: str = "fp32", device: torch.device | str = "cpu",
                 progress: bool = False, max_triples: int | None = None) -> tuple[RankCounts, int]:
    """Rank counts of every query of a split (tail queries, then head queries) and the number of triples."""
    triples = dataset.splits[split]
    if max_triples is not None and len(triples) > max_triples:
        triples = triples[:max_triples]
    queries = dataset.reciprocal(triples)
    fi = dataset.filter_index.to(device)
    counts = rank_queries(scorer, queries, fi, batch_size=batch_size, memory_budget_mb=memory_budget_mb,
                          precision=precision, device=device, progress=progress)
    return counts, len(triples)


def evaluate(scorer: Scorer, dataset: KGDataset, split: str = "test", *, batch_size: int = 1000,
             memory_budget_mb: float = 1024, precision: str = "fp32", device: torch.device | str = "cpu",
             progress: bool = False, max_triples: int | None = None) -> dict[str, Any]:
    """Filtered metrics of ``scorer`` on a split.

    Returns ``{"realistic": {...}, "pessimistic": {...}, "optimistic": {...}, "head": {policy: {...}},
    "tail": {policy: {...}}, "queries": n}`` with metric names ``mrr, mr, hits@1, hits@3, hits@10``.
    Evaluation scores in fp32 by default: bf16 products tie often and distort ranks (DESIGN §6).
    """
    counts, n = split_counts(scorer, dataset, split, batch_size=batch_size, memory_budget_mb=memory_budget_mb,
                             precision=precision, device=device, progress=progress, max_triples=max_triples)
    return split_metrics(counts, n)
