"""Exponentials that never produce an fp32 denormal, and the 1-vs-all cross-entropy built on them.

Why: on x86 CPUs an ``exp`` whose float32 result is denormal (an argument in about ``[-103.9, -87.3]``) or
underflows to zero is many times slower than one with a normal result: on the 2-core AMD EPYC dev machine,
5M elements take 17 ms at ``exp(-50)``, 189 ms at ``exp(-95)`` (denormal) and 94 ms at ``exp(-120)``
(underflow), with or without ``torch.set_flush_denormal(True)`` (the slow path is inside the vectorised
``exp`` itself). As a model sharpens, more of the ``B x E`` terms of a log-sum-exp or a softmax fall there,
and a masked log-sum-exp (entries filled with ``finfo.min``) sends most of its row there from the start.

What: every exponent is clamped below at :data:`EXP_FLOOR` ``= -64`` *relative to a term that is at least 1*
(the row maximum of a log-sum-exp, or a normaliser that makes the row sum to 1). ``exp(-64) ~ 1.6e-28``, so

* a sum of ``E`` such terms changes by at most ``E * 1.6e-28`` against a sum that is at least 1: below half
  an fp32 ulp of 1 (6e-8) for any ``E < 10^20``, i.e. the values are the same up to fp32 rounding;
* the gradients of clamped entries are zeros (:func:`logsumexp`: the clamp stops them) or at most ``1.6e-28``
  times the row's gradient scale (:func:`cross_entropy`), instead of their true values below that;
* results of the following products (a softmax times a gradient scale ``>= 1e-10``) stay normal too, so
  CPUs that also slow down on denormal *products* (without flush-to-zero) are not hit either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

EXP_FLOOR = -64.0


def floor_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(max(x, EXP_FLOOR))``: for exponents taken relative to a term ``>= 1`` (see the module doc)."""
    return torch.exp(x.clamp_min(EXP_FLOOR))


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.logsumexp`` with every exponent clamped at ``EXP_FLOOR`` below the row maximum.

    Equal to ``torch.logsumexp(x, dim)`` up to fp32 rounding; entries more than 64 below their row's maximum get
    a zero gradient (theirs is below ``1.6e-28``). Rows of ``-inf`` give ``-inf``, ``+inf`` gives ``+inf``, as in torch.
    """
    floor = x.detach().amax(dim, keepdim=True) + EXP_FLOOR
    return torch.logsumexp(x.clamp_min(floor), dim)


def split_logsumexp(x: torch.Tensor, keep: torch.Tensor,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(log sum_{keep} exp x, log sum_{not keep} exp x)`` over the last dimension, each as :func:`logsumexp` of its
    own entries (exponents floored at ``EXP_FLOOR`` below that set's maximum), from one exponential per element:
    every entry is shifted by its own set's maximum. An empty set gives a finite stand-in (``log`` of the smallest
    normal float plus 0) with a zero gradient, for the caller to replace; NDKD's neighbour split (:mod:`dsom.distill.
    losses`) reads a row twice this way instead of two masked log-sum-exps with an exponential each.

    With ``weight`` (same shape as ``x``) a third result: ``sum_{not keep} softmax(x)_i weight_i`` with the softmax
    renormalised over the entries not kept (0 for an empty set), the expectation of ``weight`` under that
    distribution, from the same exponentials and in the same pass as their sum (NDKD's non-neighbour cross term; a
    separate ``exp(x - lse)`` pass after the log-sum-exp would read the row and exponentiate it again)."""
    neg = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    m_in = torch.where(keep, x, neg).detach().amax(-1, keepdim=True)
    m_out = torch.where(keep, neg, x).detach().amax(-1, keepdim=True)
    m_in = torch.where(torch.isfinite(m_in), m_in, zero)
    m_out = torch.where(torch.isfinite(m_out), m_out, zero)
    e = (x - torch.where(keep, m_in, m_out)).clamp_min(EXP_FLOOR).exp()
    tiny = torch.finfo(x.dtype).tiny
    s_in = torch.where(keep, e, zero).sum(-1).clamp_min(tiny)
    e_out = torch.where(keep, zero, e)
    s_out = e_out.sum(-1).clamp_min(tiny)
    lse = (s_in.log() + m_in.squeeze(-1), s_out.log() + m_out.squeeze(-1))
    if weight is None:
        return lse
    return (*lse, (e_out * weight).sum(-1) / s_out)


class _FloorCE(torch.autograd.Function):
    """Cross-entropy of targets against shared score rows, with the softmax kept for the backward pass.

    Forward: ``p = exp(max(s - max_row, EXP_FLOOR))`` in one new ``(P, E)`` buffer, ``lse = log sum p + max_row``,
    ``loss_t = lse[row_t] - s[row_t, target_t]``. Backward: ``dS = p * (sum_{t in row} g_t) / sum p`` written into
    the same buffer (used once), minus ``g_t`` at every ``(row_t, target_t)``. Memory: one ``(P, E)`` block between
    forward and backward, like ``F.cross_entropy``'s saved log-softmax.
    """

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = scores.float()
        top = s.amax(-1, keepdim=True)
        p = torch.sub(s, top).clamp_min_(EXP_FLOOR).exp_()
        total = p.sum(-1, keepdim=True)
        lse = total.log().add_(top).squeeze(-1)
        loss = lse[rows] - s[rows, target]
        ctx.save_for_backward(p, total, rows, target)
        ctx.in_dtype = scores.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        p, total, rows, target = ctx.saved_tensors
        g = grad.float()
        per_row = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device).index_add_(0, rows, g)
        d = p.mul_(per_row.unsqueeze(-1) / total)  # in place: the saved buffer is needed only here
        d.index_put_((rows, target), -g, accumulate=True)
        return d.to(ctx.in_dtype), None, None


def cross_entropy(scores: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target 1-vs-all cross-entropy ``logsumexp(scores[row]) - scores[row, target]``, shape ``(T,)``.

    Args:
        scores: ``(P, E)`` score rows.
        target: ``(T,)`` target columns.
        rows: ``(T,)`` the score row of each target (several targets may share one row: the (entity, relation)
            pair batching of :mod:`dsom.train.loop`); ``None`` = row ``i`` for target ``i`` (``T = P``).

    Equal to ``F.cross_entropy(scores[rows], target, reduction="none")`` up to fp32 rounding, in value and gradient,
    with no ``exp`` ever producing a denormal (module doc).
    """
    if rows is None:
        rows = torch.arange(len(target), device=target.device)
    return _FloorCE.apply(scores, rows, target)


__all__ = ["EXP_FLOOR", "cross_entropy", "floor_exp", "logsumexp"]
