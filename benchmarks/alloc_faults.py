"""Page faults of a freed and re-allocated score block: does the C heap hand the same memory back?

    python benchmarks/alloc_faults.py --mb 51 --repeats 4

Allocates a block of ``--mb`` MB, touches every page, frees it, ``--repeats`` times, and prints the minor page faults
of each round for glibc's ``malloc``, ``posix_memalign`` with torch's 64-byte alignment and ``torch.empty``, after
:func:`dsom.perf.tune_allocator` (heap blocks up to 512 MB instead of mmap; unless ``--no-tune``). A small allocation
between rounds stands for everything else a training step allocates. A block that comes back from the heap costs no
fault; a fresh one costs one per 4 KB page; the time of each round (allocate, write every byte, free) shows what
they cost. Linux with glibc only.

Found with it (glibc 2.36, tuned): ``malloc`` gets its block back, ``posix_memalign(64)`` and ``torch.empty`` fault
every page of every round. glibc serves an aligned request of ``n`` bytes from ``n + 96``, frees the unused tail into
its per-thread cache (where it is never merged back), so the freed ``n``-byte block no longer fits the next request.
Run with ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0`` (a process-start setting) and all three reuse the block; in
dsom's training steps that setting did not remove the faults (``benchmarks/speed.py``, ``docs/performance.md``, tenth
session), so dsom does not set it.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time

import torch

from dsom.perf import tune_allocator


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=51.4, help="block size in MB (DB15K (1000, 12842) float32: 51.4)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--no-tune", action="store_true", help="leave glibc's thresholds as they are")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        p.error("this benchmark reads glibc's allocator: Linux only")
    tuned = False if args.no_tune else tune_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    n = int(args.mb * 1e6)

    def plain() -> None:
        ptr = libc.malloc(n)
        ctypes.memset(ptr, 1, n)
        libc.free(ptr)

    def aligned() -> None:
        ptr = ctypes.c_void_p()
        libc.posix_memalign(ctypes.byref(ptr), 64, n)
        ctypes.memset(ptr, 1, n)
        libc.free(ptr)

    def tensor() -> None:
        torch.empty(n // 4, dtype=torch.float32).fill_(1.0)

    out: dict[str, list[int]] = {}
    print(f"glibc {libc.gnu_get_libc_version().decode()}, tune_allocator applied: {tuned}, block {args.mb} MB "
          f"({n // 4096} pages)")
    for name, fn in (("malloc", plain), ("posix_memalign(64)", aligned), ("torch.empty", tensor)):
        counts, ms = [], []
        for _ in range(args.repeats):
            keep = libc.malloc(64)  # a small allocation between rounds, as a training step makes many
            f0, t0 = faults(), time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
            counts.append(faults() - f0)
            libc.free(keep)
        out[name] = counts
        print(f"{name:20s} faults per round: {' '.join(str(c) for c in counts)}; ms (allocate, fill, free): "
              f"{' '.join(f'{m:.1f}' for m in ms)}")
    return out


if __name__ == "__main__":
    main()
