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
    """
    q = torch.as_tensor(np.asarray(queries), dtype=torch.int64).to(device)
    num_entities = filter_index.num_entities
    batch, chunk = plan_chunks(batch_size, num_entities, memory_budget_mb)
    greater, equal = [], []
    starts = range(0, len(q), batch)
    for s in tqdm(starts, desc="evaluate", disable=not progress, leave=False):
        e, r, t = q[s:s + batch, 0], q[s:s + batch, 1], q[s:s + batch, 2]
        rows, cols = filter_index.pairs(e, r)
        if chunk >= num_entities:
            scores = scorer.score_all(e, r, precision=precision)
            target_scores = _gather_targets(scores, t)
            exclude = torch.zeros(scores.shape[-2:], dtype=torch.bool, device=scores.device)
            exclude[rows, cols] = True
            exclude[torch.arange(len(t), device=t.device), t] = True
            c = count_better(scores, target_scores, exclude)
        else:
            # Pass 1 reads each target's score from the same chunked product used for counting.
            target_scores = None
            for lo in range(0, num_entities, chunk):
                hi = min(lo + chunk, num_entities)
                inside = (t >= lo) & (t < hi)
                if inside.any():
                    idx = inside.nonzero().squeeze(1)
                    sc = scorer.score_all(e[idx], r[idx], precision=precision, start=lo, stop=hi)
                    if target_scores is None:
                        target_scores = torch.empty((*sc.shape[:-2], len(t)), dtype=torch.float32, device=sc.device)
                    target_scores[..., idx] = _gather_targets(sc, t[idx] - lo)
            c = None
            for lo in range(0, num_entities, chunk):
                hi = min(lo + chunk, num_entities)
                sc = scorer.score_all(e, r, precision=precision, start=lo, stop=hi)
                exclude = torch.zeros(sc.shape[-2:], dtype=torch.bool, device=sc.device)
                sel = (cols >= lo) & (cols < hi)
                exclude[rows[sel], cols[sel] - lo] = True
                tin = (t >= lo) & (t < hi)
                exclude[tin.nonzero().squeeze(1), t[tin] - lo] = True
                part = count_better(sc, target_scores, exclude)
                c = part if c is None else c + part
        greater.append(c.greater)
        equal.append(c.equal)
    if not greater:
        empty = torch.zeros(0, dtype=torch.int64)
        return RankCounts(empty, empty)
    return RankCounts(torch.cat(greater, -1).cpu(), torch.cat(equal, -1).cpu())


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
