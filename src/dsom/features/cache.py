"""Feature-table cache (DESIGN §4): ``$DSOM_CACHE`` (default ``~/.cache/dsom``), never the dataset folder.

A table is stored as ``<root>/<dataset>/<modality>-<key>.npz`` (features, present mask, column names;
no pickles) next to a ``.json`` with its source description. The key hashes the encoder identity and
the encoder inputs, so changing either builds a new table; ``force=True`` rebuilds anyway. Files are
written to a temporary name and renamed, so an interrupted build never leaves a broken cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from dsom.data.modality import ModalityTable
from dsom.errors import DataError

__all__ = ["FeatureCache", "cache_root", "digest"]


def cache_root() -> Path:
    return Path(os.environ.get("DSOM_CACHE") or Path.home() / ".cache" / "dsom").expanduser()


def digest(parts: Iterable[str | bytes]) -> str:
    """Short SHA-256 of a sequence of strings/bytes (order-sensitive, unambiguous separators)."""
    h = hashlib.sha256()
    for part in parts:
        b = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


class FeatureCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    def path(self, dataset: str, modality: str, key: str) -> Path:
        return self.root / _safe(dataset) / f"{_safe(modality)}-{_safe(key)}.npz"

    def load(self, dataset: str, modality: str, key: str) -> ModalityTable | None:
        p = self.path(dataset, modality, key)
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                columns = [str(c) for c in z["columns"]] if "columns" in z else None
                meta = json.loads(p.with_suffix(".json").read_text(encoding="utf-8"))
                return ModalityTable(modality, z["features"], z["present"], source=meta.get("source", ""),
                                     columns=columns)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"corrupt feature cache entry ({exc}); delete it or rebuild with --force", p) from None

    def save(self, dataset: str, table: ModalityTable, key: str) -> Path:
        p = self.path(dataset, table.name, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        arrays = {"features": table.features, "present": table.present}
        if table.columns is not None:
            arrays["columns"] = np.array(table.columns, dtype=str)
        np.savez(tmp, **arrays)
        meta_tmp = p.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps({"modality": table.name, "source": table.source, "key": key,
                                        "shape": list(table.features.shape), "present": int(table.present.sum())},
                                       indent=2), encoding="utf-8")
        os.replace(meta_tmp, p.with_suffix(".json"))
        os.replace(tmp, p)
        return p

    def get_or_build(self, dataset: str, modality: str, key: str, build: Callable[[], ModalityTable],
                     force: bool = False) -> tuple[ModalityTable, bool]:
        """The cached table, or ``build()``'s result stored under ``key``; returns (table, was_cached)."""
        if not force:
            hit = self.load(dataset, modality, key)
            if hit is not None:
                return hit, True
        table = build()
        self.save(dataset, table, key)
        return table, False
