"""Held-out triples for the teacher selector (SPEC §0.1, §0.4).

The teachers fit their training triples, so rewards computed there pay for memorisation (the structural
teacher "wins" every training triple). dsom therefore keeps a seeded fraction ``distill.holdout`` of the train
triples away from the teachers: stage 1 trains on the rest, the policy is rewarded only on the held-out triples
(where every teacher's prediction is honest), and each teacher's temperature is fitted there. The student still
trains on every train triple.
"""

from __future__ import annotations

import numpy as np
import torch

from dsom.data.graph import KGDataset
from dsom.data.pairs import PairIndex
from dsom.distill.losses import per_query_ce
from dsom.errors import ConfigError


def holdout_mask(num_train: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``(num_train,)`` bool, True for the ``round(fraction * num_train)`` held-out train triples (seeded)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"config key 'distill.holdout' must be in [0, 1), got {fraction!r}")
    mask = np.zeros(num_train, dtype=bool)
    k = int(round(fraction * num_train))
    if k > 0:
        mask[np.random.default_rng(seed).choice(num_train, size=k, replace=False)] = True
    return mask


def teacher_dataset(ds: KGDataset, fraction: float, seed: int = 0) -> KGDataset:
    """The dataset the teachers train on: train without the held-out triples (filtering still uses every triple)."""
    if fraction <= 0:
        return ds
    return ds.with_split("train", ds.train[~holdout_mask(len(ds.train), fraction, seed)])


def reward_rows(ds: KGDataset, fraction: float, seed: int = 0) -> torch.Tensor:
    """``(2 n_train,)`` bool over the reciprocal train queries (:meth:`KGDataset.queries` order): the queries of
    held-out triples, both directions."""
    mask = holdout_mask(len(ds.train), fraction, seed)
    return torch.from_numpy(np.concatenate([mask, mask]))


@torch.no_grad()
def fit_temperatures(teachers, queries: torch.Tensor, batch_size: int = 1000, iterations: int = 30,
                     tol: float = 1e-10) -> torch.Tensor:
    """Per-teacher temperatures ``T_m`` minimising the mean CE of ``F^m / T_m`` on ``queries (n, 3)``.

    ``CE(beta) = logsumexp(beta z) - beta z_t`` is convex in ``beta = 1 / T``: its derivative ``E_p[z] - z_t``
    increases with ``beta`` and its second derivative is ``Var_p[z]``. Safeguarded Newton on ``x = log beta`` in
    ``[-7, 7]`` (T from 1e-3 to 1e3): every pass over the queries gives both derivatives at the current point, which
    narrows a bracket of the minimum as bisection does; the next point is the Newton step in ``beta`` where it falls
    inside the bracket, else the bracket's midpoint (an undamped Newton step oscillates on teachers with a few very
    confident mistakes; the bracket cannot). It stops when every teacher's Newton step (or bracket) is below ``tol`` in ``x`` or after
    ``iterations`` passes: a few passes where bisection took 30 (each pass scores the teachers on every query and
    exponentiates ``M x n x E`` float64 logits: 48 s of a FB15K-237 stage-2 run)."""
    M = teachers.num_teachers
    lo = torch.full((M,), -7.0, dtype=torch.float64)
    hi = torch.full((M,), 7.0, dtype=torch.float64)
    x = (lo + hi) / 2
    for _ in range(iterations):
        beta = x.exp()
        grad, curv = _ce_derivatives(teachers, queries, beta, batch_size)
        up = grad < 0  # CE still falls as beta grows: the minimum lies above x
        lo = torch.where(up, x, lo)
        hi = torch.where(up, hi, x)
        newton = torch.log((beta - grad / curv.clamp(min=1e-300)).clamp(min=1e-300))
        inside = (curv > 0) & (newton > lo) & (newton < hi)
        # converged: Newton's own step, or the bracket, below tol (the sign of a float64 derivative this close to the
        # minimum is rounding noise, which can put the Newton point just outside the bracket)
        converged = ((newton - x).abs() < tol) | (hi - lo < tol)
        x = torch.where(inside, newton, torch.where(converged, x, (lo + hi) / 2))
        if bool(converged.all()):
            break
    return (-x).exp().float()


def _ce_derivatives(teachers, queries: torch.Tensor, beta: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M,)`` first and second derivatives of the summed CE of ``beta_m F^m`` with respect to ``beta_m``."""
    M = teachers.num_teachers
    grad = torch.zeros(M, dtype=torch.float64)
    curv = torch.zeros(M, dtype=torch.float64)
    for s in range(0, len(queries), batch_size):
        q = queries[s:s + batch_size]
        z = teachers.score_all(q[:, 0], q[:, 1]).double()  # (M, b, E)
        p = torch.softmax(z * beta.to(z.device).view(-1, 1, 1), -1)
        pz = p * z
        mean = pz.sum(-1)
        zt = z.gather(-1, q[:, 2].view(1, -1, 1).expand(M, -1, 1)).squeeze(-1)
        grad += (mean - zt).sum(1).cpu()
        curv += ((pz * z).sum(-1) - mean * mean).clamp(min=0).sum(1).cpu()
    return grad, curv


@torch.no_grad()
def teacher_ce(teachers, queries: torch.Tensor, temperatures: torch.Tensor | None = None,
               batch_size: int = 1000) -> torch.Tensor:
    """``(M,)`` mean CE of every teacher on ``queries`` (optionally divided by ``temperatures``)."""
    M = teachers.num_teachers
    total = torch.zeros(M, dtype=torch.float64)
    for s in range(0, len(queries), batch_size):
        q = queries[s:s + batch_size]
        z = teachers.score_all(q[:, 0], q[:, 1])
        if temperatures is not None:
            z = z / temperatures.to(z.device).view(-1, 1, 1)
        total += per_query_ce(z, q[:, 2]).double().sum(1).cpu()
    return (total / max(len(queries), 1)).float()


@torch.no_grad()
def entity_reliability(teachers, queries: torch.Tensor, num_entities: int, temperatures: torch.Tensor | None = None,
                       batch_size: int = 1000) -> torch.Tensor:
    """``(E, M)`` how badly each teacher does on the training queries that involve each entity.

    Per query, every teacher's (calibrated) CE minus that teacher's mean CE over the queries of the same relation;
    averaged over the queries whose query entity or target is the entity; columns standardised over entities
    (0 for entities without queries). A teacher whose features of an entity are wrong or missing scores its
    triples badly, so the policy can learn to avoid it there. Feature teachers cannot memorise single entities,
    so their training CE is an honest signal; the structural teacher's is not (it fits its training triples)."""
    M = teachers.num_teachers
    ces = torch.empty(len(queries), M, dtype=torch.float64)
    q = queries.cpu()
    # each distinct (entity, relation) pair is scored once, blocks of batch_size pairs; its queries read its row (a
    # pass over every training query, FB15K-237's 544,230 in 149,689 pairs, took longer than the student's training)
    pairs = PairIndex(q)
    for p0, p1, sel in pairs.blocks(batch_size):
        z = teachers.score_all(pairs.entities[p0:p1].to(queries.device), pairs.relations[p0:p1].to(queries.device))
        if temperatures is not None:
            z = z / temperatures.to(z.device).view(-1, 1, 1)
        ces[sel] = per_query_ce(z, q[sel, 2].to(z.device), rows=(pairs.pair_of[sel] - p0).to(z.device)).T.double().cpu()
    rel = q[:, 1]
    R = int(rel.max()) + 1 if len(rel) else 1
    rel_mean = torch.zeros(R, M, dtype=torch.float64).index_add_(0, rel, ces)
    rel_count = torch.zeros(R, dtype=torch.float64).index_add_(0, rel, torch.ones(len(rel), dtype=torch.float64))
    centred = ces - (rel_mean / rel_count.clamp(min=1).unsqueeze(1))[rel]
    total = torch.zeros(num_entities, M, dtype=torch.float64)
    count = torch.zeros(num_entities, dtype=torch.float64)
    for col in (0, 2):
        total.index_add_(0, q[:, col], centred)
        count.index_add_(0, q[:, col], torch.ones(len(q), dtype=torch.float64))
    seen = count > 0
    mean = total / count.clamp(min=1).unsqueeze(1)
    mu, sd = mean[seen].mean(0), mean[seen].std(0).clamp(min=1e-9) if int(seen.sum()) > 1 else (0.0, 1.0)
    out = torch.where(seen.unsqueeze(1), (mean - mu) / sd, torch.zeros_like(mean))
    return out.float()
