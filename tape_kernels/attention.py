"""Fused critic-head attention: ``nn.MultiheadAttention(D, H)(x, x, x)`` with head-averaged weights
and their statistics, without materialising any (B, H, S, S) or (B, S, S) tensor.

The reference (``CachedMultiheadAttention`` in the TapeTransformer, training path) computes

    out, w = MHA(x, x, x)                       w = mean_h softmax(q_h k_hᵀ / √dh)   (B, S, S)
    entropy[b, i] = −Σ_j w[b,i,j]·log(w[b,i,j] + 1e-12)
    aw[b, k]      = (Σ_j w[b,k,j] + Σ_i w[b,i,k]) / 2

``need_weights`` pushes PyTorch off its fused path and stores B·H·S² probabilities per block. Here the
in/out projections stay cuBLAS GEMMs (``F.linear``) and the core runs as Triton kernels that keep every
probability tile on chip:

* forward, one program per (batch, query block) holding *all heads* as 3-D tiles (H, BLOCK_M, dh):
  pass 1 over key blocks finds each head's log-sum-exp; pass 2 recomputes the exact probabilities
  p_h, accumulates O_h += p_h·V_h, averages p̄ = mean_h p_h in registers and reduces it to entropy,
  row sums and column-sum partials, one row per 16 queries: a (B, S/16 + 1, S) fp32 buffer (S²/16 per
  batch, vs. B·H·S² in eager MHA). A separate ``sum`` over its rows gives aw, so the column sums are
  deterministic (no float atomics): bit-identical run to run.
* backward (three kernels: δ preprocessing, dQ per query block, dK/dV per key block, all heads per
  program) recomputes p_h from the saved log-sum-exp; see ``_CriticAttnCore`` for the derivation of
  the softmax-backward row term δ, which the entropy and aw gradients change. Saved for backward:
  qkv, O and the (B, H, S) log-sum-exp.
* decode: a split-T (flash-decoding) kernel for a few new query rows against a cache of projected K/V,
  with a combine kernel when the cache is split.

Supported by the Triton path: any H and dh with next_pow2(H)·max(16, next_pow2(dh)) ≤ 256 (e.g. D = 256
with 4 heads, the model's configuration; D = 128 with 4 or 8 heads); fp32, fp16, bf16. Other sizes, float64,
and dropout > 0 in training take the eager path (``backend="auto"``) or raise ``ValueError``
(``backend="triton"``). CPU tensors run the kernels only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._dispatch import check_backend, interpreting, triton_available, use_triton
from tape_kernels._validate import check_same_device, check_same_dtype, check_tensor

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing: eager only
    triton = None
    tl = None

ENTROPY_EPS = 1e-12
LOG2E = 1.4426950408889634
# next_pow2(H) * max(16, next_pow2(dh)): the 3-D tiles (H, BLOCK, dh) live in registers.
MAX_HEAD_TILE = 256
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Eager references (test oracle and CPU / dropout fallback)
# --------------------------------------------------------------------------------------------------


def _causal_mask(s: int, device: torch.device) -> torch.Tensor:
    """Boolean (S, S) mask, True where key j > query i (masked)."""
    return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)


def attention_stats_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and aw of head-averaged weights w (B, S, S) -> ((B, S), (B, S))."""
    entropy = -(w * torch.log(w + ENTROPY_EPS)).sum(dim=-1)
    aw = (w.sum(dim=-1) + w.sum(dim=-2)) / 2
    return entropy, aw


def critic_attention_ref(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    num_heads: int,
    causal: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference: ``nn.MultiheadAttention(D, H, batch_first=True)(x, x, x)`` (head-averaged weights,
    dropout applied to the weights as MHA does) plus the critic statistics.

    x (B, S, D) -> out (B, S, D), entropy (B, S), aw (B, S); ``causal`` masks key j > query i.
    """
    b, s, d = x.shape
    h = num_heads
    dh = d // h
    qkv = F.linear(x, in_proj_weight, in_proj_bias)  # (B, S, 3D)
    q, k, v = qkv.view(b, s, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, dh) each
    q = q * (1.0 / math.sqrt(dh))
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, S, S)
    if causal:
        scores = scores.masked_fill(_causal_mask(s, x.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if training and dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    o = torch.matmul(p, v).transpose(1, 2).reshape(b, s, d)
    out = F.linear(o, out_proj_weight, out_proj_bias)
    entropy, aw = _stats_from_probs(p)
    return out, entropy, aw


def _stats_from_probs(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of per-head probabilities p (B, H, S, S) via their head average."""
    w = p.mean(dim=1)
    if w.dtype in (torch.float16, torch.bfloat16):
        # fp32 statistics (the kernels' contract): in half precision 1e-12 rounds to 0 and the masked
        # entries' 0·log(0) would give NaN entropies.
        w = w.float()
    return attention_stats_ref(w)


def critic_attention_decode_ref(
    q_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    causal: bool = False,
    q_offset: int | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager decode: softmax(q kᵀ/√dh) v for projected q_new (B, H, T_new, dh) against k/v (B, H, T, dh).

    Causal: new row r sits at position ``q_offset + r`` (default ``T − T_new``) and sees keys ≤ it.
    ``length`` (a (1,) integer tensor): only the first ``length`` keys are filled and the new rows are
    positions length − T_new … length − 1 (see ``critic_attention_decode``).
    """
    # Indexed from the end: leading dims beyond (B, H) broadcast (the lean CPU step stacks block pairs).
    tn, t, dh = q_new.shape[-2], k_cache.shape[-2], q_new.shape[-1]
    scores = torch.matmul(q_new * (1.0 / math.sqrt(dh)), k_cache.transpose(-1, -2))
    if length is not None:
        # Built from device tensors only (no host read), so this path can be graph-captured too.
        kpos = torch.arange(t, device=q_new.device)[None, :]
        last = length.to(torch.long) - 1  # position of the last new row
        qpos = (last - (tn - 1)) + torch.arange(tn, device=q_new.device)[:, None]
        limit = qpos if causal else last.expand(tn, 1)
        p = torch.softmax(scores.masked_fill(kpos > limit, float("-inf")), dim=-1)
        # Rows past the length are never written (a preallocated cache may hold NaN there): 0·NaN
        # would leak, so they are zeroed rather than trusted.
        unfilled = (kpos > last).view(t, 1)
        return torch.matmul(p, v_cache.masked_fill(unfilled, 0.0))
    if causal:
        off = t - tn if q_offset is None else q_offset
        qpos = torch.arange(tn, device=q_new.device)[:, None] + off
        kpos = torch.arange(t, device=q_new.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v_cache)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_heads(base, rows, n_rows, stride_s, offs_h, offs_d, H, DH):
        """(HP, BLOCK, DP) tile of one of q/k/v: element [h, r, d] at base + rows[r]*stride_s + h*DH + d."""
        h3 = offs_h[:, None, None]
        r3 = rows[None, :, None]
        d3 = offs_d[None, None, :]
        mask = (h3 < H) & (r3 < n_rows) & (d3 < DH)
        return tl.load(base + r3 * stride_s + h3 * DH + d3, mask=mask, other=0.0)

    @triton.jit
    def _probs(q, k, lse2, offs_m, offs_n, S, H, offs_h, qk_scale2, CAUSAL: tl.constexpr, PREC: tl.constexpr):
        """Exact probabilities p_h[i, j] (HP, BM, BN), fp32, zero outside the valid (head, row, key) set."""
        s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PREC) * qk_scale2
        valid = (offs_m[:, None] < S) & (offs_n[None, :] < S)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        valid3 = valid[None, :, :] & (offs_h[:, None, None] < H)
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
        S, H, DH, D, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2, inv_h, stride_cb,
        CAUSAL: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HP)
        offs_d = tl.arange(0, DP)
        base = QKV + b.to(tl.int64) * stride_qb
        q = _load_heads(base, offs_m, S, stride_qs, offs_h, offs_d, H, DH)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)

        # Pass 1: per-head running max / sum in log2 units (scores pre-multiplied by scale·log2 e).
        m_i = tl.full((HP, BLOCK_M), float("-inf"), tl.float32)
        l_i = tl.zeros((HP, BLOCK_M), tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_heads(base + D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
            s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PREC) * qk_scale2
            valid = offs_n[None, :] < S
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
        colp_base = COLP + b.to(tl.int64) * stride_cb + pid_m * R * S
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_heads(base + D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
            v = _load_heads(base + 2 * D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
            p = _probs(q, k, lse2, offs_m, offs_n, S, H, offs_h, qk_scale2, CAUSAL, PREC)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
            pbar = tl.sum(p, 0) * inv_h
            ent -= tl.sum(pbar * tl.log(pbar + 1e-12), 1)
            rows += tl.sum(pbar, 1)
            tl.store(colp_base + offs_n, 0.5 * tl.sum(pbar, 0), mask=offs_n < S)
        # Causal: this query block puts no weight on keys past `hi`.
        for start_n in range(hi, S, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(colp_base + offs_n, tl.zeros((BLOCK_N,), tl.float32), mask=offs_n < S)
        n_colp_rows = tl.cdiv(S, 16)
        for r in range(1, R):
            n_end = tl.where(pid_m * R + r < n_colp_rows, S, 0)
            for start_n in range(0, n_end, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                tl.store(colp_base + r * S + offs_n, tl.zeros((BLOCK_N,), tl.float32), mask=offs_n < S)

        h3 = offs_h[:, None, None]
        m3 = offs_m[None, :, None]
        d3 = offs_d[None, None, :]
        o_ptrs = O + b.to(tl.int64) * stride_ob + m3 * stride_os + h3 * DH + d3
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(h3 < H) & (m3 < S) & (d3 < DH))
        lse_ptrs = LSE + (b.to(tl.int64) * H + offs_h[:, None]) * S + offs_m[None, :]
        tl.store(lse_ptrs, lse2, mask=(offs_h[:, None] < H) & (offs_m[None, :] < S))
        row_mask = offs_m < S
        tl.store(ENT + b.to(tl.int64) * S + offs_m, ent, mask=row_mask)
        # Halved row sums go to the buffer's last row, so aw = (rowsum + colsum)/2 is one sum over its rows.
        tl.store(COLP + b.to(tl.int64) * stride_cb + n_colp_rows * S + offs_m, 0.5 * rows, mask=row_mask)

    @triton.jit
    def _attn_bwd_delta_kernel(
        QKV, O, DO, LSE, GENT, GAW, DELTA,
        S, H, DH, D, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2, inv_h,
        CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HP)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < S
        hm_mask = (offs_h[:, None] < H) & row_mask[None, :]
        o = _load_heads(O + b.to(tl.int64) * stride_ob, offs_m, S, stride_os, offs_h, offs_d, H, DH).to(tl.float32)
        do = _load_heads(DO + b.to(tl.int64) * stride_ob, offs_m, S, stride_os, offs_h, offs_d, H, DH).to(tl.float32)
        delta = tl.sum(o * do, 2)
        if HAS_ENT or HAS_AW:
            base = QKV + b.to(tl.int64) * stride_qb
            q = _load_heads(base, offs_m, S, stride_qs, offs_h, offs_d, H, DH)
            lse2 = tl.load(LSE + (b.to(tl.int64) * H + offs_h[:, None]) * S + offs_m[None, :], mask=hm_mask, other=0.0)
            g_ent = tl.load(GENT + b.to(tl.int64) * S + offs_m, mask=row_mask, other=0.0)
            hi = S
            if CAUSAL:
                hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
            extra = tl.zeros((HP, BLOCK_M), tl.float32)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k = _load_heads(base + D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
                g_aw = tl.load(GAW + b.to(tl.int64) * S + offs_n, mask=offs_n < S, other=0.0)
                p = _probs(q, k, lse2, offs_m, offs_n, S, H, offs_h, qk_scale2, CAUSAL, PREC)
                dpb = _dpbar(tl.sum(p, 0) * inv_h, g_ent, g_aw, HAS_ENT, HAS_AW)
                extra += tl.sum(p * dpb[None, :, :], 2)
            delta += extra * inv_h
        tl.store(DELTA + (b.to(tl.int64) * H + offs_h[:, None]) * S + offs_m[None, :], delta, mask=hm_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(
        QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
        S, H, DH, D, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2, sm_scale, inv_h,
        CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HP)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < S
        hm_mask = (offs_h[:, None] < H) & row_mask[None, :]
        base = QKV + b.to(tl.int64) * stride_qb
        q = _load_heads(base, offs_m, S, stride_qs, offs_h, offs_d, H, DH)
        do = _load_heads(DO + b.to(tl.int64) * stride_ob, offs_m, S, stride_os, offs_h, offs_d, H, DH)
        hm_off = (b.to(tl.int64) * H + offs_h[:, None]) * S + offs_m[None, :]
        lse2 = tl.load(LSE + hm_off, mask=hm_mask, other=0.0)
        delta = tl.load(DELTA + hm_off, mask=hm_mask, other=0.0)
        g_ent = tl.load(GENT + b.to(tl.int64) * S + offs_m, mask=row_mask, other=0.0)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        dq = tl.zeros((HP, BLOCK_M, DP), tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_heads(base + D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
            v = _load_heads(base + 2 * D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
            p = _probs(q, k, lse2, offs_m, offs_n, S, H, offs_h, qk_scale2, CAUSAL, PREC)
            dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PREC)
            if HAS_ENT or HAS_AW:
                g_aw = tl.load(GAW + b.to(tl.int64) * S + offs_n, mask=offs_n < S, other=0.0)
                dpb = _dpbar(tl.sum(p, 0) * inv_h, g_ent, g_aw, HAS_ENT, HAS_AW)
                dp += dpb[None, :, :] * inv_h
            ds = p * (dp - delta[:, :, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        h3 = offs_h[:, None, None]
        m3 = offs_m[None, :, None]
        d3 = offs_d[None, None, :]
        ptrs = DQKV + b.to(tl.int64) * stride_qb + m3 * stride_qs + h3 * DH + d3
        tl.store(ptrs, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=(h3 < H) & (m3 < S) & (d3 < DH))

    @triton.jit
    def _attn_bwd_dkv_kernel(
        QKV, DO, LSE, DELTA, GENT, GAW, DQKV,
        S, H, DH, D, stride_qb, stride_qs, stride_ob, stride_os, qk_scale2, sm_scale, inv_h,
        CAUSAL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_AW: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HP)
        offs_d = tl.arange(0, DP)
        base = QKV + b.to(tl.int64) * stride_qb
        k = _load_heads(base + D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
        v = _load_heads(base + 2 * D, offs_n, S, stride_qs, offs_h, offs_d, H, DH)
        g_aw = tl.load(GAW + b.to(tl.int64) * S + offs_n, mask=offs_n < S, other=0.0)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        dk = tl.zeros((HP, BLOCK_N, DP), tl.float32)
        dv = tl.zeros((HP, BLOCK_N, DP), tl.float32)
        for start_m in range(lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_mask = offs_m < S
            hm_mask = (offs_h[:, None] < H) & row_mask[None, :]
            q = _load_heads(base, offs_m, S, stride_qs, offs_h, offs_d, H, DH)
            do = _load_heads(DO + b.to(tl.int64) * stride_ob, offs_m, S, stride_os, offs_h, offs_d, H, DH)
            hm_off = (b.to(tl.int64) * H + offs_h[:, None]) * S + offs_m[None, :]
            lse2 = tl.load(LSE + hm_off, mask=hm_mask, other=0.0)
            delta = tl.load(DELTA + hm_off, mask=hm_mask, other=0.0)
            p = _probs(q, k, lse2, offs_m, offs_n, S, H, offs_h, qk_scale2, CAUSAL, PREC)
            dv += tl.dot(tl.permute(p, (0, 2, 1)).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PREC)
            if HAS_ENT or HAS_AW:
                g_ent = tl.load(GENT + b.to(tl.int64) * S + offs_m, mask=row_mask, other=0.0)
                dpb = _dpbar(tl.sum(p, 0) * inv_h, g_ent, g_aw, HAS_ENT, HAS_AW)
                dp += dpb[None, :, :] * inv_h
            ds = p * (dp - delta[:, :, None])
            dk += tl.dot(tl.permute(ds, (0, 2, 1)).to(q.dtype), q, input_precision=PREC)
        h3 = offs_h[:, None, None]
        n3 = offs_n[None, :, None]
        d3 = offs_d[None, None, :]
        mask = (h3 < H) & (n3 < S) & (d3 < DH)
        ptrs = DQKV + b.to(tl.int64) * stride_qb + n3 * stride_qs + h3 * DH + d3
        tl.store(ptrs + D, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=mask)
        tl.store(ptrs + 2 * D, dv.to(DQKV.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_kernel(
        Q, K, V, O, ML, LEN,
        T_NEW, T, DH, q_offset, n_split_keys, qk_scale2,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, NH,
        CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DEVICE_LEN: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # One program per (row block, batch·head, key split): flash-decoding keeps a B = 1 call
        # spread over many SMs by splitting the cache length instead of the (tiny) query count.
        if DEVICE_LEN:
            # The filled length lives on the device (a CUDA-graph-captured decode step replays with
            # a new length and the same launch): T is the capacity, LEN[0] the keys in use, and the
            # new rows are the last T_NEW of them. Splits past LEN run no iteration.
            T = tl.load(LEN)
            q_offset = T - T_NEW
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)
        b = bh // NH
        h = bh % NH
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < T_NEW
        d_mask = offs_d < DH
        q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        kb = K + b.to(tl.int64) * sk_b + h * sk_h
        vb = V + b.to(tl.int64) * sv_b + h * sv_h
        lo = split * n_split_keys
        hi = tl.minimum(T, lo + n_split_keys)
        if CAUSAL:
            hi = tl.minimum(hi, q_offset + pid_m * BLOCK_M + BLOCK_M)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            k = tl.load(kb + offs_n[:, None] * sk_t + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(vb + offs_n[:, None] * sv_t + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
            valid = n_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= q_offset + offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A split can hold no visible key for some causal rows: keep exp2 arguments finite.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if SPLIT:
            # Partials (unnormalised acc, running max, sum) for _decode_combine_kernel.
            row = (bh * tl.num_programs(2) + split).to(tl.int64) * T_NEW + offs_m
            tl.store(O + row[:, None] * DP + offs_d[None, :], acc, mask=row_mask[:, None])
            tl.store(ML + row * 2, m_i, mask=row_mask)
            tl.store(ML + row * 2 + 1, l_i, mask=row_mask)
        else:
            out = acc / l_i[:, None]
            o_ptrs = O + (bh.to(tl.int64) * T_NEW + offs_m[:, None]) * DH + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_combine_kernel(
        ACC, ML, O, T_NEW, DH, N_SPLIT, DP: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < T_NEW
        m_tot = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for sp in range(0, N_SPLIT):
            row = (bh * N_SPLIT + sp).to(tl.int64) * T_NEW + offs_m
            m_tot = tl.maximum(m_tot, tl.load(ML + row * 2, mask=row_mask, other=0.0))
        l_tot = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        for sp in range(0, N_SPLIT):
            row = (bh * N_SPLIT + sp).to(tl.int64) * T_NEW + offs_m
            m_s = tl.load(ML + row * 2, mask=row_mask, other=float("-inf"))
            l_s = tl.load(ML + row * 2 + 1, mask=row_mask, other=0.0)
            w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_tot))
            l_tot += l_s * w
            acc += tl.load(ACC + row[:, None] * DP + offs_d[None, :], mask=row_mask[:, None], other=0.0) * w[:, None]
        # Padded rows (beyond T_NEW) got no partials: keep their (unstored) quotient finite.
        out = acc / tl.where(l_tot > 0.0, l_tot, 1.0)[:, None]
        o_ptrs = O + (bh.to(tl.int64) * T_NEW + offs_m[:, None]) * DH + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < DH))


# --------------------------------------------------------------------------------------------------
# Configs, autotuning, launchers
# --------------------------------------------------------------------------------------------------

_ELT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _head_tile(num_heads: int, dh: int) -> tuple[int, int]:
    """(HP, DP): heads and head dim padded to powers of two (dh ≥ 16 for tl.dot)."""
    return _next_pow2(num_heads), max(16, _next_pow2(dh))


def kernel_supports(embed_dim: int, num_heads: int) -> bool:
    """Whether the Triton path handles this attention shape (see module docstring)."""
    if num_heads <= 0 or embed_dim % num_heads:
        return False
    hp, dp = _head_tile(num_heads, embed_dim // num_heads)
    return hp * dp <= MAX_HEAD_TILE


# Tile configs per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, {element size: shared bytes}). The
# shared-memory figures are what the compiler reports for sm_86 at the largest supported head tile
# (HP·DP = 256, causal, statistics gradients on); `python -m tape_kernels._aot attention` re-measures them
# for sm_86 and sm_90 and fails above 101376 B. A config is only offered to the element sizes it lists.
# The configs listed compile without register spills for sm_86 at that head tile (checked with
# benchmarks/kernel_report.py; the fp32 dQ tile spills 12 B): larger tiles (e.g. 32×64 with 4 warps, 64×64) spill, since the 3-D tiles
# keep HP·BLOCK·DP fp32 accumulators per program. fp32 with IEEE products has no tensor-core path (its
# 3-D dots are FMA loops over fp32 tiles staged in shared memory), so it gets one small tile per kernel:
# it is the exact path, bf16/fp16 the fast one.
_CONFIGS: dict[str, tuple] = {
    "_attn_fwd_kernel": (
        (16, 32, 4, 2, {2: 24576}),
        (32, 32, 4, 2, {2: 32768}),
        (32, 32, 8, 2, {2: 40960}),
        (32, 64, 8, 2, {2: 65536}),
        (64, 32, 8, 2, {2: 65536}),
        (16, 16, 8, 1, {4: 49152}),
    ),
    "_attn_bwd_delta_kernel": (
        (16, 32, 4, 2, {2: 24576}),
        (32, 32, 4, 2, {2: 32768}),
        (32, 64, 8, 2, {2: 49152}),
        (16, 16, 4, 1, {4: 32768}),
    ),
    "_attn_bwd_dq_kernel": (
        (16, 16, 4, 2, {2: 32768}),
        (16, 32, 4, 2, {2: 49152}),
        (32, 32, 8, 2, {2: 65536}),
        (16, 16, 8, 1, {4: 69632}),
    ),
    "_attn_bwd_dkv_kernel": (
        (16, 16, 4, 2, {2: 35328}),
        (32, 16, 8, 2, {2: 54272}),
        (16, 32, 8, 2, {2: 53760}),
        (16, 16, 4, 1, {4: 98304}),  # TF32 products need 98304 B, IEEE 69632 B
    ),
}
_INTERP_CONFIG = (32, 64, 4, 1)  # interpreter: one fixed config (autotuning would re-run the numpy emulation)


def _device_smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)


def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's early_config_prune signature
    """Keep the configs measured for this element size whose shared memory fits the device's per-block limit."""
    ptr = named_args["QKV"]
    elt = ptr.element_size()
    limit = _device_smem_limit(ptr.device)
    kept = [c for c in configs if elt in config_smem(c) and config_smem(c)[elt] <= limit]
    if not kept:  # a device below every measured figure: the smallest tile for this element size
        own = [c for c in configs if elt in config_smem(c)]
        kept = [min(own, key=lambda c: config_smem(c)[elt])]
    return kept


# Shared memory per element size of each autotune config, keyed by the Config object. Not stored on
# the Config: Triton's autotune disk cache rebuilds Configs with Config(**c.all_kwargs()), which an
# extra attribute breaks (seen with triton 3.6 and TRITON_CACHE_AUTOTUNING=1).
_CONFIG_SMEM: dict[int, tuple[object, dict[int, int]]] = {}


def config_smem(config) -> dict[int, int]:  # noqa: ANN001
    """{element size: shared bytes} measured for an autotune config of this module ({} if unknown)."""
    hit = _CONFIG_SMEM.get(id(config))
    return hit[1] if hit is not None and hit[0] is config else {}


_AUTOTUNED: dict[str, object] = {}


def _tuned(name: str):  # noqa: ANN202
    """The autotuned wrapper of kernel ``name`` (built lazily; keyed on the shape class)."""
    if name not in _AUTOTUNED:
        configs = []
        for bm, bn, warps, stages, smem in _CONFIGS[name]:
            c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            _CONFIG_SMEM[id(c)] = (c, smem)
            configs.append(c)
        key = ["S", "H", "DH", "CAUSAL"] + ([] if name == "_attn_fwd_kernel" else ["HAS_ENT", "HAS_AW"])
        _AUTOTUNED[name] = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(
            globals()[name]
        )
    return _AUTOTUNED[name]


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def autotune_enabled() -> bool:
    """``TAPE_KERNELS_ATTN_AUTOTUNE=0`` launches the first fitting config of each kernel instead of
    autotuning (compiles one config per kernel: quick GPU correctness runs)."""
    return os.environ.get("TAPE_KERNELS_ATTN_AUTOTUNE", "1") not in ("", "0")


def _launch(name: str, grid_fn, args: tuple, consts: dict) -> None:  # noqa: ANN001
    """Launch an attention kernel: autotuned on a GPU, one fixed config under the interpreter."""
    kernel = globals()[name]
    if interpreting():
        bm, bn, w, st = _INTERP_CONFIG
        kernel[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
    elif autotune_enabled():
        _tuned(name)[grid_fn](*args, **consts)
    else:
        c = _prune(_tuned(name).configs, {"QKV": args[0]})[0]
        meta = dict(c.kwargs)
        kernel[grid_fn(meta)](*args, **consts, **meta, num_warps=c.num_warps, num_stages=c.num_stages)


def _attn_forward(qkv: torch.Tensor, num_heads: int, causal: bool):
    """qkv (B, S, 3D) contiguous -> o (B, S, D), lse2 (B, H, S) fp32, entropy (B, S) fp32, aw (B, S) fp32."""
    b, s, d3 = qkv.shape
    d = d3 // 3
    dh = d // num_heads
    hp, dp = _head_tile(num_heads, dh)
    o = torch.empty(b, s, d, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b, num_heads, s, device=qkv.device, dtype=torch.float32)
    ent = torch.empty(b, s, device=qkv.device, dtype=torch.float32)
    # Halved column-sum partials, one row per 16 queries (see the kernel), independent of the tuned BLOCK_M,
    # plus a last row of halved row sums: aw = colp.sum(1), a deterministic reduction.
    colp = torch.empty(b, triton.cdiv(s, 16) + 1, s, device=qkv.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(dh)

    def grid(meta):  # noqa: ANN001, ANN202
        return (triton.cdiv(s, meta["BLOCK_M"]), b)

    _launch(
        "_attn_fwd_kernel",
        grid,
        (qkv, o, lse, ent, colp, s, num_heads, dh, d, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1),
         sm_scale * LOG2E, 1.0 / num_heads, colp.stride(0)),
        {"CAUSAL": causal, "HP": hp, "DP": dp, "PREC": _precision(qkv.dtype)},
    )  # fmt: skip
    aw = colp.sum(dim=1)
    return o, lse, ent, aw


def _attn_backward(qkv, o, lse, do, g_ent, g_aw, num_heads: int, causal: bool):  # noqa: ANN001, ANN202
    """Gradient w.r.t. qkv (B, S, 3D) given dO (B, S, D) and the statistics' gradients (B, S) or None."""
    b, s, d3 = qkv.shape
    d = d3 // 3
    dh = d // num_heads
    hp, dp = _head_tile(num_heads, dh)
    sm_scale = 1.0 / math.sqrt(dh)
    has_ent, has_aw = g_ent is not None, g_aw is not None
    dummy = lse.new_zeros(1)
    g_ent = g_ent.float().contiguous() if has_ent else dummy
    g_aw = g_aw.float().contiguous() if has_aw else dummy
    do = do.contiguous()
    delta = torch.empty_like(lse)
    dqkv = torch.empty_like(qkv)
    common = {"CAUSAL": causal, "HAS_ENT": has_ent, "HAS_AW": has_aw, "HP": hp, "DP": dp, "PREC": _precision(qkv.dtype)}
    dims = (s, num_heads, dh, d, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), sm_scale * LOG2E)

    def grid_m(meta):  # noqa: ANN001, ANN202
        return (triton.cdiv(s, meta["BLOCK_M"]), b)

    def grid_n(meta):  # noqa: ANN001, ANN202
        return (triton.cdiv(s, meta["BLOCK_N"]), b)

    _launch("_attn_bwd_delta_kernel", grid_m, (qkv, o, do, lse, g_ent, g_aw, delta, *dims, 1.0 / num_heads), common)
    _launch("_attn_bwd_dq_kernel", grid_m, (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, sm_scale, 1.0 / num_heads), common)
    _launch("_attn_bwd_dkv_kernel", grid_n, (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, sm_scale, 1.0 / num_heads), common)
    return dqkv


class _CriticAttnCore(torch.autograd.Function):
    """qkv (B, S, 3D) -> (o (B, S, D), entropy (B, S) fp32, aw (B, S) fp32).

    Backward derivation. With p_h = softmax_j(s_h) per head, p̄ = (1/H)·Σ_h p_h, the loss L reaches p̄
    through entropy[i] = −Σ_j p̄ log(p̄ + ε) and aw[k] = (Σ_j p̄[k, j] + Σ_i p̄[i, k]) / 2, so with
    ḡ_ent = dL/dentropy, ḡ_aw = dL/daw:

        dp̄[i, j]   = −ḡ_ent[i]·(log(p̄[i, j] + ε) + p̄[i, j]/(p̄[i, j] + ε)) + (ḡ_aw[i] + ḡ_aw[j]) / 2
        dp_h[i, j] = dO_h[i]·V_h[j] + dp̄[i, j] / H
        ds_h[i, j] = p_h[i, j]·(dp_h[i, j] − δ_h[i]),
        δ_h[i]     = Σ_j p_h[i, j]·dp_h[i, j] = dO_h[i]·O_h[i] + (1/H)·Σ_j p_h[i, j]·dp̄[i, j].

    The row term δ is therefore not just dO·O: its second part needs p̄ over every key, computed by a
    preprocessing pass per (batch, query block) before the dQ and dK/dV passes. Any part of dp̄ constant
    along j (here ḡ_aw[i]/2) adds the same constant to dp_h and δ_h (Σ_j p_h = 1) and cancels in ds_h,
    so the kernels drop it. dQ_h = scale·Σ_j ds_h K_h, dK_h = scale·Σ_i ds_hᵀ Q_h, dV_h = Σ_i p_hᵀ dO_h.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int, causal: bool):  # noqa: ANN001, ANN205
        qkv = qkv.contiguous()
        o, lse, ent, aw = _attn_forward(qkv, num_heads, causal)
        ctx.save_for_backward(qkv, o, lse)
        ctx.num_heads, ctx.causal = num_heads, causal
        ctx.set_materialize_grads(False)
        return o, ent, aw

    @staticmethod
    def backward(ctx, do, g_ent, g_aw):  # noqa: ANN001, ANN205
        qkv, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dqkv = _attn_backward(qkv, o, lse, do, g_ent, g_aw, ctx.num_heads, ctx.causal)
        return dqkv, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_inputs(x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads):  # noqa: ANN001, ANN202
    check_tensor("x", x, ndim=3)
    d = x.shape[-1]
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty (B, S, D), got shape {tuple(x.shape)}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if d % num_heads:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {num_heads}")
    floats = (*KERNEL_DTYPES, torch.float64)
    check_tensor("x", x, dtypes=floats)
    check_tensor("in_proj_weight", in_proj_weight, shape=(3 * d, d), dtypes=floats)
    check_tensor("out_proj_weight", out_proj_weight, shape=(d, d), dtypes=floats)
    if in_proj_bias is not None:
        check_tensor("in_proj_bias", in_proj_bias, shape=(3 * d,), dtypes=floats)
    if out_proj_bias is not None:
        check_tensor("out_proj_bias", out_proj_bias, shape=(d,), dtypes=floats)
    tensors = {
        "x": x,
        "in_proj_weight": in_proj_weight,
        "in_proj_bias": in_proj_bias,
        "out_proj_weight": out_proj_weight,
        "out_proj_bias": out_proj_bias,
    }
    check_same_device(**tensors)
    if not torch.is_autocast_enabled(x.device.type):
        check_same_dtype(**tensors)


def attention_stats(
    qkv: torch.Tensor, num_heads: int, causal: bool = False, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention core on projected inputs: qkv (B, S, 3D) = ``F.linear(x, in_proj_weight, in_proj_bias)``.

    Returns (o (B, S, D) in qkv's dtype, entropy (B, S) fp32, aw (B, S) fp32); differentiable.
    """
    check_backend(backend)
    check_tensor("qkv", qkv, ndim=3, dtypes=(*KERNEL_DTYPES, torch.float64))
    if qkv.numel() == 0:
        raise ValueError(f"qkv must be non-empty (B, S, 3D), got shape {tuple(qkv.shape)}")
    if qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % num_heads:
        raise ValueError(f"qkv last dim {qkv.shape[-1]} must be 3·D with D divisible by num_heads {num_heads}")
    d = qkv.shape[-1] // 3
    if _kernel_ok(qkv, d, num_heads, backend):
        return _CriticAttnCore.apply(qkv, num_heads, causal)
    b, s, _ = qkv.shape
    dh = d // num_heads
    q, k, v = qkv.view(b, s, 3, num_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    scores = torch.matmul(q * (1.0 / math.sqrt(dh)), k.transpose(-1, -2))
    if causal:
        scores = scores.masked_fill(_causal_mask(s, qkv.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p, v).transpose(1, 2).reshape(b, s, d)
    ent, aw = _stats_from_probs(p)
    return o, ent, aw


def _kernel_ok(t: torch.Tensor, d: int, num_heads: int, backend: str) -> bool:
    if not use_triton(t, backend=backend):
        return False
    reason = None
    if t.dtype not in KERNEL_DTYPES:
        reason = f"dtype {t.dtype} (kernels take {KERNEL_DTYPES})"
    elif not kernel_supports(d, num_heads):
        hp, dp = _head_tile(num_heads, d // num_heads)
        reason = f"head tile next_pow2(H)·max(16, next_pow2(dh)) = {hp}·{dp} > {MAX_HEAD_TILE}"
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"critic attention Triton kernels do not support {reason}; use backend='eager'")
    return False


def critic_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    num_heads: int,
    causal: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``nn.MultiheadAttention(x, x, x)`` + critic statistics.

    x (B, S, D); in_proj_weight (3D, D), in_proj_bias (3D,), out_proj_weight (D, D), out_proj_bias (D,).
    Returns out (B, S, D), entropy (B, S), aw (B, S) (aw before the block's softmax). On the kernel path
    entropy and aw are fp32 whatever the input dtype. Dropout > 0 in training runs the eager reference
    (the fused kernels have no dropout); so do float64 inputs and CPU tensors without the interpreter.
    """
    check_backend(backend)
    _check_inputs(x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if training and dropout_p > 0.0:
        if backend == "triton":
            raise ValueError("dropout_p > 0 in training has no fused kernel; use backend='auto' or 'eager'")
        return critic_attention_ref(
            x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, causal, dropout_p, training
        )
    qkv = F.linear(x, in_proj_weight, in_proj_bias)
    if not _kernel_ok(qkv, x.shape[-1], num_heads, backend):
        return critic_attention_ref(
            x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, causal, dropout_p, training
        )
    o, ent, aw = _CriticAttnCore.apply(qkv, num_heads, causal)
    return F.linear(o, out_proj_weight, out_proj_bias), ent, aw


def critic_attention_decode(
    q_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    causal: bool = False,
    q_offset: int | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a few new projected queries against a projected K/V cache (inference, no grad).

    q_new (B, H, T_new, dh), k_cache and v_cache (B, H, T, dh) -> (B, H, T_new, dh) in q_new's dtype.
    The 1/√dh scale is applied here. ``causal``: new row r is position ``q_offset + r`` (default
    ``T − T_new``: the new rows are the cache's last T_new positions) and sees keys at positions ≤ it.
    ``num_splits`` overrides the number of key splits (flash-decoding), e.g. for tests.

    ``length``: a (1,) int32 tensor on q_new's device holding the number of filled cache rows
    (T_new ≤ length ≤ T, not checked: reading it would synchronise). Then T is only the capacity,
    keys at positions ≥ length are ignored and the new rows are positions length − T_new … length − 1
    (``q_offset`` must be None). Shapes no longer depend on the length, so the call can be captured
    in a CUDA graph and replayed as the cache fills.
    """
    check_backend(backend)
    check_tensor("q_new", q_new, ndim=4, dtypes=(*KERNEL_DTYPES, torch.float64))
    b, h, tn, dh = q_new.shape
    check_tensor("k_cache", k_cache, shape=(b, h, None, dh))
    t = k_cache.shape[2]
    check_tensor("v_cache", v_cache, shape=(b, h, t, dh))
    check_same_device(q_new=q_new, k_cache=k_cache, v_cache=v_cache)
    check_same_dtype(q_new=q_new, k_cache=k_cache, v_cache=v_cache)
    if tn < 1 or t < 1:
        raise ValueError(f"need at least one new row and one cached key, got T_new={tn}, T={t}")
    if length is not None:
        check_tensor("length", length, shape=(1,), dtypes=(torch.int32,))
        check_same_device(q_new=q_new, length=length)
        if q_offset is not None:
            raise ValueError("q_offset and length exclude each other: with length, the new rows end at length")
        if tn > t:
            raise ValueError(f"T_new={tn} new rows do not fit a cache of capacity {t}")
    if length is not None:
        off = 0
    elif causal:
        off = t - tn if q_offset is None else int(q_offset)
        if off < 0 or off + tn > t:
            raise ValueError(f"causal decode needs 0 ≤ q_offset and q_offset + T_new ≤ T; got {off}, {tn}, {t}")
    else:
        off = 0
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be ≥ 1, got {num_splits}")
    kernel = use_triton(q_new, backend=backend) and q_new.dtype in KERNEL_DTYPES and dh <= 128
    if backend == "triton" and not kernel:
        raise ValueError(f"decode kernel supports dtypes {KERNEL_DTYPES} and dh ≤ 128, got {q_new.dtype}, dh={dh}")
    if not kernel:
        return critic_attention_decode_ref(q_new, k_cache, v_cache, causal, off if causal else None, length)
    return _decode_launch(q_new, k_cache, v_cache, causal, off, num_splits, length)


# Decode tiles by element size: (BLOCK_N, num_stages, num_warps); BLOCK_M is 16 (a few new rows; more
# rows take more row blocks). Spill-free for sm_86 at DP = 128 (fp32: 43 KB shared, fp16/bf16: 22.5 KB).
_DECODE_CFG = {4: (32, 2, 8), 2: (64, 2, 4)}
_DECODE_BLOCK_M = 16


def _decode_launch(q, k, v, causal: bool, off: int, num_splits: int | None, length=None) -> torch.Tensor:  # noqa: ANN001
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    b, h, tn, dh = q.shape
    t = k.shape[2]
    dp = max(16, _next_pow2(dh))
    block_m = _DECODE_BLOCK_M
    block_n, stages, warps = _DECODE_CFG[q.element_size()]
    if interpreting():
        block_n = 32
    n_mb = triton.cdiv(tn, block_m)
    if num_splits is None:
        # Enough programs to cover the SMs at B = 1; each split keeps at least a few key blocks.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = max(1, min(triton.cdiv(2 * sms, b * h * n_mb), triton.cdiv(t, 4 * block_n)))
    chunk = triton.cdiv(triton.cdiv(t, num_splits), block_n) * block_n
    num_splits = triton.cdiv(t, chunk)
    out = torch.empty(b, h, tn, dh, device=q.device, dtype=q.dtype)
    split = num_splits > 1
    if split:
        acc = torch.empty(b * h * num_splits * tn, dp, device=q.device, dtype=torch.float32)
        ml = torch.empty(b * h * num_splits * tn, 2, device=q.device, dtype=torch.float32)
    else:
        acc, ml = out, out
    _decode_kernel[(n_mb, b * h, num_splits)](
        q, k, v, acc, ml, length if length is not None else out, tn, t, dh, off, chunk, LOG2E / math.sqrt(dh),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), h,
        CAUSAL=causal, SPLIT=split, DEVICE_LEN=length is not None, DP=dp, BLOCK_M=block_m, BLOCK_N=block_n, PREC=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split:
        _decode_combine_kernel[(n_mb, b * h)](acc, ml, out, tn, dh, num_splits, DP=dp, BLOCK_M=block_m, num_warps=4)
    return out


class CriticAttention(nn.Module):
    """Drop-in for the critic's ``nn.MultiheadAttention(D, H, dropout, batch_first=True)`` + statistics.

    Parameters and ``state_dict`` keys are MHA's (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
    ``out_proj.bias``), initialised as MHA does. ``forward(x (B, S, D), causal=False)`` returns
    ``(out (B, S, D), entropy (B, S), aw (B, S))``. Dropout > 0 in training mode runs the eager path.
    """

    def __init__(self, embed_dim: int, num_heads: int = 4, dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.backend = embed_dim, num_heads, dropout, check_backend(backend)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return critic_attention(x, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias,
                                self.num_heads, causal, self.dropout, self.training, self.backend)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# --------------------------------------------------------------------------------------------------


def aot_specs() -> list:
    """Every kernel × config × dtype, at the largest supported head tile (HP·DP = 4·64, the model's D = 256)."""
    if not triton_available():
        return []
    from tape_kernels._aot import AotSpec

    specs = []
    hp, dp = 4, 64
    scalars_attn = {"S": "i32", "H": "i32", "DH": "i32", "D": "i32", "stride_qb": "i32", "stride_qs": "i32",
                    "stride_ob": "i32", "stride_os": "i32", "qk_scale2": "fp32", "sm_scale": "fp32", "inv_h": "fp32",
                    "stride_cb": "i32"}  # fmt: skip
    for dtype in KERNEL_DTYPES:
        ptr = _TL_PTR[dtype]
        tag = str(dtype).replace("torch.", "")
        kernels = (
            ("_attn_fwd_kernel", {"QKV": ptr, "O": ptr, "LSE": "*fp32", "ENT": "*fp32", "COLP": "*fp32"}, {}),
            ("_attn_bwd_delta_kernel", {"QKV": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32",
                                                      "GENT": "*fp32", "GAW": "*fp32", "DELTA": "*fp32"},
             {"HAS_ENT": True, "HAS_AW": True}),
            ("_attn_bwd_dq_kernel", {"QKV": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32",
                                                   "GENT": "*fp32", "GAW": "*fp32", "DQKV": ptr},
             {"HAS_ENT": True, "HAS_AW": True}),
            ("_attn_bwd_dkv_kernel", {"QKV": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32",
                                                    "GENT": "*fp32", "GAW": "*fp32", "DQKV": ptr},
             {"HAS_ENT": True, "HAS_AW": True}),
        )  # fmt: skip
        for name, ptrs, flags in kernels:
            kernel = globals()[name]
            argnames = _jit_arg_names(kernel)
            for bm, bn, warps, stages, smem in _CONFIGS[name]:
                if _ELT[dtype] not in smem:
                    continue
                # fp32 launches with IEEE products by default and TF32 when the user enabled it in torch.
                for prec in ("ieee", "tf32") if dtype == torch.float32 else ("tf32",):
                    consts = {"CAUSAL": True, "HP": hp, "DP": dp, "BLOCK_M": bm, "BLOCK_N": bn, "PREC": prec, **flags}
                    sig = {a: ptrs.get(a) or scalars_attn.get(a) or "constexpr" for a in argnames}
                    specs.append(AotSpec(f"{name}[{tag},{prec},bm{bm},bn{bn},w{warps},s{stages}]", kernel, sig,
                                         {a: consts[a] for a in argnames if sig[a] == "constexpr"}, warps, stages))  # fmt: skip
        prec = "ieee" if dtype == torch.float32 else "tf32"
        dec_sig = {a: "i32" for a in _jit_arg_names(_decode_kernel)}
        dec_sig.update({"Q": ptr, "K": ptr, "V": ptr, "O": "*fp32", "ML": "*fp32", "LEN": "*i32", "qk_scale2": "fp32"})
        # Decode: no autotuning; BLOCK_M = 16, compiled at the largest head dim (DP = 128), with the
        # cache length from the host and from the device (the CUDA-graph decode step).
        block_n, stages, warps = _DECODE_CFG[_ELT[dtype]]
        for split in (True, False):
            for dev_len in (False, True):
                for dprec in ("ieee", "tf32") if dtype == torch.float32 else ("tf32",):
                    consts = {"CAUSAL": True, "SPLIT": split, "DEVICE_LEN": dev_len, "DP": 128,
                              "BLOCK_M": _DECODE_BLOCK_M, "BLOCK_N": block_n, "PREC": dprec}  # fmt: skip
                    sig = dict(dec_sig, **dict.fromkeys(consts, "constexpr"))
                    if not split:
                        sig.update(O=ptr, ML=ptr)
                    suffix = f",{dprec}" if dtype == torch.float32 and dprec == "tf32" else ""
                    suffix += ",devlen" if dev_len else ""
                    name = f"_decode_kernel[{tag},{'split' if split else 'direct'}{suffix}]"
                    specs.append(AotSpec(name, _decode_kernel, sig, consts, warps, stages))
        comb_sig = {"ACC": "*fp32", "ML": "*fp32", "O": ptr, "T_NEW": "i32", "DH": "i32", "N_SPLIT": "i32",
                    "DP": "constexpr", "BLOCK_M": "constexpr"}  # fmt: skip
        specs.append(AotSpec(f"_decode_combine_kernel[{tag}]", _decode_combine_kernel, comb_sig,
                             {"DP": 128, "BLOCK_M": _DECODE_BLOCK_M}, 4, 1))  # fmt: skip
    return specs


def _jit_arg_names(kernel) -> list[str]:  # noqa: ANN001
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return list(kernel.arg_names)


__all__ = [
    "CriticAttention",
    "aot_specs",
    "attention_stats",
    "attention_stats_ref",
    "critic_attention",
    "critic_attention_decode",
    "critic_attention_decode_ref",
    "critic_attention_ref",
    "kernel_supports",
]
