"""The three matrix products of a 1-vs-all training step, timed alone in bf16 and fp32 (issue 12: do the backward
products run at the forward's speed?).

    python benchmarks/gemm_layouts.py --queries 1000 --entities 12842 --dim 1000

``fwd``: scores ``q @ T^T``; ``dq``: ``G @ T``; ``dT``: ``G^T @ q`` (as the backward computes them), plus two
alternative layouts of ``dT``, and the three products of the transposed ``(E, P)`` score layout, its forward also with
the queries copied transposed (contiguous) and padded to a multiple of 8 columns (the training step's operand; try an
unaligned ``--queries 567``). In float32 also the
products written into preallocated blocks, as stage 2 writes them: the forward as ``q @ T^T`` and as dsom's
:func:`~dsom.models.products.column_scores` (``T @ q^T`` by blocks of table rows copied transposed into the ``(P, E)``
block) and by blocks of queries (not used), the table gradient as ``G^T @ q`` and by blocks of ``G``'s columns. Best of ``--repeats``
calls after a warm-up; TFLOP/s = ``2 P E D / seconds``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dsom.models.products import column_scores, padded_queries_t
from dsom.perf import tune_allocator


def best_of(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


COLUMN_ROWS = 2048  # rows per block of the blocked table gradient


def _blocked_grad(G: torch.Tensor, q: torch.Tensor, out: torch.Tensor, rows: int) -> torch.Tensor:
    """``G^T @ q`` one block of G's columns at a time, each copied into a contiguous ``(rows, P)`` buffer first."""
    buf = torch.empty(rows, G.shape[0], dtype=G.dtype)
    for s in range(0, G.shape[1], rows):
        n = min(rows, G.shape[1] - s)
        buf[:n].copy_(G[:, s:s + n].T)
        torch.mm(buf[:n], q, out=out[s:s + n])
    return out


QUERY_COLUMNS = 160  # queries per block of the query-blocked forward (an (E, 160) float32 block: about 8 MB on DB15K)


def _query_blocked_scores(q: torch.Tensor, T: torch.Tensor, out: torch.Tensor, width: int) -> torch.Tensor:
    """``q @ T^T`` as ``T @ q_blk^T`` one block of ``width`` queries at a time, each ``(E, width)`` block copied
    transposed into whole rows of ``out`` (a contiguous destination, unlike :func:`column_scores`' column slices)."""
    block = torch.empty(T.shape[0], width, dtype=out.dtype)
    for r in range(0, q.shape[0], width):
        k = min(width, q.shape[0] - r)
        torch.mm(T, q[r:r + k].T, out=block[:, :k])
        out[r:r + k].copy_(block[:, :k].T)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--entities", type=int, default=12842)
    p.add_argument("--dim", type=int, default=1000, help="2d (the rows' real width)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes to time")
    args = p.parse_args(argv)
    tune_allocator()  # as in training: blocks reused from the heap where glibc allows
    P, E, D = args.queries, args.entities, args.dim
    out: dict[str, float] = {}
    print(f"P={P}, E={E}, 2d={D}, threads {torch.get_num_threads()}")
    for dt in (getattr(torch, name) for name in args.dtypes.split(",")):
        q, T, G = torch.randn(P, D).to(dt), torch.randn(E, D).to(dt), torch.randn(P, E).to(dt)
        Gt = G.T.contiguous()  # the gradient block of (E, P) scores
        cases: dict[str, Callable[[], torch.Tensor]] = {
            "fwd q @ T^T": lambda q=q, T=T: q @ T.T, "dq G @ T": lambda G=G, T=T: G @ T,
            "dT G^T @ q": lambda G=G, q=q: G.T @ q, "dT^T q^T @ G": lambda G=G, q=q: q.T @ G,
            "dT (G^T copied) @ q": lambda G=G, q=q: G.T.contiguous() @ q,
            # the (E, P) layout (models/fused.py, transposed=True): scores T @ q^T, then Gt^T @ T and Gt @ q
            "(E,P) fwd T @ q^T": lambda q=q, T=T: T @ q.T, "(E,P) dq Gt^T @ T": lambda Gt=Gt, T=T: Gt.T @ T,
            "(E,P) dT Gt @ q": lambda Gt=Gt, q=q: Gt @ q,
            # the training step's forward (models/fused.py): the queries copied transposed, padded to a multiple of 8
            "(E,P) fwd T @ q^T copied": lambda q=q, T=T: T @ q.T.contiguous(),
            "(E,P) fwd T @ padded q^T": lambda q=q, T=T: T @ padded_queries_t(q)}
        if dt == torch.float32:  # the (P, E) scores and table gradient written into preallocated blocks
            S, dT = torch.empty(P, E), torch.empty(E, D)
            cases.update({
                "fwd q @ T^T into S": lambda q=q, T=T, S=S: torch.mm(q, T.T, out=S),
                # dsom's column_scores: T @ q^T by blocks of table rows, each copied transposed into S
                "fwd column blocks into S": lambda q=q, T=T, S=S: column_scores(q, T, S),
                # the alternative not taken: blocks of queries, each copied into whole rows of S
                "fwd query blocks into S": lambda q=q, T=T, S=S: _query_blocked_scores(q, T, S, QUERY_COLUMNS),
                "dT G^T @ q into dT": lambda G=G, q=q, dT=dT: torch.mm(G.T, q, out=dT),
                # the alternative not taken: blocks of G's columns copied to rows, then (rows, P) @ q
                "dT column blocks": lambda G=G, q=q, dT=dT: _blocked_grad(G, q, dT, COLUMN_ROWS)})
        for name, fn in cases.items():
            s = best_of(fn, args.repeats)
            out[f"{dt} {name}"] = s
            print(f"{str(dt).removeprefix('torch.'):9s} {name:26s} {s * 1e3:8.1f} ms {2 * P * E * D / s / 1e12:6.2f} TFLOP/s")
    return out


if __name__ == "__main__":
    main()
