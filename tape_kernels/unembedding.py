"""Student-t unembedding: log_softmax over v of −½(df+D)·log1p(max(|h−U[:,v]|², 1e-12)/df).

Logits reach thousands in magnitude at D=256, so the math runs in fp32 (or fp64 for fp64 inputs)
even under autocast.

Kernel layout: one program owns BLOCK_M rows of h and sweeps all V columns in BLOCK_V tiles; each
tile is a small GEMM (h·U over D, fp32 accumulation) plus the distance → logit epilogue in
registers, so the (N, V) squared distances and raw logits never reach memory. With V ≤ BLOCK_V the
row's log-sum-exp is finished in registers and log-probs are written once; for larger V a first
sweep keeps an online (max, sum) log-sum-exp and a second sweep recomputes the tiles and writes
(logit − max) − log-sum (recomputing the GEMM is cheaper than a write + read of an (N, V) scratch
buffer).

Only two fp32 scalars per row, max m and log-sum log s, are saved for backward: softmax =
exp((logit − m) − log s) is recomputed there. They are kept apart rather than as lse = m + log s,
which would round at the logits' magnitude. The fused NLL (``student_t_nll``) never writes (N, V)
log-probs in the forward: only the row stats and the target's logit per row.

Backward (g = upstream gradient of the log-probs):
    dlogit = g − softmax·Σ_v g          (NLL: g_row·(softmax − onehot(target)))
    dd2    = dlogit·(−½(df+D))/(df + d2), and 0 where |h|² − 2h·U + |U|² < 1e-12 (the clamp)
    dh     = 2·(h·Σ_v dd2 − dd2·Uᵀ),    dU = 2·(U·Σ_n dd2 − hᵀ·dd2)
The kernel writes dd2 and its row sums; the two contractions are plain GEMMs (deterministic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._dispatch import interpreting, triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, TRITON_TYPE, dot_precision, no_autocast
from tape_kernels._validate import check_same_device, check_tensor

DEFAULT_DF = 2.718281828459
D2_CLAMP = 1e-12
REDUCTIONS = ("mean", "sum", "none")

_BLOCK_M = 32
_BLOCK_D = 32
_NUM_WARPS = 4


def _warps(block_v: int) -> int:
    """4 warps for 32-wide vocab tiles; 128-wide tiles (V > 32, the model's V = 65) keep several
    (32, 128) fp32 tiles live, which spilled up to 1.2 KB/thread at 4 warps on sm_86 (make
    kernel-report): 8 warps halve the per-thread share."""
    return _NUM_WARPS if block_v <= 32 else 2 * _NUM_WARPS


def student_t_unembedding_ref(
    hidden_states: torch.Tensor, unembedding: torch.Tensor, df: float = DEFAULT_DF
) -> torch.Tensor:
    """Eager reference. hidden_states (B, S, D), unembedding (D, V) -> log-probs (B, S, V)."""
    d = hidden_states.shape[-1]
    x2 = (hidden_states**2).sum(dim=-1, keepdim=True)  # (B, S, 1)
    w2 = (unembedding**2).sum(dim=0)[None, None, :]  # (1, 1, V)
    xw = torch.matmul(hidden_states, unembedding)  # (B, S, V)
    dist_sq = (x2 - 2 * xw + w2).clamp(min=1e-12)
    logits = -0.5 * (df + d) * torch.log1p(dist_sq / df)
    return F.log_softmax(logits, dim=-1)


def student_t_nll_ref(
    hidden_states: torch.Tensor,
    unembedding: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    df: float = DEFAULT_DF,
) -> torch.Tensor:
    """Eager reference NLL: −log-prob of ``targets`` (B, S) under ``student_t_unembedding_ref``;
    hidden_states (B, S, D), unembedding (D, V)."""
    logp = student_t_unembedding_ref(hidden_states, unembedding, df)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(nll, reduction)


def _reduce(nll: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-position losses -> their mean, sum, or themselves ("none")."""
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math

    @triton.jit
    def _log1p(x):
        # log1p without libdevice (absent in the interpreter): log(u)·x/(u − 1) with u = 1 + x
        # cancels the rounding of u (Goldberg), so small x keeps full relative precision. At x = +inf
        # the ratio would be inf/inf: log1p(inf) = inf is returned instead (NaN stays NaN).
        u = 1.0 + x
        tiny = u == 1.0
        big = u == float("inf")
        ratio = _math.div(x, tl.where(tiny | big, 1.0, u - 1.0))
        return tl.where(tiny | big, x, _math.log(u) * ratio)

    @triton.jit
    def _row_sqnorm(H, rows, rmask, dim, stride_hn, stride_hd, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        hn = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(
                H + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                mask=rmask[:, None] & (ds[None, :] < dim), other=0.0,
            ).to(tl.float32)
            hn += tl.sum(h * h, axis=1)
        return hn

    @triton.jit
    def _logit_tile(
        H, U, hn, rows, rmask, v0, n_vocab, dim, stride_hn, stride_hd, stride_ud, stride_uv, coef, inv_df,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        """Logits of rows × columns [v0, v0 + BLOCK_V): (logits with −inf past n_vocab, raw d2, d2, cols)."""
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < n_vocab
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        un = tl.zeros([BLOCK_V], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < dim
            h = tl.load(
                H + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                mask=rmask[:, None] & dmask[None, :], other=0.0,
            )
            u = tl.load(
                U + ds[:, None] * stride_ud + cols[None, :] * stride_uv,
                mask=dmask[:, None] & cmask[None, :], other=0.0,
            )
            uf = u.to(tl.float32)
            un += tl.sum(uf * uf, axis=0)
            if DOT_F32:
                acc = tl.dot(h.to(tl.float32), uf, acc, input_precision=PREC)
            else:
                # fp16/bf16 products are exact in fp32 and the MMA accumulates in fp32: same math
                # as upcasting first, at tensor-core speed.
                acc = tl.dot(h, u, acc)
        raw = hn[:, None] - 2.0 * acc + un[None, :]
        d2 = tl.maximum(raw, 1e-12, propagate_nan=tl.PropagateNan.ALL)  # clamp(min=1e-12): NaN stays NaN
        logits = coef * _log1p(d2 * inv_df)
        logits = tl.where(cmask[None, :], logits, float("-inf"))
        return logits, raw, d2, cols

    @triton.jit
    def _unembed_fwd_kernel(
        H, U, OUT, MAX, LOGS, TGT, LOSS, n_rows, n_vocab, dim,
        stride_hn, stride_hd, stride_ud, stride_uv, stride_on, coef: tl.float32, inv_df: tl.float32,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        SINGLE: tl.constexpr, NLL: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        hn = _row_sqnorm(H, rows, rmask, dim, stride_hn, stride_hd, BLOCK_M, BLOCK_D)
        if NLL:
            tgt = tl.load(TGT + rows, mask=rmask, other=0)
        t_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        if SINGLE:
            logits, raw, d2, cols = _logit_tile(
                H, U, hn, rows, rmask, 0, n_vocab, dim, stride_hn, stride_hd, stride_ud, stride_uv, coef, inv_df,
                BLOCK_M, BLOCK_V, BLOCK_D, DOT_F32, PREC,
            )
            # Max-subtracted: logits are O(−1e3), exp of them unshifted would underflow to 0.
            m = tl.max(logits, axis=1)
            log_s = _math.log(tl.sum(_math.exp(logits - m[:, None]), axis=1))
            if NLL:
                t_logit = tl.sum(tl.where((cols[None, :] == tgt[:, None]) & (cols[None, :] < n_vocab), logits, 0.0), axis=1)
            else:
                # (logit − m) − log s, never logit − (m + log s): m + log s would round at the
                # logits' magnitude (an ulp of 1e3 is 6e-5) and shift every log-prob by that.
                tl.store(
                    OUT + rows[:, None] * stride_on + cols[None, :], (logits - m[:, None]) - log_s[:, None],
                    mask=rmask[:, None] & (cols[None, :] < n_vocab),
                )
        else:
            m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            s = tl.zeros([BLOCK_M], dtype=tl.float32)
            for v0 in range(0, n_vocab, BLOCK_V):
                logits, raw, d2, cols = _logit_tile(
                    H, U, hn, rows, rmask, v0, n_vocab, dim, stride_hn, stride_hd, stride_ud, stride_uv, coef, inv_df,
                    BLOCK_M, BLOCK_V, BLOCK_D, DOT_F32, PREC,
                )
                m_new = tl.maximum(m, tl.max(logits, axis=1))
                s = s * _math.exp(m - m_new) + tl.sum(_math.exp(logits - m_new[:, None]), axis=1)
                m = m_new
                if NLL:
                    t_logit += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & (cols[None, :] < n_vocab), logits, 0.0), axis=1)
            log_s = _math.log(s)
            if not NLL:
                for v0 in range(0, n_vocab, BLOCK_V):
                    logits, raw, d2, cols = _logit_tile(
                        H, U, hn, rows, rmask, v0, n_vocab, dim, stride_hn, stride_hd, stride_ud, stride_uv, coef, inv_df,
                        BLOCK_M, BLOCK_V, BLOCK_D, DOT_F32, PREC,
                    )
                    tl.store(
                        OUT + rows[:, None] * stride_on + cols[None, :], (logits - m[:, None]) - log_s[:, None],
                        mask=rmask[:, None] & (cols[None, :] < n_vocab),
                    )
        tl.store(MAX + rows, m, mask=rmask)
        tl.store(LOGS + rows, log_s, mask=rmask)
        if NLL:
            tl.store(LOSS + rows, (m - t_logit) + log_s, mask=rmask)

    @triton.jit
    def _unembed_bwd_kernel(
        H, U, MAX, LOGS, G, GSUM, TGT, GROW, DD2, DSUM, n_rows, n_vocab, dim,
        stride_hn, stride_hd, stride_ud, stride_uv, stride_gn, stride_dn, coef: tl.float32, inv_df: tl.float32, df: tl.float32,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        NLL: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        hn = _row_sqnorm(H, rows, rmask, dim, stride_hn, stride_hd, BLOCK_M, BLOCK_D)
        m = tl.load(MAX + rows, mask=rmask, other=0.0)
        log_s = tl.load(LOGS + rows, mask=rmask, other=0.0)
        if NLL:
            tgt = tl.load(TGT + rows, mask=rmask, other=0)
            grow = tl.load(GROW + rows, mask=rmask, other=0.0)
        else:
            gsum = tl.load(GSUM + rows, mask=rmask, other=0.0)
        dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for v0 in range(0, n_vocab, BLOCK_V):
            logits, raw, d2, cols = _logit_tile(
                H, U, hn, rows, rmask, v0, n_vocab, dim, stride_hn, stride_hd, stride_ud, stride_uv, coef, inv_df,
                BLOCK_M, BLOCK_V, BLOCK_D, DOT_F32, PREC,
            )
            mask = rmask[:, None] & (cols[None, :] < n_vocab)
            p = _math.exp((logits - m[:, None]) - log_s[:, None])
            if NLL:
                dlogit = grow[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
            else:
                g = tl.load(G + rows[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dlogit = g - p * gsum[:, None]
            # d logit / d d2 = coef/(df + d2); the clamp passes gradient only where raw ≥ 1e-12.
            dd2 = tl.where(mask & (raw >= 1e-12), _math.div(dlogit * coef, df + d2), 0.0)
            tl.store(DD2 + rows[:, None] * stride_dn + cols[None, :], dd2, mask=mask)
            dsum += tl.sum(dd2, axis=1)
        tl.store(DSUM + rows, dsum, mask=rmask)


def _bwd_block_m(block_v: int) -> int:
    """Rows per backward program: 16 with 128-wide vocab tiles, whose (rows, 128) fp32 tiles of
    logits, probabilities and distances still spilled at 32 rows × 8 warps on sm_86."""
    return 16 if block_v > 32 else _BLOCK_M


def _block_v(v: int) -> tuple[int, bool]:
    """(BLOCK_V, single-sweep?) for vocab size v."""
    if v <= 32:
        return 32, True
    return 128, v <= 128


def _dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, input precision). fp32 uses IEEE unless the user enabled TF32 for matmuls in torch;
    16-bit inputs take the native MMA, except bf16 in the interpreter (whose bf16 dot is wrong;
    its fp16 dot is exact, so CPU tests do cover the native path)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()), dot_precision(dtype)


def _launch_fwd(h2: torch.Tensor, u: torch.Tensor, df: float, targets: torch.Tensor | None):
    n, d = h2.shape
    v = u.shape[1]
    block_v, single = _block_v(v)
    dot_f32, prec = _dot_mode(h2.dtype)
    nll = targets is not None
    stats = torch.empty((2, n), device=h2.device, dtype=torch.float32)  # row max, row log-sum
    if nll:
        out = torch.empty(0, device=h2.device, dtype=torch.float32)
        loss = torch.empty(n, device=h2.device, dtype=torch.float32)
        tgt = targets
    else:
        out = torch.empty((n, v), device=h2.device, dtype=torch.float32)
        loss = tgt = stats  # not read when NLL is off
    if n:
        _unembed_fwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
            h2, u, out, stats[0], stats[1], tgt, loss, n, v, d,
            h2.stride(0), h2.stride(1), u.stride(0), u.stride(1), out.stride(0) if not nll else 0,
            -0.5 * (df + d), 1.0 / df,
            BLOCK_M=_BLOCK_M, BLOCK_V=block_v, BLOCK_D=_BLOCK_D, SINGLE=single, NLL=nll,
            DOT_F32=dot_f32, PREC=prec, num_warps=_warps(block_v),
        )
    return (loss if nll else out), stats


def _launch_bwd(h2, u, stats, df, g=None, targets=None, grow=None):
    """dd2 (N, V) fp32 and its row sums (N,), from log-prob grads ``g`` or NLL row grads ``grow``."""
    n, d = h2.shape
    v = u.shape[1]
    block_v, _ = _block_v(v)
    dot_f32, prec = _dot_mode(h2.dtype)
    nll = targets is not None
    dd2 = torch.empty((n, v), device=h2.device, dtype=torch.float32)
    dsum = torch.empty(n, device=h2.device, dtype=torch.float32)
    if nll:
        g_arg, gsum, stride_gn = stats, stats, 0  # not read when NLL is on
    else:
        g_arg, gsum, stride_gn = g, g.sum(dim=1, dtype=torch.float32), g.stride(0)
        targets = grow = stats
    block_m = _bwd_block_m(block_v)
    if n:
        _unembed_bwd_kernel[(triton.cdiv(n, block_m),)](
            h2, u, stats[0], stats[1], g_arg, gsum, targets, grow, dd2, dsum, n, v, d,
            h2.stride(0), h2.stride(1), u.stride(0), u.stride(1), stride_gn, dd2.stride(0),
            -0.5 * (df + d), 1.0 / df, float(df),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=_BLOCK_D, NLL=nll,
            DOT_F32=dot_f32, PREC=prec, num_warps=_warps(block_v),
        )
    return dd2, dsum


def _grads_from_dd2(h2, u, dd2, dsum, need_h: bool, need_u: bool):
    # d2 = |h|² − 2h·U + |U|²: each term's share of the chain rule, as autograd of the ref has it.
    # fp32 GEMMs even when backward() is called inside an autocast region.
    with no_autocast(h2.device.type):
        hf, uf = h2.float(), u.float()
        dh = 2.0 * (hf * dsum[:, None] - dd2 @ uf.t()) if need_h else None
        du = 2.0 * (uf * dd2.sum(dim=0)[None, :] - hf.t() @ dd2) if need_u else None
    return dh, du


class StudentTUnembeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2: torch.Tensor, u: torch.Tensor, df: float) -> torch.Tensor:
        out, stats = _launch_fwd(h2, u, df, None)
        ctx.save_for_backward(h2, u, stats)
        ctx.df = df
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h2, u, stats = ctx.saved_tensors
        dd2, dsum = _launch_bwd(h2, u, stats, ctx.df, g=g.contiguous())
        dh, du = _grads_from_dd2(h2, u, dd2, dsum, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dh is None else dh.to(h2.dtype)), (None if du is None else du.to(u.dtype)), None


class StudentTNLLFunction(torch.autograd.Function):
    """Per-row NLL (N,) = (max − logit[target]) + log-sum; the reduction is applied outside."""

    @staticmethod
    def forward(ctx, h2: torch.Tensor, u: torch.Tensor, targets: torch.Tensor, df: float) -> torch.Tensor:
        loss, stats = _launch_fwd(h2, u, df, targets)
        ctx.save_for_backward(h2, u, targets, stats)
        ctx.df = df
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h2, u, targets, stats = ctx.saved_tensors
        dd2, dsum = _launch_bwd(h2, u, stats, ctx.df, targets=targets, grow=g.float().contiguous())
        dh, du = _grads_from_dd2(h2, u, dd2, dsum, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dh is None else dh.to(h2.dtype)), (None if du is None else du.to(u.dtype)), None, None


def _check(h: torch.Tensor, u: torch.Tensor, df: float) -> None:
    dts = INPUT_DTYPES
    check_tensor("hidden_states", h, dtypes=dts)
    if h.dim() < 1:
        raise ValueError("hidden_states must have shape (..., D), got a 0-dim tensor")
    d = h.shape[-1]
    check_tensor("unembedding", u, ndim=2, dtypes=dts)
    if u.shape[0] != d:
        raise ValueError(f"unembedding has shape {tuple(u.shape)}; expected ({d}, V) to match hidden_states' D={d}")
    if d == 0 or u.shape[1] == 0:
        raise ValueError(f"D and V must be > 0, got D={d}, V={u.shape[1]}")
    check_same_device(hidden_states=h, unembedding=u)
    if not isinstance(df, (int, float)) or isinstance(df, bool) or not math.isfinite(df) or df <= 0:
        raise ValueError(f"df must be a finite number > 0, got {df!r}")


def _math_dtype(h: torch.Tensor, u: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64; the shared 16-bit dtype when both have it (the kernel
    upcasts in registers); fp32 otherwise."""
    if torch.float64 in (h.dtype, u.dtype):
        return torch.float64
    return h.dtype if h.dtype == u.dtype else torch.float32


def student_t_unembedding(
    hidden_states: torch.Tensor,
    unembedding: torch.Tensor,
    df: float = DEFAULT_DF,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Student-t log-probs. hidden_states (..., D) e.g. (B, S, D) or (N, D); unembedding (D, V)
    -> log-probs (..., V), fp32 (fp64 for fp64 inputs).

    The math is fp32 whatever the input dtype and whether or not autocast is on. Any V (V > 128 is
    swept in tiles with an online log-sum-exp). Gradients flow to both inputs in their own dtypes.
    """
    _check(hidden_states, unembedding, df)
    dt = _math_dtype(hidden_states, unembedding)
    lead, d, v = hidden_states.shape[:-1], hidden_states.shape[-1], unembedding.shape[1]
    with no_autocast(hidden_states.device.type):
        if dt == torch.float64 or not use_triton(hidden_states, unembedding, backend=backend):
            ref_dt = torch.float64 if dt == torch.float64 else torch.float32
            h3 = hidden_states.to(ref_dt).reshape(1, -1, d)  # the ref broadcasts as (B, S, D)
            return student_t_unembedding_ref(h3, unembedding.to(ref_dt), df).view(*lead, v)
        h2 = hidden_states.to(dt).reshape(-1, d)
        out = StudentTUnembeddingFunction.apply(h2, unembedding.to(dt), float(df))
    return out.view(*lead, v)


def student_t_nll(
    hidden_states: torch.Tensor,
    unembedding: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    df: float = DEFAULT_DF,
    *,
    backend: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """Fused −log p(target) under the Student-t unembedding, without materializing (…, V) log-probs.

    hidden_states (..., D), unembedding (D, V), targets (...) integer ids in [0, V)
    -> scalar fp32 for reduction "mean"/"sum", (...) for "none".

    Checking the ids costs one device→host sync; ``check_targets=False`` skips it (e.g. inside a
    CUDA graph). The kernel never indexes memory with a target (it compares column ids), so an
    unchecked bad id cannot fault: its row's loss is just the log-sum-exp (the eager path errors).
    """
    _check(hidden_states, unembedding, df)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lead, d, v = hidden_states.shape[:-1], hidden_states.shape[-1], unembedding.shape[1]
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    if targets.shape != lead:
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected {tuple(lead)} (hidden_states' leading dims)")
    check_same_device(hidden_states=hidden_states, targets=targets)
    if check_targets:
        bad = targets[(targets < 0) | (targets >= v)]
        if bad.numel():
            raise ValueError(f"targets contain id {int(bad[0])} outside [0, {v}) (vocab size {v})")
    dt = _math_dtype(hidden_states, unembedding)
    with no_autocast(hidden_states.device.type):
        if dt == torch.float64 or not use_triton(hidden_states, unembedding, targets, backend=backend):
            ref_dt = torch.float64 if dt == torch.float64 else torch.float32
            h3 = hidden_states.to(ref_dt).reshape(1, -1, d)
            loss = student_t_nll_ref(h3, unembedding.to(ref_dt), targets.reshape(1, -1), reduction, df)
            return loss.view(lead) if reduction == "none" else loss
        h2 = hidden_states.to(dt).reshape(-1, d)
        tgt = targets.reshape(-1).to(torch.int64).contiguous()
        loss = StudentTNLLFunction.apply(h2, unembedding.to(dt), tgt, float(df))
    return _reduce(loss.view(lead), reduction)


class StudentTUnembedding(nn.Module):
    """Holds nothing: ``StudentTUnembedding(df)(h, U)`` -> log-probs; ``.nll(h, U, targets)`` -> loss."""

    def __init__(self, df: float = DEFAULT_DF, backend: str = "auto") -> None:
        super().__init__()
        self.df = df
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
        return student_t_unembedding(hidden_states, unembedding, self.df, backend=self.backend)

    def nll(
        self, hidden_states: torch.Tensor, unembedding: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return student_t_nll(hidden_states, unembedding, targets, reduction, self.df, backend=self.backend)

    def extra_repr(self) -> str:
        return f"df={self.df}"


def aot_specs() -> list:
    """Every (kernel, BLOCK_V/sweep, NLL, dtype/precision) the launchers can emit on a GPU."""
    from tape_kernels._aot import kernel_spec

    f32, i64 = torch.float32, torch.int64
    variants = [(f32, "ieee"), (f32, "tf32"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")]
    specs = []
    for dt, prec in variants:
        tag = f"{TRITON_TYPE[dt]}_{prec}" if dt == f32 else TRITON_TYPE[dt]
        for nll in (False, True):
            # Row statistics, log-probs, losses and dd2 are fp32; TGT is a dummy fp32 pointer without NLL.
            ptrs = dict.fromkeys(("OUT", "MAX", "LOGS", "LOSS", "G", "GSUM", "GROW", "DD2", "DSUM"), f32)
            ptrs["TGT"] = i64 if nll else f32
            kind = "nll" if nll else "logp"
            for block_v, single in ((32, True), (128, True), (128, False)):
                consts = {"BLOCK_M": _BLOCK_M, "BLOCK_V": block_v, "BLOCK_D": _BLOCK_D, "SINGLE": single, "NLL": nll,
                          "DOT_F32": dt == f32, "PREC": prec}  # fmt: skip
                specs.append(kernel_spec(f"unembed_fwd_{kind}_V{block_v}{'' if single else 'x'}_{tag}",
                                         _unembed_fwd_kernel, dt, consts, pointers=ptrs, num_warps=_warps(block_v)))
            for block_v in (32, 128):
                consts = {"BLOCK_M": _bwd_block_m(block_v), "BLOCK_V": block_v, "BLOCK_D": _BLOCK_D, "NLL": nll,
                          "DOT_F32": dt == f32, "PREC": prec}  # fmt: skip
                specs.append(kernel_spec(f"unembed_bwd_{kind}_V{block_v}_{tag}", _unembed_bwd_kernel, dt, consts,
                                         pointers=ptrs, num_warps=_warps(block_v)))
    return specs
