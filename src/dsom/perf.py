"""Process-level CPU tuning and optional ``torch.compile`` of the element-wise losses.

PyTorch's large CPU temporaries (a ``B x E`` score block is tens of MB) exceed glibc's mmap threshold, so
every batch maps, page-faults and unmaps them again. Raising the threshold and the trim threshold keeps
them in the heap: about 30% faster training steps and 2x faster evaluation on the 2-core dev machine
(``benchmarks/complex_epoch.py``). Set ``DSOM_NO_MALLOPT=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MB = 512  # blocks up to this size are reused from the heap (WN18 (M, B, E) stacks: 491 MB)
TRIM_THRESHOLD_MB = 512  # free memory kept at the top of the heap before it is returned to the system


def cpuinfo(field: str) -> str | None:
    """The value of ``field`` (e.g. ``flags``, ``model name``) of the first CPU in ``/proc/cpuinfo``; ``None``
    where there is no such file or field (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where unknown)."""
    return set((cpuinfo("flags") or "").split())


def set_deterministic(on: bool, device_type: str = "cpu") -> None:
    """``train.deterministic``: ask torch for run-to-run reproducible kernels (``torch.use_deterministic_algorithms``).
    On CUDA it only warns where an op has no deterministic kernel (cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG``,
    set here when CUDA has not started yet)."""
    if on and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=device_type == "cuda")
    # torch would otherwise fill every torch.empty with NaN in this mode: a B x E write per score block, for
    # buffers dsom always overwrites
    torch.utils.deterministic.fill_uninitialized_memory = False


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; returns whether it was applied."""
    if os.environ.get("DSOM_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_mb = int(os.environ.get("DSOM_MMAP_THRESHOLD_MB", MMAP_THRESHOLD_MB))
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_mb << 20) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MB << 20) == 1 and ok
        return bool(ok)
    except (OSError, AttributeError):
        return False


def device_is_host(device: torch.device) -> bool:
    """Whether tensors on ``device`` live in the host's memory (a CPU). There a step may read a tensor's values or a
    data-dependent size (``nonzero``, ``.item()``) to save work; elsewhere each such read makes the host wait for the
    device (a sync) and is something a CUDA graph cannot hold, so the GPU code paths avoid them
    (``benchmarks/host_reads.py`` lists what is left). Called through the module (``perf.device_is_host``), so a test
    can run the GPU paths on a CPU."""
    return device.type == "cpu"


PROFILE_PREFIX = "dsom:"


def _profiling() -> bool:
    """Whether a ``torch.profiler`` (or ``torch.autograd.profiler``) session is recording on this thread."""
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


class MaybeCompiled:
    """``fn`` through ``torch.compile`` (dynamic shapes, so the short last batch does not recompile), falling back
    to eager ``fn`` with a warning if compilation fails (for example without a C++ compiler on CPU).

    The first call compiles: about 20 s on the 2-core dev machine for the NDKD loss. ``enabled=False`` is eager.

    While ``torch.profiler`` records, each compiled call runs inside a range named :attr:`label`
    (``dsom:<function name>``), so a profile can name the compiled graphs it calls (``## Call CompiledFxGraph <hash>``
    otherwise); ``benchmarks/speed.py`` reads it (``compiled_graph_labels``). Without a profiler nothing is added.

    Shapes are traced without "duck sizing" (``torch.fx.experimental._config.use_duck_shape``): with it, dims that
    happen to be equal in the first call are assumed equal for good, and the first later call where they differ
    compiles again. A pair batch of exactly 1,000 queries at rank 500 (2d = 1,000) made the next DB15K step recompile
    (3.5 s instead of 0.28: ``benchmarks/speed.py``'s timed steps, docs/performance.md).
    """

    def __init__(self, fn: Callable[..., Any], enabled: bool) -> None:
        self.fn = fn
        self.enabled = enabled
        self.label = f"{PROFILE_PREFIX}{getattr(fn, '__name__', type(fn).__name__)}"
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            isolate_compile_cache()
            self._compiled = torch.compile(self.fn, dynamic=True)
        duck = fx_config.use_duck_shape
        fx_config.use_duck_shape = False  # see the class docstring; set around the call only (3 us), not for the process
        try:
            if _profiling():
                with torch.profiler.record_function(self.label):
                    return self._compiled(*args, **kwargs)
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            if not _is_compile_failure(exc):
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "running eagerly (set train.compile=off to skip the attempt)", stacklevel=2)
            self.enabled = False
            return self.fn(*args, **kwargs)
        finally:
            fx_config.use_duck_shape = duck


def compile_cache_dir(isa: str, base: str | None = None) -> str:
    """The inductor cache folder dsom uses for vector ISA ``isa``: ``<inductor's default>/dsom-<isa>``."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", isa.strip()) or "none"
    return os.path.join(base or default_cache_dir(), f"dsom-{name}")


def isolate_compile_cache() -> str:
    """Give every vector ISA its own inductor cache folder: ``<folder>/dsom-<isa>``, where ``<folder>`` is
    ``TORCHINDUCTOR_CACHE_DIR`` if the user (or an outer tool) set it, else inductor's default.

    torch 2.13's FX-graph cache key leaves out the ISA the kernels were generated for, while the cached C++ is
    rebuilt with the current ISA's flags: a graph cached under AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or an AVX2 machine
    sharing the folder, e.g. a cluster's nodes sharing a home directory) and loaded on an AVX-512 CPU steps 8 floats
    per 16-float store and writes past its buffers (heap corruption: "double free or corruption" in stage 2, aborts in
    the test suite, "corrupted size vs. prev_size" in a benchmark whose runs set one folder for both ISAs); the other
    way round it would leave half of each row unwritten. Idempotent: a folder already named ``dsom-<isa>`` is kept.
    Returns the folder set."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    base = os.path.normpath(current) if current is not None else default_cache_dir()
    if os.path.basename(base).startswith("dsom-"):  # already one ISA's folder: its parent is the base
        base = os.path.dirname(base)
    folder = compile_cache_dir(str(pick_vec_isa()), base)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def _is_compile_failure(exc: Exception) -> bool:
    mod = type(exc).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or isinstance(exc, (OSError, RuntimeError)) and (
        "compile" in str(exc).lower() or "inductor" in str(exc).lower())


def compile_enabled(setting: str, device_type: str, cells: int) -> bool:
    """Resolve ``train.compile``: ``on``/``off``, or ``auto`` = on for CUDA and for CPU score blocks of at least
    4M cells (B x E; real benchmarks, where fusion pays for the compile time), off for small graphs."""
    if setting in ("on", "off"):
        return setting == "on"
    if setting != "auto":
        raise ValueError(f"train.compile={setting!r}; choose auto, on or off")
    return device_type == "cuda" or cells >= 4_000_000


def release_memory() -> bool:
    """Return free heap pages to the system (glibc ``malloc_trim(0)``, which also releases free pages in the
    middle of the heap). Called at epoch ends: a safety net against fragmentation by long-lived small tensors."""
    if os.environ.get("DSOM_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
