"""Graph data: vocabularies, splits, readers, CSR indices and the synthetic generator."""

from dsom.data.csr import CSRIndex
from dsom.data.graph import SPLITS, KGDataset, Vocabulary

__all__ = ["CSRIndex", "KGDataset", "SPLITS", "Vocabulary"]
