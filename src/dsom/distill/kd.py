"""Distillation losses by name (``distill.kd``), each a per-query loss on one combined teacher.

A loss is a function ``(teacher, student, target, neighbours, cfg) -> (B,)`` of ``(B, E)`` teacher and student
logits, targets ``(B,)`` and the known answers ``neighbours (B, E)`` bool (``None`` when the loss did not ask for
them: the target alone is then the neighbour set), registered with ``@register_kd(name, needs_neighbours=...)``.
Adding a loss is one function (here or in its own module imported below) plus that one decorator line. The
mathematics lives in :mod:`dsom.distill.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsom.config import DistillConfig
from dsom.distill.losses import ndkd, target_mask, vanilla_kd

KDFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", DistillConfig], torch.Tensor]


@dataclass(frozen=True)
class KDLoss:
    """A registered loss. ``needs_neighbours``: the student trainer builds each query's known-answer mask for it."""

    name: str
    fn: KDFunction
    needs_neighbours: bool

    def __call__(self, teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor,
                 neighbours: torch.Tensor | None, cfg: DistillConfig) -> torch.Tensor:
        return self.fn(teacher, student, target, neighbours, cfg)


KD_LOSSES: dict[str, KDLoss] = {}
NO_KD = "none"  # distill.kd=none: cross-entropy only


def register_kd(name: str, needs_neighbours: bool = False) -> Callable[[KDFunction], KDFunction]:
    def deco(fn: KDFunction) -> KDFunction:
        KD_LOSSES[name] = KDLoss(name, fn, needs_neighbours)
        return fn
    return deco


def check_kd(name: str) -> None:
    """A clear ``ValueError`` for an unknown ``distill.kd``."""
    if name != NO_KD and name not in KD_LOSSES:
        raise ValueError(f"distill.kd={name!r} is not one of {', '.join([*KD_LOSSES, NO_KD])}")


def kd_loss(name: str) -> KDLoss:
    """The loss registered under ``name``."""
    check_kd(name)
    if name == NO_KD:
        raise ValueError("distill.kd=none has no loss function; check for it before asking")
    return KD_LOSSES[name]


def _known(neighbours: torch.Tensor | None, target: torch.Tensor, num_entities: int) -> torch.Tensor:
    return neighbours if neighbours is not None else target_mask(target, num_entities)


@register_kd("ndkd", needs_neighbours=True)
def _ndkd(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
          cfg: DistillConfig) -> torch.Tensor:
    """Neighbour-decoupled KD (Eq. 12): NEKD (weight alpha) + NNKD (weight beta)."""
    return ndkd(teacher, student, _known(neighbours, target, teacher.shape[-1]), cfg.tau, cfg.alpha, cfg.beta,
                cfg.neighbour_mode, cfg.tau_squared)


@register_kd("nekd", needs_neighbours=True)
def _nekd(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
          cfg: DistillConfig) -> torch.Tensor:
    """The neighbour binary term only (NDKD with beta = 0)."""
    return ndkd(teacher, student, _known(neighbours, target, teacher.shape[-1]), cfg.tau, cfg.alpha, 0.0,
                cfg.neighbour_mode, cfg.tau_squared)


@register_kd("nnkd", needs_neighbours=True)
def _nnkd(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
          cfg: DistillConfig) -> torch.Tensor:
    """The non-neighbour term only (NDKD with alpha = 0)."""
    return ndkd(teacher, student, _known(neighbours, target, teacher.shape[-1]), cfg.tau, 0.0, cfg.beta,
                cfg.neighbour_mode, cfg.tau_squared)


@register_kd("dkd")
def _dkd(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
         cfg: DistillConfig) -> torch.Tensor:
    """Decoupled KD: NDKD with the target as the only neighbour."""
    return ndkd(teacher, student, target_mask(target, teacher.shape[-1]), cfg.tau, cfg.alpha, cfg.beta,
                cfg.neighbour_mode, cfg.tau_squared)


@register_kd("vanilla")
def _vanilla(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
             cfg: DistillConfig) -> torch.Tensor:
    """Hinton KD: KL of the temperature-softened distributions."""
    return vanilla_kd(teacher, student, cfg.tau, cfg.tau_squared)
