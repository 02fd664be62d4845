"""Models: the ComplEx scorer shared by teachers and the student."""

from dsom.models.complex import ComplEx, complex_modulus, complex_query, matmul_scores

__all__ = ["ComplEx", "complex_modulus", "complex_query", "matmul_scores"]
