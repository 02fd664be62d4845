"""ComplEx 1-vs-all cross-entropy as one autograd node: the training step of a structural ComplEx and of the
stage-1 teachers with the work outside the matrix products cut down (issue 12).

What the plain autograd graph (gather rows, complex product, ``matmul_scores``, :func:`~dsom.numerics.cross_entropy`,
N3 on gathered rows) spends outside the products, per step, and what this node does instead:

* every ``table[ids]`` gather (query heads, N3 heads, N3 tails) has a backward that zero-fills a dense
  ``(E, 2d)`` gradient and scatters into it, and autograd then adds these dense tensors together. Here the rows are
  gathered once, and their gradients (from the query and from whatever the caller computes on the returned rows, e.g.
  N3) are added into the one dense gradient the backward product writes anyway, by ``index_add_`` (on the 2-core
  Xeon (AMX) dev machine, torch 2.13, cold caches: two 1,000-row adds into a 12,842 x 1,000 table take 0.9 ms,
  ``index_put_`` with ``accumulate`` 6.4 ms, and a table gather's autograd backward is the latter); deterministic on
  CPU (rows added in index order);
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

from dsom.models.chunked import block_logsumexp, block_softmax_grads, rounded_operand
from dsom.models.complex import REGULARIZERS
from dsom.models.interaction import complex_modulus, complex_query
from dsom.models.products import PRECISIONS, as_bf16, bf16_round, column_scores, padded_queries_t
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


LSE_T_BLOCK = 64  # rows per block of :func:`_lse_t` (DB15K, P = 1,000: 16 rows 7.0 ms, 32 6.3, 64 6.1, 128 7.2)


def _lse_t(s: torch.Tensor) -> torch.Tensor:
    """:func:`_lse` of transposed scores ``(E, P)``: one log-sum-exp per column.

    A column's maximum and exponential sum, taken over all E rows at once, walk the ``(E, P)`` block column by column
    (a strided read per row, twice): 10.2 ms for a DB15K bf16 block (E = 12,842, P = 1,000) on the 2-core AMX dev
    machine. Here each block of :data:`LSE_T_BLOCK` rows gets its own column maxima and sums (the block stays in cache
    between the two), combined at the end as ``top + log sum_b sum_b' exp(m_b - top)``: 6.1 ms. Each exponent is
    floored at :data:`~dsom.numerics.EXP_FLOOR` below its block's maximum and each block's scale below ``top`` (the
    value differs from one floor below ``top`` by under ``exp(EXP_FLOOR)`` relative, no fp32 denormal)."""
    n = s.shape[0] // LSE_T_BLOCK
    if n < 2:
        top = s.amax(0, keepdim=True).float()
        return (s.float() - top).clamp_min(EXP_FLOOR).exp().sum(0).log() + top.squeeze(0)
    main = s[: n * LSE_T_BLOCK].unflatten(0, (n, LSE_T_BLOCK))  # (n, block, P), a view
    block_top = main.amax(1).float()  # (n, P)
    block_sum = (main.float() - block_top.unsqueeze(1)).clamp_min(EXP_FLOOR).exp().sum(1)
    rest = s[n * LSE_T_BLOCK:]  # (E mod block, P)
    top = torch.maximum(block_top.amax(0), rest.amax(0).float()) if rest.shape[0] else block_top.amax(0)
    total = (block_sum * (block_top - top).clamp_min(EXP_FLOOR).exp()).sum(0)
    if rest.shape[0]:
        total = total + (rest.float() - top).clamp_min(EXP_FLOOR).exp().sum(0)
    return total.log() + top


def _softmax_grad_t(s: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """:func:`_softmax_grad` of transposed scores ``(E, P)``."""
    return ((s.float() - lse.unsqueeze(0)).clamp_min(EXP_FLOOR).exp() * g.unsqueeze(0)).to(s.dtype)


def _lse_eager(s: torch.Tensor) -> torch.Tensor:
    top = s.amax(-1, keepdim=True).float()
    p = torch.sub(s, top).clamp_min_(EXP_FLOOR).exp_()  # one float32 (P, E) buffer, reused in place
    return p.sum(-1).log_().add_(top.squeeze(-1))


def _lse_t_eager(s: torch.Tensor) -> torch.Tensor:
    """:func:`_lse_t` with in-place passes (blocks: 18.5 ms instead of 26.7 for the block measured there)."""
    n = s.shape[0] // LSE_T_BLOCK
    if n < 2:
        top = s.amax(0, keepdim=True).float()
        return torch.sub(s, top).clamp_min_(EXP_FLOOR).exp_().sum(0).log_().add_(top.squeeze(0))
    main = s[: n * LSE_T_BLOCK].unflatten(0, (n, LSE_T_BLOCK))
    block_top = main.amax(1, keepdim=True).float()  # (n, 1, P)
    block_sum = torch.sub(main, block_top).clamp_min_(EXP_FLOOR).exp_().sum(1)  # (n, P)
    block_top = block_top.squeeze(1)
    rest = s[n * LSE_T_BLOCK:]
    top = torch.maximum(block_top.amax(0), rest.amax(0).float()) if rest.shape[0] else block_top.amax(0)
    total = block_sum.mul_(torch.sub(block_top, top).clamp_min_(EXP_FLOOR).exp_()).sum(0)
    if rest.shape[0]:
        total.add_(torch.sub(rest, top).clamp_min_(EXP_FLOOR).exp_().sum(0))
    return total.log_().add_(top)


def _softmax_grad_t_eager(s: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = torch.sub(s, lse.unsqueeze(0)).clamp_min_(EXP_FLOOR).exp_().mul_(g.unsqueeze(0))
    return p.to(s.dtype)


def _softmax_grad_eager(s: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = torch.sub(s, lse.unsqueeze(-1)).clamp_min_(EXP_FLOOR).exp_().mul_(g.unsqueeze(-1))
    return p.to(s.dtype)


def _query(ent: torch.Tensor, rel: torch.Tensor, precision: str) -> torch.Tensor:
    """The queries ``ent * rel`` (complex product of ``(K, P, 2d)`` rows) as product operands."""
    return _cast(complex_query(ent, rel), precision)


def _times_conj(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * conj(y)`` of ``[re | im]`` rows (halves as views and one ``stack``: compiles to one pass)."""
    a, b = x.unflatten(-1, (2, -1)).unbind(-2)
    c, g = y.unflatten(-1, (2, -1)).unbind(-2)
    return torch.stack([a * c + b * g, b * c - a * g], -2).flatten(-2)


def _query_grads(d_query: torch.Tensor, ent: torch.Tensor, rel: torch.Tensor, g_ent: torch.Tensor | None,
                 g_rel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``q = ent * rel``: ``dL/d ent = dq * conj(rel)``, ``dL/d rel = dq * conj(ent)``, plus the gradients
    the caller sent to the returned rows (``g_ent``, ``g_rel``; ``None``: none)."""
    d_ent = _times_conj(d_query, rel)
    d_rel = _times_conj(d_query, ent)
    if g_ent is not None:
        d_ent = d_ent + g_ent
    if g_rel is not None:
        d_rel = d_rel + g_rel
    return d_ent, d_rel


MODULUS_FLOOR = 1e-30  # the clamp of :func:`~dsom.models.interaction.complex_modulus` on the squared modulus


def _penalty_value(head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor, counts: torch.Tensor,
                   power: int) -> torch.Tensor:
    """``sum_k [sum_p counts[p] (|head[k, p]|^power + |relation[k, p]|^power) + sum_t |tail[k, t]|^power]`` with
    ``|x|`` the element-wise complex modulus of ``[re | im]`` rows: the N3 (``power`` 3) or F2 (2) sum of every
    target's triple, a query's head and relation counted once per target. ``power`` is 2 or 3."""

    def per_row(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        sq = (x[..., :d] ** 2 + x[..., d:] ** 2).clamp_min(MODULUS_FLOOR)
        return (sq * sq.sqrt() if power == 3 else sq).sum(-1)  # |x|^3 or |x|^2, no generic pow

    return ((per_row(head) + per_row(relation)) * counts).sum() + per_row(tail).sum()


def _penalty_grads(head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor, counts: torch.Tensor, power: int,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``scale * _penalty_value(...)`` (closed form: ``d |x|^p / d re = p |x|^(p-2) re`` where the squared
    modulus is above the floor, else 0)."""

    def grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        parts = x.unflatten(-1, (2, x.shape[-1] // 2))  # (..., 2, d): real and imaginary halves, no cat
        sq = (parts ** 2).sum(-2, keepdim=True)
        slope = sq.sqrt() * 3.0 if power == 3 else torch.full_like(sq, 2.0)  # p |x|^(p-2)
        return (parts * (torch.where(sq > MODULUS_FLOOR, slope, 0.0) * weight)).flatten(-2)

    w = (counts * scale)[:, None, None]
    return grad(head, w), grad(relation, w), grad(tail, scale)


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor, counts: torch.Tensor,
                power: int, scale: float, tails: CETails) -> torch.Tensor:
        ctx.save_for_backward(head, relation, tail, counts)
        ctx.power, ctx.scale, ctx.tails = power, scale, tails
        return tails.penalty_value(head, relation, tail, counts, power) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        head, relation, tail, counts = ctx.saved_tensors
        grads = ctx.tails.penalty_grads(head, relation, tail, counts, ctx.power, g * ctx.scale)
        return (*grads, None, None, None, None)


class CETails:
    """The element-wise work of :func:`complex_cross_entropy` and of the N3 penalty on its rows: fused by
    ``torch.compile`` (``train.compile``; :class:`~dsom.perf.MaybeCompiled` falls back to eager if compilation
    fails) or eager (the two loss tails with in-place passes).

    * ``lse`` / ``softmax_grad``: the two ``(P, E)`` loss tails; ``lse_t`` / ``softmax_grad_t`` the same on
      transposed ``(E, P)`` scores;
    * ``query`` / ``query_grads``: the complex product of the gathered rows and its backward (a dozen small ops on
      ``(K, P, 2d)`` rows eagerly, about 15% of a ComplEx step at rank 500 on the 2-core AMX dev machine);
    * ``penalty_value`` / ``penalty_grads``: the regularizer on the returned rows and its closed-form gradient
      (:func:`fused_penalty`; autograd through the eager graph is about 10 ms per step there, mostly ``pow``, ``sgn``,
      ``where`` on ``(K, P, 2d)`` rows)."""

    def __init__(self, compile: bool = False) -> None:
        self.compiled = compile
        self.lse = MaybeCompiled(_lse, True) if compile else _lse_eager
        self.softmax_grad = MaybeCompiled(_softmax_grad, True) if compile else _softmax_grad_eager
        self.lse_t = MaybeCompiled(_lse_t, True) if compile else _lse_t_eager
        self.softmax_grad_t = MaybeCompiled(_softmax_grad_t, True) if compile else _softmax_grad_t_eager
        self._query = MaybeCompiled(_query, compile)
        self.query_grads = MaybeCompiled(_query_grads, compile)
        self.penalty_value = MaybeCompiled(_penalty_value, compile)
        self.penalty_grads = MaybeCompiled(_penalty_grads, compile)

    def query(self, ent: torch.Tensor, rel: torch.Tensor, precision: str) -> torch.Tensor:
        """The queries ``ent * rel`` as product operands (:func:`_query`). Compiled, ``bf16sim``'s float32 -> bf16 ->
        float32 round trip is removed by Inductor (it drops such cast pairs unless told to emulate them), so the
        result is rounded again here."""
        query = self._query(ent, rel, precision)
        return bf16_round(query) if precision == "bf16sim" and self.compiled else query


EAGER = CETails(False)


def _cast(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` as a product operand: bf16 for ``bf16``, bf16-rounded float32 for ``bf16sim``, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16":
        return as_bf16(x)  # an entity table's copy from the optimizer's update where there is one
    return bf16_round(x) if precision == "bf16sim" else x.float()


def _mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` of cast operands; the result in the product precision (bf16sim: rounded to bf16)."""
    out = torch.mm(a, b)
    return bf16_round(out) if precision == "bf16sim" else out


def _add_rows(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, dense: bool | None = None) -> None:
    """``table[index] += rows`` in place for float32 ``rows (n, 2d)``, ids repeated or not. A float32 ``table``:
    ``index_add_`` (deterministic on CPU). Otherwise (a bf16 gradient block) each id's rows are summed in float32 and
    added to its row in float32, rounded once: the float32 block's result, cast (on CPU per distinct id, elsewhere
    through a dense float32 block; ``dense`` chooses)."""
    if table.dtype == torch.float32:
        table.index_add_(0, index, rows)
        return
    if table.device.type != "cpu" if dense is None else dense:  # no torch.unique (a host sync, and not capturable in a CUDA graph): a dense
        # float32 block of the additions, added in float32 and rounded once per element (untouched rows add 0 exactly)
        table.add_(torch.zeros(table.shape, dtype=torch.float32, device=table.device).index_add_(0, index, rows))
        return
    ids, inverse = torch.unique(index, return_inverse=True)
    total = torch.zeros(len(ids), rows.shape[1], dtype=torch.float32, device=rows.device).index_add_(0, inverse, rows)
    table[ids] = (table[ids].float() + total).to(table.dtype)


def _relation_grads(ctx: Any, relation: torch.Tensor, d_rel: torch.Tensor) -> torch.Tensor:
    """The ``(K, 2R, 2d)`` relation tables' gradient from the rows' ``d_rel (K, P, 2d)`` (ids ``relation (P,)``), in
    the tables' dtype (``ctx.relations_shape``, ``ctx.relations_dtype``)."""
    out = torch.zeros(ctx.relations_shape, dtype=torch.float32, device=d_rel.device)
    for k in range(out.shape[0]):
        out[k].index_add_(0, relation, d_rel[k])
    return out.to(ctx.relations_dtype)


class _ComplExCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor, target: torch.Tensor,
                rows: torch.Tensor, precision: str, tails: CETails, transposed: bool,
                *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (K, P, 2d): each table's rows gathered once, as float32 (a bf16 table: bf16 projected features)
        ent = torch.stack([t[head].float() for t in tables])
        rel = relations[:, relation]  # (K, P, 2d)
        tail = torch.stack([t[target].float() for t in tables])  # (K, T, 2d)
        query = tails.query(ent, rel, precision)
        cast_tables, scores, lse, operands = [], [], [], []
        for k, table in enumerate(tables):
            ct = _cast(table, precision)
            if transposed:  # (E, W) = T @ q^T: both operands contiguous, W = P padded (padded_queries_t)
                q_t = padded_queries_t(query[k])
                s = _mm(ct, q_t, precision)
                lse.append(tails.lse_t(s))
                operands.append(q_t)
            else:
                s = _mm(query[k], ct.T, precision)  # (P, E) in the product precision
                lse.append(tails.lse(s))
            cast_tables.append(ct)
            scores.append(s)
        lse_t = torch.stack(lse)  # (K, P), or (K, W) transposed (a padded query's column: log E, never read)
        picked = torch.stack([s[target, rows] if transposed else s[rows, target] for s in scores]).float()  # (K, T)
        # transposed: the padded (2d, W) operands instead of the (K, P, 2d) queries (the table gradient's operand)
        saved_queries = operands if transposed else [query]
        ctx.save_for_backward(ent, rel, head, relation, target, rows, lse_t, *cast_tables, *scores, *saved_queries)
        ctx.precision, ctx.tails, ctx.K, ctx.transposed = precision, tails, len(tables), transposed
        ctx.shapes = [t.shape for t in tables]
        ctx.dtypes = [t.dtype for t in tables]
        ctx.relations_shape, ctx.relations_dtype = relations.shape, relations.dtype
        return lse_t[:, rows] - picked, ent, rel, tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_ent: torch.Tensor | None, g_rel: torch.Tensor | None,
                 g_tail: torch.Tensor | None) -> tuple[Any, ...]:
        K, precision, tails = ctx.K, ctx.precision, ctx.tails
        ent, rel, head, relation, target, rows, lse, *rest = ctx.saved_tensors
        cast_tables, scores, queries = rest[:K], rest[K:2 * K], rest[2 * K:]
        P, width = ent.shape[1], lse.shape[1]  # width: W (the padded columns) transposed, else P
        device = ent.device
        d_query = torch.zeros(K, P, ent.shape[-1], dtype=torch.float32, device=device)
        d_tables: list[torch.Tensor] = []
        for k in range(K):
            need_table = ctx.needs_input_grad[8 + k]
            shape = ctx.shapes[k] if need_table else (0,)
            d_table = torch.zeros(shape if g_ce is None else (0,), device=device)  # else: the product's below
            if g_ce is not None:
                g = g_ce[k].float()
                per_row = torch.zeros(width, dtype=torch.float32, device=g.device).index_add_(0, rows, g)
                if ctx.transposed:  # (E, W): a padded column's gradient is 0 (its per_row is)
                    grad_s = tails.softmax_grad_t(scores[k], lse[k], per_row)
                    grad_s.index_put_((target, rows), (-g).to(grad_s.dtype), accumulate=True)
                    d_query[k] = _mm(grad_s[:, :P].T, cast_tables[k], precision)
                    product = _mm(grad_s, queries[k].T, precision) if need_table else None
                else:
                    grad_s = tails.softmax_grad(scores[k], lse[k], per_row)  # (P, E), product precision
                    grad_s.index_put_((rows, target), (-g).to(grad_s.dtype), accumulate=True)
                    d_query[k] = _mm(grad_s, cast_tables[k], precision)
                    product = _mm(grad_s.T, queries[0][k], precision) if need_table else None
                if product is not None:
                    # a bf16 table (bf16 projected features) takes the bf16 product as its gradient: no float32 copy
                    # of the block and no cast back; else the product is copied into a float32 block
                    d_table = product if product.dtype == ctx.dtypes[k] else torch.empty(shape, device=device
                                                                                          ).copy_(product)
            d_tables.append(d_table)
        d_ent, d_rel = tails.query_grads(d_query, ent, rel, g_ent, g_rel)
        for k in range(K):
            if not ctx.needs_input_grad[8 + k]:
                continue
            if g_tail is None or d_tables[k].dtype == torch.float32:
                _add_rows(d_tables[k], head, d_ent[k])
                if g_tail is not None:
                    _add_rows(d_tables[k], target, g_tail[k].float())
            else:  # a bf16 block: every row's additions together, rounded once
                _add_rows(d_tables[k], torch.cat([head, target]), torch.cat([d_ent[k], g_tail[k].float()]))
        d_relations = _relation_grads(ctx, relation, d_rel) if ctx.needs_input_grad[0] else None
        grads = [dt.to(dtype) if need else None for dt, dtype, need in zip(d_tables, ctx.dtypes, ctx.needs_input_grad[8:])]
        return (d_relations, None, None, None, None, None, None, None, *grads)


class _ChunkedComplExCE(torch.autograd.Function):
    """:class:`_ComplExCE` over blocks of ``chunk`` entities (graphs whose ``(P, E)`` block exceeds
    ``train.block_mb``): the log-sum-exp runs over ``(chunk, W)`` blocks (:func:`~dsom.models.chunked.
    block_logsumexp`), the target's score is a row dot product, and the backward recomputes each block. The rows are
    gathered here and their gradients (the queries', the N3 penalty's on the returned rows) are added into the table's
    gradient, one ``(E, 2d)`` block per table and step, as the unchunked node does: gathering them through autograd
    gave each gather its own zero-filled ``(E, 2d)`` gradient, four such blocks per step that autograd then added."""

    @staticmethod
    def forward(ctx: Any, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor, target: torch.Tensor,
                rows: torch.Tensor, precision: str, tails: CETails, chunk: int,
                *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ent = torch.stack([t[head].float() for t in tables])  # (K, P, 2d)
        rel = relations[:, relation].float()
        tail = torch.stack([t[target].float() for t in tables])  # (K, T, 2d)
        query = complex_query(ent, rel)  # float32; each block's product casts (chunked._mm)
        q_t = [padded_queries_t(query[k]) for k in range(len(tables))]  # (2d, W) each
        lse = torch.stack([block_logsumexp(table, qt, chunk, precision) for table, qt in zip(tables, q_t)])  # (K, W)
        picked = (rounded_operand(query[:, rows], precision) * rounded_operand(tail, precision)).sum(-1)  # (K, T)
        if precision != "fp32":  # the score as a bf16 product returns it, as the unchunked node reads it
            picked = bf16_round(picked)
        ctx.save_for_backward(ent, rel, tail, query, head, relation, target, rows, lse, *q_t, *tables)
        ctx.precision, ctx.tails, ctx.chunk, ctx.K = precision, tails, chunk, len(tables)
        ctx.relations_shape, ctx.relations_dtype = relations.shape, relations.dtype
        return lse[:, rows] - picked, ent, rel, tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_ent: torch.Tensor | None, g_rel: torch.Tensor | None,
                 g_tail: torch.Tensor | None) -> tuple[Any, ...]:
        K, precision, chunk = ctx.K, ctx.precision, ctx.chunk
        ent, rel, tail, query, head, relation, target, rows, lse, *rest = ctx.saved_tensors
        q_t, tables = rest[:K], rest[K:]
        P, device = query.shape[1], query.device
        d_query = torch.zeros(query.shape, dtype=torch.float32, device=device)
        d_tables: list[torch.Tensor | None] = []
        for k, table in enumerate(tables):
            need_table = ctx.needs_input_grad[8 + k]
            # with g_ce every row is written by its block (block_softmax_grads): no zero fill
            alloc = torch.empty if g_ce is not None else torch.zeros
            d_table = alloc(table.shape, dtype=torch.float32, device=device) if need_table else None
            if g_ce is not None:
                g = g_ce[k].float()
                per_row = torch.zeros(lse.shape[1], dtype=torch.float32, device=device).index_add_(0, rows, g)
                block_softmax_grads(table, q_t[k], lse[k], per_row, chunk, precision, d_query[k], d_table, P)
                d_query[k].index_add_(0, rows, -g.unsqueeze(-1) * rounded_operand(tail[k], precision))
                if d_table is not None:
                    d_table.index_add_(0, target, -g.unsqueeze(-1) * rounded_operand(query[k, rows], precision))
            d_tables.append(d_table)
        d_ent, d_rel = ctx.tails.query_grads(d_query, ent, rel, g_ent, g_rel)
        for k, d_table in enumerate(d_tables):
            if d_table is None:
                continue
            d_table.index_add_(0, head, d_ent[k])
            if g_tail is not None:
                d_table.index_add_(0, target, g_tail[k].float())
        d_relations = _relation_grads(ctx, relation, d_rel) if ctx.needs_input_grad[0] else None
        grads = [None if d is None else d.to(t.dtype) for d, t in zip(d_tables, tables)]
        return (d_relations, None, None, None, None, None, None, None, *grads)


class _ComplExScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor,
                target: torch.Tensor, precision: str, tails: CETails) -> tuple[torch.Tensor, ...]:
        ent = table.index_select(0, head)  # (P, 2d)
        rel = relations.index_select(0, relation)
        tail = table.index_select(0, target)  # (T, 2d)
        query = tails.query(ent[None], rel[None], precision)[0]
        cast_table = _cast(table, precision)
        # (P, E) in the product precision; fp32: computed as (E, P) blocks on CPUs (faster in MKL)
        scores = column_scores(query, cast_table) if precision == "fp32" else _mm(query, cast_table.T, precision)
        ctx.save_for_backward(ent, rel, query, head, relation, target, cast_table)
        ctx.precision, ctx.tails = precision, tails
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        ctx.relations_shape, ctx.relations_dtype = relations.shape, relations.dtype
        return scores, ent, rel, tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_scores: torch.Tensor | None, g_ent: torch.Tensor | None, g_rel: torch.Tensor | None,
                 g_tail: torch.Tensor | None) -> tuple[Any, ...]:
        ent, rel, query, head, relation, target, cast_table = ctx.saved_tensors
        precision, tails = ctx.precision, ctx.tails
        need_table, need_relations = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_scores is not None:
            g = _cast(g_scores, precision)
            d_query = _mm(g, cast_table, precision).float()
            # written whole by the product: no zero fill, and the rows below are added into it
            d_table = torch.empty(ctx.table_shape if need_table else (0,), device=query.device)
            if need_table and precision == "fp32":
                torch.mm(g.T, query, out=d_table)  # no (E, 2d) temporary and copy
            elif need_table:
                d_table.copy_(_mm(g.T, query, precision))
        else:
            d_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
            d_table = torch.zeros(ctx.table_shape if need_table else (0,), device=query.device)
        d_ent, d_rel = tails.query_grads(d_query[None], ent[None], rel[None],
                                         None if g_ent is None else g_ent[None], None if g_rel is None else g_rel[None])
        d_relations = None
        if need_table:
            d_table.index_add_(0, head, d_ent[0])
            if g_tail is not None:
                d_table.index_add_(0, target, g_tail.float())
        if need_relations:
            d_relations = torch.zeros(ctx.relations_shape, dtype=torch.float32, device=query.device)
            d_relations = d_relations.index_add_(0, relation, d_rel[0]).to(ctx.relations_dtype)
        return (d_table.to(ctx.table_dtype) if need_table else None, d_relations, None, None, None, None, None)


def complex_scores(table: torch.Tensor, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor,
                   target: torch.Tensor, precision: str = "fp32", tails: CETails = EAGER) -> ComplExCE:
    """1-vs-all scores of one ComplEx model, with its rows, as one autograd node (stage 2's student: its loss reads the
    whole score block, so the cross-entropy of :func:`complex_cross_entropy` cannot be fused in).

    Returns a :class:`ComplExCE` whose ``ce`` holds the ``(P, E)`` scores of the queries ``(head, relation)`` (ids
    ``(P,)``) against every row of ``table (E, 2d)``, in the product's dtype (bf16 under ``bf16``: :func:`~dsom.models.
    products.product_scores`), and the differentiable rows ``head (1, P, 2d)``, ``relation (1, P, 2d)`` and ``tail
    (1, T, 2d)`` (``target (T,)``: rows for the N3 penalty, :func:`fused_penalty`).

    Equal in value and gradient to gathering the rows with ``index_select`` and calling ``product_scores(
    complex_query(head_rows, relation_rows), table, precision)``. That graph gives the table two dense gradients, the
    gathers' (a zero-filled ``(E, 2d)`` block the rows are added into) and the product's, which autograd then adds:
    two passes over the table per step (DB15K rank 500: a 3.2 ms fill and a 3.5 ms add on the 2-core AMX dev machine).
    Here the rows' gradients are added into the product's dense gradient (``index_add_``, deterministic on CPU)."""
    scores, ent, rel, tail = _ComplExScores.apply(table, relations, head, relation, target, precision, tails)
    return ComplExCE(scores, ent[None], rel[None], tail[None])


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
                          precision: str = "fp32", tails: CETails = EAGER,
                          transposed: bool | None = None, chunk: int | None = None) -> ComplExCE:
    """1-vs-all cross-entropy of K ComplEx models at once, each query scored once against every entity.

    Args:
        tables: K entity tables ``(E, 2d)`` (a free table, or projected features ``X W / scale``).
        relations: ``(K, 2R, 2d)`` relation tables.
        head, relation: ``(P,)`` ids of the P distinct queries (one per target with ``train.batching=triples``).
        target: ``(T,)`` target entity ids.
        rows: ``(T,)`` the query of each target (``None``: query ``i`` for target ``i``, ``T = P``).
        precision: ``fp32``, ``bf16`` or ``bf16sim`` products (:func:`~dsom.models.products.precise_matmul`).
        tails: eager or compiled loss tails (:class:`CETails`).
        transposed: score ``(E, P)`` blocks ``T @ q^T`` instead of ``(P, E)`` ones (``None``: for bf16 products, and
            for every precision on CPU). With oneDNN's bf16 kernels on CPU the scores and the table gradient then read
            contiguous operands: on the 2-core AMX dev machine the products and loss tails of one table take 64.6 ms
            instead of 72.9 at P = 1,000, E = 12,842, 2d = 1,000. fp32 products took the same time either way there
            (241 vs 238 ms), while on a 2-core AMD EPYC (AVX-512, and under the AVX2 emulation) the three fp32 products
            take 520 (AVX2: 496) ms in the ``(E, P)`` layout against 611 (623) in the row layout, the row layout's
            forward ``q @ T^T`` being the slowest (``benchmarks/gemm_layouts.py``).
        chunk: entities per block (:func:`~dsom.models.chunked.entity_chunk`); fewer than E: the loss never holds a
            ``(P, E)`` block (:class:`_ChunkedComplExCE`: 4 products per block instead of 3, ``transposed`` ignored).

    Equals, in value and gradient up to rounding, ``F.cross_entropy((q @ table.T)[rows], target, reduction="none")``
    with ``q = complex_query(table[head], relations[k, relation])`` for each model ``k``.
    """
    if rows is None:
        rows = torch.arange(len(target), device=target.device)
    if len(tables) != relations.shape[0]:
        raise ValueError(f"{len(tables)} entity tables but {relations.shape[0]} relation tables")
    if chunk is not None and chunk < tables[0].shape[0]:
        ce, ent, rel, tail = _ChunkedComplExCE.apply(relations, head, relation, target, rows, precision, tails,
                                                     int(chunk), *tables)
        return ComplExCE(ce, ent, rel, tail)
    if transposed is None:
        transposed = precision == "bf16" or tables[0].device.type == "cpu"
    ce, ent, rel, tail = _ComplExCE.apply(relations, head, relation, target, rows, precision, tails, transposed,
                                          *tables)
    return ComplExCE(ce, ent, rel, tail)


def fused_factors(out: ComplExCE, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N3 factors ``(K, T, d)`` of every target's triple (head, relation and tail moduli) from the rows
    :func:`complex_cross_entropy` returned; ``rows`` as given to it (a query's head counts once per target, as in
    :func:`~dsom.models.interaction.factors` on the triples)."""
    head, rel = (out.head, out.relation) if rows is None else (out.head[:, rows], out.relation[:, rows])
    return complex_modulus(head), complex_modulus(rel), complex_modulus(out.tail)


def fused_penalty(out: ComplExCE, rows: torch.Tensor | None, kind: str, weight: float, batch: int,
                  tails: CETails = EAGER) -> torch.Tensor | None:
    """``train.regularizer`` (:func:`~dsom.models.complex.regularizer`: ``kind`` ``n3``, ``f2`` or ``none``) of the
    factors of every target's triple, summed over the K models and divided by ``batch``; ``None`` when off.

    The value of ``regularizer(kind, fused_factors(out, rows), weight, batch)``, without gathering a query's rows once
    per target (a row's term is weighted by its number of targets), with a closed-form backward, each one pass (compiled
    when ``tails`` are)."""
    if kind == "none" or weight <= 0:
        return None
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {kind!r}; choose one of {', '.join(REGULARIZERS)}")
    P = out.head.shape[1]
    counts = (torch.ones(P, dtype=out.head.dtype, device=out.head.device) if rows is None
              else torch.bincount(rows, minlength=P).to(out.head.dtype))
    return _Penalty.apply(out.head, out.relation, out.tail, counts, 3 if kind == "n3" else 2, weight / batch, tails)
