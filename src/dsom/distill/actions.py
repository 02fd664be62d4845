"""The action space: every non-empty subset of the teacher pool (SPEC §5.3).

Action ``k`` is the bitmask ``k + 1`` over the teachers (teacher ``m`` = bit ``m``), so with
(structure, image, text) the order is S, V, SV, D, SD, VD, SVD as in the paper.
"""

from __future__ import annotations

import torch


def num_actions(num_teachers: int) -> int:
    return 2**num_teachers - 1


def subset_matrix(num_teachers: int) -> torch.Tensor:
    """``(2^M - 1, M)`` float32: row k is the indicator of subset k divided by its size."""
    k = torch.arange(1, 2**num_teachers).unsqueeze(1)
    ind = ((k >> torch.arange(num_teachers)) & 1).float()
    return ind / ind.sum(1, keepdim=True)


def subset_members(num_teachers: int) -> torch.Tensor:
    """``(2^M - 1, M)`` bool membership of each action's subset."""
    return subset_matrix(num_teachers) > 0


def action_names(modalities: list[str]) -> list[str]:
    """Subset names such as ``"structure+text"`` (members in teacher order)."""
    members = subset_members(len(modalities))
    return ["+".join(m for m, on in zip(modalities, row.tolist()) if on) for row in members]


def full_action(num_teachers: int) -> int:
    """Index of the all-teacher subset."""
    return num_actions(num_teachers) - 1


def combine(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The combined teacher ``sum_m w[b, m] F^m``: ``weights (B, M)`` and ``logits (M, B, E)`` (float32, or bfloat16
    from bf16 products) -> ``(B, E)`` float32. Written as ``M`` element-wise terms, not a batched product, so under
    ``torch.compile`` it fuses into the loss that reads it (no ``(B, E)`` block, no upcast copy of the logits)."""
    out = weights[:, 0, None] * logits[0].float()
    for m in range(1, logits.shape[0]):
        out = out + weights[:, m, None] * logits[m].float()
    return out
