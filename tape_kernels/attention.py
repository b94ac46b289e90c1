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
* decode (``tape_kernels.attention_decode``, re-exported here): a split-T (flash-decoding) kernel for a
  few new query rows against a cache of projected K/V, with a combine kernel when the cache is split.

The Triton kernels live in ``tape_kernels._attention_kernels``; the autotuning machinery (configs with
their measured shared memory, pruned per device) in ``tape_kernels._autotune``.

Supported by the Triton path: any H and dh with next_pow2(H)·max(16, next_pow2(dh)) ≤ 256 (e.g. D = 256
with 4 heads, the model's configuration; D = 128 with 4 or 8 heads); fp32, fp16, bf16. Other sizes, float64,
and dropout > 0 in training take the eager path (``backend="auto"``) or raise ``ValueError``
(``backend="triton"``). CPU tensors run the kernels only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._autotune import TileConfig, TunedKernel
from tape_kernels._dispatch import check_backend, triton_available, use_triton
from tape_kernels._utils import FLOAT_DTYPES, KERNEL_DTYPES, TRITON_TYPE, dot_precision, next_pow2
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
    )

ENTROPY_EPS = 1e-12
LOG2E = 1.4426950408889634
# next_pow2(H) * max(16, next_pow2(dh)): the 3-D tiles (H, BLOCK, dh) live in registers.
MAX_HEAD_TILE = 256


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


def _head_tile(num_heads: int, dh: int) -> tuple[int, int]:
    """(HP, DP): heads and head dim padded to powers of two (dh ≥ 16 for tl.dot)."""
    return next_pow2(num_heads), max(16, next_pow2(dh))


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
    "fwd": (
        (16, 32, 4, 2, {2: 24576}),
        (32, 32, 4, 2, {2: 32768}),
        (32, 32, 8, 2, {2: 40960}),
        (32, 64, 8, 2, {2: 65536}),
        (64, 32, 8, 2, {2: 65536}),
        (16, 16, 8, 1, {4: 49152}),
    ),
    "delta": (
        (16, 32, 4, 2, {2: 24576}),
        (32, 32, 4, 2, {2: 32768}),
        (32, 64, 8, 2, {2: 49152}),
        (16, 16, 4, 1, {4: 32768}),
    ),
    "dq": (
        (16, 16, 4, 2, {2: 32768}),
        (16, 32, 4, 2, {2: 49152}),
        (32, 32, 8, 2, {2: 65536}),
        (16, 16, 8, 1, {4: 69632}),
    ),
    "dkv": (
        (16, 16, 4, 2, {2: 35328}),
        (32, 16, 8, 2, {2: 54272}),
        (16, 32, 8, 2, {2: 53760}),
        (16, 16, 4, 1, {4: 98304}),  # TF32 products need 98304 B, IEEE 69632 B
    ),
}
INTERP_CONFIG = (32, 64, 4, 1)  # interpreter: one fixed (BLOCK_M, BLOCK_N, warps, stages)


def _interp_meta() -> tuple[dict[str, int], int]:
    bm, bn, warps, _ = INTERP_CONFIG
    return {"BLOCK_M": bm, "BLOCK_N": bn}, warps


def _tuned_kernels() -> dict[str, TunedKernel]:
    kernels = {"fwd": _attn_fwd_kernel, "delta": _attn_bwd_delta_kernel, "dq": _attn_bwd_dq_kernel,
               "dkv": _attn_bwd_dkv_kernel}  # fmt: skip
    out = {}
    for name, kernel in kernels.items():
        table = [TileConfig({"BLOCK_M": bm, "BLOCK_N": bn}, w, st, {e: (b, None) for e, b in smem.items()})
                 for bm, bn, w, st, smem in _CONFIGS[name]]  # fmt: skip
        key = ["seq_len", "n_heads", "dh", "CAUSAL"] + ([] if name == "fwd" else ["HAS_ENT", "HAS_AW"])
        out[name] = TunedKernel(kernel, table, key, "QKV", _interp_meta)
    return out


TUNED: dict[str, TunedKernel] = _tuned_kernels() if triton_available() else {}

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

    TUNED["fwd"].launch(
        grid,
        (qkv, o, lse, ent, colp, s, num_heads, dh, d, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1),
         sm_scale * LOG2E, 1.0 / num_heads, colp.stride(0)),
        {"CAUSAL": causal, "HP": hp, "DP": dp, "PREC": dot_precision(qkv.dtype)},
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
    common = {"CAUSAL": causal, "HAS_ENT": has_ent, "HAS_AW": has_aw, "HP": hp, "DP": dp, "PREC": dot_precision(qkv.dtype)}
    dims = (s, num_heads, dh, d, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), sm_scale * LOG2E)

    def grid_m(meta):  # noqa: ANN001, ANN202
        return (triton.cdiv(s, meta["BLOCK_M"]), b)

    def grid_n(meta):  # noqa: ANN001, ANN202
        return (triton.cdiv(s, meta["BLOCK_N"]), b)

    TUNED["delta"].launch(grid_m, (qkv, o, do, lse, g_ent, g_aw, delta, *dims, 1.0 / num_heads), common)
    TUNED["dq"].launch(grid_m, (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, sm_scale, 1.0 / num_heads), common)
    TUNED["dkv"].launch(grid_n, (qkv, do, lse, delta, g_ent, g_aw, dqkv, *dims, sm_scale, 1.0 / num_heads), common)
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
    floats = FLOAT_DTYPES
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
    check_tensor("qkv", qkv, ndim=3, dtypes=FLOAT_DTYPES)
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
    """Every kernel × config × dtype, at the largest supported head tile (HP·DP = 4·64, the model's D = 256)."""
    if not triton_available():
        return []
    from tape_kernels._aot import kernel_spec

    specs = []
    stats = dict.fromkeys(("LSE", "ENT", "COLP", "GENT", "GAW", "DELTA"), torch.float32)
    for dtype in KERNEL_DTYPES:
        for name, tuned in TUNED.items():
            kernel = tuned.kernel
            for tc in tuned.table:
                if dtype.itemsize not in tc.resources:
                    continue
                bm, bn = tc.meta["BLOCK_M"], tc.meta["BLOCK_N"]
                # fp32 launches with IEEE products by default and TF32 when the user enabled it in torch.
                for prec in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
                    consts = {"CAUSAL": True, "HP": 4, "DP": 64, "BLOCK_M": bm, "BLOCK_N": bn, "PREC": prec}
                    if name != "fwd":
                        consts.update(HAS_ENT=True, HAS_AW=True)
                    tag = f"{TRITON_TYPE[dtype]},{prec},bm{bm},bn{bn},w{tc.num_warps},s{tc.num_stages}"
                    specs.append(kernel_spec(f"{_jit_name(kernel)}[{tag}]", kernel, dtype, consts, pointers=stats,
                                             num_warps=tc.num_warps, num_stages=tc.num_stages))  # fmt: skip
    return specs


def _jit_name(kernel) -> str:  # noqa: ANN001
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


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
