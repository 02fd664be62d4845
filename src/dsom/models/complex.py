"""Plain ComplEx: free entity and relation tables scored by the ComplEx interaction (the structural teacher
and the student; :mod:`dsom.models.interaction`), and the kbc N3/F2 regularisers."""

from __future__ import annotations

import torch
from torch import nn

import dsom.models.interaction as interaction
from dsom.models.representations import normal_table


class ComplEx(nn.Module):
    """Entity and relation tables plus the ComplEx interaction.

    Args:
        num_entities: E.
        num_relations: number of relation ids *including reciprocals* (2R).
        rank: d, the number of complex dimensions; rows hold ``2d`` reals.
        init_scale: embeddings start as ``N(0, 1) * init_scale`` (kbc: 1e-3).
    """

    def __init__(self, num_entities: int, num_relations: int, rank: int, init_scale: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_entities = num_entities
        self.num_relations = num_relations
        self.rank = rank
        self.entity = nn.Parameter(normal_table((num_entities, 2 * rank), init_scale, generator))
        self.relation = nn.Parameter(normal_table((num_relations, 2 * rank), init_scale, generator))

    def query(self, head: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """Query vectors ``(B, 2d)`` for id tensors ``head, relation`` of shape ``(B,)``."""
        return interaction.complex_query(self.entity[head], self.relation[relation])

    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        """1-vs-all logits ``(B, stop - start)`` float32 for candidate ids ``[start, stop)``."""
        return interaction.score_all(self.entity, self.relation, head, relation, precision, start, stop)

    def score_triples(self, head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of individual triples (float32, no matmul)."""
        return interaction.score_triples(self.entity, self.relation, head, relation, tail)

    def factors(self, head: torch.Tensor, relation: torch.Tensor,
                tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N3 factors: complex moduli of the head, relation and true-tail rows, each ``(B, d)``."""
        return interaction.factors(self.entity, self.relation, head, relation, tail)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


REGULARIZERS = ("n3", "f2", "none")


def regularizer(kind: str, factors: tuple[torch.Tensor, ...], weight: float,
                batch: int | None = None) -> torch.Tensor | None:
    """The configured penalty (``train.regularizer``) of N3 factors, or ``None`` for ``none`` or weight 0: the one
    place every trainer and the distiller choose it. ``batch`` divides the sum (default: the factors' first
    dimension, which is the batch for one model; stacked teachers pass it)."""
    if kind == "none" or weight <= 0:
        return None
    if kind not in ("n3", "f2"):
        raise ValueError(f"unknown regularizer {kind!r}; choose one of {', '.join(REGULARIZERS)}")
    power = 3 if kind == "n3" else 2
    return weight * sum(f.abs().pow(power).sum() for f in factors) / (factors[0].shape[0] if batch is None else batch)

