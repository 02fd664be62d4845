"""How the dtype of the neighbour mask changes the speed of NDKD's compiled kernels (the reason stage 2 builds its
mask as 0/1 bfloat16 on CPUs, :data:`dsom.distill.distiller.NEIGHBOUR_MASK_DTYPE`).

For each mask dtype: the median time of the split log-sum-exp (:func:`dsom.numerics.split_logsumexp`) and of NDKD's
forward (:func:`dsom.distill.losses.ndkd`) through ``torch.compile``, the mask compared to 0 inside the compiled
function for the non-bool dtypes (as :func:`dsom.distill.distiller.kd_rows` does), on random logits.

    python benchmarks/kd_mask.py --threads 1
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kd_mask.py --threads 1   # the AVX2 code paths
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    isolate_compile_cache()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch, args.entities, generator=g) * 3
    teacher = torch.randn(args.batch, args.entities, generator=g) * 3
    mask = torch.rand(args.batch, args.entities, generator=g) < args.density
    mask[:, 0] = True
    out: dict[str, dict[str, float]] = {}
    print(f"B={args.batch}, E={args.entities}, {args.threads} thread(s), torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'mask dtype':<10} {'split lse ms':>12} {'NDKD ms':>9}")
    for dtype in (torch.bool, torch.bfloat16, torch.float16, torch.float32, torch.uint8):
        m = mask.to(dtype)

        def known(k: torch.Tensor) -> torch.Tensor:
            return k if k.dtype == torch.bool else k > 0

        split = torch.compile(lambda x, k: split_logsumexp(x, known(k)), dynamic=False)
        kd = torch.compile(lambda a, b, k: ndkd(a, b, known(k)), dynamic=False)
        with torch.no_grad():
            s = median_ms(lambda: split(student, m), args.repeats)  # noqa: B023 - called within the iteration
            n = median_ms(lambda: kd(teacher, student, m), args.repeats)  # noqa: B023
        name = str(dtype).removeprefix("torch.")
        out[name] = {"split_ms": s, "ndkd_ms": n}
        print(f"{name:<10} {s:12.1f} {n:9.1f}")
    return out


if __name__ == "__main__":
    main()
