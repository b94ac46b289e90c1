"""ReferenceActivation: y = 2·atanh(p/2), p = l/sqrt(1+24·l²), l = sign(s)·log1p(|s|), s = 2·tanh(x/2).

The output is bounded (|y| < 0.2047) and smooth; the eager form here is the oracle that the fused
kernel is tested against and the CPU path of every model that uses it.

Fused form (fp32 inside, any of fp16/bf16/fp32 in and out). y is odd, so work on a = |x| and put
the sign back at the end. With e = exp(−a) and d = 1 − e = −expm1(−a):

    |s| = 2·tanh(a/2) = 2d/(2 − d),   1 + |s| = (2 + d)/(2 − d),   so   l = log1p(|s|) = 2·atanh(d/2)

which removes the tanh and the log1p: one expm1 and two atanh of arguments below 0.5 and 0.103.
For small arguments expm1 and atanh use their Taylor series (no 1 − exp cancellation near 0, where
y ≈ x and relative accuracy matters); atanh(d/2) for d/2 ≥ 0.25 uses ½·log((1+w)/(1−w)), whose
cancellation is harmless there. The derivative, from the same intermediates:

    dy/dx = e · 1/(1 − (d/2)²) · (1 + 24 l²)^(−3/2) · 1/(1 − (p/2)²)

At exactly x = 0 this is 1, the true derivative; the eager reference's autograd returns 0 there
(torch differentiates sign and |·| as 0 at 0). Elsewhere the two agree.

``act_fwd`` / ``act_fwd_bwd`` are ``@triton.jit`` device functions: the Char-RNN kernels and
the bias + activation epilogue call them.

``reference_activation(x, bias=None)``: with a bias (a vector over x's last dim) the kernel adds it
before the activation, so a GEMM output goes through one elementwise pass instead of two; the bias
gradient is reduced deterministically (per-row-block partial column sums, then one sum).
"""

from __future__ import annotations

import torch
from torch import nn

from tape_kernels._dispatch import triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, TRITON_TYPE
from tape_kernels._validate import check_same_device, check_tensor

_BLOCK = 1024
_BLOCK_M = 32
_BLOCK_N = 128
_NUM_WARPS = 4
# The bias kernels hold a (32, 128) tile per program; with the activation's intermediates at 4 warps
# (32 values a thread) ptxas spilled 60 B/thread on sm_86 (make kernel-report); 8 warps do not.
_BIAS_WARPS = 8

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math

    @triton.jit
    def _atanh_series(w):
        # Odd Taylor series through w^11: relative truncation error < w^12/13 (≈ 5e-9 at w = 0.25).
        w2 = w * w
        poly = 1.0 / 11.0
        poly = poly * w2 + 1.0 / 9.0
        poly = poly * w2 + 1.0 / 7.0
        poly = poly * w2 + 1.0 / 5.0
        poly = poly * w2 + 1.0 / 3.0
        poly = poly * w2 + 1.0
        return w * poly

    @triton.jit
    def _act_core(x):
        """Shared intermediates of the activation at fp32 x: (y, e, w, l, r, q)."""
        a = tl.abs(x)
        e = _math.exp(-a)
        # d = −expm1(−a): Taylor series (Horner, through a^9/9!) below 0.5, 1 − e above.
        a_s = tl.minimum(a, 0.5)  # keeps the unused branch finite for huge |x|
        ser = 1.0 - a_s * (1.0 / 9.0)
        ser = 1.0 - a_s * (1.0 / 8.0) * ser
        ser = 1.0 - a_s * (1.0 / 7.0) * ser
        ser = 1.0 - a_s * (1.0 / 6.0) * ser
        ser = 1.0 - a_s * (1.0 / 5.0) * ser
        ser = 1.0 - a_s * (1.0 / 4.0) * ser
        ser = 1.0 - a_s * (1.0 / 3.0) * ser
        ser = 1.0 - a_s * (1.0 / 2.0) * ser
        d = tl.where(a < 0.5, a_s * ser, 1.0 - e)
        w = 0.5 * d  # in [0, 0.5)
        w_big = tl.where(w < 0.25, 0.25, w)  # keeps the unused branch finite; NaN stays NaN
        at_w = tl.where(w < 0.25, _atanh_series(w), 0.5 * _math.log(_math.div(1.0 + w_big, 1.0 - w_big)))
        l = 2.0 * at_w  # log1p(|s|), in [0, log 3)
        r = _math.div(1.0, _math.sqrt(1.0 + 24.0 * l * l))
        q = 0.5 * l * r  # p/2, below 1/(2·sqrt(24)) ≈ 0.102: the series is exact to fp32 here
        y = 2.0 * _atanh_series(q)
        y = tl.where(x < 0, -y, y)
        return y, e, w, l, r, q

    @triton.jit
    def act_fwd(x):
        """ReferenceActivation of an fp32 tensor (device function)."""
        y, e, w, l, r, q = _act_core(x)
        return y

    @triton.jit
    def act_fwd_bwd(x):
        """(ReferenceActivation(x), its derivative) for an fp32 tensor (device function)."""
        y, e, w, l, r, q = _act_core(x)
        dy = _math.div(_math.div(e, 1.0 - w * w) * (r * r * r), 1.0 - q * q)
        return y, dy

    @triton.jit
    def _act_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, act_fwd(x).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_bwd_kernel(G, X, DX, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        y, dy = act_fwd_bwd(x)
        tl.store(DX + offs, (g * dy).to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(cols, column mask, tile mask, offsets) of this program's (BLOCK_M, BLOCK_N) tile of a
        contiguous (n_rows, n_cols) tensor; program ids (row block, column block)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n_cols
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        return cols, cmask, mask, rows[:, None] * n_cols + cols[None, :]

    @triton.jit
    def _bias_act_fwd_kernel(X, BIAS, Y, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # X, Y contiguous (n_rows, n_cols); BIAS (n_cols,).
        cols, cmask, mask, offs = _bias_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        y = act_fwd(x + b[None, :])
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_act_bwd_kernel(
        G, X, BIAS, DX, DB_PART, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        # DB_PART (cdiv(n_rows, BLOCK_M), n_cols) fp32: each row block's column sums of dx, summed afterwards
        # in a fixed order, so the bias gradient is deterministic (no atomics).
        cols, cmask, mask, offs = _bias_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        y, dy = act_fwd_bwd(x + b[None, :])
        dx = tl.where(mask, g * dy, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DB_PART + tl.program_id(0).to(tl.int64) * n_cols + cols, tl.sum(dx, axis=0), mask=cmask)


def reference_activation_ref(x: torch.Tensor) -> torch.Tensor:
    """Eager ReferenceActivation, elementwise on any shape, in x's dtype."""
    s = torch.tanh(x / 2) * 2
    log_s = torch.sign(s) * torch.log1p(torch.abs(s))
    p = log_s / torch.sqrt(1 + 24 * log_s**2)
    return 2 * torch.atanh(p / 2)


def _as_2d(x: torch.Tensor) -> tuple[int, int]:
    n = x.shape[-1] if x.dim() > 0 else 1
    return (x.numel() // n if n else 0), n


def _act_fwd_launch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    if bias is None:
        n = x.numel()
        _act_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    else:
        m, n = _as_2d(x)
        grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _bias_act_fwd_kernel[grid](
            x, bias.contiguous(), y, m, n, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_BIAS_WARPS
        )
    return y


def _act_bwd_launch(
    g: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = g.contiguous()
    dx = torch.empty_like(x)
    if bias is None:
        n = x.numel()
        if n:
            _act_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, x, dx, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        return dx, None
    m, n = _as_2d(x)
    m_blocks = triton.cdiv(m, _BLOCK_M)
    db_part = torch.empty((m_blocks, n), device=x.device, dtype=torch.float32)
    if m and n:
        _bias_act_bwd_kernel[(m_blocks, triton.cdiv(n, _BLOCK_N))](
            g, x, bias.contiguous(), dx, db_part, m, n, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_BIAS_WARPS
        )
    return dx, db_part.sum(dim=0).to(bias.dtype)


class ReferenceActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, bias)
        return _act_fwd_launch(x, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, bias = ctx.saved_tensors
        dx, db = _act_bwd_launch(g, x, bias)
        return dx, (db if bias is not None and ctx.needs_input_grad[1] else None)


def _check_inputs(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensor("x", x, dtypes=INPUT_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=INPUT_DTYPES)
        if x.dim() == 0:
            raise ValueError("x must have at least 1 dim when a bias is given")
        if bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({x.shape[-1]},) = x's last dim")
        check_same_device(x=x, bias=bias)


def reference_activation(x: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Fused ReferenceActivation of ``x`` (any shape), or of ``x + bias`` with ``bias`` (N,) over x's last dim.

    Returns a tensor of x's shape and dtype (fp32 math inside). The bias may have another float dtype
    (an fp32 parameter next to an autocast fp16 GEMM output): it is added in fp32 and its gradient has
    its own dtype. float64 inputs take the eager path (the kernel computes in fp32).
    """
    _check_inputs(x, bias)
    fused = x.dtype != torch.float64 and (bias is None or bias.dtype != torch.float64)
    if fused and use_triton(x, bias, backend=backend):
        return ReferenceActivationFunction.apply(x, bias)
    if backend == "triton":
        raise ValueError("backend='triton' supports fp16/bf16/fp32 only; float64 runs eager")
    return reference_activation_ref(x if bias is None else x + bias)


class FusedReferenceActivation(nn.Module):
    """Drop-in for the TapeTransformer's ``ReferenceActivation`` module, running the fused kernel;
    ``gamma`` is accepted and ignored, as in the original."""

    def __init__(self, gamma: float = 24, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_activation(x, backend=self.backend)


def aot_specs() -> list:
    """One AOT entry per kernel × dtype (fixed block sizes, no autotuning)."""
    from tape_kernels._aot import kernel_spec

    specs = []
    for dt in KERNEL_DTYPES:
        ty = TRITON_TYPE[dt]
        blk, blk2 = {"BLOCK": _BLOCK}, {"BLOCK_M": _BLOCK_M, "BLOCK_N": _BLOCK_N}
        specs += [
            kernel_spec(f"act_fwd_{ty}", _act_fwd_kernel, dt, blk, num_warps=_NUM_WARPS),
            kernel_spec(f"act_bwd_{ty}", _act_bwd_kernel, dt, blk, num_warps=_NUM_WARPS),
            kernel_spec(f"bias_act_fwd_{ty}", _bias_act_fwd_kernel, dt, blk2, num_warps=_BIAS_WARPS),
            kernel_spec(f"bias_act_bwd_{ty}", _bias_act_bwd_kernel, dt, blk2, pointers={"DB_PART": torch.float32},
                        num_warps=_BIAS_WARPS),
        ]
    return specs
