"""Triton kernels of the one-token TapeHead decode; see ``tape_kernels.decode_block`` for the dataflow,
the three launches per layer, the tiles and the launchers.

``IN_MODE`` of ``_attn_kernel`` takes ``decode_block``'s input kinds: 0 EMBED, 1 PLAIN, 2 PAIR.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tape_kernels import _math
from tape_kernels._utils import cast_out as _cast
from tape_kernels._utils import pick as _pick
from tape_kernels.activation import act_fwd as _act_fwd
from tape_kernels.combine import combine_fwd


@triton.jit
def _mm(x, w, DDT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """x [BB, BK] fp32 times wᵀ, w [BN, BK] (float or int8 as loaded) -> [BB, BN] fp32.

    B = 1..8: broadcast product and row sums in fp32 (a GEMV: no MMA shape to fill). B ≥ 16:
    ``tl.dot`` in the activations' dtype DDT (int8 values are exact in fp16/bf16/fp32), fp32
    accumulation."""
    if USE_DOT:
        wd = w.to(DDT)
        if DDT == tl.float32:
            return tl.dot(x, tl.trans(wd), input_precision=PREC)
        else:
            return tl.dot(x.to(DDT), tl.trans(wd))
    else:
        return tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

@triton.jit
def _layer_norm(z, G, BETA, cols, cmask, D, eps):
    """LayerNorm of fp32 rows z [BB, BD] (masked columns 0), two-pass variance, as add_layer_norm."""
    mean = tl.sum(z, axis=1) / D
    zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / D
    rstd = _math.div(1.0, _math.sqrt(var + eps))
    g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(BETA + cols, mask=cmask, other=0.0).to(tl.float32)
    return zc * rstd[:, None] * g[None, :] + b[None, :]

@triton.jit
def _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D,
                NS_PREV: tl.constexpr, COMBINE: tl.constexpr):  # fmt: skip
    """LN_mlp of the previous layer's pre-LN rows R (NS_PREV, B, D), combined when it is a pair:
    0 sigmoid-XOR, 1 pair softmax, 2 sum (``combine.combine_fwd``)."""
    m2 = bmask[:, None] & cmask[None, :]
    rows = offs_b.to(tl.int64)[:, None] * D + cols[None, :]
    z0 = tl.load(R + rows, mask=m2, other=0.0)
    y0 = _layer_norm(z0, G0, BE0, cols, cmask, D, eps0)
    if NS_PREV == 1:
        return y0
    else:
        z1 = tl.load(R + B * D + rows, mask=m2, other=0.0)
        y1 = _layer_norm(z1, G1, BE1, cols, cmask, D, eps1)
        return combine_fwd(y0, y1, COMBINE)

@triton.jit
def _embed_input(XIN, sxb, PE, s_pe, FREQ, pos, offs_b, bmask, cols, cmask, CAUSAL: tl.constexpr):
    """Token embedding + positional row (row ``pos`` in causal mode, else row 0: the reference
    restarts positions on every call); causal mode rotates each (2i, 2i+1) pair by pos·f_i."""
    m2 = bmask[:, None] & cmask[None, :]
    xrow = XIN + offs_b.to(tl.int64)[:, None] * sxb
    if CAUSAL:
        prow = PE + pos * s_pe
    else:
        prow = PE
    x = tl.load(xrow + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    x += tl.load(prow + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if CAUSAL:
        # x'[2i] = x[2i]·cos − x[2i+1]·sin, x'[2i+1] = x[2i]·sin + x[2i+1]·cos: the partner
        # element is loaded again rather than moved between registers.
        partner = cols ^ 1
        xp = tl.load(xrow + partner[None, :], mask=m2, other=0.0).to(tl.float32)
        xp += tl.load(prow + partner, mask=cmask, other=0.0).to(tl.float32)[None, :]
        f = tl.load(FREQ + cols // 2, mask=cmask, other=0.0).to(tl.float32)
        theta = pos.to(tl.float32) * f
        sgn = tl.where((cols % 2) == 0, -1.0, 1.0)
        x = x * _math.cos(theta)[None, :] + (sgn * _math.sin(theta))[None, :] * xp
    return x

@triton.jit
def _attn_kernel(
    XIN, sxb, R, G0, BE0, G1, BE1, eps0, eps1,
    PE0, PE1, s_pe, FREQ0, FREQ1, POS,
    W0, W1, S0, S1, BI0, BI1,
    KV, s_blk, s_kv, s_kb, s_kh, s_kt, blk0,
    X, Q, O,
    B, D, DH, NH, qk_scale2,
    IN_MODE: tl.constexpr, CAUSAL: tl.constexpr, NS_PREV: tl.constexpr, COMBINE: tl.constexpr,
    IS_INT8: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, BN: tl.constexpr,
    BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr, RTNE_BF16: tl.constexpr,
):  # fmt: skip
    # One program per (side, attention head, batch tile). Traffic: the head's 3·dh rows of W_in
    # (3·dh·D weights), its cache rows (2·(pos+1)·dh·B elements), one K/V row written.
    side = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    offs_b = pb * BB + tl.arange(0, BB)
    bmask = offs_b < B
    cols = tl.arange(0, BD)
    cmask = cols < D
    pos = tl.load(POS)
    if IN_MODE == 0:
        x = _embed_input(XIN, sxb, _pick(side, PE0, PE1), s_pe, _pick(side, FREQ0, FREQ1), pos,
                         offs_b, bmask, cols, cmask, CAUSAL)  # fmt: skip
    elif IN_MODE == 1:
        x = tl.load(XIN + offs_b.to(tl.int64)[:, None] * sxb + cols[None, :],
                    mask=bmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    else:
        x = _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D, NS_PREV, COMBINE)
    rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
    if h == 0:  # the residual for launch 2
        tl.store(X + rows_bd + cols[None, :], x, mask=bmask[:, None] & cmask[None, :])

    W = _pick(side, W0, W1)
    S = _pick(side, S0, S1)
    BI = _pick(side, BI0, BI1)
    kv_blk = KV + (blk0 + side).to(tl.int64) * s_blk + h * s_kh
    kv_b = offs_b.to(tl.int64)[:, None] * s_kb
    q_rows = ((side * NH + h) * B + offs_b).to(tl.int64)[:, None] * DH
    for n0 in range(0, DH, BN):
        rows = n0 + tl.arange(0, BN)
        rmask = rows < DH
        m2 = bmask[:, None] & rmask[None, :]
        for part in tl.static_range(3):  # q, k, v rows of this head
            wrow = part * D + h * DH + rows
            w = tl.load(W + wrow.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            y = _mm(x, w, KV.dtype.element_ty, USE_DOT, PREC)
            if IS_INT8:
                y = y * tl.load(S + wrow, mask=rmask, other=0.0)[None, :]
            y = y + tl.load(BI + wrow, mask=rmask, other=0.0).to(tl.float32)[None, :]
            if part == 0:
                tl.store(Q + q_rows + rows[None, :], y, mask=m2)
            else:
                ptr = kv_blk + (part - 1) * s_kv + pos * s_kt + kv_b + rows[None, :]
                tl.store(ptr, _cast(y, KV.dtype.element_ty, RTNE_BF16), mask=m2)
    # The attention below reads back q and the K/V row this program wrote (other threads of
    # the block stored them): make those global writes visible block-wide first.
    tl.debug_barrier()

    d = tl.arange(0, BDH)
    dmask = d < DH
    q = tl.load(Q + q_rows + d[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
    length = pos + 1
    m_i = tl.full((BB,), float("-inf"), tl.float32)
    l_i = tl.zeros((BB,), tl.float32)
    acc = tl.zeros((BB, BDH), tl.float32)
    kv_b3 = offs_b.to(tl.int64)[:, None, None] * s_kb + d[None, None, :]
    for t0 in range(0, length, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < length
        m3 = bmask[:, None, None] & tmask[None, :, None] & dmask[None, None, :]
        off3 = kv_b3 + t.to(tl.int64)[None, :, None] * s_kt
        k = tl.load(kv_blk + off3, mask=m3, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k, axis=2) * qk_scale2  # [BB, BT], log2 units
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: row 0 is always filled
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_blk + s_kv + off3, mask=m3, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(O + rows_bd + h * DH + d[None, :], o, mask=bmask[:, None] & dmask[None, :])

@triton.jit
def _mlp_in_kernel(
    O, X, HB, A,
    WO0, WO1, SO0, SO1, BO0, BO1, G0, G1, BE0, BE1, eps0, eps1,
    WE0, WE1, SE0, SE1, BX0, BX1,
    B, D, F, f_per_prog,
    IS_INT8: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    USE_DOT: tl.constexpr, PREC: tl.constexpr, DDT: tl.constexpr,
):  # fmt: skip
    # One program per (side, expand tile of f_per_prog rows, batch tile). Traffic: all of W_out
    # (D² weights; the side's other programs read it again from L2) and f_per_prog·D of W_exp.
    side = tl.program_id(0)
    pf = tl.program_id(1)
    pb = tl.program_id(2)
    offs_b = pb * BB + tl.arange(0, BB)
    bmask = offs_b < B
    cols = tl.arange(0, BD)
    cmask = cols < D
    rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
    WO = _pick(side, WO0, WO1)
    acc = tl.zeros((BB, BD), tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        o = tl.load(O + rows_bd + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(WO + cols.to(tl.int64)[:, None] * D + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)  # fmt: skip
        acc += _mm(o, w, DDT, USE_DOT, PREC)
    if IS_INT8:
        acc = acc * tl.load(_pick(side, SO0, SO1) + cols, mask=cmask, other=0.0)[None, :]
    acc += tl.load(_pick(side, BO0, BO1) + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    m2 = bmask[:, None] & cmask[None, :]
    z = tl.where(m2, acc + tl.load(X + rows_bd + cols[None, :], mask=m2, other=0.0), 0.0)
    eps = tl.where(side == 0, eps0, eps1)
    hrow = _layer_norm(z, _pick(side, G0, G1), _pick(side, BE0, BE1), cols, cmask, D, eps)
    if pf == 0:  # the residual for launch 3
        tl.store(HB + rows_bd + cols[None, :], hrow, mask=m2)

    WE = _pick(side, WE0, WE1)
    SE = _pick(side, SE0, SE1)
    BX = _pick(side, BX0, BX1)
    f_lo = pf * f_per_prog
    f_hi = tl.minimum(f_lo + f_per_prog, F)
    rows_bf = (side * B + offs_b).to(tl.int64)[:, None] * F
    for n0 in range(f_lo, f_hi, BN):
        rows = n0 + tl.arange(0, BN)
        rmask = rows < f_hi
        w = tl.load(WE + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)  # fmt: skip
        y = _mm(hrow, w, DDT, USE_DOT, PREC)
        if IS_INT8:
            y = y * tl.load(SE + rows, mask=rmask, other=0.0)[None, :]
        y += tl.load(BX + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        tl.store(A + rows_bf + rows[None, :], _act_fwd(y), mask=bmask[:, None] & rmask[None, :])

@triton.jit
def _mlp_out_kernel(
    A, HB, R, WD0, WD1, SD0, SD1,
    B, D, F,
    IS_INT8: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, PREC: tl.constexpr, DDT: tl.constexpr,
):  # fmt: skip
    # One program per (side, BN output channels, batch tile): BN·F weights of W_down.
    side = tl.program_id(0)
    pd = tl.program_id(1)
    pb = tl.program_id(2)
    offs_b = pb * BB + tl.arange(0, BB)
    bmask = offs_b < B
    rows = pd * BN + tl.arange(0, BN)
    rmask = rows < D
    WD = _pick(side, WD0, WD1)
    rows_bf = (side * B + offs_b).to(tl.int64)[:, None] * F
    acc = tl.zeros((BB, BN), tl.float32)
    for k0 in range(0, F, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < F
        a = tl.load(A + rows_bf + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(WD + rows.to(tl.int64)[:, None] * F + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)  # fmt: skip
        acc += _mm(a, w, DDT, USE_DOT, PREC)
    if IS_INT8:
        acc = acc * tl.load(_pick(side, SD0, SD1) + rows, mask=rmask, other=0.0)[None, :]
    m2 = bmask[:, None] & rmask[None, :]
    rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
    acc += tl.load(HB + rows_bd + rows[None, :], mask=m2, other=0.0)
    tl.store(R + rows_bd + rows[None, :], acc, mask=m2)

@triton.jit
def _pair_out_kernel(
    R, G0, BE0, G1, BE1, eps0, eps1, OUT, s_ob, B, D,
    NS_PREV: tl.constexpr, COMBINE: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):  # fmt: skip
    pb = tl.program_id(0)
    offs_b = pb * BB + tl.arange(0, BB)
    bmask = offs_b < B
    cols = tl.arange(0, BD)
    cmask = cols < D
    y = _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D, NS_PREV, COMBINE)
    tl.store(OUT + offs_b.to(tl.int64)[:, None] * s_ob + cols[None, :], _cast(y, OUT.dtype.element_ty, RTNE_BF16),
             mask=bmask[:, None] & cmask[None, :])  # fmt: skip
