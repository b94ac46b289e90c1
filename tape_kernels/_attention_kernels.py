"""Triton kernels of the fused critic attention (training: forward and backward); see
``tape_kernels.attention`` for the math, the memory traffic and the launchers.

Every kernel but the statistics pass works on one head: its tiles are 2-D, (BLOCK, DP) operands and
(BLOCK_M, BLOCK_N) scores, so a program holds a few KB of registers and many programs share an SM. The
head-averaged probabilities p̄ that the entropy and aw need are rebuilt tile by tile by looping over the
heads (``_pbar_tile``), in a separate pass in the forward and, only when the statistics get a gradient,
inside the backward kernels.

Non-finite values follow the eager reference, which multiplies the masked (zero) probabilities by V, and
their zero gradients by K and Q, in its matmuls: the causal kernels add 0·x over the tiles they skip, so a
NaN / ±inf at a later position still reaches earlier rows (0·NaN = NaN) and nothing else changes.

Kernel parameters follow the package convention that ``tape_kernels._aot`` reads signatures from:
UPPERCASE tensors, lower-case scalars (float ones annotated ``tl.float32``), ``tl.constexpr`` tiles and flags.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(base, rows, n_rows, stride_s, offs_d, DH):
    """(BLOCK, DP) tile of one head of q, k, v, o or dO: element [r, d] at base + rows[r]·stride_s + d."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < DH)
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, stride_s, offs_d, DH, value):
    """Store an fp32 (BLOCK, DP) tile at base + rows[r]·stride_s + d, in base's dtype."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < DH)
    tl.store(base + rows[:, None] * stride_s + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _zero_times(base, lo, hi, n_rows, stride_s, offs_d, DH, BLOCK: tl.constexpr):
    """Σ over rows [lo, hi) of 0·x, a (DP,) vector: 0, or NaN in the columns where some row is not finite.
    What the eager matmuls add for the masked entries the causal kernels skip."""
    acc = tl.zeros(offs_d.shape, tl.float32)
    for start in range(lo, hi, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        x = _load_rows(base, rows, tl.minimum(hi, n_rows), stride_s, offs_d, DH)
        acc += tl.sum(x.to(tl.float32) * 0.0, 0)
    return acc


@triton.jit
def _head_program(n_heads, BLOCK: tl.constexpr, DP: tl.constexpr):
    """A per-head program's ids, grid (row block, batch·head): (block, b·h, b, h, its rows, head-dim offsets)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    return pid, bh, bh // n_heads, bh % n_heads, pid * BLOCK + tl.arange(0, BLOCK), tl.arange(0, DP)


@triton.jit
def _valid(offs_m, offs_n, seq_len, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N): query and key in range, and key ≤ query when causal."""
    valid = (offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _probs(q, k, lse2, valid, qk_scale2, PREC: tl.constexpr):
    """Exact probabilities p[i, j] of one head (BLOCK_M, BLOCK_N) from the saved log2-sum-exp.

    Outside the valid set: 0·lse, i.e. 0, or NaN on the rows whose softmax is NaN, as the eager softmax
    is NaN over a whole row (masked entries included) once any of its scores is NaN or +inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
    return tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0 * lse2[:, None])


@triton.jit
def _pbar_tile(qkv_b, lse_b, offs_m, offs_n, offs_d, valid, seq_len, n_heads, DH, d_model, stride_qs, qk_scale2,
               inv_h, PREC: tl.constexpr):  # fmt: skip
    """Head-averaged probabilities p̄ (BLOCK_M, BLOCK_N) of one batch row (qkv_b, lse_b: its qkv and
    (H, S) log-sum-exp): every head's q, k tiles and log-sum-exp reloaded (L1/L2 hits) and its
    probabilities summed, one QKᵀ per head."""
    pbar = tl.zeros(valid.shape, tl.float32)
    for h in range(0, n_heads):
        head = qkv_b + h * DH
        q = _load_rows(head, offs_m, seq_len, stride_qs, offs_d, DH)
        k = _load_rows(head + d_model, offs_n, seq_len, stride_qs, offs_d, DH)
        lse2 = tl.load(lse_b + h * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)
        pbar += _probs(q, k, lse2, valid, qk_scale2, PREC)
    return pbar * inv_h


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
    QKV, O, LSE,
    seq_len, n_heads, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    CAUSAL: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """One (query block, batch·head): O_h = softmax(q kᵀ/√DH) v with an online (max, sum) in log2 units,
    and the row log2-sum-exp for the statistics pass and the backward. Reads q once, K and V once per
    query block; writes O and 4 B per row."""
    pid_m, bh, b, h, offs_m, offs_d = _head_program(n_heads, BLOCK_M, DP)
    head = QKV + b.to(tl.int64) * stride_qb + h * DH
    hi = seq_len
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
        # Masked keys: 0·v (summed before the sweep, while no tile is live; the rescaling by alpha keeps
        # a NaN a NaN and a zero a zero).
        acc += _zero_times(head + 2 * d_model, hi, seq_len, seq_len, stride_qs, offs_d, DH, BLOCK_N)[None, :]
    q = _load_rows(head, offs_m, seq_len, stride_qs, offs_d, DH)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(head + d_model, offs_n, seq_len, stride_qs, offs_d, DH)
        v = _load_rows(head + 2 * d_model, offs_n, seq_len, stride_qs, offs_d, DH)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
        visible = offs_n[None, :] < seq_len
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        # Key 0 is valid for every row (padded rows see all keys), so m_new is finite from the first
        # block on unless a score is NaN or +inf, which then makes the row NaN as in the eager softmax.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    _store_rows(O + b.to(tl.int64) * stride_ob + h * DH, offs_m, seq_len, stride_os, offs_d, DH, acc / l_i[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_len)


@triton.jit
def _attn_stats_kernel(
    QKV, LSE, ENT, COLP,
    seq_len, n_heads, d_model, stride_qb, stride_qs, qk_scale2: tl.float32, inv_h: tl.float32, stride_cb,
    CAUSAL: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """One (query block, batch): the statistics of p̄ = mean_h p_h, rebuilt from the forward's log-sum-exp
    (one QKᵀ per head, no PV): entropy per row, and halved column-sum partials plus halved row sums into
    COLP, one row of partials per 16 queries, so that aw = COLP.sum(1) is a deterministic reduction."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    qkv_b = QKV + b.to(tl.int64) * stride_qb
    lse_b = LSE + b.to(tl.int64) * n_heads * seq_len
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
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
        valid = _valid(offs_m, offs_n, seq_len, CAUSAL)
        pbar = _pbar_tile(qkv_b, lse_b, offs_m, offs_n, offs_d, valid, seq_len, n_heads, DH, d_model, stride_qs,
                          qk_scale2, inv_h, PREC)  # fmt: skip
        ent -= tl.sum(pbar * tl.log(pbar + 1e-12), 1)
        rows += tl.sum(pbar, 1)
        tl.store(colp_base + offs_n, 0.5 * tl.sum(pbar, 0), mask=offs_n < seq_len)
    if CAUSAL:
        # Keys past `hi` get this block's masked probabilities: 0, or NaN from rows whose softmax is NaN.
        nan_rows = tl.zeros((BLOCK_M,), tl.float32)
        for h in range(0, n_heads):
            nan_rows += 0.0 * tl.load(lse_b + h * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)
        masked = 0.5 * inv_h * tl.sum(nan_rows, 0)
        for start_n in range(hi, seq_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(colp_base + offs_n, tl.zeros((BLOCK_N,), tl.float32) + masked, mask=offs_n < seq_len)
    n_colp_rows = tl.cdiv(seq_len, 16)
    for r in range(1, R):
        n_end = tl.where(pid_m * R + r < n_colp_rows, seq_len, 0)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(colp_base + r * seq_len + offs_n, tl.zeros((BLOCK_N,), tl.float32), mask=offs_n < seq_len)
    row_mask = offs_m < seq_len
    tl.store(ENT + b.to(tl.int64) * seq_len + offs_m, ent, mask=row_mask)
    # Halved row sums go to the buffer's last row, so aw = (rowsum + colsum)/2 is one sum over its rows.
    tl.store(COLP + b.to(tl.int64) * stride_cb + n_colp_rows * seq_len + offs_m, 0.5 * rows, mask=row_mask)


@triton.jit
def _row_block(QKV, DO, LSE, DELTA, GENT, b, h, offs_m, offs_d, seq_len, n_heads, DH, stride_qb, stride_qs, stride_ob,
               stride_os, HAS_ENT: tl.constexpr):  # fmt: skip
    """What the backward needs of a block of query rows of head h: q, dO (BLOCK_M, DP), the log2-sum-exp
    and δ (BLOCK_M,), and the entropy gradient (BLOCK_M,)."""
    row_mask = offs_m < seq_len
    q = _load_rows(QKV + b.to(tl.int64) * stride_qb + h * DH, offs_m, seq_len, stride_qs, offs_d, DH)
    do = _load_rows(DO + b.to(tl.int64) * stride_ob + h * DH, offs_m, seq_len, stride_os, offs_d, DH)
    hm_off = (b.to(tl.int64) * n_heads + h) * seq_len + offs_m
    lse2 = tl.load(LSE + hm_off, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + hm_off, mask=row_mask, other=0.0)
    # Without an entropy gradient GENT is a 1-element dummy: masked off, never read.
    g_ent = tl.load(GENT + b.to(tl.int64) * seq_len + offs_m, mask=row_mask & HAS_ENT, other=0.0)
    return q, do, lse2, delta, g_ent


@triton.jit
def _stats_grad(QKV, LSE, GAW, b, p, g_ent, offs_m, offs_n, offs_d, valid, seq_len, n_heads, DH, d_model, stride_qb,
                stride_qs, qk_scale2, inv_h, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dp̄[i, j]/H on one tile, the statistics' share of dL/dp_h (see ``CriticAttentionFunction``). The
    aw part is per key; the entropy part needs p̄, rebuilt over all heads (only when it has a gradient)."""
    g_aw = tl.load(GAW + b.to(tl.int64) * seq_len + offs_n, mask=(offs_n < seq_len) & HAS_AW, other=0.0)
    pbar = p
    if HAS_ENT:
        pbar = _pbar_tile(QKV + b.to(tl.int64) * stride_qb, LSE + b.to(tl.int64) * n_heads * seq_len, offs_m, offs_n,
                          offs_d, valid, seq_len, n_heads, DH, d_model, stride_qs, qk_scale2, inv_h, PREC)  # fmt: skip
    return _dpbar(pbar, g_ent, g_aw, HAS_ENT, HAS_AW) * inv_h


@triton.jit
def _ds_tile(
    QKV, LSE, GAW, b, q, k, v, do, lse2, delta, g_ent, offs_m, offs_n, offs_d, seq_len, n_heads, DH, d_model,
    stride_qb, stride_qs, qk_scale2, inv_h,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The softmax backward of one head's (query block, key block) tile, shared by the dQ and dK/dV
    kernels: (p, ds) with ds = p·(dO·Vᵀ + dp̄/H − δ), exactly 0 outside the valid set (the eager
    masked_fill passes no gradient there, whatever the row holds)."""
    valid = _valid(offs_m, offs_n, seq_len, CAUSAL)
    p = _probs(q, k, lse2, valid, qk_scale2, PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if HAS_ENT or HAS_AW:
        dp += _stats_grad(QKV, LSE, GAW, b, p, g_ent, offs_m, offs_n, offs_d, valid, seq_len, n_heads, DH, d_model,
                          stride_qb, stride_qs, qk_scale2, inv_h, HAS_ENT, HAS_AW, PREC)  # fmt: skip
    return p, tl.where(valid, p * (dp - delta[:, None]), 0.0)


@triton.jit
def _attn_bwd_delta_kernel(
    QKV, O, DO, LSE, GENT, GAW, DELTA,
    seq_len, n_heads, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (query block, batch·head): δ_h = dO_h·O_h, plus (1/H)·Σ_j p_h·dp̄ when the statistics have a
    gradient (a sweep over the keys)."""
    pid_m, bh, b, h, offs_m, offs_d = _head_program(n_heads, BLOCK_M, DP)
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h * DH, offs_m, seq_len, stride_os, offs_d, DH)
    do = _load_rows(DO + b.to(tl.int64) * stride_ob + h * DH, offs_m, seq_len, stride_os, offs_d, DH)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_ENT or HAS_AW:
        q, do, lse2, _, g_ent = _row_block(QKV, DO, LSE, LSE, GENT, b, h, offs_m, offs_d, seq_len, n_heads, DH,
                                           stride_qb, stride_qs, stride_ob, stride_os, HAS_ENT)  # fmt: skip
        hi = seq_len
        if CAUSAL:
            hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
        k_head = QKV + b.to(tl.int64) * stride_qb + d_model + h * DH
        extra = tl.zeros((BLOCK_M,), tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid = _valid(offs_m, offs_n, seq_len, CAUSAL)
            k = _load_rows(k_head, offs_n, seq_len, stride_qs, offs_d, DH)
            p = _probs(q, k, lse2, valid, qk_scale2, PREC)
            dpb = _stats_grad(QKV, LSE, GAW, b, p, g_ent, offs_m, offs_n, offs_d, valid, seq_len, n_heads, DH, d_model,
                              stride_qb, stride_qs, qk_scale2, inv_h, HAS_ENT, HAS_AW, PREC)  # fmt: skip
            extra += tl.sum(p * dpb, 1)
        delta += extra
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
    seq_len, n_heads, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    sm_scale: tl.float32, inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (query block, batch·head): dQ_h = scale·Σ_j ds K_h over the visible keys."""
    pid_m, bh, b, h, offs_m, offs_d = _head_program(n_heads, BLOCK_M, DP)
    k_head = QKV + b.to(tl.int64) * stride_qb + d_model + h * DH
    hi = seq_len
    dq = tl.zeros((BLOCK_M, DP), tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
        # The eager dQ multiplies the masked (zero) ds by every later key. Summed first, while no tile
        # is live: the sweep below then needs no more registers than without it.
        dq += _zero_times(k_head, hi, seq_len, seq_len, stride_qs, offs_d, DH, BLOCK_N)[None, :]
    q, do, lse2, delta, g_ent = _row_block(QKV, DO, LSE, DELTA, GENT, b, h, offs_m, offs_d, seq_len, n_heads, DH,
                                           stride_qb, stride_qs, stride_ob, stride_os, HAS_ENT)  # fmt: skip
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_head, offs_n, seq_len, stride_qs, offs_d, DH)
        v = _load_rows(k_head + d_model, offs_n, seq_len, stride_qs, offs_d, DH)
        p, ds = _ds_tile(QKV, LSE, GAW, b, q, k, v, do, lse2, delta, g_ent, offs_m, offs_n, offs_d, seq_len, n_heads,
                         DH, d_model, stride_qb, stride_qs, qk_scale2, inv_h, CAUSAL, HAS_ENT, HAS_AW, PREC)  # fmt: skip
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq_head = DQKV + b.to(tl.int64) * stride_qb + h * DH
    _store_rows(dq_head, offs_m, seq_len, stride_qs, offs_d, DH, dq * sm_scale)


@triton.jit
def _attn_bwd_dkv_kernel(
    QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
    seq_len, n_heads, d_model, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2: tl.float32,
    sm_scale: tl.float32, inv_h: tl.float32,
    CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (key block, batch·head): dK_h = scale·Σ_i dsᵀ Q_h and dV_h = Σ_i pᵀ dO_h over the rows that
    see these keys."""
    pid_n, bh, b, h, offs_n, offs_d = _head_program(n_heads, BLOCK_N, DP)
    q_head = QKV + b.to(tl.int64) * stride_qb + h * DH
    lo = 0
    dk = tl.zeros((BLOCK_N, DP), tl.float32)
    dv = tl.zeros((BLOCK_N, DP), tl.float32)
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        # The eager dK and dV multiply the masked entries of the earlier rows too: their ds is exactly 0
        # (times Q), their probability 0, or NaN on a NaN row (times dO). Summed before the sweep.
        dk += _zero_times(q_head, 0, lo, seq_len, stride_qs, offs_d, DH, BLOCK_M)[None, :]
        nan_rows = tl.zeros((BLOCK_M,), tl.float32)
        for start_m in range(0, lo, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            nan_rows += 0.0 * tl.load(LSE + bh.to(tl.int64) * seq_len + rows, mask=rows < lo, other=0.0)
        do_head = DO + b.to(tl.int64) * stride_ob + h * DH
        dv += (_zero_times(do_head, 0, lo, seq_len, stride_os, offs_d, DH, BLOCK_M) + tl.sum(nan_rows, 0))[None, :]
    k = _load_rows(q_head + d_model, offs_n, seq_len, stride_qs, offs_d, DH)
    v = _load_rows(q_head + 2 * d_model, offs_n, seq_len, stride_qs, offs_d, DH)
    for start_m in range(lo, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse2, delta, g_ent = _row_block(QKV, DO, LSE, DELTA, GENT, b, h, offs_m, offs_d, seq_len, n_heads, DH,
                                               stride_qb, stride_qs, stride_ob, stride_os, HAS_ENT)  # fmt: skip
        p, ds = _ds_tile(QKV, LSE, GAW, b, q, k, v, do, lse2, delta, g_ent, offs_m, offs_n, offs_d, seq_len, n_heads,
                         DH, d_model, stride_qb, stride_qs, qk_scale2, inv_h, CAUSAL, HAS_ENT, HAS_AW, PREC)  # fmt: skip
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    dk_head = DQKV + b.to(tl.int64) * stride_qb + d_model + h * DH
    _store_rows(dk_head, offs_n, seq_len, stride_qs, offs_d, DH, dk * sm_scale)
    _store_rows(dk_head + d_model, offs_n, seq_len, stride_qs, offs_d, DH, dv)
