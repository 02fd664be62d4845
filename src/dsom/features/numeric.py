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
import os
import warnings
from pathlib import Path

import numpy as np

from dsom.config import FeaturesConfig
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.data.readers import DataWarning, file_problem
from dsom.data.sidefiles import NumericFacts, read_numeric
from dsom.errors import DataError
from dsom.features.cache import FeatureCache, digest

__all__ = ["NumericFacts", "build_numeric", "read_numeric"]

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


def source(ds: KGDataset, fc: FeaturesConfig, cache: FeatureCache, force: bool,
           progress: bool) -> tuple[ModalityTable, bool | None]:
    """The registry's builder (:data:`dsom.features.build.SOURCES`): ``numeric.tsv`` of the dataset folder, cached
    by its bytes; whether the cache held it."""
    path = ds.root / "numeric.tsv" if ds.root is not None else None
    if path is None or not path.exists():
        raise DataError(f"dataset '{ds.name}' has no numeric.tsv, so there is no numeric modality; drop "
                        "'numeric' from modalities or give a file in features.files.numeric")
    problem = file_problem(path)
    if problem is not None:  # only a regular file is read (a FIFO would block forever)
        raise DataError(f"cannot read numeric.tsv: it is {problem}; a regular file is needed", path)
    key = digest(["numeric", fc.imputation, str(fc.seed), path.read_bytes(), *ds.entities.labels])
    return cache.get_or_build(ds.name, "numeric", key, lambda: build_numeric(ds, imputation=fc.imputation,
                                                                             seed=fc.seed), force=force)
