"""The teacher-selection policy and its REINFORCE objective (SPEC §5.2–5.5).

The state of a query is the concatenation of every teacher's 1-vs-all logits ``(M * E)``; the policy is
a two-layer MLP (hidden 1024, ReLU) giving a categorical distribution over the ``2^M - 1`` teacher
subsets. The reward of a subset on a triple is ``+1`` when the mean of its teachers' logits has a lower
cross-entropy on the target than the current student and ``-10`` otherwise; the baseline is the same
reward of the all-teacher mean, so ``delta = R - R_hat`` is in {-11, 0, 11}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsom.distill.losses import per_query_ce

STATES = ("logits", "probs", "standardised")


def policy_state(teacher_logits: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """``(M, B, E)`` teacher logits -> ``(B, M * E)`` policy input (constant w.r.t. every parameter)."""
    x = teacher_logits.detach()
    if kind == "probs":
        x = x.softmax(-1)
    elif kind == "standardised":
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp(min=1e-6)
    elif kind != "logits":
        raise ValueError(f"unknown policy state {kind!r}; choose one of {STATES}")
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


class Policy(nn.Module):
    """``pi(a | s) = softmax(W2 relu(W1 s + b1) + b2)`` with PyTorch's default Linear init."""

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

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Action logits ``(B, A)``."""
        return self.net(state)


def triple_rewards(logits: torch.Tensor, student_ce: torch.Tensor, target: torch.Tensor, positive: float = 1.0,
                   negative: float = -10.0) -> torch.Tensor:
    """Eq. (8) per triple: ``positive`` where CE(logits, t) < the student's CE, else ``negative``."""
    ce = per_query_ce(logits.detach(), target)
    return torch.where(ce < student_ce, torch.full_like(ce, positive), torch.full_like(ce, negative))


def reinforce_loss(action_logits: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """``-mean(advantage * log pi(a | s))`` with the advantage treated as a constant."""
    logp = F.log_softmax(action_logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    return -(advantage.detach() * logp).mean()
