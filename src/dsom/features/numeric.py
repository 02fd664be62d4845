"""Numeric literal modality (DESIGN §4): ``numeric.tsv`` as a per-attribute normalised entity matrix.

``numeric.tsv`` has the header ``entity<TAB>attribute<TAB>value`` and any number of rows per entity.
The table built from it has one column per attribute (attribute names sorted as strings) and is
normalised LiteralE-style, with these documented choices:

* several values for the same (entity, attribute) are averaged first;
* each attribute is min-max scaled to [0, 1] over the entities that *have* it (LiteralE scales over
  the whole zero-filled matrix, which squashes e.g. years towards 1); an attribute whose values are all
  equal maps to 1.0, so that having it stays visible;
* an entity that has some attributes but not others gets 0 in the missing columns (LiteralE's fill);
* an entity with no numeric fact at all is ``present=False`` and its row is imputed by
  :meth:`ModalityTable.from_partial` (default N(0, 1) with a fixed seed, as MoSE does for images/text).

Rows whose entity is not in the dataset vocabulary are counted and skipped with a warning; a malformed
value raises :class:`dsom.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsom.data.graph import KGDataset
from dsom.data.readers import DataWarning, gc_paused, read_lines
from dsom.errors import DataError
from dsom.features.modality import ModalityTable

__all__ = ["NumericFacts", "build_numeric", "read_numeric"]

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
                cells = ln.split("\t")
                if len(cells) != 3:
                    raise DataError(f"expected 3 tab-separated fields (entity, attribute, value), got {len(cells)}: "
                                    f"{ln[:120]!r}", path, i)
                e, a, v = cells
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


def build_numeric(ds: KGDataset, path: str | os.PathLike[str] | None = None, imputation: str = "normal",
                  seed: int = 0, min_count: int = 1) -> ModalityTable:
    """Build the ``numeric`` modality of ``ds`` from ``numeric.tsv`` (default: in the dataset folder).

    Args:
        ds: the dataset (entity ids give the rows).
        path: the numeric file; default ``ds.root / "numeric.tsv"``.
        imputation: how rows of entities without any fact are filled (``normal``, ``zeros``, ``mean``).
        seed: seed of the ``normal`` imputation.
        min_count: drop attributes that fewer than this many entities have.

    Returns a :class:`ModalityTable` ``(E, A)`` whose ``columns`` are the kept attribute names (sorted)
    and whose ``present`` marks entities with at least one fact in a kept attribute.
    """
    if path is None:
        if ds.root is None:
            raise DataError(f"dataset '{ds.name}' has no folder, so there is no numeric.tsv to read; pass path=")
        path = Path(ds.root) / "numeric.tsv"
    path = Path(path)
    if not path.is_file():
        raise DataError("numeric.tsv not found: the numeric modality needs a file with the header "
                        "'entity<TAB>attribute<TAB>value'; drop the numeric modality or add the file", path)
    facts = read_numeric(path, ds.entities.index)
    if facts.unknown_rows:
        ex = ", ".join(f"'{x}'" for x in facts.unknown_entities[:3])
        warnings.warn(f"{path}: skipped {facts.unknown_rows} rows whose entity is not in the dataset "
                      f"({len(facts.unknown_entities)} distinct labels, e.g. {ex})", DataWarning, stacklevel=2)
    num_e, num_a = ds.num_entities, len(facts.attributes)
    # Mean over repeated (entity, attribute) facts.
    key = facts.entity * max(num_a, 1) + facts.attribute
    ukey, inv = np.unique(key, return_inverse=True)
    mean = np.bincount(inv, weights=facts.value, minlength=len(ukey)) / np.bincount(inv, minlength=len(ukey))
    ent, att = ukey // max(num_a, 1), ukey % max(num_a, 1)
    # Attribute support (distinct entities per attribute) and min_count filter.
    support = np.bincount(att, minlength=num_a)
    keep = support >= max(min_count, 1)
    if not keep.any():
        raise DataError(f"no attribute has facts for at least min_count={min_count} entities; lower min_count "
                        "or check that numeric.tsv uses this dataset's entity labels", path)
    new_col = np.cumsum(keep) - 1
    sel = keep[att]
    ent, att, mean = ent[sel], new_col[att[sel]], mean[sel]
    columns = [a for a, k in zip(facts.attributes, keep) if k]
    # Per-attribute min-max over the entities that have the attribute.
    lo = np.full(len(columns), np.inf)
    hi = np.full(len(columns), -np.inf)
    np.minimum.at(lo, att, mean)
    np.maximum.at(hi, att, mean)
    span = hi - lo
    norm = np.where(span[att] > 0, (mean - lo[att]) / np.where(span > 0, span, 1.0)[att], 1.0)
    features = np.zeros((num_e, len(columns)), dtype=np.float32)
    features[ent, att] = norm
    present = np.zeros(num_e, dtype=bool)
    present[ent] = True
    source = (f"numeric:{path} ({len(columns)} attributes, {int(present.sum())} entities, min-max per attribute, "
              f"min_count={min_count}, imputation={imputation}, seed={seed})")
    table = ModalityTable.from_partial("numeric", features, present, imputation=imputation, seed=seed, source=source)
    return dataclasses.replace(table, columns=columns)
