"""Small pieces every op module shares: dtype tables, tile sizes, the dot precision rule and the output cast.

One definition each, so that a rule (e.g. when fp32 products may use TF32) cannot drift between ops.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from tape_kernels._dispatch import interpreting, triton_available

# The dtypes the Triton kernels take (fp32 math inside). INPUT_DTYPES is what the public float ops
# accept: float64 runs their eager reference.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INPUT_DTYPES: tuple[torch.dtype, ...] = (*KERNEL_DTYPES, torch.float64)
# log2(e): the kernels' softmaxes run in exp2, on scores scaled by LOG2E.
LOG2E: float = 1.4426950408889634
# torch dtype -> Triton's scalar type name (pointer types in a kernel signature are "*" + this).
TRITON_TYPE: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
}


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (1 for n ≤ 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``.

    fp32 products are IEEE unless the user enabled TF32 for matmuls in torch
    (``torch.backends.cuda.matmul.allow_tf32``), as cuBLAS does; 16-bit products are exact in the
    fp32 accumulator whatever the flag says, so they get "ieee" too.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def no_autocast(device_type: str) -> Any:
    """A region where autocast is off (math in the inputs' own dtypes): ``torch.autocast(enabled=False)``
    only when autocast is on. With autocast already off it is a no-op context, so a compiled graph holds no
    autocast enter/exit nodes, which AOTAutograd's cache cannot key (it would bypass the cache and retrace
    the joint graph on every warm start)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def rtne_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel storing ``dtype`` must round bf16 by hand (``cast_out``): only under the interpreter."""
    return dtype == torch.bfloat16 and interpreting()


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def cast_out(x, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
        """fp32 -> dtype. The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even);
        RTNE_BF16 rounds the bits first so CPU tests see the GPU's rounding."""
        if RTNE_BF16:
            u = x.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            x = u.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def pick(g, a, b):
        """a for group/side 0, b for 1 (g a runtime program index): one launch serves two blocks' pointers."""
        if g == 0:
            r = a
        else:
            r = b
        return r
