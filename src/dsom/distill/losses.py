"""Distillation losses (SPEC §5.6): NDKD (NEKD + NNKD), DKD as its ``N = {t}`` case, vanilla KD.

All functions take fp32 logits ``(B, E)`` and return a per-query loss ``(B,)``. They work in log space
and never multiply a zero probability by an infinite log, so they stay finite (values and gradients)
for ``|N| = 1``, ``N`` = every entity, huge logits and bf16-rounded inputs. The renormalised
non-neighbour distribution excludes the neighbours exactly (the reference fills them with a large
negative logit, which is the same to fp32 precision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log sum_{keep} exp(x)`` per row; ``-inf`` for rows with nothing kept. Gradients stay finite."""
    neg = torch.finfo(x.dtype).min
    out = torch.logsumexp(x.masked_fill(~keep, neg), dim=-1)
    return torch.where(keep.any(-1), out, torch.full_like(out, -math.inf))


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dim, skipping entries with ``p = 0`` (or not kept)."""
    valid = torch.isfinite(log_p) if keep is None else keep & torch.isfinite(log_p)
    lp = torch.where(valid, log_p, torch.zeros_like(log_p))
    lq = torch.where(valid, log_q, torch.zeros_like(log_q))
    return torch.where(valid, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def _log_binary(log_prob: torch.Tensor, neighbours: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, 2)`` log of ``[b, 1 - b]`` with ``b`` the mean (``mode="mean"``) or total neighbour mass."""
    log_pn = masked_logsumexp(log_prob, neighbours)
    log_rest = masked_logsumexp(log_prob, ~neighbours)
    if mode == "sum":
        return torch.stack([log_pn, log_rest], -1)
    n = neighbours.sum(-1).to(log_prob.dtype)
    log_mean = log_pn - torch.log(n)
    # 1 - mean = (non-neighbour mass) + P_N (1 - 1/|N|); the second term vanishes for |N| = 1.
    shrink = torch.where(n > 1, torch.log1p(-1.0 / n.clamp(min=2)), torch.full_like(n, -math.inf))
    return torch.stack([log_mean, torch.logaddexp(log_rest, log_pn + shrink)], -1)


def nekd(teacher: torch.Tensor, student: torch.Tensor, neighbours: torch.Tensor, tau: float = 4.0,
         mode: str = "mean") -> torch.Tensor:
    """Neighbour binary term: KL of ``[p̄_N, 1 - p̄_N]`` (teacher ‖ student), no τ² factor."""
    lt = F.log_softmax(teacher / tau, -1)
    ls = F.log_softmax(student / tau, -1)
    return _kl_terms(_log_binary(lt, neighbours, mode), _log_binary(ls, neighbours, mode))


def nnkd(teacher: torch.Tensor, student: torch.Tensor, neighbours: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """KL of the distributions renormalised over the non-neighbours (teacher ‖ student), no τ² factor."""
    zt, zs = teacher / tau, student / tau
    keep = ~neighbours
    lt = zt - masked_logsumexp(zt, keep).unsqueeze(-1)
    ls = zs - masked_logsumexp(zs, keep).unsqueeze(-1)
    return _kl_terms(lt, ls, keep)


def ndkd(teacher: torch.Tensor, student: torch.Tensor, neighbours: torch.Tensor, tau: float = 4.0,
         alpha: float = 1.0, beta: float = 1.0, mode: str = "mean", tau_squared: bool = True) -> torch.Tensor:
    """``tau^2 (alpha NEKD + beta NNKD)`` per query (SPEC §5.6); ``neighbours`` must include the target."""
    scale = tau * tau if tau_squared else 1.0
    out = torch.zeros(teacher.shape[0], dtype=teacher.dtype, device=teacher.device)
    if alpha:
        out = out + alpha * nekd(teacher, student, neighbours, tau, mode)
    if beta:
        out = out + beta * nnkd(teacher, student, neighbours, tau)
    return scale * out


def target_mask(target: torch.Tensor, num_entities: int) -> torch.Tensor:
    """``(B, E)`` one-hot bool mask of the targets (DKD's ``N = {t}``)."""
    m = torch.zeros(len(target), num_entities, dtype=torch.bool, device=target.device)
    m[torch.arange(len(target), device=target.device), target] = True
    return m


def dkd(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, tau: float = 4.0, alpha: float = 1.0,
        beta: float = 1.0, tau_squared: bool = True) -> torch.Tensor:
    """Decoupled KD (TCKD + NCKD) = NDKD with ``N = {t}``."""
    return ndkd(teacher, student, target_mask(target, teacher.shape[-1]), tau, alpha, beta, "mean", tau_squared)


def vanilla_kd(teacher: torch.Tensor, student: torch.Tensor, tau: float = 4.0, tau_squared: bool = True) -> torch.Tensor:
    """``tau^2 KL(softmax(F_tea / tau) ‖ softmax(F_stu / tau))`` per query."""
    scale = tau * tau if tau_squared else 1.0
    return scale * _kl_terms(F.log_softmax(teacher / tau, -1), F.log_softmax(student / tau, -1))
