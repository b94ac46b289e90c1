"""Fused critic-head attention: ``nn.MultiheadAttention(D, H)(x, x, x)`` with head-averaged weights
and their statistics, without materialising any (B, H, S, S) or (B, S, S) tensor.

The reference (``CachedMultiheadAttention`` in the TapeTransformer, training path) computes

    out, w = MHA(x, x, x)                       w = mean_h softmax(q_h k_hᵀ / √dh)   (B, S, S)
    entropy[b, i] = −Σ_j w[b,i,j]·log(w[b,i,j] + 1e-12)
    aw[b, k]      = (Σ_j w[b,k,j] + Σ_i w[b,i,k]) / 2

``need_weights`` pushes PyTorch off its fused path and stores B·H·S² probabilities per block. Here the
in/out projections stay cuBLAS GEMMs (``F.linear``) and the core runs as Triton kernels that keep every
probability tile on chip. Each kernel but one works on a single head, with 2-D tiles, so that programs
are small and many of them share an SM; the head average p̄ the statistics need is rebuilt by a pass
that loops over the heads:

* forward: (1) one program per (query block, batch·head), FlashAttention-2 style: one sweep over the
  key blocks with an online (max, sum) softmax gives O_h and the row log-sum-exp (B, H, S); memory
  traffic q + K + V + O per head. (2) the statistics pass, one program per (query block, batch): per
  key block it recomputes every head's exact probabilities p_h = exp2(s_h − lse_h) (one QKᵀ per head,
  no PV), averages them into p̄ in registers and reduces p̄ to entropy, row sums and column-sum
  partials, one row per 16 queries: a (B, S/16 + 1, S) fp32 buffer (S²/16 per batch, vs. B·H·S² in
  eager MHA). A separate ``sum`` over its rows gives aw, so the column sums are deterministic (no float
  atomics): bit-identical run to run. FLOPs: 4·B·S²·D for (1) + 2·B·S²·D for (2), as the former
  two-pass all-heads kernel.
* backward: three per-head kernels, δ preprocessing, dQ per query block and dK/dV per key block, which
  recompute p_h from the saved log-sum-exp; see ``CriticAttentionFunction`` for the derivation of the
  softmax-backward row term δ, which the entropy and aw gradients change. Without statistics gradients
  (the model's training loss) this is plain FlashAttention-2 backward. With an aw gradient one extra
  load per key tile; with an entropy gradient every tile also rebuilds p̄ from all heads (H more QKᵀ
  per tile), the price of per-head programs. Saved for backward: qkv, O and the log-sum-exp.
* decode (``tape_kernels.attention_decode``, re-exported here): a split-T (flash-decoding) kernel for a
  few new query rows against a cache of projected K/V, with a combine kernel when the cache is split.

The Triton kernels live in ``tape_kernels._attention_kernels``; the autotuning machinery (configs with
their measured shared memory and registers, pruned per device) in ``tape_kernels._autotune``.

Supported by the Triton path: any number of heads H and head dims dh ≤ 256 (tiles padded to
max(16, next_pow2(dh))); fp32, fp16, bf16. Other sizes, float64, and dropout > 0 in training take the
eager path (``backend="auto"``) or raise ``ValueError`` (``backend="triton"``). CPU tensors run the
kernels only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._attention_configs import CONFIGS
from tape_kernels._autotune import TileConfig, TunedKernel
from tape_kernels._dispatch import check_backend, triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, LOG2E, TRITON_TYPE, dot_precision, next_pow2
from tape_kernels._validate import check_same_device, check_same_dtype, check_tensor

# Decode lives in its own module; these names stay importable from here.
from tape_kernels.attention_decode import critic_attention_decode, critic_attention_decode_ref

if triton_available():
    import triton

    from tape_kernels._attention_kernels import (
        _attn_bwd_delta_kernel,
        _attn_bwd_dkv_kernel,
        _attn_bwd_dq_kernel,
        _attn_fwd_kernel,
        _attn_stats_kernel,
    )

ENTROPY_EPS = 1e-12
# max(16, next_pow2(dh)): the padded head dim of the per-head tiles.
MAX_HEAD_DIM = 256


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
    qkv = F.linear(x, in_proj_weight, in_proj_bias)  # (B, S, 3D)
    o, entropy, aw = attention_core_ref(qkv, num_heads, causal, dropout_p if training else 0.0)
    return F.linear(o, out_proj_weight, out_proj_bias), entropy, aw


def attention_core_ref(
    qkv: torch.Tensor, num_heads: int, causal: bool = False, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager attention core on projected inputs qkv (B, S, 3D): o (B, S, D) in qkv's dtype, and the
    statistics of the head-averaged weights (fp32 for 16-bit inputs); dropout on the weights as MHA."""
    b, s, d3 = qkv.shape
    d = d3 // 3
    dh = d // num_heads
    q, k, v = qkv.view(b, s, 3, num_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, dh) each
    scores = torch.matmul(q * (1.0 / math.sqrt(dh)), k.transpose(-1, -2))  # (B, H, S, S)
    if causal:
        scores = scores.masked_fill(_causal_mask(s, qkv.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    o = torch.matmul(p, v).transpose(1, 2).reshape(b, s, d)
    entropy, aw = _stats_from_probs(p)
    return o, entropy, aw


def _stats_from_probs(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of per-head probabilities p (B, H, S, S) via their head average."""
    w = p.mean(dim=1)
    if w.dtype in (torch.float16, torch.bfloat16):
        # fp32 statistics (the kernels' contract): in half precision 1e-12 rounds to 0 and the masked
        # entries' 0·log(0) would give NaN entropies.
        w = w.float()
    return attention_stats_ref(w)


# --------------------------------------------------------------------------------------------------
# Configs, autotuning, launchers
# --------------------------------------------------------------------------------------------------


def _head_dim_tile(dh: int) -> int:
    """DP: the head dim padded to a power of two (≥ 16 for tl.dot)."""
    return max(16, next_pow2(dh))


def kernel_supports(embed_dim: int, num_heads: int) -> bool:
    """Whether the Triton path handles this attention shape (see module docstring)."""
    if num_heads <= 0 or embed_dim % num_heads:
        return False
    return _head_dim_tile(embed_dim // num_heads) <= MAX_HEAD_DIM


# Occupancy floors of the autotune prune: the notebook's tables (DP 64, no statistics gradient), the others.
MIN_OCCUPANCY, MIN_OCCUPANCY_OTHER = 0.5, 0.25
INTERP_CONFIG = (32, 64, 4, 1)  # interpreter: one fixed (BLOCK_M, BLOCK_N, warps, stages)


def _interp_meta() -> tuple[dict[str, int], int]:
    bm, bn, warps, _ = INTERP_CONFIG
    return {"BLOCK_M": bm, "BLOCK_N": bn}, warps


def _tuned_kernels() -> dict[tuple[str, int], TunedKernel]:
    kernels = {"fwd": _attn_fwd_kernel, "stats": _attn_stats_kernel, "delta": _attn_bwd_delta_kernel,
               "dq": _attn_bwd_dq_kernel, "dkv": _attn_bwd_dkv_kernel}  # fmt: skip
    out = {}
    for name, by_dp in CONFIGS.items():
        base, _, variant = name.partition("+")
        key = ["seq_len", "n_heads", "DH", "CAUSAL"] + (["HAS_ENT", "HAS_AW"] if base in ("delta", "dq", "dkv") else [])
        for dp, table in by_dp.items():
            configs = [TileConfig({"BLOCK_M": bm, "BLOCK_N": bn}, w, st, dict(res), maxnreg)
                       for bm, bn, w, st, maxnreg, res in table]  # fmt: skip
            floor = MIN_OCCUPANCY if dp == 64 and not variant else MIN_OCCUPANCY_OTHER
            out[name, dp] = TunedKernel(kernels[base], configs, key, "QKV", _interp_meta, floor)
    return out


TUNED: dict[tuple[str, int], TunedKernel] = _tuned_kernels() if triton_available() else {}


def _tuned(name: str, dp: int, stats_grad: bool = False) -> TunedKernel:
    """The tuned kernel for a padded head dim (tables at DP 64, 128, 256), "+stats" with statistics gradients."""
    return TUNED[name + ("+stats" if stats_grad else ""), max(dp, 64)]


def _attn_forward(qkv: torch.Tensor, num_heads: int, causal: bool):
    """qkv (B, S, 3D) contiguous -> o (B, S, D), lse2 (B, H, S) fp32, entropy (B, S) fp32, aw (B, S) fp32."""
    b, s, d3 = qkv.shape
    d = d3 // 3
    dh = d // num_heads
    dp = _head_dim_tile(dh)
    o = torch.empty(b, s, d, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b, num_heads, s, device=qkv.device, dtype=torch.float32)
    ent = torch.empty(b, s, device=qkv.device, dtype=torch.float32)
    # Halved column-sum partials, one row per 16 queries (see the kernel), independent of the tuned BLOCK_M,
    # plus a last row of halved row sums: aw = colp.sum(1), a deterministic reduction.
    colp = torch.empty(b, triton.cdiv(s, 16) + 1, s, device=qkv.device, dtype=torch.float32)
    qk_scale2 = LOG2E / math.sqrt(dh)
    consts = {"CAUSAL": causal, "DH": dh, "DP": dp, "PREC": dot_precision(qkv.dtype)}
    strides = (qkv.stride(0), qkv.stride(1))
    _tuned("fwd", dp).launch(
        lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * num_heads),
        (qkv, o, lse, s, num_heads, d, *strides, o.stride(0), o.stride(1), qk_scale2),
        consts,
    )
    _tuned("stats", dp).launch(
        lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b),
        (qkv, lse, ent, colp, s, num_heads, d, *strides, qk_scale2, 1.0 / num_heads, colp.stride(0)),
        consts,
    )
    return o, lse, ent, colp.sum(dim=1)


def _attn_backward(qkv, o, lse, do, g_ent, g_aw, num_heads: int, causal: bool):  # noqa: ANN001, ANN202
    """Gradient w.r.t. qkv (B, S, 3D) given dO (B, S, D) and the statistics' gradients (B, S) or None."""
    b, s, d3 = qkv.shape
    d = d3 // 3
    dh = d // num_heads
    dp = _head_dim_tile(dh)
    has_ent, has_aw = g_ent is not None, g_aw is not None
    dummy = lse.new_zeros(1)
    g_ent = g_ent.float().contiguous() if has_ent else dummy
    g_aw = g_aw.float().contiguous() if has_aw else dummy
    do = do.contiguous()
    delta = torch.empty_like(lse)
    dqkv = torch.empty_like(qkv)
    consts = {"CAUSAL": causal, "HAS_ENT": has_ent, "HAS_AW": has_aw, "DH": dh, "DP": dp,
              "PREC": dot_precision(qkv.dtype)}  # fmt: skip
    dims = (s, num_heads, d, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), LOG2E / math.sqrt(dh))
    scales = (1.0 / math.sqrt(dh), 1.0 / num_heads)
    bh = b * num_heads
    by_rows = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), bh)  # noqa: E731
    stats_grad = has_ent or has_aw
    _tuned("delta", dp, stats_grad).launch(by_rows, (qkv, o, do, lse, g_ent, g_aw, delta, *dims, 1.0 / num_heads),
                                           consts)  # fmt: skip
    _tuned("dq", dp, stats_grad).launch(by_rows, (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, *scales), consts)
    _tuned("dkv", dp, stats_grad).launch(lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), bh),
                                         (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, *scales), consts)  # fmt: skip
    return dqkv


class CriticAttentionFunction(torch.autograd.Function):
    """qkv (B, S, 3D) -> (o (B, S, D), entropy (B, S) fp32, aw (B, S) fp32).

    Backward derivation. With p_h = softmax_j(s_h) per head, p̄ = (1/H)·Σ_h p_h, the loss L reaches p̄
    through entropy[i] = −Σ_j p̄ log(p̄ + ε) and aw[k] = (Σ_j p̄[k, j] + Σ_i p̄[i, k]) / 2, so with
    ḡ_ent = dL/dentropy, ḡ_aw = dL/daw:

        dp̄[i, j]   = −ḡ_ent[i]·(log(p̄[i, j] + ε) + p̄[i, j]/(p̄[i, j] + ε)) + (ḡ_aw[i] + ḡ_aw[j]) / 2
        dp_h[i, j] = dO_h[i]·V_h[j] + dp̄[i, j] / H
        ds_h[i, j] = p_h[i, j]·(dp_h[i, j] − δ_h[i]),
        δ_h[i]     = Σ_j p_h[i, j]·dp_h[i, j] = dO_h[i]·O_h[i] + (1/H)·Σ_j p_h[i, j]·dp̄[i, j].

    The row term δ is therefore not just dO·O: its second part needs p̄ over every key, computed by a
    preprocessing pass per (query block, head) before the dQ and dK/dV passes. Any part of dp̄ constant
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
        dp = _head_dim_tile(qkv.shape[-1] // 3 // ctx.num_heads)
        stats_grad = g_ent is not None or g_aw is not None
        if not all(_tuned(k, dp, stats_grad).fits(qkv, dot_precision(qkv.dtype)) for k in ("delta", "dq", "dkv")):
            # No backward config fits this device's shared memory (e.g. dh > 128 with statistics gradients
            # and TF32 products on a 100 KB sm_86 block): the eager backward, exact but (B, H, S, S).
            return _eager_backward(qkv, do, g_ent, g_aw, ctx.num_heads, ctx.causal), None, None
        dqkv = _attn_backward(qkv, o, lse, do, g_ent, g_aw, ctx.num_heads, ctx.causal)
        return dqkv, None, None


def _eager_backward(qkv, do, g_ent, g_aw, num_heads: int, causal: bool) -> torch.Tensor:  # noqa: ANN001
    with torch.enable_grad():
        leaf = qkv.detach().requires_grad_()
        outs = attention_core_ref(leaf, num_heads, causal)
        grads = [(o, g) for o, g in zip(outs, (do, g_ent, g_aw)) if g is not None]
        return torch.autograd.grad([o for o, _ in grads], leaf, [g.to(o.dtype) for o, g in grads])[0]


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
    floats = INPUT_DTYPES
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
    check_tensor("qkv", qkv, ndim=3, dtypes=INPUT_DTYPES)
    if qkv.numel() == 0:
        raise ValueError(f"qkv must be non-empty (B, S, 3D), got shape {tuple(qkv.shape)}")
    if qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % num_heads:
        raise ValueError(f"qkv last dim {qkv.shape[-1]} must be 3·D with D divisible by num_heads {num_heads}")
    d = qkv.shape[-1] // 3
    if _kernel_ok(qkv, d, num_heads, backend):
        return CriticAttentionFunction.apply(qkv, num_heads, causal)
    return attention_core_ref(qkv, num_heads, causal)


def _kernel_ok(t: torch.Tensor, d: int, num_heads: int, backend: str) -> bool:
    if not use_triton(t, backend=backend):
        return False
    reason = None
    dp = _head_dim_tile(d // num_heads)
    if t.dtype not in KERNEL_DTYPES:
        reason = f"dtype {t.dtype} (kernels take {KERNEL_DTYPES})"
    elif not kernel_supports(d, num_heads):
        reason = f"head tile max(16, next_pow2(dh)) = {dp} > {MAX_HEAD_DIM}"
    elif not all(_tuned(k, dp).fits(t, dot_precision(t.dtype)) for k in ("fwd", "stats")):
        reason = f"head dim {d // num_heads} in {t.dtype} on this device (no config fits its shared memory)"
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
    o, ent, aw = CriticAttentionFunction.apply(qkv, num_heads, causal)
    return F.linear(o, out_proj_weight, out_proj_bias), ent, aw


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
    """Every kernel × config × launch type of its table (fp16, bf16, fp32 with IEEE and with TF32
    products) at the table's DP, causal; the backward with and without statistics gradients."""
    if not triton_available():
        return []
    from tape_kernels._aot import kernel_spec

    specs = []
    stats = dict.fromkeys(("LSE", "ENT", "COLP", "GENT", "GAW", "DELTA"), torch.float32)
    launch_types = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"), "fp32": (torch.float32, "ieee"),
                    "tf32": (torch.float32, "tf32")}  # fmt: skip
    for key, (dtype, prec) in launch_types.items():
        for (name, dp), tuned in TUNED.items():
            for tc in tuned.table:
                if key not in tc.resources:
                    continue
                bm, bn = tc.meta["BLOCK_M"], tc.meta["BLOCK_N"]
                consts = {"CAUSAL": True, "DH": dp, "DP": dp, "BLOCK_M": bm, "BLOCK_N": bn, "PREC": prec}
                if name.partition("+")[0] in ("delta", "dq", "dkv"):
                    consts.update(HAS_ENT="+stats" in name, HAS_AW="+stats" in name)
                tag = (f"{TRITON_TYPE[dtype]},{prec},dp{dp},bm{bm},bn{bn},w{tc.num_warps},s{tc.num_stages}"
                       + (f",r{tc.maxnreg}" if tc.maxnreg else "") + (",stats" if "+stats" in name else ""))
                specs.append(kernel_spec(f"{tuned.kernel.__name__}[{tag}]", tuned.kernel, dtype, consts,
                                         pointers=stats, num_warps=tc.num_warps, num_stages=tc.num_stages,
                                         maxnreg=tc.maxnreg))  # fmt: skip
    return specs


__all__ = [
    "CriticAttention",
    "CriticAttentionFunction",
    "aot_specs",
    "attention_stats",
    "attention_stats_ref",
    "critic_attention",
    "critic_attention_decode",
    "critic_attention_decode_ref",
    "critic_attention_ref",
    "kernel_supports",
]
