"""fp32 math for the Triton kernels: correctly rounded or libdevice on a GPU, plain ``tl`` ops in the interpreter.

On NVIDIA GPUs Triton lowers ``tl.exp``/``tl.log`` to ``ex2.approx``/``lg2.approx`` (absolute error
up to ~2⁻²² in log2, and the ``x·log2(e)`` product's rounding scales exp's relative error with |x|),
and fp32 ``/`` and ``tl.sqrt`` to approximate instructions (≈2 ulp). Through a recurrence (the
Char-RNN) or a log-sum-exp that is several times PyTorch's own fp32 error, measured on an H200. The
kernels therefore use libdevice ``exp``/``log`` and IEEE-rounded ``div_rn``/``sqrt_rn`` when compiled.
``tl.cos``/``tl.sin`` may lower to the approximate instructions, whose error grows with |θ| (RoPE angles
reach seq_len radians): libdevice ``cos``/``sin`` when compiled.
The interpreter has no libdevice (its calls return None) and computes ``tl`` math in numpy at full
precision anyway, so it takes the plain ops: ``PRECISE`` is fixed when this module is imported.
"""

from __future__ import annotations

from tape_kernels._dispatch import interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    PRECISE = tl.constexpr(not interpreting())

    @triton.jit
    def exp(x):
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def log(x):
        if PRECISE:
            return libdevice.log(x)
        else:
            return tl.log(x)

    @triton.jit
    def div(a, b):
        if PRECISE:
            return tl.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def sqrt(x):
        if PRECISE:
            return tl.sqrt_rn(x)
        else:
            return tl.sqrt(x)

    @triton.jit
    def cos(x):
        if PRECISE:
            return libdevice.cos(x)
        else:
            return tl.cos(x)

    @triton.jit
    def sin(x):
        if PRECISE:
            return libdevice.sin(x)
        else:
            return tl.sin(x)
