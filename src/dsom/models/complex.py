"""ComplEx scoring shared by every teacher and the student (SPEC §2.2).

Layout: every embedding row holds ``2d`` reals, the real half first and the imaginary half second
(``[re | im]``). For a query ``(h, r)`` with head row ``[a; b]`` and relation row ``[c; g]`` the query
vector is ``q = [a*c - b*g ; a*g + b*c]`` and the logit of candidate ``e`` is ``<q, e_row>``, i.e.
``Re(<h * r, conj(e)>)``. 1-vs-all scoring is one ``(B, 2d) x (2d, E)`` matrix product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRECISIONS = ("bf16", "fp32", "bf16sim")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16). On AVX2-only CPUs a bf16
    product is emulated and runs several times *slower* than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Map ``auto`` to ``bf16`` where bf16 products are fast (CUDA with bf16, AMX/AVX512-BF16 CPUs), else ``fp32``."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def complex_query(head: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
    """Complex product of head and relation rows. Shapes ``(..., 2d)`` broadcast to ``(..., 2d)``."""
    d = head.shape[-1] // 2
    a, b = head[..., :d], head[..., d:]
    c, g = relation[..., :d], relation[..., d:]
    return torch.cat([a * c - b * g, a * g + b * c], dim=-1)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16 value (round-to-nearest-even), kept in float32."""
    return x.to(torch.bfloat16).float()


class _Bf16SimMatmul(torch.autograd.Function):
    """``a @ b`` with the numerics of a bf16 GEMM (bf16 operands, fp32 accumulation, bf16 result) computed
    by fp32 kernels, in the forward and in both backward products. Products of two bf16 numbers are exact
    in fp32, so this equals a hardware bf16 GEMM up to the order of the fp32 accumulation."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ar, br = bf16_round(a), bf16_round(b)
        ctx.save_for_backward(ar, br)
        return bf16_round(torch.matmul(ar, br))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ar, br = ctx.saved_tensors
        g = bf16_round(grad)
        return bf16_round(torch.matmul(g, br.transpose(-1, -2))), bf16_round(torch.matmul(ar.transpose(-1, -2), g))


def precise_matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``a @ b`` (batched like :func:`torch.matmul`) as float32 in a training precision.

    * ``fp32``: float32 products.
    * ``bf16``: bfloat16 operands and result (the fast path on CUDA and AMX CPUs, DESIGN §6); gradients flow
      to the float32 inputs through the casts.
    * ``bf16sim``: the bf16 numerics simulated with float32 kernels (:class:`_Bf16SimMatmul`), for checking
      bf16 accuracy on CPUs whose bf16 products are emulated and slow.
    """
    if precision == "fp32":
        return torch.matmul(a.float(), b.float())
    if precision == "bf16":
        return torch.matmul(a.to(torch.bfloat16), b.to(torch.bfloat16)).float()
    if precision == "bf16sim":
        return _Bf16SimMatmul.apply(a.float(), b.float())
    raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")


def matmul_scores(query: torch.Tensor, candidates: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Scores of every query against every candidate row: ``(..., B, 2d) x (..., N, 2d) -> (..., B, N)`` float32
    in the given precision (:func:`precise_matmul`)."""
    return precise_matmul(query, candidates.transpose(-1, -2), precision)


def stacked_scores(query: torch.Tensor, candidates: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``(M, B, 2d) x (M, N, 2d) -> (M, B, N)`` scores of M models at once (teachers), float32.

    Without autograd in fp32 this is one ``mm`` per model written into a preallocated output: on the
    2-core dev machine (MKL/oneDNN sgemm) a loop of ``mm`` is about 1.3x faster than ``bmm`` of the same
    shapes (benchmarks/speed.py). Elsewhere it is :func:`matmul_scores`.
    """
    if precision != "fp32" or (torch.is_grad_enabled() and (query.requires_grad or candidates.requires_grad)):
        return matmul_scores(query, candidates, precision)
    q, c = query.float(), candidates.float()
    # Written as (B, M, N) and returned as an (M, B, N) view: the policy's (B, M * N) state is then a free reshape.
    out = torch.empty(q.shape[1], q.shape[0], c.shape[1], dtype=torch.float32, device=q.device)
    for m in range(q.shape[0]):
        torch.mm(q[m], c[m].T, out=out[:, m])
    return out.permute(1, 0, 2)


def complex_modulus(x: torch.Tensor) -> torch.Tensor:
    """Element-wise complex modulus of ``[re | im]`` rows: ``(..., 2d) -> (..., d)``.

    The square is clamped at 1e-30 before the root so an exactly-zero entry (a feature row of zeros times
    its projection) has a zero gradient instead of ``0 * inf = NaN``; values change by at most 1e-15.
    """
    d = x.shape[-1] // 2
    return torch.sqrt((x[..., :d] ** 2 + x[..., d:] ** 2).clamp_min(1e-30))


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
        self.entity = nn.Parameter(torch.randn(num_entities, 2 * rank, generator=generator) * init_scale)
        self.relation = nn.Parameter(torch.randn(num_relations, 2 * rank, generator=generator) * init_scale)

    def query(self, head: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """Query vectors ``(B, 2d)`` for id tensors ``head, relation`` of shape ``(B,)``."""
        return complex_query(self.entity[head], self.relation[relation])

    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        """1-vs-all logits ``(B, stop - start)`` float32 for candidate ids ``[start, stop)``."""
        cand = self.entity if (start == 0 and stop is None) else self.entity[start:stop]
        return matmul_scores(self.query(head, relation), cand, precision)

    def score_triples(self, head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of individual triples (float32, no matmul)."""
        return (self.query(head, relation) * self.entity[tail]).sum(-1)

    def factors(self, head: torch.Tensor, relation: torch.Tensor,
                tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N3 factors: complex moduli of the head, relation and true-tail rows, each ``(B, d)``."""
        return (complex_modulus(self.entity[head]), complex_modulus(self.relation[relation]),
                complex_modulus(self.entity[tail]))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def n3_penalty(factors: tuple[torch.Tensor, ...], weight: float) -> torch.Tensor:
    """kbc N3: ``weight * sum_f sum |f|^3 / B`` (SPEC §2.3)."""
    batch = factors[0].shape[0]
    return weight * sum(f.abs().pow(3).sum() for f in factors) / batch


def f2_penalty(factors: tuple[torch.Tensor, ...], weight: float) -> torch.Tensor:
    """kbc F2: ``weight * sum_f sum f^2 / B``."""
    batch = factors[0].shape[0]
    return weight * sum(f.pow(2).sum() for f in factors) / batch
