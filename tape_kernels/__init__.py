"""tape-kernels: fused Triton kernels (and a small int8 C++/CUDA extension) for the TapeTransformer.

Every op ships as: Triton kernel -> launcher -> autograd.Function -> functional API -> nn.Module,
with an eager ``*_ref`` beside it that is both the test oracle and the CPU fallback.
"""

from tape_kernels._dispatch import interpreting, triton_available, triton_runnable, use_triton
from tape_kernels.activation import ReferenceActivationRef, reference_activation_ref
from tape_kernels.unembedding import student_t_unembedding_ref

__version__ = "0.1.0"

__all__ = [
    "ReferenceActivationRef",
    "interpreting",
    "reference_activation_ref",
    "student_t_unembedding_ref",
    "triton_available",
    "triton_runnable",
    "use_triton",
]
