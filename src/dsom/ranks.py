"""Filtered rank computation and rank-based metrics (SPEC §4), isolated from models and data.

Ranks are computed from one score row per query: the target's score is read from that row, every
*other* known answer is filtered out, and the remaining candidates are compared with the target.

* optimistic rank  = 1 + #{candidates scoring strictly higher}
* pessimistic rank = 1 + #{candidates scoring higher or equal}  (kbc / MoSE / DSoM convention)
* realistic rank   = (optimistic + pessimistic) / 2             (the expected rank under random tie-breaking,
  PyKEEN's default; our headline number)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIE_POLICIES = ("realistic", "pessimistic", "optimistic")
HITS_AT = (1, 3, 10)


@dataclass
class RankCounts:
    """Per-query counts of strictly-greater and equal-scoring unfiltered candidates (``(B,)`` int64)."""

    greater: torch.Tensor
    equal: torch.Tensor

    def __add__(self, other: RankCounts) -> RankCounts:
        return RankCounts(self.greater + other.greater, self.equal + other.equal)

    @property
    def optimistic(self) -> torch.Tensor:
        return (1 + self.greater).double()

    @property
    def pessimistic(self) -> torch.Tensor:
        return (1 + self.greater + self.equal).double()

    @property
    def realistic(self) -> torch.Tensor:
        return 0.5 * (self.optimistic + self.pessimistic)

    def ranks(self, policy: str) -> torch.Tensor:
        if policy not in TIE_POLICIES:
            raise ValueError(f"unknown tie policy {policy!r}; choose one of {TIE_POLICIES}")
        return getattr(self, policy)


def count_better(scores: torch.Tensor, target_scores: torch.Tensor, exclude: torch.Tensor,
                 excluded: bool = True, check_nan: bool = True) -> RankCounts:
    """Compare a block of candidate scores with each query's target score.

    Args:
        scores: ``(..., B, N)`` float32 scores of N candidates (leading dims: several scorers at once).
        target_scores: ``(..., B)`` the target's score (read from the same computation).
        exclude: ``(B, N)`` bool (broadcast over leading dims), True for candidates that must not be
            counted (other known answers and the target itself). With ``excluded=False`` the mask is
            the complement instead: True for candidates that *are* counted.
    """
    if torch.isnan(scores).any() or torch.isnan(target_scores).any():
        raise FloatingPointError("model produced NaN scores; ranks are undefined (check the learning rate/precision)")
    t = target_scores.unsqueeze(-1)
    keep = ~exclude if excluded else exclude
    # int32 sums of the boolean blocks: about 2x faster than the default int64 accumulation on CPU
    greater = ((scores > t) & keep).sum(-1, dtype=torch.int32).long()
    equal = ((scores == t) & keep).sum(-1, dtype=torch.int32).long()
    return RankCounts(greater, equal)


def min_rank_counts(counts: list[RankCounts], policy: str) -> torch.Tensor:
    """Per-query minimum rank over several models under one tie policy (MoSE's "oracle", SPEC §2.4)."""
    return torch.stack([c.ranks(policy) for c in counts]).min(0).values


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """MRR, MR and Hits@{1,3,10} of a rank vector (fractions in [0, 1]; MR a mean rank)."""
    r = ranks.double()
    if r.numel() == 0:
        return {"mrr": math.nan, "mr": math.nan, **{f"hits@{k}": math.nan for k in HITS_AT}}
    out = {"mrr": float((1.0 / r).mean()), "mr": float(r.mean())}
    for k in HITS_AT:
        out[f"hits@{k}"] = float((r <= k).double().mean())
    return out


def all_metrics(counts: RankCounts) -> dict[str, dict[str, float]]:
    """Metrics under every tie policy: ``{policy: {metric: value}}``."""
    return {p: metrics_from_ranks(counts.ranks(p)) for p in TIE_POLICIES}
