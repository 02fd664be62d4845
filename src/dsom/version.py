"""Environment report for bug reports (``dsom version``)."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch

from dsom import __version__
from dsom.perf import cpu_flags, cpuinfo


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flag_summary() -> str:
    """The flags that decide the fast path (AVX2, AVX-512, bf16 products, AMX)."""
    if cpuinfo("flags") is None:
        return "unknown"
    flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def environment() -> list[tuple[str, str]]:
    rows = [
        ("dsom", __version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("numpy", np.__version__),
        ("torch threads", str(torch.get_num_threads())),
        ("cpu count", str(os.cpu_count())),
        ("cpu", cpu_model()),
        ("cpu features", cpu_flag_summary()),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows.append(("cuda", str(torch.version.cuda)))
        for i in range(torch.cuda.device_count()):
            rows.append((f"gpu {i}", torch.cuda.get_device_name(i)))
    for mod in ("safetensors", "pykeen", "transformers", "sentence_transformers"):
        try:
            m = __import__(mod)
            rows.append((mod, getattr(m, "__version__", "installed")))
        except ImportError:
            rows.append((mod, "not installed"))
    for var in ("DSOM_DATA", "DSOM_CACHE"):
        rows.append((var, os.environ.get(var, "(unset)")))
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)
