"""Triton kernels of the fused critic attention (training: forward and backward); see
``tape_kernels.attention`` for the math, the memory traffic and the launchers.

Kernel parameters follow the package convention that ``tape_kernels._aot`` reads signatures from:
UPPERCASE tensors, lower-case scalars (float ones annotated ``tl.float32``), ``tl.constexpr`` tiles and flags.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_heads(base, rows, n_rows, stride_s, offs_h, offs_d, n_heads, dh):
    """(HP, BLOCK, DP) tile of one of q/k/v: element [h, r, d] at base + rows[r]*stride_s + h*dh + d."""
    h3 = offs_h[:, None, None]
    r3 = rows[None, :, None]
    d3 = offs_d[None, None, :]
    mask = (h3 < n_heads) & (r3 < n_rows) & (d3 < dh)
    return tl.load(base + r3 * stride_s + h3 * dh + d3, mask=mask, other=0.0)


@triton.jit
def _probs(q, k, lse2, offs_m, offs_n, seq_len, n_heads, offs_h, qk_scale2, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Exact probabilities p_h[i, j] (HP, BM, BN), fp32, zero outside the valid (head, row, key) set."""
    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PREC) * qk_scale2
    valid = (offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    valid3 = valid[None, :, :] & (offs_h[:, None, None] < n_heads)
    return tl.where(valid3, tl.exp2(s - lse2[:, :, None]), 0.0)


@triton.jit
def _dpbar(pbar, g_ent, g_aw_j, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr):
    """dL/dp̄[i, j] without the row-constant g_aw[i]/2 term (it cancels in the softmax backward)."""
    d = tl.zeros_like(pbar)
    if HAS_ENT:
        d = -g_ent[:, None] * (tl.log(pbar + 1e-12) + pbar / (pbar + 1e-12))
    if HAS_AW:
        d = d + 0.5 * g_aw_j[None, :]
    return d


@triton.jit
def _attn_fwd_kernel(
    QKV, O, LSE, ENT, COLP,
    seq_len, n_heads, dh, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    inv_h: tl.float32, stride_cb,
    CAUSAL: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    base = QKV + b.to(tl.int64) * stride_qb
    q = _load_heads(base, offs_m, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)

    # Pass 1: per-head running max / sum in log2 units (scores pre-multiplied by scale·log2 e).
    m_i = tl.full((HP, BLOCK_M), float("-inf"), tl.float32)
    l_i = tl.zeros((HP, BLOCK_M), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_heads(base + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PREC) * qk_scale2
        valid = offs_n[None, :] < seq_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid[None, :, :], s, float("-inf"))
        # Key 0 is valid for every row (also padded rows), so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 2))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, :, None]), 2)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)

    # Pass 2: exact probabilities, so O needs no rescaling and p̄ is final per tile.
    acc = tl.zeros((HP, BLOCK_M, DP), tl.float32)
    ent = tl.zeros((BLOCK_M,), tl.float32)
    rows = tl.zeros((BLOCK_M,), tl.float32)
    # Column-sum partials live in rows of 16 queries, whatever BLOCK_M the autotuner picked: this program
    # owns rows pid_m·R .. pid_m·R + R − 1 (R = BLOCK_M / 16), writes its partial into the first and
    # zeros into the others, so every row is written exactly once per launch (no memset, no stale rows
    # left by another config's tuning run) and a plain sum over rows reduces them deterministically.
    R: tl.constexpr = BLOCK_M // 16
    colp_base = COLP + b.to(tl.int64) * stride_cb + pid_m * R * seq_len
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_heads(base + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        v = _load_heads(base + 2 * d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        p = _probs(q, k, lse2, offs_m, offs_n, seq_len, n_heads, offs_h, qk_scale2, CAUSAL, PREC)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        pbar = tl.sum(p, 0) * inv_h
        ent -= tl.sum(pbar * tl.log(pbar + 1e-12), 1)
        rows += tl.sum(pbar, 1)
        tl.store(colp_base + offs_n, 0.5 * tl.sum(pbar, 0), mask=offs_n < seq_len)
    # Causal: this query block puts no weight on keys past `hi`.
    for start_n in range(hi, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tl.store(colp_base + offs_n, tl.zeros((BLOCK_N,), tl.float32), mask=offs_n < seq_len)
    n_colp_rows = tl.cdiv(seq_len, 16)
    for r in range(1, R):
        n_end = tl.where(pid_m * R + r < n_colp_rows, seq_len, 0)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(colp_base + r * seq_len + offs_n, tl.zeros((BLOCK_N,), tl.float32), mask=offs_n < seq_len)

    h3 = offs_h[:, None, None]
    m3 = offs_m[None, :, None]
    d3 = offs_d[None, None, :]
    o_ptrs = O + b.to(tl.int64) * stride_ob + m3 * stride_os + h3 * dh + d3
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(h3 < n_heads) & (m3 < seq_len) & (d3 < dh))
    lse_ptrs = LSE + (b.to(tl.int64) * n_heads + offs_h[:, None]) * seq_len + offs_m[None, :]
    tl.store(lse_ptrs, lse2, mask=(offs_h[:, None] < n_heads) & (offs_m[None, :] < seq_len))
    row_mask = offs_m < seq_len
    tl.store(ENT + b.to(tl.int64) * seq_len + offs_m, ent, mask=row_mask)
    # Halved row sums go to the buffer's last row, so aw = (rowsum + colsum)/2 is one sum over its rows.
    tl.store(COLP + b.to(tl.int64) * stride_cb + n_colp_rows * seq_len + offs_m, 0.5 * rows, mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    QKV, O, DO, LSE, GENT, GAW, DELTA,
    seq_len, n_heads, dh, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    row_mask = offs_m < seq_len
    hm_mask = (offs_h[:, None] < n_heads) & row_mask[None, :]
    o = _load_heads(O + b.to(tl.int64) * stride_ob, offs_m, seq_len, stride_os, offs_h, offs_d, n_heads, dh).to(tl.float32)
    do = _load_heads(DO + b.to(tl.int64) * stride_ob, offs_m, seq_len, stride_os, offs_h, offs_d, n_heads, dh).to(tl.float32)
    delta = tl.sum(o * do, 2)
    if HAS_ENT or HAS_AW:
        base = QKV + b.to(tl.int64) * stride_qb
        q = _load_heads(base, offs_m, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        lse2 = tl.load(LSE + (b.to(tl.int64) * n_heads + offs_h[:, None]) * seq_len + offs_m[None, :], mask=hm_mask, other=0.0)
        g_ent = tl.load(GENT + b.to(tl.int64) * seq_len + offs_m, mask=row_mask, other=0.0)
        hi = seq_len
        if CAUSAL:
            hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
        extra = tl.zeros((HP, BLOCK_M), tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_heads(base + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
            g_aw = tl.load(GAW + b.to(tl.int64) * seq_len + offs_n, mask=offs_n < seq_len, other=0.0)
            p = _probs(q, k, lse2, offs_m, offs_n, seq_len, n_heads, offs_h, qk_scale2, CAUSAL, PREC)
            dpb = _dpbar(tl.sum(p, 0) * inv_h, g_ent, g_aw, HAS_ENT, HAS_AW)
            extra += tl.sum(p * dpb[None, :, :], 2)
        delta += extra * inv_h
    tl.store(DELTA + (b.to(tl.int64) * n_heads + offs_h[:, None]) * seq_len + offs_m[None, :], delta, mask=hm_mask)


@triton.jit
def _row_block(QKV, DO, LSE, DELTA, GENT, b, offs_m, offs_h, offs_d, seq_len, n_heads, dh, stride_qb, stride_qs,
               stride_ob, stride_os, HAS_ENT: tl.constexpr):  # fmt: skip
    """What the backward needs of a block of query rows, all heads: q, dO (HP, BM, DP), the log-sum-exp
    and δ (HP, BM) and the entropy gradient (BM,)."""
    row_mask = offs_m < seq_len
    hm_mask = (offs_h[:, None] < n_heads) & row_mask[None, :]
    q = _load_heads(QKV + b.to(tl.int64) * stride_qb, offs_m, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
    do = _load_heads(DO + b.to(tl.int64) * stride_ob, offs_m, seq_len, stride_os, offs_h, offs_d, n_heads, dh)
    hm_off = (b.to(tl.int64) * n_heads + offs_h[:, None]) * seq_len + offs_m[None, :]
    lse2 = tl.load(LSE + hm_off, mask=hm_mask, other=0.0)
    delta = tl.load(DELTA + hm_off, mask=hm_mask, other=0.0)
    # Without an entropy gradient GENT is a 1-element dummy: masked off, never read.
    g_ent = tl.load(GENT + b.to(tl.int64) * seq_len + offs_m, mask=row_mask & HAS_ENT, other=0.0)
    return q, do, lse2, delta, g_ent


@triton.jit
def _ds_tile(
    q, k, v, do, lse2, delta, g_ent, g_aw, offs_m, offs_n, offs_h, seq_len, n_heads, qk_scale2, inv_h,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The softmax backward of one (query block, key block) tile, all heads: (p_h, ds_h) (HP, BM, BN) with
    ds_h = p_h·(dO_h·V_hᵀ + dp̄/H − δ_h) (see ``CriticAttentionFunction``), shared by the dQ and dK/dV passes."""
    p = _probs(q, k, lse2, offs_m, offs_n, seq_len, n_heads, offs_h, qk_scale2, CAUSAL, PREC)
    dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PREC)
    if HAS_ENT or HAS_AW:
        dpb = _dpbar(tl.sum(p, 0) * inv_h, g_ent, g_aw, HAS_ENT, HAS_AW)
        dp += dpb[None, :, :] * inv_h
    return p, p * (dp - delta[:, :, None])


@triton.jit
def _store_heads(base, rows, n_rows, stride_s, offs_h, offs_d, n_heads, dh, value):
    """Store an (HP, BLOCK, DP) fp32 tile at base + rows[r]*stride_s + h*dh + d, in base's dtype."""
    h3 = offs_h[:, None, None]
    r3 = rows[None, :, None]
    d3 = offs_d[None, None, :]
    mask = (h3 < n_heads) & (r3 < n_rows) & (d3 < dh)
    tl.store(base + r3 * stride_s + h3 * dh + d3, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
    seq_len, n_heads, dh, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    sm_scale: tl.float32, inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    base = QKV + b.to(tl.int64) * stride_qb
    q, do, lse2, delta, g_ent = _row_block(QKV, DO, LSE, DELTA, GENT, b, offs_m, offs_h, offs_d, seq_len, n_heads,
                                           dh, stride_qb, stride_qs, stride_ob, stride_os, HAS_ENT)  # fmt: skip
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
    dq = tl.zeros((HP, BLOCK_M, DP), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_heads(base + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        v = _load_heads(base + 2 * d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
        g_aw = tl.load(GAW + b.to(tl.int64) * seq_len + offs_n, mask=(offs_n < seq_len) & HAS_AW, other=0.0)
        p, ds = _ds_tile(q, k, v, do, lse2, delta, g_ent, g_aw, offs_m, offs_n, offs_h, seq_len, n_heads, qk_scale2,
                         inv_h, CAUSAL, HAS_ENT, HAS_AW, PREC)  # fmt: skip
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    _store_heads(DQKV + b.to(tl.int64) * stride_qb, offs_m, seq_len, stride_qs, offs_h, offs_d, n_heads, dh,
                 dq * sm_scale)  # fmt: skip


@triton.jit
def _attn_bwd_dkv_kernel(
    QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
    seq_len, n_heads, dh, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    sm_scale: tl.float32, inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    base = QKV + b.to(tl.int64) * stride_qb
    k = _load_heads(base + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
    v = _load_heads(base + 2 * d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh)
    g_aw = tl.load(GAW + b.to(tl.int64) * seq_len + offs_n, mask=(offs_n < seq_len) & HAS_AW, other=0.0)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    dk = tl.zeros((HP, BLOCK_N, DP), tl.float32)
    dv = tl.zeros((HP, BLOCK_N, DP), tl.float32)
    for start_m in range(lo, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse2, delta, g_ent = _row_block(QKV, DO, LSE, DELTA, GENT, b, offs_m, offs_h, offs_d, seq_len, n_heads,
                                               dh, stride_qb, stride_qs, stride_ob, stride_os, HAS_ENT)  # fmt: skip
        p, ds = _ds_tile(q, k, v, do, lse2, delta, g_ent, g_aw, offs_m, offs_n, offs_h, seq_len, n_heads, qk_scale2,
                         inv_h, CAUSAL, HAS_ENT, HAS_AW, PREC)  # fmt: skip
        dv += tl.dot(tl.permute(p, (0, 2, 1)).to(do.dtype), do, input_precision=PREC)
        dk += tl.dot(tl.permute(ds, (0, 2, 1)).to(q.dtype), q, input_precision=PREC)
    dqkv = DQKV + b.to(tl.int64) * stride_qb
    _store_heads(dqkv + d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh, dk * sm_scale)
    _store_heads(dqkv + 2 * d_model, offs_n, seq_len, stride_qs, offs_h, offs_d, n_heads, dh, dv)
