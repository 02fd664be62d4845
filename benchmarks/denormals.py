"""Time per call of the CE / KD / NDKD tails on normal and on sharpened logits (issue 12, item 5).

A sharp model puts most of a row's logits far below its maximum; without care, their exponentials are fp32
denormals or underflow, and a vectorised ``exp`` is many times slower there. ``--sharpen 50`` multiplies the
same random logits by 50. A regression shows as a sharpened/normal ratio well above 1.

    python benchmarks/denormals.py --batch 1000 --entities 12842 --threads 1

Each case is forward + backward of one loss on a ``(B, E)`` block, best of ``--repeats`` calls after a warm-up.
``--compile`` also times the stage-2 tail through ``torch.compile`` (as ``train.compile`` does).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsom.distill.losses import ndkd, per_query_ce, vanilla_kd


def _cases(zt: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "F.cross_entropy": lambda zs: F.cross_entropy(zs, t),
        "per_query_ce": lambda zs: per_query_ce(zs, t).mean(),
        "ndkd": lambda zs: ndkd(zt, zs, mask, 4.0).mean(),
        "vanilla_kd": lambda zs: vanilla_kd(zt, zs, 4.0).mean(),
    }
    try:  # dsom.numerics exists from issue 12 on; the benchmark also runs against older checkouts
        from dsom.numerics import cross_entropy

        cases["dsom cross_entropy"] = lambda zs: cross_entropy(zs, t).mean()
    except ImportError:
        pass
    try:  # the tails of dsom.models.fused (log-sum-exp forward, softmax recomputed in the backward)
        from dsom.models.fused import _lse_eager as _lse
        from dsom.models.fused import _softmax_grad_eager as _softmax_grad

        class _Tails(torch.autograd.Function):
            @staticmethod
            def forward(ctx, s):  # type: ignore[no-untyped-def]
                lse = _lse(s)
                ctx.save_for_backward(s, lse)
                return lse.sum()

            @staticmethod
            def backward(ctx, g):  # type: ignore[no-untyped-def]
                s, lse = ctx.saved_tensors
                return _softmax_grad(s, lse, g.expand(len(s)))

        cases["fused CE tails"] = lambda zs: _Tails.apply(zs)
    except ImportError:
        pass
    return cases


def time_call(fn: Callable[[torch.Tensor], torch.Tensor], zs: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats + 1):
        x = zs.detach().clone().requires_grad_()
        t0 = time.perf_counter()
        fn(x).backward()
        dt = time.perf_counter() - t0
        if i > 0:
            best = min(best, dt)
    return best


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--entities", type=int, default=12842, help="DB15K: 12,842")
    p.add_argument("--sharpen", type=float, default=50.0, help="factor applied to the logits for the sharp case")
    p.add_argument("--neighbours", type=int, default=8, help="neighbour-set size per query for NDKD")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="also time the losses through torch.compile")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, E = args.batch, args.entities
    # logits with the spread of a trained ComplEx (std ~3); the teacher is a noisy copy of the student
    zs = torch.randn(B, E, generator=g) * 3
    zt = zs + torch.randn(B, E, generator=g)
    t = torch.randint(0, E, (B,), generator=g)
    mask = torch.zeros(B, E, dtype=torch.bool)
    mask[torch.arange(B).repeat_interleave(args.neighbours), torch.randint(0, E, (B * args.neighbours,), generator=g)] = True
    mask[torch.arange(B), t] = True
    results: dict[str, dict[str, float]] = {}
    print(f"B={B}, E={E}, threads {torch.get_num_threads()}, sharpened = logits x {args.sharpen:g}; "
          f"seconds per forward+backward call (best of {args.repeats})")
    print(f"{'loss':<22} {'normal s':>9} {'sharp s':>9} {'ratio':>6}")
    for compiled in ([False, True] if args.compile else [False]):
        for name, fn in _cases(zt, t, mask).items():
            run = fn
            if compiled:
                run = torch.compile(fn, dynamic=False)
                name = f"{name} (compiled)"
            normal = time_call(run, zs, args.repeats)
            # the teacher is sharpened with the student: both distributions are peaked
            sharp_fn = _cases(zt * args.sharpen, t, mask)[name.removesuffix(" (compiled)")]
            if compiled:
                sharp_fn = torch.compile(sharp_fn, dynamic=False)
            sharp = time_call(sharp_fn, zs * args.sharpen, args.repeats)
            results[name] = {"normal_s": normal, "sharp_s": sharp}
            print(f"{name:<22} {normal:9.4f} {sharp:9.4f} {sharp / normal:6.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
