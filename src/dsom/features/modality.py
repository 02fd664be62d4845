"""Moved to :mod:`dsom.data.modality` (a feature table is data that stage 1 reads; ``features/`` builds tables from
side files and depends on ``data/``, never the reverse). Kept so existing imports keep working."""

from dsom.data.modality import IMPUTATIONS, ModalityTable, apply_missing_rate

__all__ = ["IMPUTATIONS", "ModalityTable", "apply_missing_rate"]
