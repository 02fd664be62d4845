"""1-vs-all cross-entropy over entity chunks: memory ``O(B x chunk)`` instead of ``O(B x E)``.

The plain training loss materialises the ``(B, E)`` logits, their softmax and their gradient: about
12 bytes per cell, 12 GB for a batch of 1,000 queries against a million entities. :func:`chunked_cross_entropy`
computes the same loss and gradients block by block:

* forward: a running log-sum-exp over ``(chunk, B)`` score blocks (``B`` padded to a multiple of 8), and the
  target's score as a row dot product;
* backward: each block's scores are recomputed, ``p = exp(s - lse)`` scaled by the incoming gradient gives
  the block's score gradient, which flows to the queries (``p @ T_c``) and to the block's table rows
  (``p^T @ q``); the target term ``-q . T_t`` is added with one gather and one ``index_add``.

The matrix-product work is 4 products per block instead of 3 (one recomputation). Scores, probabilities and
the log-sum-exp are float32; ``precision="bf16"`` multiplies in bfloat16 as :func:`matmul_scores` does.
Exponents are clamped at ``dsom.numerics.EXP_FLOOR`` (no fp32 denormal is ever produced; same values to fp32
rounding).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsom.models.products import bf16_round, padded_queries_t
from dsom.numerics import EXP_FLOOR


def _mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` for 2-D operands in the requested precision, float32 result (called without autograd)."""
    if precision == "bf16":
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16)).float()
    if precision == "bf16sim":
        return bf16_round(torch.mm(bf16_round(a), bf16_round(b)))
    return torch.mm(a.float(), b.float())


def rounded_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` as a product in ``precision`` would read it (bf16-rounded for bf16 and bf16sim), in float32."""
    return bf16_round(x) if precision in ("bf16", "bf16sim") else x.float()


def block_logsumexp(table: torch.Tensor, q_t: torch.Tensor, chunk: int, precision: str) -> torch.Tensor:
    """``(W,)`` float32 log-sum-exp of each column of ``table (E, 2d) @ q_t (2d, W)``, one ``(chunk, W)`` block of
    table rows at a time (a running ``logaddexp``); exponents floored at ``EXP_FLOOR``."""
    lse = torch.full((q_t.shape[1],), -math.inf, dtype=torch.float32, device=q_t.device)
    for lo in range(0, table.shape[0], chunk):
        s = _mm(table[lo:lo + chunk], q_t, precision)
        top = s.amax(0)
        lse = torch.logaddexp(lse, s.sub_(top).clamp_min_(EXP_FLOOR).exp_().sum(0).log_().add_(top))
    return lse


def block_softmax_grads(table: torch.Tensor, q_t: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor, chunk: int,
                        precision: str, d_query: torch.Tensor | None, d_table: torch.Tensor | None, rows: int) -> None:
    """The softmax part of the 1-vs-all CE gradient, block by block: each ``(chunk, W)`` block's probabilities
    ``exp(s - lse)`` times the columns' ``weight (W,)`` (recomputed from the product), added into ``d_query (rows,
    2d)`` (its first ``rows`` columns) and written into the block's rows of ``d_table (E, 2d)`` (every row is
    written: it needs no zero fill). The target terms are the caller's."""
    for lo in range(0, table.shape[0], chunk):
        block = table[lo:lo + chunk]
        p = _mm(block, q_t, precision).sub_(lse).clamp_min_(EXP_FLOOR).exp_().mul_(weight)
        if d_query is not None:
            d_query += _mm(p[:, :rows].T, block, precision)
        if d_table is not None:
            d_table[lo:lo + chunk] = _mm(p, q_t.T, precision)


class _ChunkedCE(torch.autograd.Function):
    """Per model ``k`` (a loop of 2-D ``mm``: faster than ``bmm`` on CPU) and per entity block, with the
    block's exp / scaling done in place so each block allocates one ``(chunk, W)`` buffer.

    The blocks are laid out ``(chunk, W)``: ``table_block @ q^T`` with the queries transposed and padded to W, a
    multiple of 8 (:func:`~dsom.models.products.padded_queries_t`; a padded column's gradient weight is 0). MKL's
    sgemm runs that product well above ``q @ table_block^T`` (the forward and the recomputation; ``python
    benchmarks/gemm_layouts.py --entities 67108 --dim 128``: the ``(E,P)`` rows; ``benchmarks/step_profile.py``)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, table: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
                chunk: int, precision: str) -> torch.Tensor:
        K = query.shape[0]
        q_t = torch.stack([padded_queries_t(query[k]) for k in range(K)])  # (K, 2d, W)
        lse = torch.stack([block_logsumexp(table[k], q_t[k], chunk, precision) for k in range(K)])  # (K, W)
        target_score = (rounded_operand(query[:, rows], precision)
                        * rounded_operand(table[:, target], precision)).sum(-1)
        ctx.save_for_backward(query, q_t, table, target, rows, lse)
        ctx.chunk, ctx.precision = chunk, precision
        return lse[:, rows] - target_score

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        query, q_t, table, target, rows, lse = ctx.saved_tensors
        chunk, precision = ctx.chunk, ctx.precision
        K, B = query.shape[0], query.shape[1]
        g_t = grad.float()  # (K, T): one per target
        g = torch.zeros_like(lse).index_add_(1, rows, g_t)  # (K, W): summed over the targets sharing a row; 0 padded
        need_q, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = torch.zeros_like(query, dtype=torch.float32) if need_q else None
        dt = torch.empty_like(table, dtype=torch.float32) if need_t else None  # every row written by its block
        for k in range(K):
            block_softmax_grads(table[k], q_t[k], lse[k], g[k], chunk, precision, None if dq is None else dq[k],
                                None if dt is None else dt[k], B)
        g3 = g_t.unsqueeze(-1)
        if dq is not None:
            dq_rows = -g3 * rounded_operand(table[:, target], precision)
            for k in range(K):  # index_add_ rather than index_put_(accumulate): much faster on CPU (models/fused.py)
                dq[k].index_add_(0, rows, dq_rows[k])
            dq = dq.to(query.dtype)
        if dt is not None:
            dt_rows = -g3 * rounded_operand(query[:, rows], precision)
            for k in range(K):
                dt[k].index_add_(0, target, dt_rows[k])
            dt = dt.to(table.dtype)
        return dq, dt, None, None, None, None


def chunked_cross_entropy(query: torch.Tensor, table: torch.Tensor, target: torch.Tensor, chunk: int,
                          precision: str = "fp32", rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query cross-entropy of the logits ``query @ table^T`` against ``target``, never holding them all.

    Args:
        query: ``(B, D)`` or ``(K, B, D)`` query vectors (K models, e.g. every teacher).
        table: ``(E, D)`` or ``(K, E, D)`` candidate rows.
        target: ``(B,)`` target ids in ``[0, E)``.
        chunk: entities per block (``>= 1``).
        precision: ``fp32``, ``bf16`` or ``bf16sim`` products (:func:`~dsom.models.products.precise_matmul`).
        rows: ``(T,)`` the query row of each target when several targets share a query (pair batching);
            ``None`` = query ``i`` for target ``i``. ``target`` is then ``(T,)``.

    Returns:
        ``(T,)`` or ``(K, T)`` float32 losses, equal to ``F.cross_entropy((query @ table.T)[rows], target,
        reduction="none")`` up to float rounding, with gradients to ``query`` and ``table``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    squeeze = query.dim() == 2
    q = query.unsqueeze(0) if squeeze else query
    t = table.unsqueeze(0) if table.dim() == 2 else table
    if rows is None:
        rows = torch.arange(len(target), device=target.device)
    out = _ChunkedCE.apply(q, t, target, rows, int(chunk), precision)
    return out.squeeze(0) if squeeze else out


def entity_chunk(batch_size: int, num_entities: int, block_mb: float) -> int:
    """Entities per block so a ``batch_size x chunk`` float32 block stays within ``block_mb`` MiB
    (``num_entities`` when everything fits, i.e. no chunking; ``block_mb <= 0`` also means no chunking)."""
    if block_mb <= 0:
        return num_entities
    return max(1, min(num_entities, int(block_mb * 2**20 // (4 * max(batch_size, 1)))))
