"""The DSoM distiller (SPEC §5): frozen teachers, a unimodal ComplEx student, a teacher selector.

One step on a batch of reciprocal training queries:

1. the frozen teachers' logits ``(M, B, E)`` from their materialised tables (one batched product, no grad);
2. per-query teacher weights ``(B, M)`` from the selector (the policy samples a subset; heuristics pick one);
3. the combined teacher logits ``sum_m w_m F^m`` and the student's logits;
4. the losses, returned as a dict so every term is logged: ``ce`` (+ ``reg``), ``kd`` (already multiplied
   by gamma), ``rc`` (REINFORCE), ``senior`` (MulDE sketch); plus step statistics (delta, R, R_hat).

The distiller never updates the teachers: they are a plain tensor holder, not a submodule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsom.config import DistillConfig
from dsom.distill.actions import full_action, num_actions, subset_matrix
from dsom.distill.losses import ndkd, per_query_ce, target_mask, vanilla_kd
from dsom.distill.policy import Policy, policy_state, reinforce_loss, triple_rewards
from dsom.models.complex import ComplEx, f2_penalty, n3_penalty
from dsom.models.teachers import FrozenTeachers
from dsom.perf import MaybeCompiled

HEURISTICS = ("avg", "conf", "best_teacher", "best_strategy")
SELECTORS = ("rl", "mulde", "none", *HEURISTICS)


def check_selector(selector: str, modalities: list[str]) -> None:
    if selector.startswith("single:"):
        if selector[7:] not in modalities:
            raise ValueError(f"distill.selector={selector!r}: no teacher '{selector[7:]}' "
                             f"(teachers: {', '.join(modalities)})")
    elif selector not in SELECTORS:
        raise ValueError(f"distill.selector={selector!r} is not one of {', '.join(SELECTORS)}, single:<modality>")


def kd_rows(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
            cfg: DistillConfig) -> torch.Tensor:
    """Per-query distillation loss ``(B,)`` of the configured kind (``distill.kd``) without gamma."""
    if cfg.kd == "vanilla":
        return vanilla_kd(teacher, student, cfg.tau, cfg.tau_squared)
    if cfg.kd == "dkd" or neighbours is None:
        neighbours = target_mask(target, teacher.shape[-1])
    alpha = 0.0 if cfg.kd == "nnkd" else cfg.alpha
    beta = 0.0 if cfg.kd == "nekd" else cfg.beta
    return ndkd(teacher, student, neighbours, cfg.tau, alpha, beta, cfg.neighbour_mode, cfg.tau_squared)


def step_terms(student: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
               neighbours: torch.Tensor | None, cfg: DistillConfig, rewards: bool, kd: bool) -> dict[str, torch.Tensor]:
    """The element-wise part of a stage-2 step, after the matrix products (one function so ``torch.compile``
    can fuse it): per-query student CE, the combined teacher ``sum_m w_m F^m``, the rewards of the chosen
    subset and of the all-teacher baseline, and the distillation loss. ``(B,)`` tensors keyed
    ``ce``, ``reward``, ``baseline``, ``kd``."""
    ce = per_query_ce(student, target)
    out = {"ce": ce}
    teacher = torch.einsum("bm,mbe->be", weights, teacher_logits)
    if rewards:
        out["reward"] = triple_rewards(teacher, ce.detach(), target, cfg.reward_positive, cfg.reward_negative)
        if cfg.baseline == "avg_action":
            out["baseline"] = triple_rewards(teacher_logits.mean(0), ce.detach(), target, cfg.reward_positive,
                                             cfg.reward_negative)
    if kd:
        out["kd"] = kd_rows(teacher, student, target, neighbours, cfg)
    return out


class Distiller(nn.Module):
    """Args:
    teachers: frozen, materialised teachers (``M`` of them).
    num_relations: relation ids including reciprocals (2R).
    rank: the student's rank d.
    config: the ``distill`` section.
    compile: run the distillation loss through ``torch.compile`` (:class:`~dsom.perf.MaybeCompiled`).
    """

    def __init__(self, teachers: FrozenTeachers, num_relations: int, rank: int, config: DistillConfig,
                 init_scale: float = 1e-3, generator: torch.Generator | None = None, compile: bool = False) -> None:
        super().__init__()
        self._step_terms = MaybeCompiled(step_terms, compile)
        check_selector(config.selector, teachers.modalities)
        self.cfg = config
        self.teachers = teachers
        self.num_teachers = teachers.num_teachers
        E = teachers.num_entities
        self.student = ComplEx(E, num_relations, rank, init_scale, generator=generator)
        self.register_buffer("subsets", subset_matrix(self.num_teachers), persistent=False)
        self.policy: Policy | None = None
        self.mulde_scale: nn.Parameter | None = None
        if config.selector == "rl":
            self.policy = Policy(self.num_teachers * E, num_actions(self.num_teachers), config.policy_hidden,
                                 generator=generator)
        elif config.selector == "mulde":
            inv_softplus_1 = math.log(math.e - 1.0)
            self.mulde_scale = nn.Parameter(torch.full((num_relations, self.num_teachers), inv_softplus_1))

    def to(self, *args: Any, **kwargs: Any) -> Distiller:  # keep the frozen teachers on the same device
        super().to(*args, **kwargs)
        device = self.student.entity.device
        if self.teachers.tables.device != device:
            self.teachers = self.teachers.to(device)
        return self

    # ------------------------------------------------------------------------------------ selection
    def act(self, teacher_logits: torch.Tensor, greedy: bool = False,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy actions ``(B,)`` (sampled, or arg-max with ``greedy``) and the action logits ``(B, A)``."""
        assert self.policy is not None
        logits = self.policy(policy_state(teacher_logits, self.cfg.policy_state))
        if greedy:
            return logits.argmax(-1), logits
        probs = logits.detach().float().softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1), logits

    def heuristic_weights(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` weights of the non-learned selectors (SPEC §6, Table 2/4/6)."""
        sel, M = self.cfg.selector, self.num_teachers
        B = teacher_logits.shape[1]
        eye = torch.eye(M, device=teacher_logits.device)
        if sel == "avg":
            return torch.full((B, M), 1.0 / M, device=teacher_logits.device)
        if sel.startswith("single:"):
            return eye[self.teachers.index(sel[7:])].expand(B, M)
        if sel == "conf":  # most confident teacher; ties go to the lower index
            conf = teacher_logits.softmax(-1).amax(-1)  # (M, B)
            return eye[conf.argmax(0)]
        if sel == "best_teacher":
            return eye[per_query_ce(teacher_logits, target).argmin(0)]
        if sel == "best_strategy":
            ces = torch.stack([per_query_ce(torch.einsum("m,mbe->be", w, teacher_logits).unsqueeze(0), target)[0]
                               for w in self.subsets])  # (A, B)
            return self.subsets[ces.argmin(0)]
        raise ValueError(sel)

    # ------------------------------------------------------------------------------------------ step
    def forward(self, batch: torch.Tensor, neighbours: torch.Tensor | None, precision: str = "fp32",
                regularizer: str = "n3", reg: float = 0.01, kd_weight: float | None = None,
                generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Losses and step statistics for reciprocal queries ``(B, 3)``; ``neighbours (B, E)`` bool holds each
        query's training answers (target included)."""
        cfg = self.cfg
        h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
        student = self.student.score_all(h, r, precision=precision)
        losses: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if regularizer != "none" and reg > 0:
            penalty = n3_penalty if regularizer == "n3" else f2_penalty
            losses["reg"] = penalty(self.student.factors(h, r, t), reg)
        if cfg.selector == "none":
            losses["ce"] = F.cross_entropy(student, t)
            return losses, stats
        gamma = cfg.gamma if kd_weight is None else kd_weight
        with torch.no_grad():
            tea_all = self.teachers.score_all(h, r, precision=precision)  # (M, B, E)
        if cfg.selector == "mulde":
            losses["ce"] = F.cross_entropy(student, t)
            c = F.softplus(self.mulde_scale[r]).T.unsqueeze(-1)  # (M, B, 1)
            scaled = c * tea_all
            with torch.no_grad():
                ls = F.log_softmax(student.detach() / cfg.tau, -1)
            kl = (F.softmax(scaled / cfg.tau, -1) * (F.log_softmax(scaled / cfg.tau, -1) - ls)).sum(-1)  # (M, B)
            attention = torch.softmax(-kl / cfg.mulde_attention_temperature, 0)
            senior = (attention.unsqueeze(-1) * scaled).sum(0)
            losses["senior"] = F.cross_entropy(senior, t)
            losses["kd"] = gamma * vanilla_kd(senior.detach(), student, cfg.tau, cfg.tau_squared).mean()
            stats["attention"] = attention.mean(1).detach()
            return losses, stats
        rl = cfg.selector == "rl"
        if rl:
            actions, action_logits = self.act(tea_all, generator=generator)
            weights = self.subsets[actions]
        else:
            weights = self.heuristic_weights(tea_all, t)
            stats["teacher_share"] = weights.mean(0)
        use_kd = cfg.kd != "none" and gamma > 0
        terms = self._step_terms(student, tea_all, weights, t, neighbours, cfg, rl, use_kd)
        losses["ce"] = terms["ce"].mean()
        if use_kd:
            losses["kd"] = gamma * terms["kd"].mean()
        if rl:
            reward = terms["reward"]
            base = terms["baseline"] if cfg.baseline == "avg_action" else reward.mean().expand_as(reward)
            delta = reward - base
            losses["rc"] = reinforce_loss(action_logits, actions, delta)
            stats.update(delta=delta.mean(), reward=reward.mean(), reward_baseline=base.mean())
            # a histogram without bincount's host sync on CUDA
            stats["actions"] = torch.zeros(num_actions(self.num_teachers), dtype=torch.int64,
                                           device=actions.device).scatter_add_(0, actions, torch.ones_like(actions))
        return losses, stats

    @torch.no_grad()
    def greedy_actions(self, queries: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Arg-max policy actions ``(n,)`` for reciprocal queries (the Fig. 3 analysis).

        The result is preallocated: small tensors kept alive across iterations would otherwise sit between
        the per-batch score blocks in the heap and fragment it (RSS grew by GBs on DB15K)."""
        out = torch.empty(len(queries), dtype=torch.int64, device=queries.device)
        for s in range(0, len(queries), batch_size):
            q = queries[s:s + batch_size]
            out[s:s + batch_size] = self.act(self.teachers.score_all(q[:, 0], q[:, 1]), greedy=True)[0]
        return out


__all__ = ["Distiller", "HEURISTICS", "SELECTORS", "check_selector", "full_action"]
