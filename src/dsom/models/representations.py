"""Entity representations: where an entity's ``2d``-real row comes from, before any interaction scores it.

* a free table (the structural teacher, the student): ``N(0, 1) * init_scale`` rows, trained directly;
* projected features (a feature teacher): fixed features ``X (E, F)`` times a trainable ``W (F, 2d)``,
  divided by ``scale`` (MoSE ``learn.py``: 20), with ``W`` Xavier-uniform.

A new kind of representation is one function here returning an ``(E, 2d)`` table; the interaction
(:mod:`dsom.models.interaction`) never needs to know which kind it got.
"""

from __future__ import annotations

import torch


def normal_table(shape: tuple[int, ...], init_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A free table of ``shape`` (e.g. ``(E, 2d)``) drawn as ``N(0, 1) * init_scale`` (kbc's initialisation)."""
    return torch.randn(*shape, generator=generator) * init_scale


def xavier_projection(in_dim: int, out_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A projection ``(in_dim, out_dim)`` drawn Xavier-uniform from ``generator``."""
    w = torch.empty(in_dim, out_dim)
    bound = (6.0 / (in_dim + out_dim)) ** 0.5
    return w.uniform_(-bound, bound, generator=generator)


def projected_table(features: torch.Tensor, projection: torch.Tensor, scale: float,
                    precision: str = "fp32") -> torch.Tensor:
    """Entity rows of a feature teacher: ``features (E, F) @ projection (F, 2d) / scale`` -> ``(E, 2d)``.

    Computed as ``features @ (projection / scale)``: the division touches the ``F x 2d`` projection instead of the
    ``E x 2d`` table (forward and backward; the same values up to fp32 rounding). ``precision`` is the product's
    (:mod:`dsom.models.products`): under ``bf16`` the table comes out bfloat16 (``features`` may already be bf16), the
    operand the scoring products read anyway; ``bf16sim`` simulates that with float32 kernels."""
    from dsom.models.products import PRECISIONS, precise_matmul

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16":
        return torch.mm(features.to(torch.bfloat16), (projection / scale).to(torch.bfloat16))
    if precision == "bf16sim":
        return precise_matmul(features, projection / scale, precision)
    return features.float() @ (projection / scale)
