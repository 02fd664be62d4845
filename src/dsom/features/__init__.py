"""Feature modalities: the container, builders (numeric now; text and image later) and the cache."""

from dsom.features.modality import ModalityTable

__all__ = ["ModalityTable"]
