"""Sampling on the device: the exponential race (Gumbel-max) with a counter-based RNG.

Drawing token i with probability softmax(z)_i needs no normalisation and no host round trip:

    next = argmax_i (z_i + g_i),   g_i = −log(−log u_i),   u_i ~ U(0, 1) independent

(equivalently argmax_i z_i − log E_i with E_i = −log u_i ~ Exp(1): the first of V exponential clocks
with rates p_i to ring). ``z`` are the scores (log-probs / temperature); top-k keeps the entries
≥ the k-th largest score (ties kept, as ``masked_fill(z < kth, −inf)`` does) and gives the others
−inf.

The uniforms come from Philox-4x32-10 (Triton's ``tl.philox``) keyed by a 64-bit seed, with counter
(column i, row b, step low 32 bits, step high 32 bits): u = ((r >> 9) + ½)·2⁻²³, strictly inside
(0, 1) and exact in fp32/fp64; the noise and the race run in float64. The state is a (2,) int64
tensor ``[seed, step]`` on the device: every draw reads it and advances ``step`` in place, so a
sampling step has no host synchronisation and can be captured in a CUDA graph (each replay draws
fresh noise). ``sample_ref`` is the same computation in PyTorch ops (Philox in int64 arithmetic),
bit for bit up to the last ulp of ``log``, the CPU path and the test oracle.

A seed's samples therefore differ from ``torch.multinomial``'s with the same seed (another
algorithm and another generator); they follow the same distribution.
"""

from __future__ import annotations

import torch

from tape_kernels._dispatch import triton_available, use_triton
from tape_kernels._validate import check_tensor

__all__ = ["new_state", "philox_ref", "sample", "sample_ref"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_BV = 128  # vocabulary tile of the kernel


def new_state(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A sampler state ``[seed, 0]`` (int64) on ``device``; seed in [0, 2^63)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a·b for a constant a < 2^32 and b in [0, 2^32) (int64 tensors):
    split a in 16-bit halves so no partial product leaves int64."""
    t = (a & 0xFFFF) * b  # < 2^48
    u = (a >> 16) * b  # < 2^48
    lo = (((u & 0xFFFF) << 16) + t) & _M32
    hi = (u + (t >> 16)) >> 16
    return hi, lo


def philox_ref(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 as Triton's ``tl.philox(seed, c0, c1, c2, c3)``: int64 tensors holding uint32
    values (seed: a 0-d int64 tensor, its two 32-bit halves the key) -> four uint32 words."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def gumbel_ref(state: torch.Tensor, b: int, v: int) -> torch.Tensor:
    """The (b, v) float64 Gumbel noise of the next draw of ``state`` (not advanced)."""
    dev = state.device
    seed, step = state[0], state[1]
    cols = torch.arange(v, device=dev, dtype=torch.int64)[None, :].expand(b, v)
    rows = torch.arange(b, device=dev, dtype=torch.int64)[:, None].expand(b, v)
    zero = torch.zeros(b, v, device=dev, dtype=torch.int64)
    r, _, _, _ = philox_ref(seed, cols, rows, zero + (step & _M32), zero + ((step >> 32) & _M32))
    u = ((r >> 9).double() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(u))


def sample_ref(scores: torch.Tensor, state: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, V) -> next ids (B,) int64; advances ``state`` in place. ``threshold`` (B, 1): keep
    scores ≥ it (top-k)."""
    b, v = scores.shape
    z = scores.double() + gumbel_ref(state, b, v)
    if threshold is not None:
        z = z.masked_fill(scores < threshold, float("-inf"))
    state[1:].add_(1)
    return z.argmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math

    @triton.jit
    def _sample_kernel(S, s_sb, THR, s_tb, OUT, s_ob, STATE, B, V, HAS_THR: tl.constexpr, BV: tl.constexpr):
        # One program: every row reads the same (seed, step), and the step advances after all of
        # them (B·V is a few thousand at most; the model's V is 65).
        seed = tl.load(STATE)
        step = tl.load(STATE + 1)
        c2 = (step & 0xFFFFFFFF).to(tl.uint32)
        c3 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
        for b in range(0, B):
            best = tl.full((), float("-inf"), tl.float64)
            best_i = tl.full((), 0, tl.int64)
            if HAS_THR:
                thr = tl.load(THR + b * s_tb)
            for v0 in range(0, V, BV):
                v = v0 + tl.arange(0, BV)
                vm = v < V
                sc = tl.load(S + b * s_sb + v, mask=vm, other=float("-inf"))
                keep = vm
                if HAS_THR:
                    keep = keep & (sc >= thr)
                zero = tl.zeros((BV,), tl.uint32)
                r, _, _, _ = tl.philox(seed, v.to(tl.uint32), zero + b, zero + c2, zero + c3)
                u = ((r >> 9).to(tl.float64) + 0.5) * 1.1920928955078125e-07  # 2^-23
                g = -_math.log(-_math.log(u))
                z = tl.where(keep, sc.to(tl.float64) + g, float("-inf"))
                zmax = tl.max(z, 0)
                zi = tl.min(tl.where(z == zmax, v, V + BV), 0).to(tl.int64)  # first index of the max
                best_i = tl.where(zmax > best, zi, best_i)
                best = tl.maximum(best, zmax)
            tl.store(OUT + b * s_ob, best_i)
        tl.store(STATE + 1, step + 1)


def sample(scores: torch.Tensor, state: torch.Tensor, threshold: torch.Tensor | None = None,
           out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Draw one id per row of ``scores`` (B, V) fp32 (log-probs / temperature) from softmax(scores)
    restricted to scores ≥ ``threshold`` (B, 1) when given; ``state`` (2,) int64 ``[seed, step]`` on
    the same device, advanced in place. -> ids (B,) int64 (written into ``out`` when given, e.g. a
    CUDA graph's static buffer). No host synchronisation."""
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float32,))
    check_tensor("state", state, shape=(2,), dtypes=(torch.int64,))
    b, v = scores.shape
    if threshold is not None:
        check_tensor("threshold", threshold, shape=(b, 1), dtypes=(torch.float32,))
    if state.device != scores.device or (threshold is not None and threshold.device != scores.device):
        raise ValueError(f"scores ({scores.device}), state ({state.device}) and threshold must share one device")
    if out is None:
        out = torch.empty(b, device=scores.device, dtype=torch.int64)
    else:
        check_tensor("out", out, shape=(b,), dtypes=(torch.int64,))
    if v == 0 or b == 0:
        raise ValueError(f"scores must be non-empty, got shape {tuple(scores.shape)}")
    if not use_triton(scores, backend=backend):
        return out.copy_(sample_ref(scores, state, threshold))
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    _sample_kernel[(1,)](
        scores, scores.stride(0), threshold if threshold is not None else scores,
        threshold.stride(0) if threshold is not None else 0, out, out.stride(0), state, b, v,
        HAS_THR=threshold is not None, BV=min(_BV, triton.next_power_of_2(v)), num_warps=4,
    )  # fmt: skip
    return out


def aot_specs() -> list:
    if not triton_available():
        return []
    from tape_kernels._aot import AotSpec

    sig = {"S": "*fp32", "s_sb": "i32", "THR": "*fp32", "s_tb": "i32", "OUT": "*i64", "s_ob": "i32", "STATE": "*i64", "B": "i32",
           "V": "i32", "HAS_THR": "constexpr", "BV": "constexpr"}  # fmt: skip
    return [AotSpec(f"_sample_kernel[{'topk' if thr else 'all'}]", _sample_kernel, sig, {"HAS_THR": thr, "BV": _BV}, 4, 1)
            for thr in (False, True)]  # fmt: skip
