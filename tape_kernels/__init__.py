"""tape-kernels: fused Triton kernels (and a small int8 C++/CUDA extension) for the TapeTransformer.

Every op ships as: Triton kernel -> launcher -> autograd.Function -> functional API -> nn.Module,
with an eager ``*_ref`` beside it that is both the test oracle and the CPU fallback. Which one runs
is decided per call by ``tape_kernels._dispatch.use_triton``: CUDA tensors run the kernels, CPU
tensors run them only under ``TRITON_INTERPRET=1``, anything else takes the eager path.
"""

from tape_kernels._dispatch import interpreting, triton_available, triton_runnable, use_triton
from tape_kernels.activation import FusedReferenceActivation, reference_activation, reference_activation_ref
from tape_kernels.attention import CriticAttention, attention_stats, critic_attention, critic_attention_ref
from tape_kernels.attention_decode import critic_attention_decode, critic_attention_decode_ref
from tape_kernels.charrnn import CharRNN, charrnn_ref, charrnn_step
from tape_kernels.combine import TapeHeadCombine, tapehead_combine, tapehead_combine_ref
from tape_kernels.fused_linear import grouped_linear, grouped_linear_add_layer_norm, grouped_mlp_add_layer_norm
from tape_kernels.int8 import Int8Linear, Int8MultiheadAttention, int8_linear, quantize_weight
from tape_kernels.layernorm import AddLayerNorm, add_layer_norm, add_layer_norm_ref
from tape_kernels.rope import rope_embed
from tape_kernels.unembedding import (
    StudentTUnembedding,
    student_t_nll,
    student_t_nll_ref,
    student_t_unembedding,
    student_t_unembedding_ref,
)

__version__ = "0.1.0"

__all__ = [
    "AddLayerNorm",
    "CharRNN",
    "CriticAttention",
    "FusedReferenceActivation",
    "Int8Linear",
    "Int8MultiheadAttention",
    "StudentTUnembedding",
    "TapeHeadCombine",
    "add_layer_norm",
    "add_layer_norm_ref",
    "attention_stats",
    "charrnn_ref",
    "charrnn_step",
    "critic_attention",
    "critic_attention_decode",
    "critic_attention_decode_ref",
    "critic_attention_ref",
    "grouped_linear",
    "grouped_linear_add_layer_norm",
    "grouped_mlp_add_layer_norm",
    "int8_linear",
    "interpreting",
    "quantize_weight",
    "reference_activation",
    "reference_activation_ref",
    "rope_embed",
    "student_t_nll",
    "student_t_nll_ref",
    "student_t_unembedding",
    "student_t_unembedding_ref",
    "tapehead_combine",
    "tapehead_combine_ref",
    "triton_available",
    "triton_runnable",
    "use_triton",
]
