"""Build (or load from the cache) the feature table of one modality as configured (DESIGN §4).

Used by ``dsom features`` and by the pipeline before the teachers are trained. A modality is built from
a file listed in ``features.files`` if there is one, else from the source registered under its name in
:data:`SOURCES` (``text``, ``image``, ``numeric``). Adding a built-in modality is one module with a
``source(ds, fc, cache, force, progress) -> (table, cached)`` function plus one line in :data:`SOURCES`.
The ``missing_rate`` study (SPEC §7) is applied last, on the cached table, so changing it never re-encodes
anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dsom.config import FeaturesConfig
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable, apply_missing_rate
from dsom.errors import ConfigError
from dsom.features import image, numeric, text
from dsom.features.cache import FeatureCache
from dsom.features.importers import import_features

Builder = Callable[[KGDataset, FeaturesConfig, FeatureCache, bool, bool], "tuple[ModalityTable, bool | None]"]


@dataclass(frozen=True)
class ModalitySource:
    """A built-in modality: its builder and the seed offset of the entities it hides in the missing-rate study
    (each modality hides an independent sample, SPEC §7 step 1)."""

    build: Builder
    missing_offset: int


#: the built-in modalities, by name (``structure`` needs no features and is not listed)
SOURCES: dict[str, ModalitySource] = {
    "text": ModalitySource(text.source, missing_offset=1),
    "image": ModalitySource(image.source, missing_offset=2),
    "numeric": ModalitySource(numeric.source, missing_offset=3),
}
IMPORTED_MISSING_OFFSET = 7  # a modality from a file in features.files


def missing_offset(name: str) -> int:
    return SOURCES[name].missing_offset if name in SOURCES else IMPORTED_MISSING_OFFSET


def with_missing_rate(table: ModalityTable, name: str, fc: FeaturesConfig) -> ModalityTable:
    """``table`` with ``features.missing_rate`` of its entities hidden (unchanged at rate 0)."""
    if fc.missing_rate <= 0:
        return table
    return apply_missing_rate(table, fc.missing_rate, seed=fc.missing_seed + missing_offset(name),
                              imputation=fc.imputation)


@dataclass
class BuiltTable:
    table: ModalityTable
    cached: bool | None  # None when the builder manages the cache itself
    seconds: float


def build_modality(ds: KGDataset, name: str, fc: FeaturesConfig, cache: FeatureCache | None = None,
                   force: bool = False, progress: bool = True) -> BuiltTable:
    """The feature table of modality ``name`` for ``ds`` (imputed, with its ``present`` mask)."""
    cache = cache or FeatureCache()
    t0 = time.perf_counter()
    cached: bool | None = None
    if name in fc.files:
        spec = fc.files[name]
        path, order = (spec.get("path"), spec.get("entity_order")) if isinstance(spec, dict) else (spec, None)
        if not path:
            raise ConfigError(f"features.files.{name}: give a path (or a mapping with 'path' and 'entity_order')")
        table = import_features(ds, path, name, entity_order=order, allow_pickle=fc.allow_pickle,
                                imputation=fc.imputation, seed=fc.seed)
    elif name in SOURCES:
        table, cached = SOURCES[name].build(ds, fc, cache, force, progress)
    else:
        raise ConfigError(f"modality '{name}' has no built-in source ({', '.join(SOURCES)}); "
                          f"give its feature file with --set features.files.{name}=PATH")
    return BuiltTable(with_missing_rate(table, name, fc), cached, time.perf_counter() - t0)
