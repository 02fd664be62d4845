"""Matrix products in a training precision, the one place where fp32/bf16 are chosen (DESIGN §6).

``fp32`` is the fast path on AVX2-only CPUs; ``bf16`` where the hardware multiplies bfloat16 natively
(AMX or AVX512-BF16 CPUs, CUDA); ``bf16sim`` simulates bf16 numerics with fp32 kernels for accuracy checks.
Every score product of every model goes through :func:`matmul_scores` or :func:`stacked_scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsom.perf import cpu_flags

PRECISIONS = ("bf16", "fp32", "bf16sim")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16). On AVX2-only CPUs a bf16
    product is emulated and runs several times *slower* than fp32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


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


def keep_bf16_shadow(x: torch.Tensor, shadow: torch.Tensor) -> None:
    """Record ``shadow`` as the bfloat16 copy of ``x`` as it is now (its storage and version); written by the
    optimizer's update (:class:`~dsom.train.optim.ShadowAdagrad`) so the next forward need not cast ``x`` again."""
    x._dsom_bf16_shadow = ((x.data_ptr(), x._version), shadow)  # type: ignore[attr-defined]


def bf16_shadow(x: torch.Tensor) -> torch.Tensor | None:
    """The bfloat16 copy recorded by :func:`keep_bf16_shadow`, if ``x`` has not been written since (same storage and
    version counter; ``load_state_dict``, ``copy_`` or any other in-place write makes it stale); else ``None``."""
    record = getattr(x, "_dsom_bf16_shadow", None)
    if record is None or record[0] != (x.data_ptr(), x._version):
        return None
    return record[1]


def cached_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bfloat16, cast once and kept as its shadow (:func:`keep_bf16_shadow`) until ``x`` is written again: for
    tensors that rarely change (a teacher's fixed feature matrix)."""
    shadow = bf16_shadow(x)
    if shadow is None:
        shadow = x.to(torch.bfloat16)
        keep_bf16_shadow(x, shadow)
    return shadow


def as_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bfloat16: its up-to-date shadow (:func:`bf16_shadow`) where there is one, else a cast. The shadow is
    not connected to ``x`` in autograd: for code that computes ``x``'s gradient itself (an autograd ``Function``)."""
    shadow = bf16_shadow(x)
    return shadow if shadow is not None else x.to(torch.bfloat16)


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


COLUMN_BLOCK_BYTES = 8 << 20  # the (rows, B) float32 block of :func:`column_scores` (DB15K, B = 1,000: 2,097 rows)
COLUMN_MIN_QUERIES = 64  # fewer queries: a plain ``q @ T^T`` (a thin product; nothing to gain from the layout)
COLUMN_MIN_ROWS = 256  # the fewest table rows per block
COLUMN_PAD = 8  # the block's width (queries) is a multiple of this: MKL's sgemm into rows of odd length is slow


def padded_width(n: int) -> int:
    """``n`` queries rounded up to a multiple of :data:`COLUMN_PAD` (the width of a ``(rows, W)`` score block)."""
    return -(-n // COLUMN_PAD) * COLUMN_PAD


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a product of ``tensors`` would be recorded by autograd (grad mode on and one of them requiring it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def padded_queries_t(query: torch.Tensor) -> torch.Tensor:
    """``query (P, 2d)`` as a contiguous ``(2d, W)`` product operand, ``W`` = P rounded up to a multiple of
    :data:`COLUMN_PAD`, the padded columns zero: ``table @ padded_queries_t(query)`` is the ``(N, W)`` score block
    whose first P columns are ``(query @ table^T)^T`` and whose others are 0.

    MKL's sgemm writing rows of a length that is not a multiple of 8 runs much slower: a DB15K rank-500 table
    (N = 12,842, 2d = 1,000) times 567 queries took 123.7 ms into ``(N, 567)`` and 76.2 ms into ``(N, 568)`` under the
    AVX2 emulation on a 2-core AMD EPYC (``benchmarks/gemm_layouts.py --queries 567 --dtypes float32``).
    Pair batches (``train.batching=pairs``) score a different, mostly unaligned, number of queries every step."""
    P, D = query.shape
    width = padded_width(P)
    if width == P:
        return query.T.contiguous()
    out = query.new_empty(D, width)
    out[:, P:] = 0
    out[:, :P] = query.T
    return out


def column_scores(query: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``query (B, 2d) @ table (N, 2d)^T`` as float32 ``(B, N)`` (written into ``out``, any strides, when given),
    computed as ``table @ query^T`` one block of table rows at a time, each ``(rows, B)`` block copied transposed into
    place. Without autograd (the caller's product needs no gradient through here, or computes its own).

    MKL's fp32 GEMM on AVX-512 and AVX2 CPUs without AMX runs the ``(N, B)`` product well above the ``(B, N)`` one, and
    the copies keep the ``(B, N)`` layout every reader of the scores expects: on a 2-core AMD EPYC one DB15K product
    (B = 1,000, N = 12,842, 2d = 1,000) into a ``(B, N)`` block takes 154-163 ms this way against 206-210 ms as
    ``q @ T^T`` under the AVX2 emulation, 153 against 212 ms with AVX-512 (``benchmarks/gemm_layouts.py --dtypes
    float32 --repeats 10``); a stage-2 step 1.15-1.29x faster (``benchmarks/score_layout.py``). The values are the same
    dot products; MKL may sum them in another order (float32 rounding).

    The queries are padded with zero rows to a multiple of :data:`COLUMN_PAD`: into a block whose row length is not a
    multiple of 8 MKL runs much slower (a DB15K rank-500 table, median of 8 under the AVX2 emulation: 839 queries 221 ms
    unpadded, 156 ms padded to 840, all 1,000 queries 178 ms; 517 queries 143 against 98 ms; the same with AVX-512:
    ``benchmarks/teacher_rows.py --widths``), and stage 2 scores a teacher on as many queries as chose it."""
    B, N = query.shape[0], table.shape[0]
    q, t = query.float(), table.float()
    if out is None:
        out = torch.empty(B, N, dtype=torch.float32, device=query.device)
    if B < COLUMN_MIN_QUERIES or query.device.type != "cpu":
        return torch.mm(q, t.T, out=out)
    width = padded_width(B)
    if width != B:  # zero queries up to a multiple of COLUMN_PAD: the block's rows stay aligned
        q = torch.cat([q, q.new_zeros(width - B, q.shape[1])])
    rows = max(COLUMN_MIN_ROWS, COLUMN_BLOCK_BYTES // (4 * width))
    block = torch.empty(min(rows, N), width, dtype=torch.float32, device=query.device)
    q_t = q.T
    for start in range(0, N, rows):
        n = min(rows, N - start)
        torch.mm(t[start:start + n], q_t, out=block[:n])
        out[:, start:start + n].copy_(block[:n, :B].T)
    return out


def matmul_scores(query: torch.Tensor, candidates: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Scores of every query against every candidate row: ``(..., B, 2d) x (..., N, 2d) -> (..., B, N)`` float32
    in the given precision (:func:`precise_matmul`). Without autograd, fp32 on a CPU, a single model's scores are
    :func:`column_scores` instead (:func:`~dsom.models.interaction.score_all`: a DB15K rank-500 test evaluation took
    2.84 s against 3.72 under the AVX2 emulation, 2.65 against 3.56 with AVX-512, on a 2-core AMD EPYC)."""
    return precise_matmul(query, candidates.transpose(-1, -2), precision)


def product_scores(query: torch.Tensor, candidates: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """:func:`matmul_scores` left in the product's dtype: bfloat16 under ``bf16`` (no float32 copy of the block and no
    cast of its gradient back, two passes over it per step; the consumer converts as it reads, inside a compiled
    function), float32 otherwise (``bf16sim``: bf16-rounded float32)."""
    if precision == "bf16":
        return torch.matmul(query.to(torch.bfloat16), candidates.to(torch.bfloat16).transpose(-1, -2))
    return matmul_scores(query, candidates, precision)


def stacked_scores(query: torch.Tensor, candidates: torch.Tensor, precision: str = "fp32",
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, B, 2d) x (M, N, 2d) -> (M, B, N)`` scores of M models at once (teachers), float32.

    Without autograd in fp32 this is one product per model written into a preallocated output: on the
    2-core dev machine (MKL/oneDNN sgemm) a loop of ``mm`` is about 1.3x faster than ``bmm`` of the same
    shapes (benchmarks/speed.py); on a CPU each is :func:`column_scores`. Elsewhere it is :func:`matmul_scores`.
    ``rows (M, B)`` bool (no autograd): model ``m`` scores only the queries ``rows[m]``, its other rows are zero
    (:func:`masked_rows`).
    """
    partial = rows is not None and not bool(rows.all())
    if partial and needs_autograd(query, candidates):
        raise ValueError("stacked_scores: rows= is for frozen models (no autograd)")
    if precision != "fp32" or needs_autograd(query, candidates):
        if not partial:
            return matmul_scores(query, candidates, precision)
        out = torch.empty(query.shape[0], query.shape[1], candidates.shape[1], dtype=torch.float32,
                          device=query.device)
        for m in range(query.shape[0]):
            masked_rows(out[m], rows[m], lambda idx, m=m: matmul_scores(query[m, idx], candidates[m], precision))
        return out
    q, c = query.float(), candidates.float()
    # Written as (B, M, N) and returned as an (M, B, N) view: the policy's (B, M * N) state is then a free reshape.
    out = torch.empty(q.shape[1], q.shape[0], c.shape[1], dtype=torch.float32, device=q.device)
    for m in range(q.shape[0]):
        if not partial:
            column_scores(q[m], c[m], out[:, m])
        else:
            masked_rows(out[:, m], rows[m], lambda idx, m=m: column_scores(q[m, idx], c[m]))
    return out.permute(1, 0, 2)


def masked_rows(out: torch.Tensor, rows: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Fill ``out (B, N)`` (any strides) with ``score(idx)``, the ``(n, N)`` scores of its rows ``idx`` where ``rows (B,)``
    is true, and zeros elsewhere: a frozen teacher whose weight is 0 on a row is not scored there (its product is the
    cost of stage 2; a zero row is finite, so ``0 * row`` in a weighted mean stays 0). All rows: one call, written in
    place; none: zeros only."""
    n = int(rows.sum())
    if n == len(rows):
        out.copy_(score(torch.arange(len(rows), device=rows.device)))
    elif n == 0:
        out.zero_()
    else:
        out.index_fill_(0, (~rows).nonzero().squeeze(1), 0.0)
        idx = rows.nonzero().squeeze(1)
        out.index_copy_(0, idx, score(idx).to(out.dtype))
    return out


@dataclass
class RowBlocks:
    """M frozen models' scores, each on some of B rows only: ``blocks[m]`` ``(n_m, N)`` holds model ``m``'s scores of
    its rows, and ``pos (M, B)`` long gives each row's place in ``blocks[m]``, ``-1`` where model ``m`` was not scored.
    Stage 2's teacher logits where a selector chose without reading them: no ``(M, B, N)`` block is written, and the
    compiled loss gathers the rows it reads (:func:`~dsom.distill.distiller.row_step_terms`)."""

    blocks: list[torch.Tensor]
    pos: torch.Tensor

    @classmethod
    def score(cls, rows: torch.Tensor, score: Callable[[int, torch.Tensor], torch.Tensor]) -> RowBlocks:
        """``rows (M, B)`` bool -> each model's ``score(m, idx)`` ``(n_m, N)`` on its rows ``idx``, in order."""
        pos = torch.full(rows.shape, -1, dtype=torch.long, device=rows.device)
        blocks = []
        for m in range(rows.shape[0]):
            idx = rows[m].nonzero().squeeze(1)
            pos[m, idx] = torch.arange(len(idx), device=rows.device)
            blocks.append(score(m, idx))
        return cls(blocks, pos)

    def rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, n, N)`` scores of the rows ``idx`` (``None``: all B) in the blocks' dtype, zeros where not scored."""
        pos = self.pos if idx is None else self.pos[:, idx]
        out = self.blocks[0].new_zeros(pos.shape[0], pos.shape[1], self.blocks[0].shape[1])
        for m, block in enumerate(self.blocks):
            have = (pos[m] >= 0).nonzero().squeeze(1)
            out[m, have] = block[pos[m, have]]
        return out
