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
    """Rank counts for reciprocal queries ``(n, 3)`` = (entity, relation, answer) against all entities."""
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
            target_scores = scores.gather(1, t.unsqueeze(1)).squeeze(1)
            exclude = torch.zeros_like(scores, dtype=torch.bool)
            exclude[rows, cols] = True
            exclude[torch.arange(len(t), device=t.device), t] = True
            c = count_better(scores, target_scores, exclude)
        else:
            # Pass 1 reads each target's score from the same chunked product used for counting.
            target_scores = torch.empty(len(t), dtype=torch.float32, device=t.device)
            for lo in range(0, num_entities, chunk):
                hi = min(lo + chunk, num_entities)
                inside = (t >= lo) & (t < hi)
                if inside.any():
                    idx = inside.nonzero().squeeze(1)
                    sc = scorer.score_all(e[idx], r[idx], precision=precision, start=lo, stop=hi)
                    target_scores[idx] = sc.gather(1, (t[idx] - lo).unsqueeze(1)).squeeze(1)
            c = RankCounts(torch.zeros_like(t), torch.zeros_like(t))
            for lo in range(0, num_entities, chunk):
                hi = min(lo + chunk, num_entities)
                sc = scorer.score_all(e, r, precision=precision, start=lo, stop=hi)
                exclude = torch.zeros_like(sc, dtype=torch.bool)
                sel = (cols >= lo) & (cols < hi)
                exclude[rows[sel], cols[sel] - lo] = True
                tin = (t >= lo) & (t < hi)
                exclude[tin.nonzero().squeeze(1), t[tin] - lo] = True
                c = c + count_better(sc, target_scores, exclude)
        greater.append(c.greater)
        equal.append(c.equal)
    if not greater:
        empty = torch.zeros(0, dtype=torch.int64)
        return RankCounts(empty, empty)
    return RankCounts(torch.cat(greater).cpu(), torch.cat(equal).cpu())


def evaluate(scorer: Scorer, dataset: KGDataset, split: str = "test", *, batch_size: int = 1000,
             memory_budget_mb: float = 1024, precision: str = "fp32", device: torch.device | str = "cpu",
             progress: bool = False, max_triples: int | None = None) -> dict[str, Any]:
    """Filtered metrics of ``scorer`` on a split.

    Returns ``{"realistic": {...}, "pessimistic": {...}, "optimistic": {...}, "head": {policy: {...}},
    "tail": {policy: {...}}, "queries": n}`` with metric names ``mrr, mr, hits@1, hits@3, hits@10``.
    Evaluation scores in fp32 by default: bf16 products tie often and distort ranks (DESIGN §6).
    """
    triples = dataset.splits[split]
    if max_triples is not None and len(triples) > max_triples:
        triples = triples[:max_triples]
    queries = dataset.reciprocal(triples)
    fi = dataset.filter_index.to(device)
    counts = rank_queries(scorer, queries, fi, batch_size=batch_size, memory_budget_mb=memory_budget_mb,
                          precision=precision, device=device, progress=progress)
    n = len(triples)
    tail = RankCounts(counts.greater[:n], counts.equal[:n])
    head = RankCounts(counts.greater[n:], counts.equal[n:])
    out: dict[str, Any] = dict(all_metrics(counts))
    out["head"] = all_metrics(head)
    out["tail"] = all_metrics(tail)
    out["queries"] = int(len(queries))
    return out
