"""The TapeTransformer model package: the exact eager reference, the fused model, generation,
training, data and the CLI."""

from tapetransformer.generate import generate
from tapetransformer.model import FusedCache, TapeTransformer
from tapetransformer.optim import FusedWolf
from tapetransformer.quantize import quantize_int8
from tapetransformer.reference import TapeTransformer as ReferenceTapeTransformer
from tapetransformer.reference import Wolf, student_t_unembedding

__all__ = [
    "FusedCache",
    "FusedWolf",
    "ReferenceTapeTransformer",
    "TapeTransformer",
    "Wolf",
    "generate",
    "quantize_int8",
    "student_t_unembedding",
]
