"""Inference-time ensembles of frozen teachers (SPEC §3): Teacher Avg. (MoSE-AI), MoSE-BI and MoSE-MI.

* **Teacher Avg.** ranks by the mean of all teachers' logits (:meth:`FrozenTeachers.view`).
* **MoSE-BI** learns per-relation teacher weights on the valid queries with MoSE's AdaBoost-style
  rule. Every (query, candidate) cell is a +1/-1 "vote" per teacher (+1 when the candidate scores below
  the target or is filtered, the target included). Because the boosting distribution only ever
  multiplies cells by ``exp(-w p)``, its value depends only on the cell's sign pattern over the M
  teachers; we therefore count cells per (relation, pattern), 2^M numbers per relation, and run the
  boosting rounds on those counts. That is exact and needs no ``T_r x E`` matrices.
* **MoSE-MI** is a per-candidate MLP (M -> hidden -> 1, ReLU, ReLU on the output) trained with
  cross-entropy on unfiltered valid scores. Its epoch is chosen on a held-out slice of valid (MoSE chose
  it on test; that leaky variant is available behind ``ensemble.mi_leaky``).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsom.config import EnsembleConfig
from dsom.data.graph import KGDataset
from dsom.evaluate import evaluate
from dsom.models.teachers import FrozenTeachers

log = logging.getLogger("dsom")


# --------------------------------------------------------------------------------------------- MoSE-BI
@torch.no_grad()
def pattern_counts(teachers: FrozenTeachers, ds: KGDataset, queries: np.ndarray, batch_size: int = 500,
                   device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """``(2R, 2^M)`` float64 counts of (query, candidate) cells per relation and sign pattern.

    Bit m of a pattern is set when teacher m votes -1 for the cell: the candidate is not filtered, is not
    the target, and scores >= the target's score in teacher m.
    """
    M, E = teachers.num_teachers, teachers.num_entities
    num_rel = 2 * ds.num_relations
    fi = ds.filter_index.to(device)
    q = torch.as_tensor(queries, dtype=torch.int64, device=device)
    counts = torch.zeros(num_rel * 2**M, dtype=torch.float64, device=device)
    bits = (2 ** torch.arange(M, device=device)).view(M, 1, 1)
    for s in tqdm(range(0, len(q), batch_size), desc="MoSE-BI counts", disable=not progress, leave=False):
        e, r, t = q[s:s + batch_size, 0], q[s:s + batch_size, 1], q[s:s + batch_size, 2]
        scores = teachers.score_all(e, r)  # (M, B, E)
        target = scores.gather(2, t.view(1, -1, 1).expand(M, -1, 1))
        minus = scores >= target
        rows, cols = fi.pairs(e, r)
        keep = torch.ones(len(t), E, dtype=torch.bool, device=device)
        keep[rows, cols] = False
        keep[torch.arange(len(t), device=device), t] = False
        code = ((minus & keep).long() * bits).sum(0)  # (B, E)
        counts += torch.bincount((r.view(-1, 1) * 2**M + code).reshape(-1), minlength=num_rel * 2**M).double()
    return counts.view(num_rel, 2**M).cpu()


def boosting_from_counts(counts: torch.Tensor, num_teachers: int, num_entities: int) -> torch.Tensor:
    """MoSE's boosting rounds on one relation's pattern counts ``(2^M,)``; returns the weights ``(M,)``."""
    M = num_teachers
    codes = torch.arange(2**M)
    p = torch.stack([torch.where((codes >> m) & 1 == 1, -1.0, 1.0) for m in range(M)]).double()  # (M, 2^M)
    d = torch.ones(2**M, dtype=torch.float64) / num_entities  # per-cell mass; each query row sums to 1
    acc = torch.zeros(M, dtype=torch.float64)
    for _ in range(M):
        mass = counts * d
        correct = (mass * (p > 0)).sum(1) + 1e-10
        wrong = (mass * (p < 0)).sum(1) + 1e-10
        w = 0.5 * torch.log(correct / wrong)
        open_ = acc <= 0
        best = int(torch.where(open_, w, torch.full_like(w, -math.inf)).argmax())
        acc[best] += w[best]
        d = d * torch.exp(-w[best] * p[best])
        d = d / (counts * d).sum()
    return acc


def boosting_weights(teachers: FrozenTeachers, ds: KGDataset, split: str = "valid", min_queries: int = 10,
                     device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """``(2R, M)`` MoSE-BI weights learned on ``split``; relations with fewer than ``min_queries`` queries
    there get uniform weights ``1/M``."""
    M = teachers.num_teachers
    queries = ds.queries(split)
    counts = pattern_counts(teachers, ds, queries, device=device, progress=progress)
    per_rel = np.bincount(queries[:, 1], minlength=2 * ds.num_relations)
    weights = torch.full((2 * ds.num_relations, M), 1.0 / M, dtype=torch.float64)
    for r in np.flatnonzero(per_rel >= max(min_queries, 1)):
        weights[r] = boosting_from_counts(counts[r], M, teachers.num_entities)
    return weights.float()


class WeightedTeachers:
    """Scorer ``sum_m w_m(r) F^m`` with per-relation weights ``(2R, M)`` (MoSE-BI)."""

    def __init__(self, teachers: FrozenTeachers, weights: torch.Tensor) -> None:
        self.teachers, self.weights = teachers, weights.to(teachers.tables.device)

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        s = self.teachers.score_all(head, relation, precision, start=start, stop=stop)
        return torch.einsum("bm,mbn->bn", self.weights[relation], s)


# --------------------------------------------------------------------------------------------- MoSE-MI
class MetaLearner(nn.Module):
    """Per-candidate MLP over the M teacher scores: ``(..., M) -> (...)`` (MoSE ``meta_learner.py``).

    ``output="relu"`` ends in a ReLU as MoSE's does; a candidate score is then never negative, and once the last
    layer's pre-activation is negative everywhere every score is 0 and no gradient flows (observed on MKG-Y).
    ``"linear"`` (the default) drops that last ReLU."""

    def __init__(self, num_teachers: int, hidden: int = 32, output: str = "linear") -> None:
        super().__init__()
        if output not in ("linear", "relu"):
            raise ValueError(f"MetaLearner output {output!r}: choose linear or relu")
        self.output = output
        layers: list[nn.Module] = [nn.Linear(num_teachers, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
        self.net = nn.Sequential(*layers, *([nn.ReLU()] if output == "relu" else []))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores (M, B, N)`` -> ``(B, N)``, computed over blocks of candidates so the ``(B, N, hidden)``
        activations never exist at once (:class:`_BlockedMLP`; the teachers' scores get no gradient)."""
        first, last = self.net[0], self.net[2]
        return _BlockedMLP.apply(scores.detach(), first.weight, first.bias, last.weight[0], last.bias,
                                 self.output == "relu")

    def reference(self, scores: torch.Tensor) -> torch.Tensor:
        """The same function through ``nn.Sequential`` on the whole block (the definition; used by tests)."""
        return self.net(scores.permute(1, 2, 0)).squeeze(-1)


class _BlockedMLP(torch.autograd.Function):
    """``relu(s W1^T + b1) w2 + b2`` (optionally a final ReLU) per candidate, over blocks of candidates.

    The whole-block version writes and reads a ``(B, N, hidden)`` activation three times (about 5x slower on
    DB15K's shapes); here each block of ``(B, c, hidden)``, about 2 MB, stays in cache, and the backward pass
    recomputes it instead of saving it."""

    ELEMENTS = 1 << 19  # B * c * hidden per block

    @staticmethod
    def _pre(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mbc,hm->bch", x, w1).add_(b1)

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, final_relu: bool) -> torch.Tensor:
        M, B, N = scores.shape
        c = max(8, _BlockedMLP.ELEMENTS // max(B * w1.shape[0], 1))
        out = torch.empty(B, N, dtype=torch.result_type(scores, w1), device=scores.device)
        for s0 in range(0, N, c):
            out[:, s0:s0 + c] = torch.addmv(b2, _BlockedMLP._pre(scores[:, :, s0:s0 + c], w1, b1).relu_().flatten(0, 1),
                                            w2).view(B, -1)
        if final_relu:
            out.relu_()
        ctx.save_for_backward(scores, w1, b1, w2, out)
        ctx.block, ctx.final_relu = c, final_relu
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        scores, w1, b1, w2, out = ctx.saved_tensors
        if ctx.final_relu:
            grad = grad * (out > 0)
        g_w1, g_b1, g_w2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
        for s0 in range(0, scores.shape[2], ctx.block):
            x, g = scores[:, :, s0:s0 + ctx.block], grad[:, s0:s0 + ctx.block]
            pre = _BlockedMLP._pre(x, w1, b1)  # recomputed: (B, c, H)
            g_w2 += torch.einsum("bch,bc->h", pre.relu(), g)
            d_pre = (pre > 0).to(g.dtype).mul_(g.unsqueeze(-1)).mul_(w2)
            g_b1 += d_pre.sum((0, 1))
            g_w1 += torch.einsum("bch,mbc->hm", d_pre, x)
        return None, g_w1, g_b1, g_w2, grad.sum().reshape(1), None


class MetaLearnerScorer:
    def __init__(self, teachers: FrozenTeachers, net: MetaLearner) -> None:
        self.teachers, self.net = teachers, net

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.net(self.teachers.score_all(head, relation, precision, start=start, stop=stop))


def _holdout_split(ds: KGDataset, fraction: float, seed: int) -> tuple[np.ndarray, KGDataset]:
    """Valid triples used for training the meta-learner, and a dataset whose ``valid`` is the held-out slice."""
    valid = ds.splits["valid"]
    perm = np.random.default_rng(seed).permutation(len(valid))
    n_hold = int(round(fraction * len(valid))) if fraction > 0 else 0
    if 0 < fraction and n_hold == 0 and len(valid) > 1:
        n_hold = 1
    hold, train = valid[np.sort(perm[:n_hold])], valid[np.sort(perm[n_hold:])]
    return train, ds.with_split("valid", hold)


def train_meta_learner(teachers: FrozenTeachers, ds: KGDataset, ec: EnsembleConfig, *,
                       device: torch.device | str = "cpu", memory_budget_mb: float = 1024, progress: bool = False,
                       selection_policy: str = "realistic") -> tuple[MetaLearnerScorer, dict[str, Any]]:
    """Train MoSE-MI on valid; choose the epoch by held-out valid Hits@10. Returns the scorer and a log."""
    torch.manual_seed(ec.mi_seed)
    net = MetaLearner(teachers.num_teachers, ec.mi_hidden, ec.mi_output).to(device)
    opt = torch.optim.Adagrad(net.parameters(), lr=ec.mi_lr)
    train_triples, held = _holdout_split(ds, ec.mi_holdout, ec.mi_seed)
    n = len(train_triples)
    # MoSE passes over the tail queries, then the head queries, each epoch.
    directions = [ds.reciprocal(train_triples)[:n], ds.reciprocal(train_triples)[n:]]
    gen = torch.Generator().manual_seed(ec.mi_seed)
    budget = memory_budget_mb / (ec.mi_hidden + teachers.num_teachers + 2)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, 0, copy.deepcopy(net.state_dict()))
    leaky: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, 0, best[2])
    scorer = MetaLearnerScorer(teachers, net)
    for epoch in tqdm(range(1, ec.mi_epochs + 1), desc="MoSE-MI", disable=not progress, leave=False):
        net.train()
        total, steps = 0.0, 0
        for queries in directions:
            q = torch.as_tensor(queries, dtype=torch.int64)[torch.randperm(len(queries), generator=gen)].to(device)
            for s in range(0, len(q), ec.mi_batch_size):
                b = q[s:s + ec.mi_batch_size]
                with torch.no_grad():
                    scores = teachers.score_all(b[:, 0], b[:, 1])
                loss = F.cross_entropy(net(scores), b[:, 2])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
        net.eval()
        rec: dict[str, Any] = {"epoch": epoch, "loss": total / max(steps, 1)}
        if len(held.splits["valid"]):
            m = evaluate(scorer, held, "valid", memory_budget_mb=budget, device=device)
            rec["holdout_hits@10"] = m[selection_policy]["hits@10"]
            if rec["holdout_hits@10"] > best[0]:
                best = (rec["holdout_hits@10"], epoch, copy.deepcopy(net.state_dict()))
        else:
            best = (math.nan, epoch, copy.deepcopy(net.state_dict()))
        if ec.mi_leaky:
            m = evaluate(scorer, ds, "test", memory_budget_mb=budget, device=device)
            rec["test_hits@10"] = m["pessimistic"]["hits@10"]
            if rec["test_hits@10"] > leaky[0]:
                leaky = (rec["test_hits@10"], epoch, copy.deepcopy(net.state_dict()))
        history.append(rec)
    info: dict[str, Any] = {"epoch": best[1], "holdout_triples": int(len(held.splits["valid"])),
                            "train_triples": int(n), "history": history}
    if ec.mi_leaky:
        leaky_net = copy.deepcopy(net)
        leaky_net.load_state_dict(leaky[2])
        info["leaky_scorer"] = MetaLearnerScorer(teachers, leaky_net)
        info["leaky_epoch"] = leaky[1]
    net.load_state_dict(best[2])
    return scorer, info


__all__ = ["MetaLearner", "MetaLearnerScorer", "WeightedTeachers", "boosting_from_counts", "boosting_weights",
           "pattern_counts", "train_meta_learner"]
