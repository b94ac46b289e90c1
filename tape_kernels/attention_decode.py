"""Critic attention at decode time: a few new projected query rows against a cache of projected K/V.

    o = softmax(q kᵀ / √dh) v          q (B, H, T_new, dh), k and v (B, H, T, dh)

One program per (row block, batch·head, key split): flash-decoding keeps a B = 1 call spread over
many SMs by splitting the cache length instead of the (tiny) query count. Each split keeps an online
(max, sum) softmax over its keys and writes its unnormalised partial (BLOCK_M × dh fp32 plus two
scalars per row); a combine kernel rescales and sums the partials. Memory traffic is one read of the
K/V cache (2·B·H·T·dh elements) plus B·H·splits·T_new·(dh + 2) fp32 partials.

The cache length can live on the device (``length``): a CUDA graph captured once replays as the
cache fills. The eager ``critic_attention_decode_ref`` is the oracle and the CPU path (the lean CPU
decode step of the TapeTransformer calls it directly).
"""

from __future__ import annotations

import math

import torch

from tape_kernels._dispatch import check_backend, interpreting, triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, LOG2E, TRITON_TYPE, dot_precision, next_pow2
from tape_kernels._validate import check_same_device, check_same_dtype, check_tensor


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


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_kernel(
        Q, K, V, O, ML, LEN,
        t_new, t_cache, dh, q_offset, n_split_keys, qk_scale2: tl.float32,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, n_heads,
        CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DEVICE_LEN: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # One program per (row block, batch·head, key split): flash-decoding keeps a B = 1 call
        # spread over many SMs by splitting the cache length instead of the (tiny) query count.
        if DEVICE_LEN:
            # The filled length lives on the device (a CUDA-graph-captured decode step replays with
            # a new length and the same launch): t_cache is the capacity, LEN[0] the keys in use, and the
            # new rows are the last t_new of them. Splits past LEN run no iteration.
            t_cache = tl.load(LEN)
            q_offset = t_cache - t_new
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)
        b = bh // n_heads
        h = bh % n_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < t_new
        d_mask = offs_d < dh
        q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        kb = K + b.to(tl.int64) * sk_b + h * sk_h
        vb = V + b.to(tl.int64) * sv_b + h * sv_h
        lo = split * n_split_keys
        hi = tl.minimum(t_cache, lo + n_split_keys)
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
        if CAUSAL:
            # The eager decode multiplies the masked keys' zero weights by V too, so a NaN or ±inf there
            # reaches these rows (0·NaN = NaN). The keys of this split past the row block's last visible
            # one, skipped above, do the same here: 0·v summed over them is 0, or NaN where v is not finite.
            # (Rows placed at the end of the cache, as in generation, have no such keys: no iteration.)
            end = tl.minimum(t_cache, lo + n_split_keys)
            poison = tl.zeros((DP,), tl.float32)
            for start_n in range(tl.maximum(hi, lo), end, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_mask = offs_n < end
                v = tl.load(vb + offs_n[:, None] * sv_t + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                poison += tl.sum(v.to(tl.float32) * 0.0, 0)
            acc += poison[None, :]
        if SPLIT:
            # Partials (unnormalised acc, running max, sum) for _decode_combine_kernel.
            row = (bh * tl.num_programs(2) + split).to(tl.int64) * t_new + offs_m
            tl.store(O + row[:, None] * DP + offs_d[None, :], acc, mask=row_mask[:, None])
            tl.store(ML + row * 2, m_i, mask=row_mask)
            tl.store(ML + row * 2 + 1, l_i, mask=row_mask)
        else:
            out = acc / l_i[:, None]
            o_ptrs = O + (bh.to(tl.int64) * t_new + offs_m[:, None]) * dh + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_combine_kernel(
        ACC, ML, O, t_new, dh, n_split, DP: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        row_mask = offs_m < t_new
        m_tot = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for sp in range(0, n_split):
            row = (bh * n_split + sp).to(tl.int64) * t_new + offs_m
            m_tot = tl.maximum(m_tot, tl.load(ML + row * 2, mask=row_mask, other=0.0))
        l_tot = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        for sp in range(0, n_split):
            row = (bh * n_split + sp).to(tl.int64) * t_new + offs_m
            m_s = tl.load(ML + row * 2, mask=row_mask, other=float("-inf"))
            l_s = tl.load(ML + row * 2 + 1, mask=row_mask, other=0.0)
            w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_tot))
            l_tot += l_s * w
            acc += tl.load(ACC + row[:, None] * DP + offs_d[None, :], mask=row_mask[:, None], other=0.0) * w[:, None]
        # Padded rows (beyond t_new) got no partials: keep their (unstored) quotient finite.
        out = acc / tl.where(l_tot > 0.0, l_tot, 1.0)[:, None]
        o_ptrs = O + (bh.to(tl.int64) * t_new + offs_m[:, None]) * dh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < dh))


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
    check_tensor("q_new", q_new, ndim=4, dtypes=INPUT_DTYPES)
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
    dp = max(16, next_pow2(dh))
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
        CAUSAL=causal, SPLIT=split, DEVICE_LEN=length is not None, DP=dp, BLOCK_M=block_m, BLOCK_N=block_n, PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split:
        _decode_combine_kernel[(n_mb, b * h)](acc, ml, out, tn, dh, num_splits, DP=dp, BLOCK_M=block_m, num_warps=4)
    return out


def aot_specs() -> list:
    """The decode kernels per dtype: no autotuning; BLOCK_M = 16, compiled at the largest head dim
    (DP = 128), split and direct, with the cache length from the host and from the device (the
    CUDA-graph decode step), fp32 with IEEE and TF32 products."""
    from tape_kernels._aot import kernel_spec

    specs = []
    for dt in KERNEL_DTYPES:
        tag = TRITON_TYPE[dt]
        block_n, stages, warps = _DECODE_CFG[dt.itemsize]
        for split in (True, False):
            # Split partials are fp32; the direct launch writes the output (and passes it as the unused ML).
            ptrs = dict.fromkeys(("O", "ML"), torch.float32 if split else dt) | {"LEN": torch.int32}
            for dev_len in (False, True):
                for prec in ("ieee", "tf32") if dt == torch.float32 else ("ieee",):
                    consts = {"CAUSAL": True, "SPLIT": split, "DEVICE_LEN": dev_len, "DP": 128,
                              "BLOCK_M": _DECODE_BLOCK_M, "BLOCK_N": block_n, "PREC": prec}  # fmt: skip
                    suffix = (",tf32" if prec == "tf32" else "") + (",devlen" if dev_len else "")
                    name = f"_decode_kernel[{tag},{'split' if split else 'direct'}{suffix}]"
                    specs.append(kernel_spec(name, _decode_kernel, dt, consts, pointers=ptrs, num_warps=warps,
                                             num_stages=stages))  # fmt: skip
        specs.append(kernel_spec(f"_decode_combine_kernel[{tag}]", _decode_combine_kernel, dt,
                                 {"DP": 128, "BLOCK_M": _DECODE_BLOCK_M}, pointers={"ACC": torch.float32, "ML": torch.float32},
                                 num_warps=4, num_stages=1))  # fmt: skip
    return specs


__all__ = ["aot_specs", "critic_attention_decode", "critic_attention_decode_ref"]
