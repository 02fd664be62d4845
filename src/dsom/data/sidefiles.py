"""Readers of the optional side files of a dataset folder (DESIGN §3): ``numeric.tsv`` and ``images.tsv``.

They parse and validate (unknown entities counted, malformed lines named, image paths confined to the dataset
folder); turning the parsed rows into feature tables is ``dsom.features``' job.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsom.data.graph import KGDataset
from dsom.data.readers import DataWarning, gc_paused, read_lines, three_cells
from dsom.errors import DataError, DsomError

__all__ = ["HEADER", "ImageList", "NumericFacts", "read_images_tsv", "read_numeric", "regular_file"]

HEADER = ("entity", "attribute", "value")


@dataclass
class NumericFacts:
    """Parsed rows of a ``numeric.tsv`` whose entity is known (parallel arrays)."""

    entity: np.ndarray  # (n,) int64 entity ids
    attribute: np.ndarray  # (n,) int64 index into ``attributes``
    value: np.ndarray  # (n,) float64
    attributes: list[str]  # sorted attribute names (of the known-entity rows)
    rows: int  # data rows in the file (blank lines excluded)
    unknown_rows: int  # rows skipped because the entity label is not in the vocabulary
    unknown_entities: list[str]  # distinct unknown labels, in file order

    @property
    def num_entities(self) -> int:
        """Distinct entities with at least one fact."""
        return int(len(np.unique(self.entity)))


def read_numeric(path: str | os.PathLike[str], entity_index: Mapping[str, int]) -> NumericFacts:
    """Parse ``numeric.tsv``; rows with unknown entity labels are counted, not returned (no warning here)."""
    path = Path(path)
    with gc_paused():
        lines = read_lines(path)
        if not lines:
            raise DataError("empty file; expected the header 'entity<TAB>attribute<TAB>value' and one fact per line",
                            path, 1)
        if tuple(c.strip() for c in lines[0].split("\t")) != HEADER:
            raise DataError(f"first line must be the header 'entity<TAB>attribute<TAB>value', got {lines[0][:80]!r}",
                            path, 1)
        body = lines[1:]
        rows = [ln.split("\t") for ln in body]
        vals: np.ndarray | None = None
        if all(len(r) == 3 for r in rows):
            ents = [r[0] for r in rows]
            attrs = [r[1] for r in rows]
            try:
                vals = np.array([r[2] for r in rows], dtype=np.float64)
            except ValueError:
                vals = None
            if vals is not None and ("" in attrs or not np.isfinite(vals).all()):
                vals = None
        if vals is None:
            ents, attrs, vlist = [], [], []
            for i, ln in enumerate(body, start=2):
                if not ln.strip():
                    continue
                e, a, v = three_cells(ln, path, i, "entity, attribute, value")
                if not a.strip():
                    raise DataError("empty attribute name; give every fact an attribute", path, i)
                try:
                    x = float(v)
                except ValueError:
                    raise DataError(f"value '{v[:40]}' is not a decimal number (dates must be fractional years)",
                                    path, i) from None
                if not math.isfinite(x):
                    raise DataError(f"value '{v[:40]}' is not finite; remove the row or give a real number", path, i)
                ents.append(e)
                attrs.append(a)
                vlist.append(x)
            vals = np.array(vlist, dtype=np.float64)
        ids = np.array([entity_index.get(e, -1) for e in ents], dtype=np.int64)
    known = ids >= 0
    unknown = [] if known.all() else list(dict.fromkeys(e for e, k in zip(ents, known) if not k))
    kept_attrs = [a for a, k in zip(attrs, known) if k] if not known.all() else attrs
    names = sorted(set(kept_attrs))
    col = {a: j for j, a in enumerate(names)}
    return NumericFacts(entity=ids[known], attribute=np.array([col[a] for a in kept_attrs], dtype=np.int64),
                        value=vals[known], attributes=names, rows=len(ents), unknown_rows=int((~known).sum()),
                        unknown_entities=unknown)


@dataclass
class ImageList:
    """Image paths per entity id (file order kept) and the rows that named unknown entities."""

    paths: dict[int, list[Path]]
    unknown_rows: int


def read_images_tsv(ds: KGDataset, path: str | Path | None = None, warn: bool = True,
                    allow_outside: bool = False) -> ImageList:
    """Parse ``images.tsv`` (header ``entity<TAB>path``; paths relative to the dataset folder).

    A path that is absolute or that resolves (symlinks followed) outside the folder of ``images.tsv`` is a
    :class:`DataError` naming its line, unless ``allow_outside`` (``features.allow_outside_paths``)."""
    if path is None:
        if ds.root is None:
            raise DsomError(f"dataset '{ds.name}' has no folder, so no images.tsv")
        path = ds.root / "images.tsv"
    p = Path(path)
    if not p.exists():
        raise DsomError(f"{p} not found: the image modality needs an images.tsv (entity<TAB>path)")
    lines = read_lines(p)
    if not lines or lines[0].split("\t")[:2] != ["entity", "path"]:
        raise DataError("expected the header 'entity<TAB>path'", p, 1)
    index = ds.entities.index
    out: dict[int, list[Path]] = {}
    unknown = 0
    root = p.parent.resolve()
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"expected 2 tab-separated columns, found {len(parts)}", p, n)
        if parts[0] not in index:
            unknown += 1
            continue
        image = p.parent / parts[1]
        if not allow_outside:
            check_inside(root, parts[1], image, p, n)
        out.setdefault(index[parts[0]], []).append(image)
    if unknown and warn:
        warnings.warn(f"{p}: {unknown} rows name entities not in the dataset; skipped", DataWarning, stacklevel=2)
    return ImageList(out, unknown)


def check_inside(root: Path, given: str, image: Path, listing: Path, line: int) -> None:
    hint = "image paths must be relative to the dataset folder (features.allow_outside_paths=true allows others)"
    if Path(given).is_absolute():
        raise DataError(f"image path {given!r} is absolute; {hint}", listing, line)
    try:
        resolved = image.resolve()
    except (OSError, RuntimeError):  # a symlink loop: left to the reader, which skips and counts it
        return
    if not resolved.is_relative_to(root):
        raise DataError(f"image path {given!r} leads outside the dataset folder {root}; {hint}", listing, line)


def regular_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False
