"""Residual + LayerNorm: y = LayerNorm(x + residual) over the last dim, in one pass.

Unfused, PyTorch writes x + residual to memory and reads it back for the norm; here each row
is loaded once, summed and normalized in fp32 registers, and only y plus two fp32 scalars per
row (mean, rstd) are written. The backward recomputes z = x + residual from the inputs instead
of saving it (one extra read instead of a saved (N, D) tensor).

dweight/dbias are sums over all rows. Atomics would make them run-to-run nondeterministic, so
each backward program accumulates its own block of rows into a private fp32 row of a (P, D)
partial buffer, and a second kernel sums the P partials column by column in a fixed order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._dispatch import triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, TRITON_TYPE, no_autocast, rtne_bf16
from tape_kernels._validate import check_same_device, check_tensor

MAX_D = 4096
# Second-stage tile: narrow in D so that even D = 256 spreads the column sums over 8 programs.
_RED_BLOCK_P = 64
_RED_BLOCK_C = 32

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels._utils import cast_out

    @triton.jit
    def _add_ln_fwd_kernel(
        X, R, W, B, Y, MEAN, RSTD, d, eps: tl.float32,
        BLOCK_D: tl.constexpr, RTNE_BF16: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < d
        base = row * d
        z = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        z += tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(z, axis=0) / d
        zc = tl.where(mask, z - mean, 0.0)
        # Two-pass variance (centred first): no cancellation when |mean| >> std.
        var = tl.sum(zc * zc, axis=0) / d
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0)
        b = tl.load(B + cols, mask=mask, other=0.0)
        y = zc * rstd * w + b
        tl.store(Y + base + cols, cast_out(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _add_ln_bwd_kernel(
        DY, X, R, W, MEAN, RSTD, DZ, DW_PART, DB_PART, n_rows, d, rows_per_prog,
        BLOCK_D: tl.constexpr, RTNE_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < d
        w = tl.load(W + cols, mask=mask, other=0.0)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_D], dtype=tl.float32)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, n_rows)
        base = row_start.to(tl.int64) * d  # advanced by d per row: no i32 overflow for n_rows·d ≥ 2³¹
        for row in range(row_start, row_end):
            z = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            z += tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (z - mean) * rstd, 0.0)
            wdy = w * dy
            # dz = rstd·(w·dy − mean(w·dy) − x̂·mean(x̂·w·dy)): the projection out of the
            # mean and scale directions that LayerNorm removes.
            c1 = tl.sum(xhat * wdy, axis=0) / d
            c2 = tl.sum(wdy, axis=0) / d
            dz = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(DZ + base + cols, cast_out(dz, DZ.dtype.element_ty, RTNE_BF16), mask=mask)
            dw += dy * xhat
            db += dy
            base += d
        tl.store(DW_PART + pid * d + cols, dw, mask=mask)
        tl.store(DB_PART + pid * d + cols, db, mask=mask)

    @triton.jit
    def _partial_sum_kernel(DW_PART, DB_PART, DW, DB, n_part, d, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < d
        acc_w = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(0, n_part, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            m = (rows[:, None] < n_part) & cmask[None, :]
            offs = rows[:, None] * d + cols[None, :]
            acc_w += tl.load(DW_PART + offs, mask=m, other=0.0)
            acc_b += tl.load(DB_PART + offs, mask=m, other=0.0)
        tl.store(DW + cols, tl.sum(acc_w, axis=0), mask=cmask)
        tl.store(DB + cols, tl.sum(acc_b, axis=0), mask=cmask)


def add_layer_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Eager reference: ``F.layer_norm(x + residual)`` over the last dim. x, residual (..., D); weight, bias (D,)."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def _num_warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 8)


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), 64)


def _num_partials(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        # Two programs per SM keep the loads in flight; more would only grow the partial buffer
        # (P × D fp32) that the second stage must read.
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter runs programs one after another: fewer, longer ones are cheaper
    return max(1, min(n, target))


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        d = x.shape[-1]
        x2 = x.contiguous().view(-1, d)
        r2 = residual.contiguous().view(-1, d)
        # Parameters are read once per row from cache; fp32 keeps the affine step in fp32.
        w = weight.detach().float().contiguous()
        b = bias.detach().float().contiguous()
        n = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(n, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n, device=x.device, dtype=torch.float32)
        block_d = _block_d(d)
        if n:
            _add_ln_fwd_kernel[(n,)](
                x2, r2, w, b, y, mean, rstd, d, float(eps),
                BLOCK_D=block_d, RTNE_BF16=rtne_bf16(y.dtype), num_warps=_num_warps(block_d),
            )
        ctx.save_for_backward(x2, r2, w, mean, rstd)
        ctx.meta = (x.shape, x.dtype, residual.dtype, weight.dtype, bias.dtype, block_d)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r2, w, mean, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype, w_dtype, b_dtype, block_d = ctx.meta
        n, d = x2.shape
        dy2 = dy.contiguous().view(-1, d)
        dz = torch.empty_like(x2)
        p = _num_partials(n, x2.device)
        dw_part = torch.empty((p, d), device=x2.device, dtype=torch.float32)
        db_part = torch.empty((p, d), device=x2.device, dtype=torch.float32)
        dw = torch.empty(d, device=x2.device, dtype=torch.float32)
        db = torch.empty(d, device=x2.device, dtype=torch.float32)
        if n:
            rows_per_prog = triton.cdiv(n, p)
            p = triton.cdiv(n, rows_per_prog)
            _add_ln_bwd_kernel[(p,)](
                dy2, x2, r2, w, mean, rstd, dz, dw_part, db_part, n, d, rows_per_prog,
                BLOCK_D=block_d, RTNE_BF16=rtne_bf16(dz.dtype), num_warps=_num_warps(block_d),
            )
            _partial_sum_kernel[(triton.cdiv(d, _RED_BLOCK_C),)](
                dw_part, db_part, dw, db, p, d, BLOCK_P=_RED_BLOCK_P, BLOCK_C=_RED_BLOCK_C, num_warps=4
            )
        else:
            dw.zero_()
            db.zero_()
        dz = dz.view(shape)
        return dz.to(x_dtype), dz.to(r_dtype), dw.to(w_dtype), db.to(b_dtype), None


def _check(x, residual, weight, bias) -> None:
    dts = INPUT_DTYPES
    check_tensor("x", x, dtypes=dts)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., D)")
    d = x.shape[-1]
    check_tensor("residual", residual, dtypes=dts)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
    check_tensor("weight", weight, dtypes=dts, shape=(d,))
    check_tensor("bias", bias, dtypes=dts, shape=(d,))
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if d == 0:
        raise ValueError("the normalized dim D of x must be > 0")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim. x, residual (..., D); weight, bias (D,) -> (..., D).

    D up to 4096 on the kernel path (larger D takes the eager path). Output dtype is the promoted
    dtype of x and residual; under CUDA autocast it is fp32, as for ``nn.LayerNorm``. The math is fp32
    (z = x + residual is not rounded to the input dtype first). fp64 takes the eager reference.
    """
    _check(x, residual, weight, bias)
    dt = torch.promote_types(x.dtype, residual.dtype)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs layer_norm in fp32 (CPU autocast leaves its dtype alone); match it.
        dt = torch.promote_types(dt, torch.float32)
    if dt == torch.float64 or x.shape[-1] > MAX_D or not use_triton(x, residual, weight, bias, backend=backend):
        with no_autocast(x.device.type):
            return add_layer_norm_ref(x.to(dt), residual.to(dt), weight.to(dt), bias.to(dt), eps)
    return AddLayerNormFunction.apply(x.to(dt), residual.to(dt), weight, bias, float(eps))


class AddLayerNorm(nn.Module):
    """Drop-in for ``nn.LayerNorm(D)`` applied to ``x + residual``; same ``weight``/``bias`` state_dict keys."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def aot_specs() -> list:
    """Every (kernel, BLOCK_D, dtype) the launchers can emit: BLOCK_D = next_pow2(D) in [64, 4096]."""
    from tape_kernels._aot import kernel_spec

    specs = []
    stats = {"W": torch.float32, "B": torch.float32, "MEAN": torch.float32, "RSTD": torch.float32,
             "DW_PART": torch.float32, "DB_PART": torch.float32}  # fmt: skip
    for dt in KERNEL_DTYPES:
        for bd in (1 << k for k in range(6, 13)):
            for kind, kernel in (("fwd", _add_ln_fwd_kernel), ("bwd", _add_ln_bwd_kernel)):
                specs.append(kernel_spec(f"add_ln_{kind}_D{bd}_{TRITON_TYPE[dt]}", kernel, dt,
                                         {"BLOCK_D": bd, "RTNE_BF16": False}, pointers=stats,
                                         num_warps=_num_warps(bd)))  # fmt: skip
    consts = {"BLOCK_P": _RED_BLOCK_P, "BLOCK_C": _RED_BLOCK_C}
    specs.append(kernel_spec("add_ln_partial_sum", _partial_sum_kernel, torch.float32, consts))
    return specs
