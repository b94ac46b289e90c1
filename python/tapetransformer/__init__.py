"""The TapeTransformer model package: the exact eager reference, the fused model, generation,
training, data and the CLI."""

from tapetransformer.generate import generate
from tapetransformer.kvcache import KVCache
from tapetransformer.model import ModelConfig, TapeTransformer
from tapetransformer.optim import FusedWolf
from tapetransformer.quantize import quantize_int8
from tapetransformer.reference import ReferenceTapeTransformer, Wolf

__all__ = [
    "FusedWolf",
    "KVCache",
    "ModelConfig",
    "ReferenceTapeTransformer",
    "TapeTransformer",
    "Wolf",
    "generate",
    "quantize_int8",
]
