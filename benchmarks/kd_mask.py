"""How the dtype of the neighbour mask changes the speed of NDKD's compiled kernels (the reason stage 2 builds its
mask as 0/1 bfloat16 on CPUs, :data:`dsom.distill.distiller.NEIGHBOUR_MASK_DTYPE`).

For each mask dtype: the median time of the split log-sum-exp (:func:`dsom.numerics.split_logsumexp`) and of NDKD's
forward (:func:`dsom.distill.losses.ndkd`) through ``torch.compile`` without autograd, the mask compared to 0 inside
the compiled function for the non-bool dtypes (as :func:`dsom.distill.distiller.kd_rows` does), on random logits;
and a training step's element-wise part: stage 2's :func:`dsom.distill.distiller.step_terms` (student CE, the
weighted teacher combination of ``--teachers`` bf16 logit blocks, NDKD) compiled, forward and backward to the
student's logits, as torch.compile's partitioner leaves it ("saved": it keeps the bool comparison of a float mask for
the backward) and as the distiller runs it ("recomputed": :func:`dsom.distill.distiller.mask_recomputed`).

    python benchmarks/kd_mask.py --threads 1
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kd_mask.py --threads 1   # the AVX2 code paths
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dsom.config import DistillConfig
from dsom.distill.distiller import mask_recomputed, step_terms
from dsom.distill.losses import ndkd
from dsom.numerics import split_logsumexp
from dsom.perf import isolate_compile_cache


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--entities", type=int, default=12842)
    p.add_argument("--density", type=float, default=0.001, help="fraction of neighbours in a row")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtypes", default="bool,bfloat16,float16,float32,uint8", help="mask dtypes, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    isolate_compile_cache()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch, args.entities, generator=g) * 3
    teacher = torch.randn(args.batch, args.entities, generator=g) * 3
    mask = torch.rand(args.batch, args.entities, generator=g) < args.density
    mask[:, 0] = True
    target = torch.zeros(args.batch, dtype=torch.long)
    tea_all = (torch.randn(args.teachers, args.batch, args.entities, generator=g) * 3).to(torch.bfloat16)
    weights = torch.rand(args.batch, args.teachers, generator=g)
    cfg = DistillConfig()
    out: dict[str, dict[str, float]] = {}
    print(f"B={args.batch}, E={args.entities}, {args.threads} thread(s), torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'mask dtype':<10} {'split lse ms':>12} {'NDKD ms':>9} {'train saved ms':>15} {'train recomputed ms':>20}")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        m = mask.to(dtype)

        def known(k: torch.Tensor) -> torch.Tensor:
            return k if k.dtype == torch.bool else k > 0

        split = torch.compile(lambda x, k: split_logsumexp(x, known(k)), dynamic=False)
        kd = torch.compile(lambda a, b, k: ndkd(a, b, known(k)), dynamic=False)
        with torch.no_grad():
            s = median_ms(lambda: split(student, m), args.repeats)  # noqa: B023 - called within the iteration
            n = median_ms(lambda: kd(teacher, student, m), args.repeats)  # noqa: B023
        leaf = student.clone().requires_grad_(True)
        train = []
        for fn in (step_terms, mask_recomputed(step_terms)):
            terms = torch.compile(fn, dynamic=False)

            def train_step(terms: Callable[..., dict[str, torch.Tensor]] = terms, m: torch.Tensor = m,
                           leaf: torch.Tensor = leaf) -> None:
                t = terms(leaf, tea_all, weights, target, m, cfg, True)
                (t["ce"] + t["kd"]).mean().backward()
                leaf.grad = None

            train.append(median_ms(train_step, args.repeats))
        name = str(dtype).removeprefix("torch.")
        out[name] = {"split_ms": s, "ndkd_ms": n, "train_saved_ms": train[0], "train_recomputed_ms": train[1]}
        print(f"{name:<10} {s:12.1f} {n:9.1f} {train[0]:15.1f} {train[1]:20.1f}")
    return out


if __name__ == "__main__":
    main()
