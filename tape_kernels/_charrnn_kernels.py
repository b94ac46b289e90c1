"""Triton kernels of the fused Char-RNN (see ``tape_kernels.charrnn`` for the layouts and the math).

Kernel parameters follow the package convention that ``tape_kernels._aot`` reads signatures from:
UPPERCASE tensors, lower-case scalars, ``tl.constexpr`` tile sizes and flags.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tape_kernels.activation import act_fwd, act_fwd_bwd


@triton.jit
def _grid_sync(COUNTER, target):
    # Grid-wide barrier (cooperative-groups pattern): every thread's stores are ordered before
    # the CTA barrier, one release-add publishes them at GPU scope, acquire-loads spin until all
    # programs of this round arrived. Requires every program to be resident.
    tl.debug_barrier()
    tl.atomic_add(COUNTER, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _dual_matvec(
    acc_l, acc_r, X, stride_xb, offs_b, bmask, W, offs_h, hmask, hd, k_dim,
    BLOCK_K: tl.constexpr, L2_ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Both cells' products over one input: acc_l += x·W[offs_h]ᵀ, acc_r += x·W[hd + offs_h]ᵀ, for
    x = X[offs_b, :k_dim] (row stride stride_xb) and W (2Hd, k_dim) row-major. ``L2_ONLY`` loads x
    with ``.cg`` (bypassing L1): for states that other SMs wrote during this launch."""
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_dim
        x_ptrs = X + offs_b[:, None] * stride_xb + offs_k[None, :]
        xmask = bmask[:, None] & kmask[None, :]
        if L2_ONLY:
            x = tl.load(x_ptrs, mask=xmask, other=0.0, cache_modifier=".cg")
        else:
            x = tl.load(x_ptrs, mask=xmask, other=0.0)
        wmask = kmask[:, None] & hmask[None, :]
        w_l = tl.load(W + offs_h[None, :] * k_dim + offs_k[:, None], mask=wmask, other=0.0)
        w_r = tl.load(W + (offs_h + hd)[None, :] * k_dim + offs_k[:, None], mask=wmask, other=0.0)
        acc_l = tl.dot(x, w_l, acc_l, input_precision=DOT_PRECISION)
        acc_r = tl.dot(x, w_r, acc_r, input_precision=DOT_PRECISION)
    return acc_l, acc_r


@triton.jit
def _combine(zl, zr):
    # h = ½(a + b − 2ab) with a = act(act(z_L)), b = act(act(z_R))
    a = act_fwd(act_fwd(zl))
    b = act_fwd(act_fwd(zr))
    return 0.5 * (a + b) - a * b


@triton.jit
def rnn_fwd_kernel(
    P, WH, HS, Z, COUNTER, n_batch, hd, t0, n_steps,
    stride_pb, stride_pt, stride_hb, stride_ht, stride_zb, stride_zt,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GRID_SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # P (B, S, 2Hd) input projections incl. both biases; WH (2Hd, Hd) = [W_hL; W_hR] contiguous;
    # HS (B, S+1, Hd) states (HS[:, t] = h_{t-1}); Z (B, S, 2Hd) fp32 pre-activations (saved).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < hd
    for i in range(n_steps):
        t = t0 + i
        for b0 in range(0, n_batch, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < n_batch
            acc_l = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_l, acc_r = _dual_matvec(acc_l, acc_r, HS + t * stride_ht, stride_hb, offs_b, bmask, WH, offs_h, hmask,
                                        hd, hd, BLOCK_K, True, DOT_PRECISION)  # fmt: skip
            m2 = bmask[:, None] & hmask[None, :]
            p_ptr = P + offs_b[:, None] * stride_pb + t * stride_pt + offs_h[None, :]
            zl = acc_l + tl.load(p_ptr, mask=m2, other=0.0).to(tl.float32)
            zr = acc_r + tl.load(p_ptr + hd, mask=m2, other=0.0).to(tl.float32)
            z_ptr = Z + offs_b[:, None] * stride_zb + t * stride_zt + offs_h[None, :]
            tl.store(z_ptr, zl, mask=m2)
            tl.store(z_ptr + hd, zr, mask=m2)
            h_new = _combine(zl, zr)
            h_ptr = HS + offs_b[:, None] * stride_hb + (t + 1) * stride_ht + offs_h[None, :]
            tl.store(h_ptr, h_new.to(HS.dtype.element_ty), mask=m2)
        if GRID_SYNC:
            _grid_sync(COUNTER, (i + 1) * nprog)


@triton.jit
def rnn_bwd_kernel(
    DOUT, DHLAST, Z, WH, DZ, COUNTER, n_batch, seq, hd, t0, n_steps,
    stride_ob, stride_ot, stride_zb, stride_zt,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GRID_SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Reverse time from t0 for n_steps. DOUT (B, S, Hd) fp32: dL/dh_t from above (output or next
    # layer); DHLAST (B, Hd) fp32: dL/dh_{S-1} from the returned state; Z, DZ (B, S, 2Hd) fp32.
    # dh_t = DOUT[:, t] + dZ_{t+1}·WH (WH = [W_hL; W_hR], (2Hd, Hd)); then through h = ½(a+b) − ab,
    # a = act(c_L), c_L = act(z_L):  dz_L = dh·(½ − b)·act'(c_L)·act'(z_L), symmetrically for R.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < hd
    for i in range(n_steps):
        t = t0 - i
        for b0 in range(0, n_batch, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < n_batch
            m2 = bmask[:, None] & hmask[None, :]
            g = tl.load(DOUT + offs_b[:, None] * stride_ob + t * stride_ot + offs_h[None, :], mask=m2, other=0.0)
            if t + 1 < seq:
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, 2 * hd, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    kmask = offs_k < 2 * hd
                    dz = tl.load(
                        DZ + offs_b[:, None] * stride_zb + (t + 1) * stride_zt + offs_k[None, :],
                        mask=bmask[:, None] & kmask[None, :], other=0.0, cache_modifier=".cg",
                    )
                    w = tl.load(
                        WH + offs_k[:, None] * hd + offs_h[None, :], mask=kmask[:, None] & hmask[None, :], other=0.0
                    )
                    acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
                g += acc
            else:
                g += tl.load(DHLAST + offs_b[:, None] * hd + offs_h[None, :], mask=m2, other=0.0)
            z_ptr = Z + offs_b[:, None] * stride_zb + t * stride_zt + offs_h[None, :]
            zl = tl.load(z_ptr, mask=m2, other=0.0)
            zr = tl.load(z_ptr + hd, mask=m2, other=0.0)
            cl, dcl = act_fwd_bwd(zl)
            cr, dcr = act_fwd_bwd(zr)
            a, da = act_fwd_bwd(cl)
            b, db = act_fwd_bwd(cr)
            dz_ptr = DZ + offs_b[:, None] * stride_zb + t * stride_zt + offs_h[None, :]
            tl.store(dz_ptr, g * (0.5 - b) * da * dcl, mask=m2)
            tl.store(dz_ptr + hd, g * (0.5 - a) * db * dcr, mask=m2)
        if GRID_SYNC:
            _grid_sync(COUNTER, (i + 1) * nprog)


@triton.jit
def rnn_decode_kernel(
    X, WI0, WIR, WH, BIAS, HIN, HOUT, COUNTER, n_batch, d_in, hd, l0, n_layers,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GRID_SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One token through layers l0 .. l0+n_layers−1. X (B, D); WI0 (2Hd, D); WIR (L−1, 2Hd, Hd)
    # input weights of layers ≥ 1; WH (L, 2Hd, Hd); BIAS (L, 2Hd) fp32 (b_i + b_h);
    # HIN, HOUT (L, B, Hd): states before / after. Layer l ≥ 1 reads HOUT[l−1].
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < hd
    two_hd_hd = 2 * hd * hd
    for i in range(n_layers):
        l = l0 + i
        for b0 in range(0, n_batch, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < n_batch
            acc_l = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            if l == 0:
                acc_l, acc_r = _dual_matvec(acc_l, acc_r, X, d_in, offs_b, bmask, WI0, offs_h, hmask, hd, d_in,
                                            BLOCK_K, False, DOT_PRECISION)  # fmt: skip
            else:
                # Layer l − 1's new state, written by other programs before the barrier: L2 loads.
                acc_l, acc_r = _dual_matvec(acc_l, acc_r, HOUT + (l - 1) * n_batch * hd, hd, offs_b, bmask,
                                            WIR + (l - 1) * two_hd_hd, offs_h, hmask, hd, hd, BLOCK_K, True,
                                            DOT_PRECISION)  # fmt: skip
            acc_l, acc_r = _dual_matvec(acc_l, acc_r, HIN + l * n_batch * hd, hd, offs_b, bmask, WH + l * two_hd_hd,
                                        offs_h, hmask, hd, hd, BLOCK_K, False, DOT_PRECISION)  # fmt: skip
            zl = acc_l + tl.load(BIAS + l * 2 * hd + offs_h, mask=hmask, other=0.0)[None, :]
            zr = acc_r + tl.load(BIAS + l * 2 * hd + hd + offs_h, mask=hmask, other=0.0)[None, :]
            h_new = _combine(zl, zr)
            m2 = bmask[:, None] & hmask[None, :]
            tl.store(HOUT + l * n_batch * hd + offs_b[:, None] * hd + offs_h[None, :], h_new.to(HOUT.dtype.element_ty), mask=m2)
        if GRID_SYNC:
            _grid_sync(COUNTER, (i + 1) * nprog)
