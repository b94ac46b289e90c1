"""Grouped Linear layers with fused prologues and epilogues: the GEMMs of a TapeHead block pair.

A TapeHead layer runs two blocks (left and right) on the same input. Every op here takes ``G`` groups
(G = 1 or 2: one block, or a layer's pair) and their weights as separate tensors: the kernels take
both groups' weight pointers and pick one by program id, so a pair costs the launches of one block
and no per-step weight stacking. Where the groups must meet (the combine of their outputs, the sum
of a shared input's gradients) one program handles both.

Ops (x shared by the groups: (M, K); or one per group: (G, M, K)):

* ``grouped_linear``: y_g = x_g W_gᵀ + b_g -> (G, M, N)  (the attention in-projection);
* ``grouped_linear_add_layer_norm``: y_g = LN_g(r_g + x_g W_gᵀ + b_g) -> (G, M, N)  (out-projection +
  residual + LayerNorm, the whole row of N ≤ 1024 in one tile);
* ``grouped_mlp_add_layer_norm``: y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ), optionally combined as
  the TapeHead does, h = combine(y_0, y_1) -> (M, D)  (the RectifiedKAN MLP, residual, LayerNorm and
  the combine; ``act`` = ReferenceActivation).

Kernels (all fp32 accumulation; operands rounded to the compute dtype where eager rounds them):

* ``_fl_fwd_kernel``: tile GEMM acc = act?(X) Wᵀ with the bias / residual / LayerNorm / combine
  epilogue, grid (M tiles, N tiles, G). The MLP's activation runs in the *second* GEMM's prologue
  (on each loaded tile of the pre-activation z), so the (M, 8D) activation is never written: the
  forward writes z once and reads it once. The LayerNorm epilogue saves x̂ (fp32) and rstd for the
  backward.
* ``_fl_bwd_kernel``: one launch holds three kinds of programs, told apart by the program id:
  dX tiles (dX = dY W, with act'(z) or a residual gradient folded into the epilogue, summed over
  the groups when they share x), dW tiles (dW = dYᵀ act?(X), looping over all M rows, and the bias
  gradient as the column sums of dY in the same loop) and LayerNorm-parameter programs (column sums
  of the per-program partials the row kernel wrote). Every reduction runs in a fixed order: no
  atomics, bit-identical run to run.
* ``_ln_bwd_kernel``: LayerNorm backward by rows, with the combine's backward as its prologue (it
  recomputes y_g = x̂_g γ_g + β_g), the sum over groups of a shared residual's gradient, and
  per-program partial sums of dγ, dβ.

Launches per block pair (forward + backward): in-projection 1 + 1, out-projection + LN 1 + 2,
MLP + LN + combine 2 + 3. Memory traffic saved against eager: the activation's (M, 8D) output (written
and read twice), the bias/residual sums before each LayerNorm, the combine's inputs; weights are read
in place in any dtype (no autocast copies).

Autocast: the GEMM operands are rounded to the autocast dtype inside the kernels (weights stay
fp32 in memory: no cast launches), GEMM outputs are written in it, LayerNorm outputs in fp32 on
CUDA (as ``nn.LayerNorm`` under autocast). Weight and bias gradients are written in the parameters'
dtype straight from the fp32 accumulators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tape_kernels._dispatch import check_backend, triton_available, use_triton
from tape_kernels._validate import check_same_device, check_tensor
from tape_kernels.activation import reference_activation_ref
from tape_kernels.combine import MODES, rtne_bf16, tapehead_combine_ref

__all__ = [
    "grouped_linear",
    "grouped_linear_add_layer_norm",
    "grouped_linear_add_layer_norm_ref",
    "grouped_linear_ref",
    "grouped_mlp_add_layer_norm",
    "grouped_mlp_add_layer_norm_ref",
    "supports_ln_width",
]

MAX_GROUPS = 2
# The LayerNorm epilogue holds a whole row per tile: next_pow2(N) fp32 accumulators per row.
MAX_LN_N = 1024
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CDT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math
    from tape_kernels._utils import cast_out
    from tape_kernels._utils import pick as _pick

    try:  # the public names of the activation's device functions (kernel-hygiene branch)
        from tape_kernels.activation import act_fwd, act_fwd_bwd
    except ImportError:
        from tape_kernels.activation import _act_fwd as act_fwd
        from tape_kernels.activation import _act_fwd_bwd as act_fwd_bwd

    @triton.jit
    def _to_cdt(x, CDT: tl.constexpr):
        """Round a GEMM operand to the compute dtype (0 fp32, 1 fp16, 2 bf16), where eager/autocast rounds it."""
        if CDT == 1:
            return x.to(tl.float16)
        elif CDT == 2:
            return x.to(tl.bfloat16)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _combine_fwd(hl, hr, MODE: tl.constexpr):
        """The TapeHead combine of two fp32 tiles (tape_kernels.combine's formulas)."""
        if MODE == 0:
            a = tl.sigmoid(hl)
            b = tl.sigmoid(hr)
            return (a + b) * 0.5 - a * b
        elif MODE == 1:
            # pair softmax as s·hl + (1 − s)·hr; 0·hl + 0·hr is NaN where an input is not finite, as in
            # the eager max-subtracted softmax
            s = tl.sigmoid(hl - hr)
            return s * hl + (1.0 - s) * hr + (0.0 * hl + 0.0 * hr)
        else:
            return hl + hr

    @triton.jit
    def _combine_bwd(g, hl, hr, MODE: tl.constexpr):
        """(dL/dhl, dL/dhr) of the combine for the upstream gradient g."""
        if MODE == 0:
            a = tl.sigmoid(hl)
            b = tl.sigmoid(hr)
            return g * (0.5 - b) * a * (1.0 - a), g * (0.5 - a) * b * (1.0 - b)
        elif MODE == 1:
            # h = hr + δ·σ(δ): ∂h/∂hl = s + δ·s(1 − s) = k, ∂h/∂hr = 1 − k
            delta = hl - hr
            s = tl.sigmoid(delta)
            t = s * (1.0 - s)
            k = s + tl.where(t > 0.0, delta * t, 0.0) + (0.0 * hl + 0.0 * hr)
            return g * k, g * (1.0 - k)
        else:
            return g, g

    @triton.jit
    def _mm_xwt(
        X, W, rows, cols, M, N, K,
        ACT_IN: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """acc[m, n] = Σ_k act?(X[m, k])·W[n, k] in fp32; X (M, K), W (N, K) row-major.

        With ACT_IN, X holds the pre-activation z and each loaded tile goes through ReferenceActivation
        (≈ 40 flops per element against 2·BLOCK_N in the dot), rounded to the compute dtype as eager
        rounds the activation's output."""
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < M
        cmask = cols < N
        x_ptrs = X + rows[:, None].to(tl.int64) * K + ks[None, :]
        w_ptrs = W + cols[None, :].to(tl.int64) * K + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            if ACT_IN:
                a = act_fwd(a.to(tl.float32))
            w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(_to_cdt(a, CDT), _to_cdt(w, CDT), acc, input_precision=PREC)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _fwd_group(
        X, W, BIAS, R, Y, XHAT, RSTD, LNW, LNB, rows, cols, M, N, K, eps,
        HAS_BIAS: tl.constexpr, ACT_IN: tl.constexpr, HAS_RES: tl.constexpr, LN: tl.constexpr,
        STORE_Y: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One group's output tile: the GEMM, then + bias, + residual, LayerNorm; -> y (fp32 tile)."""
        acc = _mm_xwt(X, W, rows, cols, M, N, K, ACT_IN, CDT, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if LN:
            # The whole row is in the tile (BLOCK_N ≥ N, one column program); masked columns are 0.
            # Two-pass variance (centred first): no cancellation when |mean| >> std.
            nf = N.to(tl.float32)
            mean = _math.div(tl.sum(acc, axis=1), nf)
            xc = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
            var = _math.div(tl.sum(xc * xc, axis=1), nf)
            rstd = _math.div(1.0, _math.sqrt(var + eps))
            xhat = xc * rstd[:, None]
            lnw = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
            lnb = tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32)
            y = xhat * lnw[None, :] + lnb[None, :]
            tl.store(XHAT + offs, xhat, mask=mask)
            tl.store(RSTD + rows, rstd, mask=rmask)
        else:
            y = acc
        if STORE_Y:
            tl.store(Y + offs, cast_out(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
        return y

    @triton.jit
    def _fl_fwd_kernel(
        X, W0, W1, B0, B1, R, Y, XHAT, RSTD, LNW0, LNW1, LNB0, LNB1, OUT,
        m, n, k, stride_xg, stride_rg, eps: tl.float32,
        HAS_BIAS: tl.constexpr, ACT_IN: tl.constexpr, HAS_RES: tl.constexpr,
        LN: tl.constexpr, STORE_Y: tl.constexpr, COMBINE: tl.constexpr, CDT: tl.constexpr,
        PREC: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Y[g] = epilogue(act?(X[g]) W_gᵀ). Grid (m tiles, n tiles, G): one group per program, its
        pointers picked by program id. With COMBINE (G = 2, whole rows) one program computes both
        groups' row tiles and writes OUT (m, n) = combine(y_0, y_1); grid (m tiles, 1, 1). Groups share
        X when stride_xg = 0 (R likewise). Y, XHAT (G, m, n); RSTD (G, m)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = m.to(tl.int64) * n
        if COMBINE < 0:
            g = tl.program_id(2)
            _fwd_group(
                X + g * stride_xg, _pick(g, W0, W1), _pick(g, B0, B1), R + g * stride_rg, Y + g * mn,
                XHAT + g * mn, RSTD + g * m, _pick(g, LNW0, LNW1), _pick(g, LNB0, LNB1), rows, cols, m, n, k, eps,
                HAS_BIAS, ACT_IN, HAS_RES, LN, STORE_Y, CDT, PREC, RTNE_BF16, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            y0 = _fwd_group(
                X, W0, B0, R, Y, XHAT, RSTD, LNW0, LNB0, rows, cols, m, n, k, eps,
                HAS_BIAS, ACT_IN, HAS_RES, LN, STORE_Y, CDT, PREC, RTNE_BF16, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            y1 = _fwd_group(
                X + stride_xg, W1, B1, R + stride_rg, Y + mn, XHAT + mn, RSTD + m, LNW1, LNB1, rows, cols,
                m, n, k, eps, HAS_BIAS, ACT_IN, HAS_RES, LN, STORE_Y, CDT, PREC, RTNE_BF16,
                BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            mask = (rows < m)[:, None] & (cols < n)[None, :]
            offs = rows[:, None].to(tl.int64) * n + cols[None, :]
            h = _combine_fwd(y0, y1, COMBINE)
            tl.store(OUT + offs, cast_out(h, OUT.dtype.element_ty, RTNE_BF16), mask=mask)

    @triton.jit
    def _mm_dyw(
        DY, W, rows, ks, M, N, K, CDT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # BLOCK_M × BLOCK_K output tile, BLOCK_N-deep reduction steps
        """acc[m, k] = Σ_n DY[m, n]·W[n, k] in fp32; DY (M, N), W (N, K) row-major."""
        ns = tl.arange(0, BLOCK_N)
        rmask = rows < M
        kmask = ks < K
        dy_ptrs = DY + rows[:, None].to(tl.int64) * N + ns[None, :]
        w_ptrs = W + ns[:, None].to(tl.int64) * K + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nmask = (n0 + ns) < N
            dy = tl.load(dy_ptrs, mask=rmask[:, None] & nmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(_to_cdt(dy, CDT), _to_cdt(w, CDT), acc, input_precision=PREC)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * K
        return acc

    @triton.jit
    def _dx_store(
        acc, X, R, DX, rows, ks, M, K,
        ACT_IN: tl.constexpr, HAS_RES: tl.constexpr, RTNE_BF16: tl.constexpr,
    ):  # fmt: skip
        """dX epilogue: × act'(z) where X held the pre-activation z, + a residual's gradient R."""
        mask = (rows < M)[:, None] & (ks < K)[None, :]
        offs = rows[:, None].to(tl.int64) * K + ks[None, :]
        if ACT_IN:
            z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            _, dact = act_fwd_bwd(z)
            acc = acc * dact
        if HAS_RES:
            acc += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, cast_out(acc, DX.dtype.element_ty, RTNE_BF16), mask=mask)

    @triton.jit
    def _dw_group(
        DY, X, DW, DB, ns, ks, pid_k, M, N, K,
        ACT_IN: tl.constexpr, HAS_DB: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
        RTNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """dW[n, k] = Σ_m DY[m, n]·act?(X[m, k]) over all rows; with HAS_DB the programs of the first
        K tile also write db[n] = Σ_m DY[m, n] (the same loads, a fixed summation order)."""
        ms = tl.arange(0, BLOCK_M)
        nmask = ns < N
        kmask = ks < K
        dy_ptrs = DY + ms[:, None].to(tl.int64) * N + ns[None, :]
        x_ptrs = X + ms[:, None].to(tl.int64) * K + ks[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            mmask = (m0 + ms) < M
            dy = tl.load(dy_ptrs, mask=mmask[:, None] & nmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            if ACT_IN:
                x = act_fwd(x.to(tl.float32))
            acc = tl.dot(tl.trans(_to_cdt(dy, CDT)), _to_cdt(x, CDT), acc, input_precision=PREC)
            if HAS_DB:
                db += tl.sum(dy.to(tl.float32), axis=0)
            dy_ptrs += BLOCK_M * N
            x_ptrs += BLOCK_M * K
        offs = ns[:, None].to(tl.int64) * K + ks[None, :]
        tl.store(DW + offs, cast_out(acc, DW.dtype.element_ty, RTNE_BF16), mask=nmask[:, None] & kmask[None, :])
        if HAS_DB:
            if pid_k == 0:
                tl.store(DB + ns, cast_out(db, DB.dtype.element_ty, RTNE_BF16), mask=nmask)

    @triton.jit
    def _colsum_store(PART, OUT, cols, P, N, RTNE_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """OUT[c] = Σ_p PART[p, c] over P rows, in a fixed order."""
        cmask = cols < N
        ps = tl.arange(0, BLOCK_P)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            m = ((p0 + ps) < P)[:, None] & cmask[None, :]
            acc += tl.load(PART + (p0 + ps)[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
        tl.store(OUT + cols, cast_out(tl.sum(acc, axis=0), OUT.dtype.element_ty, RTNE_BF16), mask=cmask)

    @triton.jit
    def _fl_bwd_kernel(
        DY, W0, W1, X, R, DX, DW0, DW1, DB0, DB1, PW, PB, DLNW0, DLNW1, DLNB0, DLNB1,
        m, n, k, p, stride_xg, stride_rg, stride_dxg, n_dx, n_dw,
        G: tl.constexpr, SUM_G: tl.constexpr, ACT_IN: tl.constexpr, HAS_RES: tl.constexpr,
        HAS_DB: tl.constexpr, LN_RED: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
        RTNE_BF16: tl.constexpr, DX_M: tl.constexpr, DX_K: tl.constexpr, DX_R: tl.constexpr,
        DW_N: tl.constexpr, DW_K: tl.constexpr, DW_R: tl.constexpr,
    ):  # fmt: skip
        """Backward of Y[g] = act?(X[g]) W_gᵀ (+ b_g) given DY (G, m, n), in one launch (1-D grid):

        programs [0, n_dx):          dX tiles (DX_M × DX_K, reduction steps of DX_R over n), group-major:
                                     dX[g] = (DY[g] W_g)·act'(X[g]) + R[g]; or, for groups sharing X
                                     (SUM_G), one dX = Σ_g DY[g] W_g + R accumulated in one program;
        programs [n_dx, n_dx+n_dw):  dW tiles (DW_N × DW_K, steps of DW_R rows over all m), group-major,
                                     with db from the first K tile's programs;
        programs after:              dγ_g, dβ_g of a LayerNorm (LN_RED): column sums (DW_K columns a
                                     program) of the (G, p, n) partials PW, PB of ``_ln_bwd_kernel``.
        """
        pid = tl.program_id(0)
        mn = m.to(tl.int64) * n
        if pid < n_dx:
            tiles_k = tl.cdiv(k, DX_K)
            tiles = tl.cdiv(m, DX_M) * tiles_k
            g = pid // tiles
            t = pid % tiles
            rows = (t // tiles_k) * DX_M + tl.arange(0, DX_M)
            ks = (t % tiles_k) * DX_K + tl.arange(0, DX_K)
            if SUM_G:
                acc = _mm_dyw(DY, W0, rows, ks, m, n, k, CDT, PREC, DX_M, DX_R, DX_K)
                if G == 2:
                    acc += _mm_dyw(DY + mn, W1, rows, ks, m, n, k, CDT, PREC, DX_M, DX_R, DX_K)
                _dx_store(acc, X, R, DX, rows, ks, m, k, ACT_IN, HAS_RES, RTNE_BF16)
            else:
                acc = _mm_dyw(DY + g * mn, _pick(g, W0, W1), rows, ks, m, n, k, CDT, PREC, DX_M, DX_R, DX_K)
                _dx_store(acc, X + g * stride_xg, R + g * stride_rg, DX + g * stride_dxg, rows, ks, m, k,
                          ACT_IN, HAS_RES, RTNE_BF16)  # fmt: skip
        elif pid < n_dx + n_dw:
            q = pid - n_dx
            tiles_k = tl.cdiv(k, DW_K)
            tiles = tl.cdiv(n, DW_N) * tiles_k
            g = q // tiles
            t = q % tiles
            pid_k = t % tiles_k
            ns = (t // tiles_k) * DW_N + tl.arange(0, DW_N)
            ks = pid_k * DW_K + tl.arange(0, DW_K)
            _dw_group(DY + g * mn, X + g * stride_xg, _pick(g, DW0, DW1), _pick(g, DB0, DB1), ns, ks, pid_k, m, n, k,
                      ACT_IN, HAS_DB, CDT, PREC, RTNE_BF16, DW_R, DW_N, DW_K)  # fmt: skip
        else:
            if LN_RED:
                q = pid - n_dx - n_dw
                tiles_c = tl.cdiv(n, DW_K)
                g = q // tiles_c
                cols = (q % tiles_c) * DW_K + tl.arange(0, DW_K)
                pn = g * p.to(tl.int64) * n
                _colsum_store(PW + pn, _pick(g, DLNW0, DLNW1), cols, p, n, RTNE_BF16, DX_M, DW_K)
                _colsum_store(PB + pn, _pick(g, DLNB0, DLNB1), cols, p, n, RTNE_BF16, DX_M, DW_K)

    @triton.jit
    def _ln_bwd_row(dy, xhat, rstd, w, nf):
        """dz = rstd·(w·dy − mean(w·dy) − x̂·mean(x̂·w·dy)): LayerNorm's input gradient for one row."""
        wdy = w * dy
        c1 = _math.div(tl.sum(xhat * wdy, axis=0), nf)
        c2 = _math.div(tl.sum(wdy, axis=0), nf)
        return (wdy - (xhat * c1 + c2)) * rstd

    @triton.jit
    def _ln_bwd_kernel(
        DY, XHAT, RSTD, LNW0, LNW1, LNB0, LNB1, DR, DRSUM, PW, PB, m, n, rows_per_prog,
        G: tl.constexpr, COMBINE: tl.constexpr, HAS_SUM: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """LayerNorm backward of G groups, rows_per_prog rows per program (all groups of a row in one
        program). DY (G, m, n), or with COMBINE (m, n): the gradient of combine(y_0, y_1), whose
        backward runs here on y_g = x̂_g γ_g + β_g. Writes DR (G, m, n), DRSUM (m, n) = Σ_g DR[g] for a
        residual the groups share, and this program's partial dγ, dβ rows of PW, PB (G, P, n)."""
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < n
        nf = n.to(tl.float32)
        mn = m.to(tl.int64) * n
        w0 = tl.load(LNW0 + cols, mask=cmask, other=0.0).to(tl.float32)
        w1 = w0
        if G == 2:
            w1 = tl.load(LNW1 + cols, mask=cmask, other=0.0).to(tl.float32)
        b0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b1 = b0
        if COMBINE >= 0:
            b0 = tl.load(LNB0 + cols, mask=cmask, other=0.0).to(tl.float32)
            b1 = tl.load(LNB1 + cols, mask=cmask, other=0.0).to(tl.float32)
        pw0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        pb0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        pw1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        pb1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, m)
        base = row_start.to(tl.int64) * n  # advanced by n per row: no i32 overflow for m·n ≥ 2³¹
        for row in range(row_start, row_end):
            offs = base + cols
            xh0 = tl.load(XHAT + offs, mask=cmask, other=0.0)
            r0 = tl.load(RSTD + row)
            xh1 = xh0
            r1 = r0
            if G == 2:
                xh1 = tl.load(XHAT + mn + offs, mask=cmask, other=0.0)
                r1 = tl.load(RSTD + m + row)
            if COMBINE >= 0:
                g = tl.load(DY + offs, mask=cmask, other=0.0).to(tl.float32)
                dy0, dy1 = _combine_bwd(g, xh0 * w0 + b0, xh1 * w1 + b1, COMBINE)
            else:
                dy0 = tl.load(DY + offs, mask=cmask, other=0.0).to(tl.float32)
                dy1 = dy0
                if G == 2:
                    dy1 = tl.load(DY + mn + offs, mask=cmask, other=0.0).to(tl.float32)
            dr0 = _ln_bwd_row(dy0, xh0, r0, w0, nf)
            tl.store(DR + offs, cast_out(dr0, DR.dtype.element_ty, RTNE_BF16), mask=cmask)
            pw0 += dy0 * xh0
            pb0 += dy0
            drs = dr0
            if G == 2:
                dr1 = _ln_bwd_row(dy1, xh1, r1, w1, nf)
                tl.store(DR + mn + offs, cast_out(dr1, DR.dtype.element_ty, RTNE_BF16), mask=cmask)
                pw1 += dy1 * xh1
                pb1 += dy1
                drs = dr0 + dr1
            if HAS_SUM:
                tl.store(DRSUM + offs, cast_out(drs, DRSUM.dtype.element_ty, RTNE_BF16), mask=cmask)
            base += n
        prow = pid.to(tl.int64) * n + cols
        tl.store(PW + prow, pw0, mask=cmask)
        tl.store(PB + prow, pb0, mask=cmask)
        if G == 2:
            pn = n_prog.to(tl.int64) * n
            tl.store(PW + pn + prow, pw1, mask=cmask)
            tl.store(PB + pn + prow, pb1, mask=cmask)


# --------------------------------------------------------------------------------------------------
# Eager references (test oracles; the CPU / float64 path)
# --------------------------------------------------------------------------------------------------


def _per_group(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    return [x] * g if x.dim() == 2 else list(x.unbind(0))


def grouped_linear_ref(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Eager: torch.stack([F.linear(x_g, W_g, b_g)]) -> (G, M, N); x (M, K) shared or (G, M, K)."""
    xs = _per_group(x, len(weights))
    return torch.stack([F.linear(xg, w, b) for xg, w, b in zip(xs, weights, biases)])


def grouped_linear_add_layer_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor], eps: float = 1e-5,
) -> torch.Tensor:  # fmt: skip
    """Eager: LN_g(r_g + F.linear(x_g, W_g, b_g)) stacked -> (G, M, N)."""
    g = len(weights)
    xs, rs = _per_group(x, g), _per_group(residual, g)
    n = weights[0].shape[0]
    return torch.stack(
        [F.layer_norm(F.linear(xg, w, b) + r, (n,), lw, lb, eps)
         for xg, r, w, b, lw, lb in zip(xs, rs, weights, biases, ln_weights, ln_biases)]
    )  # fmt: skip


def grouped_mlp_add_layer_norm_ref(
    h: torch.Tensor, expand_weights: Sequence[torch.Tensor], expand_biases: Sequence[torch.Tensor | None],
    linear_weights: Sequence[torch.Tensor], ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor],
    eps: float = 1e-5, combine: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Eager: y_g = LN_g(h_g + F.linear(act(F.linear(h_g, W_e, b_e)), W_l)) -> (G, M, D), or with
    ``combine`` the TapeHead combine of y_0, y_1 -> (M, D). h (G, M, D)."""
    d = h.shape[-1]
    ys = []
    for hg, we, be, wl, lw, lb in zip(h.unbind(0), expand_weights, expand_biases, linear_weights, ln_weights,
                                      ln_biases):  # fmt: skip
        m = F.linear(reference_activation_ref(F.linear(hg, we, be)), wl)
        ys.append(F.layer_norm(hg + m, (d,), lw, lb, eps))
    if combine is None:
        return torch.stack(ys)
    return tapehead_combine_ref(ys[0], ys[1], combine)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype: autocast's on x's device when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _ln_dtype(cdt: torch.dtype, residual: torch.Tensor) -> torch.dtype:
    """LayerNorm output dtype, as ``add_layer_norm(gemm_out, residual)`` gives it: the promoted dtype,
    fp32 under CUDA autocast (where nn.LayerNorm runs in fp32)."""
    dt = torch.promote_types(cdt, residual.dtype)
    if residual.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.promote_types(dt, torch.float32)
    return dt


def _prec(cdt: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 products unless torch allows TF32 for matmuls (as cuBLAS)."""
    return "tf32" if cdt == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Tiles (rows × columns × reduction step, warps), by the dot's operand class, chosen with
# benchmarks/kernel_report.py so that no variant the model uses spills on sm_86. fp32 products are FMA
# loops whose operands sit in registers (no tensor cores in IEEE mode): 32 × 32 tiles, 16-deep steps.
# 16-bit operands take the MMA path: 64 × 64 tiles, 16-deep steps, 8 warps. Where the activation runs
# in a prologue or epilogue (≈ 10 live fp32 temporaries per element) the tiles it touches shrink.
# LayerNorm tiles hold whole rows: 16 rows × next_pow2(N) columns, 8 warps at N = 256 (16 fp32
# accumulators a thread; the combine keeps the first group's rows live while the second is computed).
NUM_STAGES = 2  # what the AOT specs compile (Triton's launch default would be 3)


def _fwd_tile(fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) of a plain GEMM tile."""
    return (32, 32, 16, 4) if fp32 else (64, 64, 32, 8)


def _bwd_tile(fp32: bool, act: bool) -> tuple[int, ...]:
    """(DX_M, DX_K, DX_R, DW_N, DW_K, DW_R, warps): dX tiles DX_M × DX_K in steps of DX_R, dW tiles
    DW_N × DW_K in steps of DW_R rows."""
    if fp32:
        return (32, 32, 16, 32, 32, 16, 8 if act else 4)
    return (32, 64, 32, 64, 64, 16, 8) if act else (64, 64, 16, 64, 64, 16, 8)


def _ln_tile(n: int, fp32: bool, act: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) of a whole-row LayerNorm tile of width n: 16 rows, 16-deep steps.
    Spill-free on sm_86 up to n = 256 with the combine (the model's D = 256) and n = 512 without;
    wider rows are correct but spill (kernel_report)."""
    bn = max(16, _pow2(n))
    return 16, bn, 16, (4 if bn <= 64 else 8 if bn <= 256 else 16)


def _ln_bwd_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 8)


def _num_ln_progs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        # two programs per SM keep the loads in flight; more would only grow the partial buffers
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter runs programs one after another: fewer, longer ones are cheaper
    return max(1, min(m, target))


def _fwd(
    x: torch.Tensor, ws: Sequence[torch.Tensor], bs: Sequence[torch.Tensor | None], cdt: torch.dtype, *,
    act_in: bool = False, res: torch.Tensor | None = None, ln: tuple | None = None, y_dtype: torch.dtype,
    combine: int | None = None, store_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Launch ``_fl_fwd_kernel``: x (M, K) shared or (G, M, K) contiguous -> (y (G, M, N) or None, x̂, rstd,
    combined out (M, N) or None). ``ln`` = (lnws, lnbs, eps)."""
    g = len(ws)
    n, k = ws[0].shape
    m = x.shape[-2]
    dev = x.device
    has_bias = bs[0] is not None
    y = torch.empty((g, m, n), device=dev, dtype=y_dtype) if store_y else None
    out = torch.empty((m, n), device=dev, dtype=y_dtype) if combine is not None else None
    fp32 = cdt == torch.float32
    if ln is not None:
        xhat = torch.empty((g, m, n), device=dev, dtype=torch.float32)
        rstd = torch.empty((g, m), device=dev, dtype=torch.float32)
        lnws, lnbs, eps = ln
        bm, bn, bk, warps = _ln_tile(n, fp32, act_in)
    else:
        xhat = rstd = None
        lnws = lnbs = (ws[0],) * g
        eps = 0.0
        bm, bn, bk, warps = _fwd_tile(fp32)
    dummy = ws[0]
    w1 = ws[1] if g == 2 else dummy
    b0 = bs[0] if has_bias else dummy
    b1 = bs[1] if has_bias and g == 2 else dummy
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), 1 if combine is not None else g)
    if m:
        _fl_fwd_kernel[grid](
            x, ws[0], w1, b0, b1, res if res is not None else dummy,
            y if y is not None else (out if out is not None else dummy),
            xhat if xhat is not None else dummy, rstd if rstd is not None else dummy,
            lnws[0], lnws[-1], lnbs[0], lnbs[-1], out if out is not None else dummy,
            m, n, k, (m * k if x.dim() == 3 else 0), (m * n if res is not None and res.dim() == 3 else 0), float(eps),
            HAS_BIAS=has_bias, ACT_IN=act_in, HAS_RES=res is not None, LN=ln is not None, STORE_Y=store_y,
            COMBINE=-1 if combine is None else combine, CDT=_CDT[cdt], PREC=_prec(cdt),
            RTNE_BF16=rtne_bf16(y_dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    return y, xhat, rstd, out


def _bwd(
    dy: torch.Tensor, ws: Sequence[torch.Tensor], x: torch.Tensor, cdt: torch.dtype, *, act_in: bool = False,
    res_grad: torch.Tensor | None = None, dx_dtype: torch.dtype, bias_dtypes: Sequence[torch.dtype] | None = None,
    ln_partials: tuple | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None, tuple | None]:  # fmt: skip
    """Launch ``_fl_bwd_kernel`` for dy (G, M, N): -> (dx like x, [dW_g], [db_g] or None, (dγs, dβs) or
    None). ``res_grad`` (like x) is added to dx; ``ln_partials`` = (PW, PB, ln_weights, ln_biases)
    gives the LayerNorm parameters' gradients from ``_ln_bwd_kernel``'s partial sums."""
    g = len(ws)
    n, k = ws[0].shape
    m = x.shape[-2]
    dev = x.device
    shared = x.dim() == 2
    dx = torch.empty(x.shape, device=dev, dtype=dx_dtype)
    dws = [torch.empty_like(w) for w in ws]
    dbs = None if bias_dtypes is None else [torch.empty(n, device=dev, dtype=dt) for dt in bias_dtypes]
    dxm, dxk, dxr, dwn, dwk, dwr, warps = _bwd_tile(cdt == torch.float32, act_in)
    n_dx = triton.cdiv(m, dxm) * triton.cdiv(k, dxk) * (1 if shared else g)
    n_dw = triton.cdiv(n, dwn) * triton.cdiv(k, dwk) * g
    n_red = 0
    dummy = dws[0]
    if ln_partials is not None:
        pw, pb, lnws, lnbs = ln_partials
        dlnws = [torch.empty_like(t) for t in lnws]
        dlnbs = [torch.empty_like(t) for t in lnbs]
        n_red = triton.cdiv(n, dwk) * g
        p = pw.shape[1]
    else:
        pw = pb = dummy
        dlnws = dlnbs = [dummy] * g
        p = 0
    if m:
        _fl_bwd_kernel[(n_dx + n_dw + n_red,)](
            dy, ws[0], ws[-1], x, res_grad if res_grad is not None else dummy, dx, dws[0], dws[-1],
            dbs[0] if dbs else dummy, dbs[-1] if dbs else dummy, pw, pb, dlnws[0], dlnws[-1], dlnbs[0], dlnbs[-1],
            m, n, k, p, (0 if shared else m * k),
            (m * k if res_grad is not None and res_grad.dim() == 3 else 0), (0 if shared else m * k), n_dx, n_dw,
            G=g, SUM_G=shared, ACT_IN=act_in, HAS_RES=res_grad is not None, HAS_DB=dbs is not None,
            LN_RED=ln_partials is not None, CDT=_CDT[cdt], PREC=_prec(cdt), RTNE_BF16=rtne_bf16(dx_dtype),
            DX_M=dxm, DX_K=dxk, DX_R=dxr, DW_N=dwn, DW_K=dwk, DW_R=dwr, num_warps=warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    else:
        for t in dws + (dbs or []) + (list(dlnws) + list(dlnbs) if ln_partials is not None else []):
            t.zero_()
    return dx, dws, dbs, ((dlnws, dlnbs) if ln_partials is not None else None)


def _ln_bwd(
    dy: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, lnws: Sequence[torch.Tensor],
    lnbs: Sequence[torch.Tensor], dr_dtype: torch.dtype, *, combine: int | None = None, want_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch ``_ln_bwd_kernel``: -> (dr (G, M, N), Σ_g dr (M, N) or None, partials PW, PB (G, P, N))."""
    g, m, n = xhat.shape
    dev = xhat.device
    p = _num_ln_progs(m, dev)
    rows_per_prog = triton.cdiv(m, p) if m else 1
    p = triton.cdiv(m, rows_per_prog) if m else 1
    dr = torch.empty((g, m, n), device=dev, dtype=dr_dtype)
    drsum = torch.empty((m, n), device=dev, dtype=dr_dtype) if want_sum else None
    pw = torch.empty((g, p, n), device=dev, dtype=torch.float32)
    pb = torch.empty((g, p, n), device=dev, dtype=torch.float32)
    bn = max(16, _pow2(n))
    if m:
        _ln_bwd_kernel[(p,)](
            dy, xhat, rstd, lnws[0], lnws[-1], lnbs[0], lnbs[-1], dr, drsum if drsum is not None else dr, pw, pb,
            m, n, rows_per_prog, G=g, COMBINE=-1 if combine is None else combine, HAS_SUM=want_sum,
            RTNE_BF16=rtne_bf16(dr_dtype), BLOCK_N=bn, num_warps=_ln_bwd_warps(bn), num_stages=NUM_STAGES,
        )  # fmt: skip
    else:
        pw.zero_()
        pb.zero_()
    return dr, drsum, pw, pb


# --------------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------------


def _grads_or_none(ctx, start: int, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:  # noqa: ANN001
    return [gr if ctx.needs_input_grad[start + i] else None for i, gr in enumerate(grads)]


class _GroupedLinearFn(torch.autograd.Function):
    """y (G, M, N) = x_g W_gᵀ + b_g. Inputs: x, cdt, return_input, then W_0, b_0, W_1, b_1 (b may be None
    for all). With return_input the outputs are (y, x as a view): the view's gradient (x's second
    consumer) is added to dx in the dX epilogue instead of by a separate autograd ``add``."""

    @staticmethod
    def forward(ctx, x, cdt, return_input, *wb):  # noqa: ANN001, ANN205
        ws, bs = list(wb[0::2]), list(wb[1::2])
        x = x.contiguous()
        y, _, _, _ = _fwd(x, ws, bs, cdt, y_dtype=cdt)
        ctx.save_for_backward(x, *ws)
        ctx.cdt = cdt
        ctx.bias_dtypes = None if bs[0] is None else [b.dtype for b in bs]
        ctx.set_materialize_grads(False)
        return (y, x.view_as(x)) if return_input else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dx_view: torch.Tensor | None = None):  # noqa: ANN001, ANN205
        x, *ws = ctx.saved_tensors
        if dy is None:  # only the input view was used
            dy = torch.zeros((len(ws), x.shape[-2], ws[0].shape[0]), device=x.device, dtype=ctx.cdt)
        res = None if dx_view is None else dx_view.contiguous()
        dx, dws, dbs, _ = _bwd(dy.contiguous(), ws, x, ctx.cdt, res_grad=res, dx_dtype=x.dtype,
                               bias_dtypes=ctx.bias_dtypes)  # fmt: skip
        wb = [t for pair in zip(dws, dbs or [None] * len(dws)) for t in pair]
        return (dx if ctx.needs_input_grad[0] else None, None, None, *_grads_or_none(ctx, 3, wb))


class _GroupedLinearLNFn(torch.autograd.Function):
    """y (G, M, N) = LN_g(r_g + x_g W_gᵀ + b_g). Inputs: x, residual, cdt, y dtype, eps, then per group
    W, b, γ, β."""

    @staticmethod
    def forward(ctx, x, residual, cdt, y_dtype, eps, *params):  # noqa: ANN001, ANN205
        g = len(params) // 4
        ws, bs, lnws, lnbs = (list(params[i::4]) for i in range(4))
        x = x.contiguous()
        residual = residual.contiguous()
        y, xhat, rstd, _ = _fwd(x, ws, bs, cdt, res=residual, ln=(lnws, lnbs, eps), y_dtype=y_dtype)
        ctx.save_for_backward(x, xhat, rstd, *ws, *lnws, *lnbs)
        ctx.meta = (g, cdt, residual.dtype, residual.dim() == 2, None if bs[0] is None else [b.dtype for b in bs])
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        g, cdt, r_dtype, shared_res, bias_dtypes = ctx.meta
        x, xhat, rstd, *rest = ctx.saved_tensors
        ws, lnws, lnbs = rest[:g], rest[g : 2 * g], rest[2 * g :]
        dr, drsum, pw, pb = _ln_bwd(dy.contiguous(), xhat, rstd, lnws, lnbs, r_dtype, want_sum=shared_res)
        dx, dws, dbs, (dlnws, dlnbs) = _bwd(dr, ws, x, cdt, dx_dtype=x.dtype, bias_dtypes=bias_dtypes,
                                            ln_partials=(pw, pb, lnws, lnbs))  # fmt: skip
        dbs = dbs or [None] * g
        params = [t for i in range(g) for t in (dws[i], dbs[i], dlnws[i], dlnbs[i])]
        dres = drsum if shared_res else dr
        return (dx if ctx.needs_input_grad[0] else None, dres if ctx.needs_input_grad[1] else None, None, None,
                None, *_grads_or_none(ctx, 5, params))  # fmt: skip


class _GroupedMLPLNFn(torch.autograd.Function):
    """y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ) -> (G, M, D), or combine(y_0, y_1) -> (M, D).
    Inputs: h (G, M, D), cdt, y dtype, eps, combine mode or None, then per group W_e, b_e, W_l, γ, β."""

    @staticmethod
    def forward(ctx, h, cdt, y_dtype, eps, combine, *params):  # noqa: ANN001, ANN205
        g = len(params) // 5
        wes, bes, wls, lnws, lnbs = (list(params[i::5]) for i in range(5))
        h = h.contiguous()
        z, _, _, _ = _fwd(h, wes, bes, cdt, y_dtype=cdt)
        y, xhat, rstd, out = _fwd(z, wls, [None] * g, cdt, act_in=True, res=h, ln=(lnws, lnbs, eps), y_dtype=y_dtype,
                                  combine=combine, store_y=combine is None)  # fmt: skip
        ctx.save_for_backward(h, z, xhat, rstd, *wes, *wls, *lnws, *lnbs)
        ctx.meta = (g, cdt, combine, None if bes[0] is None else [b.dtype for b in bes])
        return out if combine is not None else y

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        g, cdt, combine, bias_dtypes = ctx.meta
        h, z, xhat, rstd, *rest = ctx.saved_tensors
        wes, wls, lnws, lnbs = (rest[i * g : (i + 1) * g] for i in range(4))
        # LN backward (with the combine's backward in front) -> the gradient of h + m, for m and for h
        dr, _, pw, pb = _ln_bwd(dout.contiguous(), xhat, rstd, lnws, lnbs, h.dtype, combine=combine)
        # m = act(z) W_lᵀ: dz = (dr W_l)·act'(z), dW_l = drᵀ act(z), and the LayerNorm's dγ, dβ
        dz, dwls, _, (dlnws, dlnbs) = _bwd(dr, wls, z, cdt, act_in=True, dx_dtype=z.dtype,
                                           ln_partials=(pw, pb, lnws, lnbs))  # fmt: skip
        # z = h W_eᵀ + b_e: dh = dz W_e + dr (the residual), dW_e, db_e
        dh, dwes, dbes, _ = _bwd(dz, wes, h, cdt, res_grad=dr, dx_dtype=h.dtype, bias_dtypes=bias_dtypes)
        dbes = dbes or [None] * g
        params = [t for i in range(g) for t in (dwes[i], dbes[i], dwls[i], dlnws[i], dlnbs[i])]
        return (dh if ctx.needs_input_grad[0] else None, None, None, None, None, *_grads_or_none(ctx, 5, params))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

_FLOATS = (*KERNEL_DTYPES, torch.float64)


def supports_ln_width(n: int) -> bool:
    """Whether the LayerNorm epilogue holds a row of width n (whole rows in one tile)."""
    return 0 < n <= MAX_LN_N


def _check_groups(name: str, ts: Sequence[torch.Tensor | None], g: int, optional: bool = False) -> list:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of {g} tensors (one per group)")
    if len(ts) != g:
        raise ValueError(f"{name} has {len(ts)} entries; expected {g} (one per group)")
    ts = list(ts)
    if optional:
        if any(t is None for t in ts) and not all(t is None for t in ts):
            raise ValueError(f"{name}: give a tensor for every group or None for every group")
    return ts


def _check_x(name: str, x: torch.Tensor, g: int, k: int | None = None, grouped_only: bool = False) -> None:
    check_tensor(name, x, ndim=(3,) if grouped_only else (2, 3), dtypes=_FLOATS)
    if x.dim() == 3 and x.shape[0] != g:
        raise ValueError(f"{name} has {x.shape[0]} groups (shape {tuple(x.shape)}); the weights give {g}")
    if k is not None and x.shape[-1] != k:
        raise ValueError(f"{name} has last dim {x.shape[-1]}; the weights expect {k}")


def _check_weights(
    ws: list[torch.Tensor], bs: list[torch.Tensor | None], wname: str, bname: str, k: int | None = None
) -> tuple[int, int]:
    n, kk = None, None
    for i, w in enumerate(ws):
        check_tensor(f"{wname}[{i}]", w, ndim=2, dtypes=_FLOATS)
        if n is None:
            n, kk = w.shape
        if w.shape != (n, kk) or (k is not None and kk != k):
            want = (n, k if k is not None else kk)
            raise ValueError(f"{wname}[{i}] has shape {tuple(w.shape)}; expected {want}")
    for i, b in enumerate(bs):
        if b is not None:
            check_tensor(f"{bname}[{i}]", b, shape=(n,), dtypes=_FLOATS)
    return n, kk


def _check_ln(lnws: list, lnbs: list, n: int) -> None:
    for i, (w, b) in enumerate(zip(lnws, lnbs)):
        check_tensor(f"ln_weights[{i}]", w, shape=(n,), dtypes=_FLOATS)
        check_tensor(f"ln_biases[{i}]", b, shape=(n,), dtypes=_FLOATS)


def _kernel_path(backend: str, tensors: list[torch.Tensor | None], ln_n: int | None = None) -> bool:
    """Whether the kernels run: dtypes they take, one dtype for activations and parameters unless autocast
    is on (then the parameters may be fp32 next to half activations), an LN width they hold; the
    eager reference otherwise (``backend="triton"`` raises instead)."""
    check_backend(backend)
    present = [t for t in tensors if t is not None]
    if not use_triton(*present, backend=backend):
        return False
    reason = None
    dts = {t.dtype for t in present}
    if not dts <= set(KERNEL_DTYPES):
        reason = f"dtypes {sorted(map(str, dts))} (kernels take fp32/fp16/bf16)"
    elif len(dts) > 1 and not torch.is_autocast_enabled(present[0].device.type):
        reason = f"mixed dtypes {sorted(map(str, dts))} outside autocast"
    elif ln_n is not None and not supports_ln_width(ln_n):
        reason = f"LayerNorm width {ln_n} > {MAX_LN_N}"
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"fused_linear Triton kernels do not support {reason}; use backend='eager'")
    return False


def grouped_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], *,
    return_input: bool = False, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """G Linear layers: x (M, K) shared by the groups or (G, M, K) one per group; weights G × (N, K);
    biases G × (N,) or G × None -> (G, M, N), in the autocast dtype under autocast, else x's dtype.
    G = 1 or 2. Differentiable in every input.

    ``return_input=True`` returns (y, x'), x' a view of x to hand to x's other consumer (the residual
    of the block's LayerNorm): on the kernel path x''s gradient is then added to dx inside the backward
    kernel, where autograd would launch an ``add`` for a tensor with two consumers."""
    ws = _check_groups("weights", weights, len(weights) if isinstance(weights, (list, tuple)) else 0)
    g = len(ws)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bs = _check_groups("biases", biases, g, optional=True)
    n, k = _check_weights(ws, bs, "weights", "biases")
    _check_x("x", x, g, k)
    check_same_device(x=x, **{f"weights[{i}]": w for i, w in enumerate(ws)},
                      **{f"biases[{i}]": b for i, b in enumerate(bs)})  # fmt: skip
    if not _kernel_path(backend, [x, *ws, *bs]):
        y = grouped_linear_ref(x, ws, bs)
        return (y, x) if return_input else y
    wb = [t for pair in zip(ws, bs) for t in pair]
    return _GroupedLinearFn.apply(x, _compute_dtype(x), bool(return_input), *wb)


def grouped_linear_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor], eps: float = 1e-5, *,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """y_g = LayerNorm_g(r_g + x_g W_gᵀ + b_g) -> (G, M, N). x (M, K) or (G, M, K); residual (M, N) or
    (G, M, N); weights G × (N, K); biases G × (N,) or None; ln_weights / ln_biases G × (N,).

    The LayerNorm holds whole rows (N ≤ 1024 on the kernel path). Output dtype: that of
    ``add_layer_norm(linear_out, residual)`` (fp32 under CUDA autocast)."""
    ws = _check_groups("weights", weights, len(weights) if isinstance(weights, (list, tuple)) else 0)
    g = len(ws)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bs = _check_groups("biases", biases, g, optional=True)
    lnws, lnbs = _check_groups("ln_weights", ln_weights, g), _check_groups("ln_biases", ln_biases, g)
    n, k = _check_weights(ws, bs, "weights", "biases")
    _check_ln(lnws, lnbs, n)
    _check_x("x", x, g, k)
    _check_x("residual", residual, g, n)
    if residual.shape[-2] != x.shape[-2]:
        raise ValueError(f"residual has {residual.shape[-2]} rows; x has {x.shape[-2]}")
    tensors = [x, residual, *ws, *bs, *lnws, *lnbs]
    check_same_device(**{f"t{i}": t for i, t in enumerate(tensors)})
    if not _kernel_path(backend, tensors, n):
        return grouped_linear_add_layer_norm_ref(x, residual, ws, bs, lnws, lnbs, eps)
    cdt = _compute_dtype(x)
    params = [t for i in range(g) for t in (ws[i], bs[i], lnws[i], lnbs[i])]
    return _GroupedLinearLNFn.apply(x, residual, cdt, _ln_dtype(cdt, residual), float(eps), *params)


def grouped_mlp_add_layer_norm(
    h: torch.Tensor, expand_weights: Sequence[torch.Tensor], expand_biases: Sequence[torch.Tensor | None],
    linear_weights: Sequence[torch.Tensor], ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor],
    eps: float = 1e-5, combine: int | None = None, *, backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """The TapeHead block's MLP half for G groups: y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ), act =
    ReferenceActivation. h (G, M, D); expand_weights G × (F, D); expand_biases G × (F,) or None;
    linear_weights G × (D, F); ln_weights / ln_biases G × (D,). -> (G, M, D), or with ``combine``
    (0 sigmoid-XOR, 1 pair softmax, 2 sum; needs G = 2) the TapeHead combine of y_0, y_1 -> (M, D).

    Output dtype: that of ``add_layer_norm(m, h)``; the pre-activation is kept (in the GEMM dtype) for
    the backward, the activation is recomputed from it."""
    wes = _check_groups("expand_weights", expand_weights,
                        len(expand_weights) if isinstance(expand_weights, (list, tuple)) else 0)  # fmt: skip
    g = len(wes)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"expand_weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bes = _check_groups("expand_biases", expand_biases, g, optional=True)
    wls = _check_groups("linear_weights", linear_weights, g)
    lnws, lnbs = _check_groups("ln_weights", ln_weights, g), _check_groups("ln_biases", ln_biases, g)
    if combine is not None:
        if isinstance(combine, bool) or combine not in MODES:
            raise ValueError(f"combine must be None or one of {MODES}, got {combine!r}")
        if g != 2:
            raise ValueError(f"combine needs 2 groups, got {g}")
    f, d = _check_weights(wes, bes, "expand_weights", "expand_biases")
    _check_weights(wls, [None] * g, "linear_weights", "-", k=f)
    if wls[0].shape[0] != d:
        raise ValueError(f"linear_weights[0] has shape {tuple(wls[0].shape)}; expected ({d}, {f})")
    _check_ln(lnws, lnbs, d)
    _check_x("h", h, g, d, grouped_only=True)
    tensors = [h, *wes, *bes, *wls, *lnws, *lnbs]
    check_same_device(**{f"t{i}": t for i, t in enumerate(tensors)})
    if not _kernel_path(backend, tensors, d):
        return grouped_mlp_add_layer_norm_ref(h, wes, bes, wls, lnws, lnbs, eps, combine)
    cdt = _compute_dtype(h)
    params = [t for i in range(g) for t in (wes[i], bes[i], wls[i], lnws[i], lnbs[i])]
    return _GroupedMLPLNFn.apply(h, cdt, _ln_dtype(cdt, h), float(eps), combine, *params)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# --------------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def kernel_signature(kernel, pointers: dict[str, torch.dtype], default: torch.dtype) -> dict[str, str]:  # noqa: ANN001
    """Triton signature from a kernel's parameter list (this package's convention): ``tl.constexpr``
    parameters are constexprs, UPPERCASE parameters pointers (``pointers[name]`` or ``default``),
    lower-case ones scalars (fp32 where annotated ``tl.float32``, else i32)."""
    import inspect

    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    sig = {}
    for p in inspect.signature(fn.fn).parameters.values():
        ann = str(p.annotation)
        if ann.endswith("constexpr"):
            sig[p.name] = "constexpr"
        elif p.name.isupper():
            sig[p.name] = "*" + _TY[pointers.get(p.name, default)]
        else:
            sig[p.name] = "fp32" if ann.endswith("float32") else "i32"
    return sig


# Pointer dtypes per launch under autocast (cdt = the autocast dtype; parameters and LayerNorm outputs
# fp32, GEMM outputs cdt), by what each launcher passes.
def _autocast_pointers(kind: str, cdt: torch.dtype) -> dict[str, torch.dtype]:
    f32 = torch.float32
    return {
        "in_proj": {"X": f32, "Y": cdt},  # x is the previous LayerNorm's fp32 output (or fp32 embeddings)
        "out_proj_ln": {"X": cdt, "R": f32, "Y": f32, "OUT": f32},
        "mlp_ln": {"X": cdt, "R": f32, "Y": f32, "OUT": f32},
        "bwd_in_proj": {"DY": cdt, "X": f32, "R": f32, "DX": f32},
        "bwd_out_proj": {"DY": f32, "X": cdt, "DX": cdt},
        "bwd_mlp_linear": {"DY": f32, "X": cdt, "DX": cdt},
        "bwd_mlp_expand": {"DY": cdt, "X": f32, "R": f32, "DX": f32},
        "ln_bwd": {"DY": f32, "DR": f32, "DRSUM": f32},
    }[kind]


def aot_specs() -> list:
    """The kernel variants the launchers emit: in fp32 every op variant (G = 1 and 2, shared and
    per-group inputs, every combine mode) at the notebook's LayerNorm width (256) and the LayerNorm
    tiles of widths 16, 64, 512 and 1024; the model's own variants in bf16 and under bf16/fp16 autocast (the
    16-bit MMA path; pure fp16 compiles as bf16 does)."""
    from tape_kernels._aot import AotSpec

    f32 = torch.float32
    stats = {"XHAT": f32, "RSTD": f32, "PW": f32, "PB": f32}
    schemes = [("fp32", f32, None), ("bf16", torch.bfloat16, None), ("ac_bf16", f32, torch.bfloat16),
               ("ac_fp16", f32, torch.float16)]  # fmt: skip
    specs = []

    def add(name: str, kernel, kind: str, scheme: tuple, consts: dict, warps: int) -> None:  # noqa: ANN001
        tag, dt, ac = scheme
        ptrs = dict(stats)
        if ac is not None:
            ptrs.update(_autocast_pointers(kind, ac))
        cdt = ac or dt
        c = dict(consts)
        if "CDT" in c:
            c["CDT"], c["PREC"] = _CDT[cdt], "ieee"
        c.setdefault("RTNE_BF16", False)
        specs.append(AotSpec(name=f"{name}_{tag}", kernel=kernel, signature=kernel_signature(kernel, ptrs, dt),
                             constexprs=c, num_warps=warps, num_stages=NUM_STAGES))  # fmt: skip

    base_f = {"HAS_BIAS": True, "ACT_IN": False, "HAS_RES": False, "LN": False, "STORE_Y": True, "COMBINE": -1,
              "CDT": 0, "PREC": "ieee"}  # fmt: skip

    def fwd_tile(fp32: bool) -> tuple[dict, int]:
        bm, bn, bk, w = _fwd_tile(fp32)
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w

    def bwd(fp32: bool, **kw) -> tuple[dict, int]:
        dxm, dxk, dxr, dwn, dwk, dwr, w = _bwd_tile(fp32, kw.get("ACT_IN", False))
        return {"G": 2, "SUM_G": False, "ACT_IN": False, "HAS_RES": False, "HAS_DB": True, "LN_RED": False,
                "CDT": 0, "PREC": "ieee", "DX_M": dxm, "DX_K": dxk, "DX_R": dxr, "DW_N": dwn, "DW_K": dwk,
                "DW_R": dwr, **kw}, w  # fmt: skip

    def ln_fwd(n: int, fp32: bool, **kw) -> tuple[dict, int]:
        bm, bn, bk, w = _ln_tile(n, fp32, kw.get("ACT_IN", False))
        return {**base_f, "LN": True, "HAS_RES": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **kw}, w

    for scheme in schemes:
        tag, dt, ac = scheme
        fp32 = (ac or dt) == f32
        full = tag == "fp32"  # every variant in fp32; the model's own in the 16-bit schemes
        tile, fw = fwd_tile(fp32)
        add("fl_fwd_linear", _fl_fwd_kernel, "in_proj", scheme, {**base_f, **tile}, fw)
        add("fl_fwd_linear_ln_N256", _fl_fwd_kernel, "out_proj_ln", scheme, *ln_fwd(256, fp32))
        for mode in ((-1, 0, 1, 2) if full else (0, 1)):
            add(f"fl_fwd_mlp_ln_combine{mode}_N256", _fl_fwd_kernel, "mlp_ln", scheme,
                *ln_fwd(256, fp32, HAS_BIAS=False, ACT_IN=True, STORE_Y=mode < 0, COMBINE=mode))  # fmt: skip
        for g in ((1, 2) if full else (2,)):
            for shared in ((True, False) if g == 2 else (True,)):
                add(f"fl_bwd_in_proj_{'shared' if shared else 'grouped'}_G{g}", _fl_bwd_kernel, "bwd_in_proj",
                    scheme, *bwd(fp32, G=g, SUM_G=shared, HAS_RES=True))  # fmt: skip
        add("fl_bwd_out_proj", _fl_bwd_kernel, "bwd_out_proj", scheme, *bwd(fp32, LN_RED=True))
        add("fl_bwd_mlp_linear", _fl_bwd_kernel, "bwd_mlp_linear", scheme,
            *bwd(fp32, ACT_IN=True, HAS_DB=False, LN_RED=True))  # fmt: skip
        add("fl_bwd_mlp_expand", _fl_bwd_kernel, "bwd_mlp_expand", scheme, *bwd(fp32, HAS_RES=True))
        for g in ((1, 2) if full else (2,)):
            if g == 1:
                variants: tuple = ((-1, True),)
            elif full:
                variants = ((-1, True), (-1, False), (0, False), (1, False), (2, False))
            else:
                variants = ((-1, True), (-1, False), (1, False))
            for mode, has_sum in variants:
                add(f"ln_bwd_combine{mode}{'_sum' if has_sum else ''}_N256_G{g}", _ln_bwd_kernel, "ln_bwd", scheme,
                    {"G": g, "COMBINE": mode, "HAS_SUM": has_sum, "BLOCK_N": 256}, _ln_bwd_warps(256))  # fmt: skip
    for bn in (16, 64, 512, 1024):  # other model widths, fp32
        add(f"fl_fwd_linear_ln_N{bn}", _fl_fwd_kernel, "out_proj_ln", schemes[0], *ln_fwd(bn, True))
        add(f"fl_fwd_mlp_ln_combine1_N{bn}", _fl_fwd_kernel, "mlp_ln", schemes[0],
            *ln_fwd(bn, True, HAS_BIAS=False, ACT_IN=True, STORE_Y=False, COMBINE=1))  # fmt: skip
        add(f"ln_bwd_combine1_N{bn}_G2", _ln_bwd_kernel, "ln_bwd", schemes[0],
            {"G": 2, "COMBINE": 1, "HAS_SUM": False, "BLOCK_N": bn}, _ln_bwd_warps(bn))  # fmt: skip
    return specs
