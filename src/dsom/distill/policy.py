"""The teacher-selection policy networks, their states and their REINFORCE objective (SPEC §5.2–5.5).

Two states:

* ``logits`` (the paper, SPEC A2): every teacher's raw 1-vs-all logits concatenated, ``(B, M * E)``, into a
  two-layer MLP (:class:`Policy`). Its first layer has ``M * E * hidden`` weights and saturates in one step
  under a shared Adagrad (SPEC §0.3). ``probs`` and ``standardised`` are normalised versions of the same input.
* ``summary`` (the dsom default): a few scale-free statistics per teacher and teacher pair
  (:func:`summary_features`), optionally with a learned embedding of the query's relation and entity, into the
  same MLP shape (:class:`SummaryPolicy`). Its size does not grow with ``E``.

Rewards (Eq. 8 and its alternatives) are computed per action by :func:`action_rewards`; :func:`reinforce_loss`
is the policy-gradient loss with a constant advantage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsom.distill.losses import per_query_ce
from dsom.distill.rowcache import RowCache
from dsom.numerics import EXP_FLOOR
from dsom.perf import MaybeCompiled

STATES = ("logits", "probs", "standardised", "summary")


def policy_state(teacher_logits: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """``(M, B, E)`` teacher logits -> ``(B, M * E)`` policy input (constant w.r.t. every parameter)."""
    x = teacher_logits.detach()
    if kind == "probs":
        x = x.float().softmax(-1)
    elif kind == "standardised":
        x = x.float()
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp(min=1e-6)
    elif kind != "logits":
        raise ValueError(f"unknown full-logit policy state {kind!r}; choose one of {STATES[:3]}")
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


def num_summary_features(num_teachers: int) -> int:
    return 3 * num_teachers + num_teachers * (num_teachers - 1)


def _summary_rows(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of ``z (M, B, E)``: the top logit, its (first) entity, the second logit, the log-sum-exp and the
    entropy of ``softmax(z)``. Written for ``torch.compile``: a max pass, then one pass in which every other reduction
    reads the same row (no arg-max or top-k kernel; exponents floored at ``EXP_FLOOR``, so no fp32 denormal)."""
    z = z.float()
    top = z.amax(-1, keepdim=True)
    at_top = z == top
    cols = torch.arange(z.shape[-1], device=z.device)
    idx = torch.where(at_top, cols, z.shape[-1]).amin(-1)  # the first entity at the top
    tied = at_top.sum(-1) > 1  # a tie at the top: the second logit is the top one
    below = torch.where(at_top, -math.inf, z).amax(-1)
    shifted = z - top
    e = shifted.clamp_min(EXP_FLOOR).exp()
    total = e.sum(-1)
    top = top.squeeze(-1)
    second = torch.where(tied, top, below)
    entropy = total.log() - (e * shifted).sum(-1) / total  # H = lse - sum p z
    return top, idx, second, total.log() + top, entropy


def _summary_rows_eager(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_summary_rows` with eager kernels (top-k and log-softmax: fewer passes than the compiled form's
    element-wise masks would take unfused)."""
    z = z.float()
    logp = torch.log_softmax(z, -1)
    top = z.topk(min(2, z.shape[-1]), dim=-1)
    lse = top.values[..., 0] - logp.gather(-1, top.indices[..., :1]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return top.values[..., 0], z.argmax(-1), top.values[..., -1], lse, entropy


_SUMMARY_ROWS = {False: _summary_rows_eager, True: MaybeCompiled(_summary_rows, True)}


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The ``M(M-1)`` off-diagonal entries of ``x (M, M, ...)`` in row-major order, ``x[~eye(M)]``, without a
    boolean mask (whose indexing makes the host read the mask: a sync on a GPU): drop the first entry of the flattened
    square and every ``M + 1``-th one after it, the diagonal."""
    M = x.shape[0]
    if M < 2:
        return x.flatten(0, 1)[:0]
    return x.flatten(0, 1)[1:].unflatten(0, (M - 1, M + 1))[:, :M].flatten(0, 1)


@torch.no_grad()
def summary_features(teacher_logits: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """``(M, B, E)`` logits -> ``(B, 3M + M(M-1))`` scale-free statistics of each query's teacher distributions.

    Per teacher ``m`` (with ``p_m = softmax(F^m)``): normalised entropy ``H(p_m) / log E``, the log-probability
    of its top entity and the logit margin between its top two entities, both divided by ``log E``. Per ordered
    pair ``(m, m')``: ``log p_m(argmax p_m') / log E``, how much teacher ``m`` believes the other's top answer
    (the disagreement signal). Nothing here depends on the target.

    Three passes over the block (``compile``: fused by ``torch.compile``) instead of a log-softmax, its
    exponential and a top-k: at M = 3, B = 1,000, E = 12,842 about 130 ms per step on the 2-core AMX dev
    machine before (issue 12)."""
    M, B, E = teacher_logits.shape
    z = teacher_logits.detach()
    log_e = math.log(max(E, 2))
    top, idx, second, lse, entropy = _SUMMARY_ROWS[compile](z)
    top_logp = (top - lse) / log_e
    margin = (top - second) / log_e if E > 1 else torch.zeros_like(top)
    feats = [entropy / log_e, top_logp, margin]
    if M > 1:
        # cross[m, m', b] = log p_m(top entity of m') for query b = z[m, b, idx[m', b]] - lse[m, b]
        cross = (z.gather(-1, idx.T.unsqueeze(0).expand(M, B, M)).float() - lse.unsqueeze(-1)).permute(0, 2, 1) / log_e
        feats.append(off_diagonal(cross))  # (M(M-1), B)
    return torch.cat([f.reshape(-1, B) for f in feats]).T.contiguous()


class Policy(nn.Module):
    """The paper's policy: ``pi(a | s) = softmax(W2 relu(W1 s + b1) + b2)`` with PyTorch's default Linear init."""

    def __init__(self, state_dim: int, num_actions: int, hidden: int = 1024,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_actions))
        if generator is not None:  # PyTorch's default Linear distribution, drawn from our generator
            with torch.no_grad():
                for layer in (self.net[0], self.net[2]):
                    bound = 1.0 / layer.in_features**0.5
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, state: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Action logits ``(B, A)``, float32. A bfloat16 ``state`` (teacher logits from bf16 products) runs the first
        layer as a bf16 product (its ``M * E * hidden`` weights cast per step, gradients flowing back to the float32
        weights; the largest product of a stage-2 step under the paper's state); the rest stays float32. ``rows
        (B,)``: the states are one per pair, ``(P, S)``; the first layer runs once per pair and query ``b`` reads row
        ``rows[b]`` of it."""
        first, act, last = self.net
        if state.dtype == torch.bfloat16:
            hidden = F.linear(state, first.weight.to(torch.bfloat16), first.bias.to(torch.bfloat16)).float()
        else:
            hidden = first(state)
        if rows is not None:
            hidden = hidden[rows]
        return last(act(hidden))

    def split_forward(self, state: torch.Tensor, grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(state)`` without autograd, ``forward(state[grad_rows])`` with it``)``: every row's action logits
        (to sample from) and those of the rows whose policy gradient is taken (the reward rows). The first layer's
        weight gradient is then a product over those rows only, not over every row with zeros elsewhere: with held-out
        rewards a tenth of the batch, where that product was about a quarter of a DB15K stage-2 step under the paper's
        state. The bf16 cast of the weights is made once for both; the first are the values :meth:`forward` gives."""
        first, act, last = self.net
        w, b = first.weight, first.bias
        if state.dtype == torch.bfloat16:
            w, b = w.to(torch.bfloat16), b.to(torch.bfloat16)
        with torch.no_grad():
            every = last(act(F.linear(state, w.detach(), b.detach()).float()))
        return every, last(act(F.linear(state[grad_rows], w, b).float()))


class SummaryPolicy(nn.Module):
    """Policy on :func:`summary_features` plus optional relation / query-entity embeddings.

    Args:
        num_teachers: M.
        num_actions: 2^M - 1.
        num_relations: relation ids including reciprocals (for the relation embedding).
        num_entities: E (for the query-entity embedding).
        hidden: MLP width.
        relation_dim: width of the learned relation embedding (0 = none).
        entity_dim: width of the learned query-entity embedding (0 = none).
        compile: compute :func:`summary_features` through ``torch.compile``.
        cache_pairs: keep the summary features of this many keyed (entity, relation) pairs (0 = no cache): the
            features are a function of the frozen teachers' logits of the pair only, so after every pair has been
            computed once (the :class:`~dsom.distill.rowcache.RowCache` ``cache`` sealed) they are read instead of
            recomputed.
    """

    def __init__(self, num_teachers: int, num_actions: int, num_relations: int, num_entities: int, hidden: int = 128,
                 relation_dim: int = 16, entity_dim: int = 0, generator: torch.Generator | None = None,
                 entity_stats: torch.Tensor | None = None, stats_of: str = "none", compile: bool = False,
                 cache_pairs: int = 0) -> None:
        super().__init__()
        self.compile = compile  # summary_features through torch.compile
        width_summary = num_summary_features(num_teachers)
        self.cache = RowCache(cache_pairs, width_summary) if cache_pairs > 0 else None
        self.relation = nn.Embedding(num_relations, relation_dim) if relation_dim > 0 else None
        self.entity = nn.Embedding(num_entities, entity_dim) if entity_dim > 0 else None
        if stats_of not in ("none", "query", "query+target"):
            raise ValueError(f"unknown policy_entity_stats {stats_of!r}")
        self.stats_of = stats_of if entity_stats is not None else "none"
        self.register_buffer("entity_stats", entity_stats.float() if entity_stats is not None else None,
                             persistent=False)
        n_stats = 0 if self.stats_of == "none" else num_teachers * (2 if self.stats_of == "query+target" else 1)
        width = width_summary + relation_dim + entity_dim + n_stats
        self.mlp = Policy(width, num_actions, hidden, generator=generator)
        with torch.no_grad():
            for emb in (self.relation, self.entity):
                if emb is not None:
                    emb.weight.normal_(0.0, 0.1, generator=generator)

    def summary(self, teacher_logits: torch.Tensor | None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`summary_features` of the rows of ``(M, n, E)`` teacher logits; ``keys (n,)``: each row's pair id in
        the cache (``None`` = compute without the cache). Until the cache is sealed the features are computed and
        stored; after, they are read (no pass over the logits, no host sync; ``teacher_logits`` may then be
        ``None``, :meth:`serves`)."""
        if self.serves(keys):
            assert self.cache is not None and keys is not None
            return self.cache.read(keys)
        if teacher_logits is None:
            raise ValueError("the summary state needs the teacher logits of rows its cache does not hold")
        feats = summary_features(teacher_logits, self.compile)
        if keys is not None and self.cache is not None:
            self.cache.store(keys, feats)
        return feats

    def serves(self, keys: torch.Tensor | None) -> bool:
        """Whether :meth:`summary` of rows ``keys`` is read from the sealed cache (no teacher logits needed)."""
        return self.cache is not None and self.cache.serves(keys)

    def forward(self, teacher_logits: torch.Tensor | None, head: torch.Tensor, relation: torch.Tensor,
                target: torch.Tensor | None = None, pair_of: torch.Tensor | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        """Action logits ``(B, A)`` from ``(M, B, E)`` teacher logits, the queries' entity and relation and (for
        ``stats_of="query+target"``) their target; ``pair_of (B,)``: the logits are ``(M, P, E)``, one row per pair,
        whose statistics are computed once; ``keys``: the cache key of each row of the logits (:meth:`summary`)."""
        feats = self.summary(teacher_logits, keys)
        parts = [feats if pair_of is None else feats[pair_of]]
        if self.relation is not None:
            parts.append(self.relation(relation))
        if self.entity is not None:
            parts.append(self.entity(head))
        if self.stats_of != "none":
            parts.append(self.entity_stats[head])
            if self.stats_of == "query+target":
                if target is None:
                    raise ValueError("this policy reads the target entity's teacher reliability; pass the target")
                parts.append(self.entity_stats[target])
        return self.mlp(torch.cat(parts, -1))


def triple_rewards(logits: torch.Tensor, student_ce: torch.Tensor, target: torch.Tensor, positive: float = 1.0,
                   negative: float = -10.0) -> torch.Tensor:
    """Eq. (8) per triple: ``positive`` where CE(logits, t) < the student's CE, else ``negative``."""
    ce = per_query_ce(logits.detach(), target)
    return torch.where(ce < student_ce, torch.full_like(ce, positive), torch.full_like(ce, negative))


@torch.no_grad()
def action_ces(teacher_logits: torch.Tensor, subsets: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(A, B)`` cross-entropy of every action's combined teacher ``sum_m C[a, m] F^m`` on the targets
    (one ``(B, E)`` block at a time)."""
    return torch.stack([per_query_ce(torch.einsum("m,mbe->be", w, teacher_logits), target) for w in subsets])


def action_rewards(ces: torch.Tensor, student_ce: torch.Tensor, kind: str, positive: float = 1.0,
                   negative: float = -10.0) -> torch.Tensor:
    """``(A, B)`` rewards from per-action CEs: ``binary`` = Eq. (8) (``positive`` if the action beats the student,
    else ``negative``); ``margin`` = ``CE_student - CE_action`` (nats; action-dependent and continuous)."""
    if kind == "binary":
        return torch.where(ces < student_ce, torch.full_like(ces, positive), torch.full_like(ces, negative))
    if kind == "margin":
        return student_ce - ces
    raise ValueError(f"unknown reward {kind!r}; choose binary or margin")


def reinforce_loss(action_logits: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """``-mean(advantage * log pi(a | s))`` with the advantage treated as a constant."""
    logp = F.log_softmax(action_logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    return -(advantage.detach() * logp).mean()


def entropy(action_logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` entropy of the action distributions."""
    logp = F.log_softmax(action_logits, -1)
    return -(logp.exp() * logp).sum(-1)
