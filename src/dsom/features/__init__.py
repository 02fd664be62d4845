"""Feature tables built from a dataset's side files: text and image encoders, numeric literals, imports of
precomputed matrices, and the on-disk cache. The table type itself is :class:`dsom.data.modality.ModalityTable`."""

from dsom.data.modality import ModalityTable

__all__ = ["ModalityTable"]
