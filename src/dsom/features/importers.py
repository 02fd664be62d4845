"""Import published feature files as a :class:`ModalityTable` (``.npy``, ``.pt``/``.pth``, pickled dicts).

Row order comes from, in this order of preference:

* the keys of a ``{label: vector}`` mapping (MoSE-style pickles, ``torch.save``'d dicts);
* an ``entity_order`` text file with one entity label per line (row i of the matrix = that entity);
* otherwise the matrix must have exactly one row per entity, in the dataset's id order.

Entities without a row are marked not present and imputed. Pickles are read with a restricted
unpickler that only rebuilds plain containers and numpy arrays; anything else is refused unless
``allow_pickle=True`` is passed (only for files you trust: unpickling can run arbitrary code).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.errors import DataError

__all__ = ["import_features", "read_feature_file"]

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_feature_file(path: str | Path, allow_pickle: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """A 2-D float array, or a ``{label: 1-D vector}`` mapping, from a feature file."""
    p = Path(path)
    if not p.is_file():
        raise DataError("feature file not found", p)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            obj: Any = np.load(p, allow_pickle=allow_pickle)
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=not allow_pickle)
        elif suffix in (".pkl", ".pickle"):
            data = p.read_bytes()
            obj = pickle.loads(data) if allow_pickle else _RestrictedUnpickler(io.BytesIO(data)).load()
        else:
            raise DataError(f"unsupported feature file type '{suffix}' (use .npy, .pt/.pth, .pkl/.pickle)", p)
    except DataError:
        raise
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{first}; the file holds objects other than arrays and plain containers: set "
                        "--set features.allow_pickle=true only if you trust it (unpickling can run code)", p) from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt/unsupported file
        text = str(exc).strip().splitlines()
        pickled = "allow_pickle" in str(exc) or "weights_only" in str(exc)
        hint = (" (pickled objects need --set features.allow_pickle=true; only for files you trust)"
                if pickled else "")
        raise DataError(f"cannot read feature file: {type(exc).__name__}: {text[0] if text else ''}{hint}",
                        p) from None
    return _normalise(obj, p)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _normalise(obj: Any, p: Path) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            arr = _as_array(v).reshape(-1) if not isinstance(v, (str, bytes)) else None
            if arr is None or not np.issubdtype(arr.dtype, np.number):
                raise DataError(f"entry {k!r} is not a numeric vector", p)
            out[str(k)] = arr.astype(np.float32)
        if not out:
            raise DataError("the feature mapping is empty", p)
        dims = {v.shape[0] for v in out.values()}
        if len(dims) != 1:
            raise DataError(f"vectors have different lengths {sorted(dims)[:5]}", p)
        if 0 in dims:
            raise DataError("the feature vectors are empty (dimension 0)", p)
        return out
    arr = _as_array(obj)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"expected a numeric matrix, got dtype {arr.dtype}", p)
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D matrix (entities x dim), got shape {arr.shape}", p)
    if 0 in arr.shape:
        raise DataError(f"the feature matrix is empty (shape {arr.shape}); it needs rows and at least one column", p)
    return arr.astype(np.float32)


def _read_order(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        labels = [line.rstrip("\r\n").split("\t")[0] for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read entity order file: {exc}", p) from None
    return [x for x in labels if x]


def import_features(ds: KGDataset, path: str | Path, name: str, entity_order: str | Path | None = None,
                    allow_pickle: bool = False, imputation: str = "normal", seed: int = 0) -> ModalityTable:
    """Read a feature file and align its rows to ``ds``'s entity ids (see module docstring)."""
    p = Path(path)
    obj = read_feature_file(p, allow_pickle)
    E = ds.num_entities
    if isinstance(obj, dict):
        labels, rows = list(obj.keys()), np.stack(list(obj.values()))
        where = p
    elif entity_order is not None:
        labels, rows, where = _read_order(entity_order), obj, Path(entity_order)
        if len(labels) != len(rows):
            raise DataError(f"{len(labels)} entity labels for a matrix with {len(rows)} rows ({p})", where)
    else:
        if obj.shape[0] != E:
            raise DataError(f"matrix has {obj.shape[0]} rows but the dataset has {E} entities; pass an entity "
                            "order file (one label per line) to align the rows", p)
        labels, rows, where = list(ds.entities.labels), obj, p
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"row {i} ({labels[i]!r}) holds NaN or Inf ({int(bad.sum())} such rows)", p)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise DataError(f"entity {label!r} appears twice (rows {seen[label]} and {i})", where)
        seen[label] = i
    index = ds.entities.index
    unknown = [x for x in labels if x not in index]
    if unknown:
        raise DataError(f"{len(unknown)} entities are not in dataset '{ds.name}' (e.g. "
                        f"{', '.join(repr(u) for u in unknown[:3])}); check the entity order", where)
    feats = np.zeros((E, rows.shape[1]), dtype=np.float32)
    present = np.zeros(E, dtype=bool)
    ids = np.fromiter((index[x] for x in labels), dtype=np.int64, count=len(labels))
    feats[ids] = rows
    present[ids] = True
    return ModalityTable.from_partial(name, feats, present, imputation=imputation, seed=seed,
                                      source=f"imported from {p}")
