"""The TapeTransformer model package: the exact eager reference, data, training, generation, CLI."""

from tapetransformer.reference import TapeTransformer as ReferenceTapeTransformer
from tapetransformer.reference import Wolf, student_t_unembedding

__all__ = ["ReferenceTapeTransformer", "Wolf", "student_t_unembedding"]
