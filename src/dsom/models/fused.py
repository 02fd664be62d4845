"""ComplEx 1-vs-all cross-entropy as one autograd node: the training step of a structural ComplEx and of the
stage-1 teachers with the work outside the matrix products cut down (issue 12).

What the plain autograd graph (gather rows, complex product, ``matmul_scores``, :func:`~dsom.numerics.cross_entropy`,
N3 on gathered rows) spends outside the products, per step, and what this node does instead:

* every ``table[ids]`` gather (query heads, N3 heads, N3 tails) has a backward that zero-fills a dense
  ``(E, 2d)`` gradient and scatters into it, and autograd then adds these dense tensors together. Here the rows are
  gathered once, and their gradients (from the query and from whatever the caller computes on the returned rows, e.g.
  N3) are added into the one dense gradient the backward product writes anyway (``index_put_`` with
  ``accumulate``: on the 2-core Xeon (AMX) dev machine ``index_add_`` of 1,000 rows into a 12,842 x 1,000 table
  took 58 ms against 0.7-8 ms);
* the ``(P, E)`` scores stay in the product's precision (bf16: half the bytes), are never cast to float32 as a
  whole, and the loss tail reads them in place: the forward needs only the log-sum-exp per row, the backward
  recomputes the softmax from the saved scores and writes the product-precision gradient block directly.
  :class:`CETails` runs these two tails eagerly or through ``torch.compile`` (one fused pass each);
* each entity table is cast to the product precision once per step (forward) and the cast is reused by the
  backward product.

The values are those of the plain graph: the loss is ``logsumexp(s_row) - s[row, target]`` of the same product
``s`` (exponents clamped at :data:`~dsom.numerics.EXP_FLOOR` below the log-sum-exp, so no fp32 denormal), the
gradients the same up to rounding (bf16: the target's ``-g`` is added to the bf16 softmax block rather than before
the cast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from dsom.models.interaction import complex_modulus, complex_query
from dsom.models.products import PRECISIONS, bf16_round
from dsom.numerics import EXP_FLOOR
from dsom.perf import MaybeCompiled


def _lse(s: torch.Tensor) -> torch.Tensor:
    """``(P, E)`` scores (any float dtype) -> ``(P,)`` float32 log-sum-exp, exponents floored at ``EXP_FLOOR``.
    Written for ``torch.compile`` (one fused pass); :func:`_lse_eager` is the same in place."""
    top = s.amax(-1, keepdim=True).float()
    return (s.float() - top).clamp_min(EXP_FLOOR).exp().sum(-1).log() + top.squeeze(-1)


def _softmax_grad(s: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``softmax(s) * g[:, None]`` in ``s``'s dtype, from the saved log-sum-exp (no ``(P, E)`` float32 block saved).
    Written for ``torch.compile``; :func:`_softmax_grad_eager` is the same in place."""
    return ((s.float() - lse.unsqueeze(-1)).clamp_min(EXP_FLOOR).exp() * g.unsqueeze(-1)).to(s.dtype)


def _lse_eager(s: torch.Tensor) -> torch.Tensor:
    top = s.amax(-1, keepdim=True).float()
    p = torch.sub(s, top).clamp_min_(EXP_FLOOR).exp_()  # one float32 (P, E) buffer, reused in place
    return p.sum(-1).log_().add_(top.squeeze(-1))


def _softmax_grad_eager(s: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = torch.sub(s, lse.unsqueeze(-1)).clamp_min_(EXP_FLOOR).exp_().mul_(g.unsqueeze(-1))
    return p.to(s.dtype)


class CETails:
    """The two element-wise tails of :func:`complex_cross_entropy`: fused by ``torch.compile`` (``train.compile``;
    :class:`~dsom.perf.MaybeCompiled` falls back to eager if compilation fails) or eager with in-place passes."""

    def __init__(self, compile: bool = False) -> None:
        self.lse = MaybeCompiled(_lse, True) if compile else _lse_eager
        self.softmax_grad = MaybeCompiled(_softmax_grad, True) if compile else _softmax_grad_eager


EAGER = CETails(False)


def _cast(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` as a product operand: bf16 for ``bf16``, bf16-rounded float32 for ``bf16sim``, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16":
        return x.to(torch.bfloat16)
    return bf16_round(x) if precision == "bf16sim" else x.float()


def _mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` of cast operands; the result in the product precision (bf16sim: rounded to bf16)."""
    out = torch.mm(a, b)
    return bf16_round(out) if precision == "bf16sim" else out


def _conj(x: torch.Tensor) -> torch.Tensor:
    """Complex conjugate of ``[re | im]`` rows."""
    d = x.shape[-1] // 2
    return torch.cat([x[..., :d], -x[..., d:]], -1)


class _ComplExCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor, target: torch.Tensor,
                rows: torch.Tensor, precision: str, tails: CETails, *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ent = torch.stack([t[head] for t in tables])  # (K, P, 2d): each table's rows gathered once
        rel = relations[:, relation]  # (K, P, 2d)
        tail = torch.stack([t[target] for t in tables])  # (K, T, 2d)
        query = _cast(complex_query(ent, rel), precision)
        cast_tables, scores, lse = [], [], []
        for k, table in enumerate(tables):
            ct = _cast(table, precision)
            s = _mm(query[k], ct.T, precision)  # (P, E) in the product precision
            cast_tables.append(ct)
            scores.append(s)
            lse.append(tails.lse(s))
        lse_t = torch.stack(lse)  # (K, P)
        picked = torch.stack([s[rows, target] for s in scores]).float()  # (K, T): the same product's values
        ctx.save_for_backward(ent, rel, query, head, relation, target, rows, lse_t, *cast_tables, *scores)
        ctx.precision, ctx.tails, ctx.K = precision, tails, len(tables)
        ctx.shapes = [t.shape for t in tables]
        ctx.dtypes = [t.dtype for t in tables]
        ctx.relations_shape, ctx.relations_dtype = relations.shape, relations.dtype
        return lse_t[:, rows] - picked, ent, rel, tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_ent: torch.Tensor | None, g_rel: torch.Tensor | None,
                 g_tail: torch.Tensor | None) -> tuple[Any, ...]:
        K, precision, tails = ctx.K, ctx.precision, ctx.tails
        ent, rel, query, head, relation, target, rows, lse, *rest = ctx.saved_tensors
        cast_tables, scores = rest[:K], rest[K:]
        P = query.shape[1]
        d_query = torch.zeros(K, P, query.shape[-1], dtype=torch.float32, device=query.device)
        d_tables: list[torch.Tensor] = []
        for k in range(K):
            need_table = ctx.needs_input_grad[7 + k]
            shape = ctx.shapes[k] if need_table else (0,)
            # written whole by the product below when there is a CE gradient: no zero fill then
            d_table = torch.empty(shape, device=query.device) if g_ce is not None else torch.zeros(shape,
                                                                                                   device=query.device)
            if g_ce is not None:
                g = g_ce[k].float()
                per_row = torch.zeros(P, dtype=torch.float32, device=g.device).index_add_(0, rows, g)
                grad_s = tails.softmax_grad(scores[k], lse[k], per_row)  # (P, E), product precision
                grad_s.index_put_((rows, target), (-g).to(grad_s.dtype), accumulate=True)
                d_query[k] = _mm(grad_s, cast_tables[k], precision)
                if need_table:
                    d_table.copy_(_mm(grad_s.T, query[k], precision))
            d_tables.append(d_table)
        # backward of the complex product q = ent * rel: dL/d ent = dq * conj(rel), dL/d rel = dq * conj(ent)
        d_ent = complex_query(d_query, _conj(rel))
        d_rel = complex_query(d_query, _conj(ent))
        if g_ent is not None:
            d_ent += g_ent
        if g_rel is not None:
            d_rel += g_rel
        for k in range(K):
            if ctx.needs_input_grad[7 + k]:
                d_tables[k].index_put_((head,), d_ent[k], accumulate=True)
                if g_tail is not None:
                    d_tables[k].index_put_((target,), g_tail[k].float(), accumulate=True)
        d_relations = None
        if ctx.needs_input_grad[0]:
            d_relations = torch.zeros(ctx.relations_shape, dtype=torch.float32, device=query.device)
            for k in range(K):
                d_relations[k].index_put_((relation,), d_rel[k], accumulate=True)
            d_relations = d_relations.to(ctx.relations_dtype)
        grads = [dt.to(dtype) if need else None for dt, dtype, need in zip(d_tables, ctx.dtypes, ctx.needs_input_grad[7:])]
        return (d_relations, None, None, None, None, None, None, *grads)


@dataclass
class ComplExCE:
    """What :func:`complex_cross_entropy` returns. ``ce (K, T)``: per-target cross-entropy of each of the K models;
    ``head (K, P, 2d)``, ``relation (K, P, 2d)``: the rows of the P queries' heads and relations; ``tail (K, T, 2d)``: the
    target rows. The rows are differentiable: a regulariser on them (N3) sends its gradient through the same node."""

    ce: torch.Tensor
    head: torch.Tensor
    relation: torch.Tensor
    tail: torch.Tensor


def complex_cross_entropy(tables: Sequence[torch.Tensor], relations: torch.Tensor, head: torch.Tensor,
                          relation: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None,
                          precision: str = "fp32", tails: CETails = EAGER) -> ComplExCE:
    """1-vs-all cross-entropy of K ComplEx models at once, each query scored once against every entity.

    Args:
        tables: K entity tables ``(E, 2d)`` (a free table, or projected features ``X W / scale``).
        relations: ``(K, 2R, 2d)`` relation tables.
        head, relation: ``(P,)`` ids of the P distinct queries (one per target with ``train.batching=triples``).
        target: ``(T,)`` target entity ids.
        rows: ``(T,)`` the query of each target (``None``: query ``i`` for target ``i``, ``T = P``).
        precision: ``fp32``, ``bf16`` or ``bf16sim`` products (:func:`~dsom.models.products.precise_matmul`).
        tails: eager or compiled loss tails (:class:`CETails`).

    Equals, in value and gradient up to rounding, ``F.cross_entropy((q @ table.T)[rows], target, reduction="none")``
    with ``q = complex_query(table[head], relations[k, relation])`` for each model ``k``.
    """
    if rows is None:
        rows = torch.arange(len(target), device=target.device)
    if len(tables) != relations.shape[0]:
        raise ValueError(f"{len(tables)} entity tables but {relations.shape[0]} relation tables")
    ce, ent, rel, tail = _ComplExCE.apply(relations, head, relation, target, rows, precision, tails, *tables)
    return ComplExCE(ce, ent, rel, tail)


def fused_factors(out: ComplExCE, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N3 factors ``(K, T, d)`` of every target's triple (head, relation and tail moduli) from the rows
    :func:`complex_cross_entropy` returned; ``rows`` as given to it (a query's head counts once per target, as in
    :func:`~dsom.models.interaction.factors` on the triples)."""
    head, rel = (out.head, out.relation) if rows is None else (out.head[:, rows], out.relation[:, rows])
    return complex_modulus(head), complex_modulus(rel), complex_modulus(out.tail)
