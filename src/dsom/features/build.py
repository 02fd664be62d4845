"""Build (or load from the cache) the feature table of one modality as configured (DESIGN §4).

Used by ``dsom features`` and by the pipeline before the teachers are trained. A modality is built from
a file listed in ``features.files`` if there is one, else from the built-in source of its name
(``text``, ``image``, ``numeric``). The ``missing_rate`` study (SPEC §7) is applied last, on the
cached table, so changing it never re-encodes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dsom.config import FeaturesConfig
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable, apply_missing_rate
from dsom.errors import ConfigError, DataError
from dsom.features.cache import FeatureCache, digest

BUILT_IN = ("text", "image", "numeric")


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
        from dsom.features.importers import import_features

        spec = fc.files[name]
        path, order = (spec.get("path"), spec.get("entity_order")) if isinstance(spec, dict) else (spec, None)
        if not path:
            raise ConfigError(f"features.files.{name}: give a path (or a mapping with 'path' and 'entity_order')")
        table = import_features(ds, path, name, entity_order=order, allow_pickle=fc.allow_pickle,
                                imputation=fc.imputation, seed=fc.seed)
    elif name == "numeric":
        from dsom.features.numeric import build_numeric

        if ds.root is None or not (ds.root / "numeric.tsv").exists():
            raise DataError(f"dataset '{ds.name}' has no numeric.tsv, so there is no numeric modality; drop "
                            "'numeric' from modalities or give a file in features.files.numeric")
        from dsom.data.readers import file_problem

        problem = file_problem(ds.root / "numeric.tsv")
        if problem is not None:  # only a regular file is read (a FIFO would block forever)
            raise DataError(f"cannot read numeric.tsv: it is {problem}; a regular file is needed", ds.root / "numeric.tsv")
        src = (ds.root / "numeric.tsv").read_bytes()
        key = digest(["numeric", fc.imputation, str(fc.seed), src, *ds.entities.labels])
        table, cached = cache.get_or_build(ds.name, "numeric", key, lambda: build_numeric(
            ds, imputation=fc.imputation, seed=fc.seed), force=force)
    elif name == "text":
        from dsom.features.text import build_text

        table = build_text(ds, fc.text_model or None, fc.text_pooling, fc.text_batch_size, imputation=fc.imputation,
                           seed=fc.seed, cache=cache, force=force, progress=progress)
    elif name == "image":
        from dsom.features.image import build_image

        table = build_image(ds, fc.image_model, fc.image_agg, imputation=fc.imputation, seed=fc.seed, cache=cache,
                            force=force, progress=progress, allow_outside=fc.allow_outside_paths)
    else:
        raise ConfigError(f"modality '{name}' has no built-in source ({', '.join(BUILT_IN)}); "
                          f"give its feature file with --set features.files.{name}=PATH")
    if fc.missing_rate > 0:
        table = apply_missing_rate(table, fc.missing_rate, seed=fc.missing_seed + BUILT_IN_OFFSET.get(name, 7),
                                   imputation=fc.imputation)
    return BuiltTable(table, cached, time.perf_counter() - t0)


# Each modality hides an independent entity sample (SPEC §7 step 1).
BUILT_IN_OFFSET = {"text": 1, "image": 2, "numeric": 3}
