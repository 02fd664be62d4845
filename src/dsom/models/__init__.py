"""Models: entity representations (:mod:`~dsom.models.representations`) scored by the ComplEx interaction
(:mod:`~dsom.models.interaction`) through precision-aware products (:mod:`~dsom.models.products`); the plain
:class:`~dsom.models.complex.ComplEx` and the modality teachers (:mod:`~dsom.models.teachers`) are both built so."""

from dsom.models.complex import ComplEx
from dsom.models.interaction import complex_modulus, complex_query
from dsom.models.products import matmul_scores

__all__ = ["ComplEx", "complex_modulus", "complex_query", "matmul_scores"]
