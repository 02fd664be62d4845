"""Feature modality container (DESIGN §4): an entity x dim float matrix plus a ``present`` mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsom.errors import DataError

IMPUTATIONS = ("normal", "zeros", "mean")


@dataclass
class ModalityTable:
    """Fixed features of one modality, row i = entity id i.

    Attributes:
        name: modality name (``text``, ``image``, ``numeric`` or user-chosen).
        features: ``(E, F)`` float32 matrix; rows with ``present == False`` hold imputed values.
        present: ``(E,)`` bool, True where the row comes from real data.
        source: free-form description of where the features came from (encoder, file, hash).
        columns: optional name of each feature column (for example numeric attribute names).
    """

    name: str
    features: np.ndarray
    present: np.ndarray
    source: str = ""
    columns: list[str] | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.present = np.asarray(self.present, dtype=bool)
        if self.features.ndim != 2:
            raise DataError(f"modality '{self.name}': features must be 2-D (entities x dim), got shape {self.features.shape}")
        if self.present.shape != (self.features.shape[0],):
            raise DataError(
                f"modality '{self.name}': present mask has shape {self.present.shape}, expected ({self.features.shape[0]},)")
        if self.columns is not None and len(self.columns) != self.features.shape[1]:
            raise DataError(f"modality '{self.name}': {len(self.columns)} column names for {self.features.shape[1]} "
                            "feature columns")
        if not np.isfinite(self.features).all():
            raise DataError(f"modality '{self.name}': features contain NaN or Inf")

    @property
    def num_entities(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @classmethod
    def from_partial(cls, name: str, features: np.ndarray, present: np.ndarray, imputation: str = "normal",
                     seed: int = 0, source: str = "") -> ModalityTable:
        """Fill the rows where ``present`` is False by ``imputation`` (``normal``: N(0,1) with ``seed``,
        as MoSE does; ``zeros``; ``mean`` of the present rows) and return the table."""
        feats = np.array(features, dtype=np.float32, copy=True)
        present = np.asarray(present, dtype=bool)
        missing = ~present
        if imputation not in IMPUTATIONS:
            raise DataError(f"unknown imputation '{imputation}' for modality '{name}'; choose one of {IMPUTATIONS}")
        if missing.any():
            if imputation == "normal":
                rng = np.random.default_rng(seed)
                feats[missing] = rng.standard_normal((int(missing.sum()), feats.shape[1])).astype(np.float32)
            elif imputation == "zeros":
                feats[missing] = 0.0
            else:
                mean = feats[present].mean(axis=0) if present.any() else np.zeros(feats.shape[1], np.float32)
                feats[missing] = mean
        return cls(name=name, features=feats, present=present, source=source)


def apply_missing_rate(table: ModalityTable, rate: float, seed: int = 0, imputation: str = "normal") -> ModalityTable:
    """Hide rows so that a fraction ``rate`` of all entities is missing (the Figure-4 study, SPEC §7).

    Entities already missing count toward the rate: with ``m`` rows missing and a target of
    ``round(rate * E)``, ``max(0, target - m)`` present rows chosen uniformly with ``seed`` are marked
    missing and re-imputed with fresh values; all other rows are unchanged.
    """
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"missing_rate must be in [0, 1], got {rate}")
    E = table.num_entities
    target = int(round(rate * E))
    present = table.present.copy()
    extra = target - int((~present).sum())
    if extra <= 0:
        return table
    rng = np.random.default_rng(seed)
    hide = rng.choice(np.flatnonzero(present), size=extra, replace=False)
    present[hide] = False
    fresh = ModalityTable.from_partial(table.name, table.features, present, imputation=imputation, seed=seed + 1)
    features = table.features.copy()
    features[hide] = fresh.features[hide]
    return ModalityTable(table.name, features, present, source=f"{table.source}; missing_rate={rate} seed={seed}",
                         columns=table.columns)
