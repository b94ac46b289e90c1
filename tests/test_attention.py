"""Fused critic-head attention vs the eager reference (and the reference vs nn.MultiheadAttention).

Kernel error is judged FlashAttention-style: against a float64 oracle, the kernel's error must stay within
2× (outputs) / 3× (gradients) PyTorch's own error in the same dtype, plus a small floor from the table
below (which only matters where PyTorch happens to be exact, e.g. the near-constant row sums).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import _accuracy as acc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tape_kernels._autotune as AT
import tape_kernels.attention as A
import tape_kernels.attention_decode as AD
from tape_kernels.attention import (
    CriticAttention,
    attention_stats,
    critic_attention,
    critic_attention_decode,
    critic_attention_decode_ref,
    critic_attention_ref,
)

# dtype -> (atol, rtol) floor added to the "k× PyTorch's own error" bound.
TOL = {
    torch.float32: (2e-6, 2e-6),
    torch.float16: (5e-4, 5e-4),
    torch.bfloat16: (4e-3, 4e-3),
}
NAMES = ("x", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")


def _params(b: int, s: int, d: int, seed: int = 0, scale: float = 1.5) -> list[torch.Tensor]:
    """x and MHA parameters in float64; `scale` > 1 sharpens the attention so the entropy varies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
    b_in = torch.randn(3 * d, generator=g, dtype=torch.float64) * 0.1
    w_out = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b_out = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return [x, w_in, b_in, w_out, b_out]


def _run(fn, params, cot, dtype, **kw):  # noqa: ANN001, ANN202
    """Outputs (as float64) and gradients (float64) of sum(out·go + entropy·ge + aw·ga)."""
    leaves = [p.detach().to(dtype).requires_grad_() for p in params]
    out = fn(*leaves, **kw)
    loss = sum((o.double() * c).sum() for o, c in zip(out, cot))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach().double() for o in out], [g.double() for g in grads]


def _cotangents(b: int, s: int, d: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, d, generator=g, dtype=torch.float64),
            torch.randn(b, s, generator=g, dtype=torch.float64),
            torch.randn(b, s, generator=g, dtype=torch.float64) * 5]  # fmt: skip


def _assert_like_torch(name: str, got: torch.Tensor, ref: torch.Tensor, torch_same: torch.Tensor, factor: float,
                       dtype: torch.dtype) -> None:  # fmt: skip
    atol, rtol = TOL[dtype]
    acc.assert_within_torch_error(got, ref, torch_same, factor, atol=atol, rtol=rtol, name=f"{name} ({dtype})")


def _check_case(b: int, s: int, d: int, h: int, causal: bool, dtype: torch.dtype, seed: int = 0) -> None:
    params = _params(b, s, d, seed)
    # The oracle sees exactly the values the low-precision runs see.
    params = [p.to(dtype).double() for p in params]
    _compare_with_torch(params, _cotangents(b, s, d, seed + 1), h, causal, dtype)


def _compare_with_torch(params: list, cot: list, h: int, causal: bool, dtype: torch.dtype) -> None:
    """Kernel outputs and gradients in ``dtype`` against float64, within the factors of PyTorch's own
    error in ``dtype`` (params already rounded to ``dtype``, held in float64)."""
    kw = {"num_heads": h, "causal": causal}
    ref_out, ref_grads = _run(critic_attention_ref, params, cot, torch.float64, **kw)
    t_out, t_grads = _run(critic_attention_ref, params, cot, dtype, **kw)
    k_out, k_grads = _run(critic_attention, params, cot, dtype, backend="triton", **kw)
    for name, g, r, t in zip(("out", "entropy", "aw"), k_out, ref_out, t_out):
        _assert_like_torch(name, g, r, t, acc.OUT_FACTOR, dtype)
    for name, g, r, t in zip(NAMES, k_grads, ref_grads, t_grads):
        _assert_like_torch(f"d{name}", g, r, t, acc.GRAD_FACTOR, dtype)


# Every S, D and B value of the issue, both masks, fp32 and fp16 (bf16 runs under `gpu`).
CASES = [
    (1, 1, 32),
    (3, 5, 64),
    (1, 16, 256),
    (3, 33, 32),
    (1, 128, 64),
    (3, 128, 256),
    (1, 300, 32),
]


# S = 300 runs in fp32 only: fp16 takes the same multi-block code path at S = 128 (and S = 300 is the
# slowest case in the interpreter).
MATCH_CASES = [
    pytest.param(b, s, d, causal, dtype, id=f"B{b}-S{s}-D{d}-{'causal' if causal else 'full'}-{name}")
    for b, s, d in CASES
    for causal in (False, True)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"))
    if not (s == 300 and dtype == torch.float16)
]


@pytest.mark.parametrize("b,s,d,causal,dtype", MATCH_CASES)
def test_matches_reference(b: int, s: int, d: int, causal: bool, dtype: torch.dtype) -> None:
    _check_case(b, s, d, 4, causal, dtype)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (16, 32, 4, 1), (32, 32, 4, 1), (64, 32, 4, 1)])
def test_tile_configs(monkeypatch: pytest.MonkeyPatch, config: tuple[int, int, int, int]) -> None:
    """Block-boundary logic (causal loop bounds, column-sum partials) for BLOCK_N <, =, > BLOCK_M."""
    monkeypatch.setattr(A, "INTERP_CONFIG", config)
    _check_case(2, 75, 64, 4, True, torch.float32, seed=3)


@pytest.mark.parametrize("h,d", [(1, 16), (2, 48), (3, 24), (8, 64), (16, 256)])
def test_head_counts(h: int, d: int) -> None:
    """Head counts and head dims that are not powers of two (padded by masks)."""
    _check_case(2, 19, d, h, causal=(h % 2 == 1), dtype=torch.float32, seed=h)


# TK_ATTN_HYPOTHESIS_EXAMPLES raises the example count for a stress run (250 pass: fp32 and fp16 mixed).
HYPOTHESIS_EXAMPLES = int(os.environ.get("TK_ATTN_HYPOTHESIS_EXAMPLES", "8"))


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 90),
    h=st.sampled_from([1, 2, 3, 4, 8]),
    dh=st.sampled_from([4, 8, 12, 16, 32]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(b: int, s: int, h: int, dh: int, causal: bool, dtype: torch.dtype, seed: int) -> None:
    _check_case(b, s, h * dh, h, causal, dtype, seed)


@pytest.mark.parametrize("which", ["entropy", "aw", "out"])
def test_single_output_gradients(which: str) -> None:
    """Each statistic's gradient alone (the kernels skip the terms of outputs that get no gradient)."""
    params = _params(2, 21, 32, seed=5)
    idx = {"out": 0, "entropy": 1, "aw": 2}[which]
    cot = [c if i == idx else torch.zeros_like(c) for i, c in enumerate(_cotangents(2, 21, 32))]

    def only(fn):  # noqa: ANN001, ANN202
        leaves = [p.detach().float().requires_grad_() for p in params]
        out = fn(*leaves, num_heads=4, **({"backend": "triton"} if fn is critic_attention else {}))
        return torch.autograd.grad((out[idx].double() * cot[idx]).sum(), leaves, allow_unused=True)

    got, want = only(critic_attention), only(critic_attention_ref)
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=f"d{name}")


def test_reference_matches_nn_multihead_attention() -> None:
    """critic_attention_ref == nn.MultiheadAttention(batch_first=True)(x, x, x) + the reference statistics."""
    torch.manual_seed(0)
    d, h = 32, 4
    mha = nn.MultiheadAttention(d, h, batch_first=True).double()
    x = torch.randn(3, 11, d, dtype=torch.float64)
    args = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, h)
    for causal in (False, True):
        mask = torch.ones(11, 11, dtype=torch.bool).triu(1) if causal else None
        out, w = mha(x, x, x, attn_mask=mask)
        entropy = -(w * torch.log(w + 1e-12)).sum(-1)
        aw = (w.sum(-1) + w.sum(-2)) / 2
        r_out, r_ent, r_aw = critic_attention_ref(x, *args, causal=causal)
        torch.testing.assert_close(r_out, out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(r_ent, entropy, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(r_aw, aw, atol=1e-12, rtol=1e-12)
    # Dropout: same RNG stream as MHA (dropout on the (B·H, S, S) weights, which MHA then averages).
    mha_d = nn.MultiheadAttention(d, h, dropout=0.3, batch_first=True).double().train()
    mha_d.load_state_dict(mha.state_dict())
    torch.manual_seed(7)
    out, w = mha_d(x, x, x)
    torch.manual_seed(7)
    r_out, r_ent, r_aw = critic_attention_ref(x, *args, dropout_p=0.3, training=True)
    torch.testing.assert_close(r_out, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(r_aw, (w.sum(-1) + w.sum(-2)) / 2, atol=1e-12, rtol=1e-12)


def test_module_state_dict_and_forward() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    mod = CriticAttention(64, 4)
    assert list(mod.state_dict()) == list(mha.state_dict())
    assert all(a.shape == b.shape for a, b in zip(mod.state_dict().values(), mha.state_dict().values()))
    mod.load_state_dict(mha.state_dict(), strict=True)
    x = torch.randn(2, 9, 64)
    out, ent, aw = mod(x)
    r_out, r_ent, r_aw = critic_attention_ref(x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                              mha.out_proj.bias, 4)  # fmt: skip
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aw, r_aw, atol=1e-5, rtol=1e-5)
    assert ent.shape == aw.shape == (2, 9)
    out_c, _, _ = mod(x, causal=True)
    r_c, _, _ = critic_attention_ref(x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
                                     4, causal=True)  # fmt: skip
    torch.testing.assert_close(out_c, r_c, atol=1e-5, rtol=1e-5)


def test_dropout_takes_eager_path() -> None:
    """dropout > 0 in training: eager reference with MHA's RNG use; in eval the kernel runs without dropout."""
    mod = CriticAttention(32, 4, dropout=0.5).train()
    x = torch.randn(2, 7, 32)
    torch.manual_seed(3)
    got = mod(x)
    torch.manual_seed(3)
    want = critic_attention_ref(x, mod.in_proj_weight, mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias, 4,
                                dropout_p=0.5, training=True)  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    mod.eval()
    got = mod(x)
    want = critic_attention_ref(x, mod.in_proj_weight, mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_deterministic() -> None:
    params = _params(2, 45, 64, seed=2)
    cot = _cotangents(2, 45, 64)
    first = _run(critic_attention, params, cot, torch.float32, num_heads=4, causal=True, backend="triton")
    second = _run(critic_attention, params, cot, torch.float32, num_heads=4, causal=True, backend="triton")
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_attention_stats_core() -> None:
    """The projected-input op equals its eager form (backend='eager') and the full op's statistics."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 23, 3 * 64, requires_grad=True)
    for causal in (False, True):
        got = attention_stats(qkv, 4, causal, backend="triton")
        want = attention_stats(qkv, 4, causal, backend="eager")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
        gg = torch.autograd.grad(sum(o.sum() for o in got), qkv)[0]
        gw = torch.autograd.grad(sum(o.sum() for o in want), qkv)[0]
        torch.testing.assert_close(gg, gw, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("t,tn,splits", [(1, 1, None), (37, 1, None), (37, 3, 2), (100, 4, 3), (130, 1, 5)])
def test_decode_equals_last_rows(t: int, tn: int, splits: int | None, causal: bool, dtype: torch.dtype) -> None:
    """Decode of the last T_new rows against the projected cache == those rows of the full computation."""
    b, h, d = 2, 4, 64
    dh = d // h
    torch.manual_seed(t + tn)
    qkv = torch.randn(b, t, 3 * d, dtype=torch.float64) * 1.5
    o_full, _, _ = attention_stats(qkv, h, causal, backend="eager")  # float64 oracle
    q, k, v = qkv.to(dtype).view(b, t, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, dh) views
    got = critic_attention_decode(q[:, :, t - tn :], k, v, causal=causal, backend="triton", num_splits=splits)
    want = o_full.view(b, t, h, dh).transpose(1, 2)[:, :, t - tn :]
    torch_same = critic_attention_decode_ref(q[:, :, t - tn :], k, v, causal=causal)
    assert got.shape == (b, h, tn, dh) and got.dtype == dtype
    _assert_like_torch("decode", got.double(), want, torch_same.double(), acc.OUT_FACTOR, dtype)


def test_decode_offset_and_auto_splits() -> None:
    """Causal rows placed mid-cache (q_offset) and the automatic split count."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 32)
    k = torch.randn(1, 2, 90, 32)
    v = torch.randn(1, 2, 90, 32)
    for kw in ({"causal": True, "q_offset": 40}, {"causal": True}, {"causal": False}):
        got = critic_attention_decode(q, k, v, backend="triton", **kw)
        want = critic_attention_decode_ref(q, k, v, **kw)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length,tn,splits", [(1, 1, None), (37, 1, None), (37, 3, 2), (64, 1, 4), (20, 2, 5)])
def test_decode_device_length(length: int, tn: int, splits: int | None, causal: bool, backend: str) -> None:
    """A (1,) device length over a larger cache (capacity 70, rows past ``length`` garbage) equals
    the decode against the cache cut to ``length``: what the CUDA-graph decode step replays."""
    torch.manual_seed(length * 7 + tn)
    b, h, cap, dh = 2, 4, 70, 16
    q = torch.randn(b, h, tn, dh)
    k, v = torch.randn(b, h, cap, dh), torch.randn(b, h, cap, dh)
    k[:, :, length:] = 1e4  # must be ignored: a visible row would swamp every softmax
    v[:, :, length:] = float("nan")
    lens = torch.tensor([length], dtype=torch.int32)
    got = critic_attention_decode(q, k, v, causal=causal, backend=backend, num_splits=splits, length=lens)
    want = critic_attention_decode_ref(q, k[:, :, :length], v[:, :, :length], causal=causal)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="length"):
        critic_attention_decode(q, k, v, length=lens.long())
    with pytest.raises(ValueError, match="q_offset"):
        critic_attention_decode(q, k, v, causal=True, q_offset=0, length=lens)


def test_bad_input_raises_value_error() -> None:
    d, h = 32, 4
    x = torch.randn(2, 5, d)
    w_in, b_in, w_out, b_out = torch.randn(3 * d, d), torch.randn(3 * d), torch.randn(d, d), torch.randn(d)
    with pytest.raises(ValueError, match="dims"):
        critic_attention(x[0], w_in, b_in, w_out, b_out, h)
    with pytest.raises(ValueError, match="divisible"):
        critic_attention(x, w_in, b_in, w_out, b_out, 5)
    with pytest.raises(ValueError, match="non-empty"):
        critic_attention(x[:, :0], w_in, b_in, w_out, b_out, h)
    with pytest.raises(ValueError, match="divisible"):
        CriticAttention(30, 4)
    with pytest.raises(ValueError, match="in_proj_weight"):
        critic_attention(x, w_in[:-1], b_in, w_out, b_out, h)
    with pytest.raises(ValueError, match="out_proj_bias"):
        critic_attention(x, w_in, b_in, w_out, b_out[:-1], h)
    with pytest.raises(ValueError, match="dtype"):
        critic_attention(x, w_in.half(), b_in, w_out, b_out, h)
    with pytest.raises(ValueError, match="device"):
        critic_attention(x, w_in.to("meta"), b_in, w_out, b_out, h)
    with pytest.raises(ValueError, match="int64|dtype"):
        critic_attention(x.long(), w_in.long(), b_in.long(), w_out.long(), b_out.long(), h)
    with pytest.raises(ValueError, match="backend"):
        critic_attention(x, w_in, b_in, w_out, b_out, h, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        critic_attention(x.double(), w_in.double(), b_in.double(), w_out.double(), b_out.double(), h, backend="triton")
    with pytest.raises(ValueError, match="dropout"):
        critic_attention(x, w_in, b_in, w_out, b_out, h, dropout_p=0.1, backend="triton")
    with pytest.raises(ValueError, match="head tile"):
        dd = 1024
        critic_attention(torch.randn(1, 2, dd), torch.randn(3 * dd, dd), None, torch.randn(dd, dd), None, 2,
                         backend="triton")  # fmt: skip
    q, kc = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 10, 8)
    with pytest.raises(ValueError, match="k_cache"):
        critic_attention_decode(q, kc[:, :2], kc)
    with pytest.raises(ValueError, match="v_cache"):
        critic_attention_decode(q, kc, kc[:, :, :5])
    with pytest.raises(ValueError, match="dtype"):
        critic_attention_decode(q, kc, kc.half())
    with pytest.raises(ValueError, match="q_offset"):
        critic_attention_decode(q, kc, kc, causal=True, q_offset=9)
    with pytest.raises(ValueError, match="dims"):
        critic_attention_decode(q[0], kc, kc)


def test_eager_fallbacks_agree() -> None:
    """backend='eager' and float64 inputs take the reference path; results match the kernel."""
    params = [p.float() for p in _params(1, 12, 32)]
    k = critic_attention(*params, 4, backend="triton")
    e = critic_attention(*params, 4, backend="eager")
    f64 = critic_attention(*[p.double() for p in params], 4)
    for a, b, c in zip(k, e, f64):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert c.dtype == torch.float64
        torch.testing.assert_close(a.double(), c, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- GPU only


# GPU tests launch one config per kernel (TAPE_KERNELS_ATTN_AUTOTUNE=0) to keep compile time inside the
# gpu-check budget; test_gpu_autotuned runs the autotuner (every config is compiled and timed) once.


@pytest.fixture
def no_autotune(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPE_KERNELS_ATTN_AUTOTUNE", "0")


def _check_gpu(b: int, s: int, d: int, causal: bool, dtype: torch.dtype) -> None:
    params = [p.to(dtype).double().cuda() for p in _params(b, s, d)]
    _compare_with_torch(params, [c.cuda() for c in _cotangents(b, s, d)], 4, causal, dtype)


# (dtype, causal) pairs each compile every kernel once: four pairs keep the gpu-check compile time small.
GPU_CASES = [
    (torch.bfloat16, 3, 33, 64, False),
    (torch.bfloat16, 2, 300, 256, True),
    (torch.float16, 2, 300, 256, True),
    (torch.float32, 3, 33, 64, False),
]


GPU_IDS = [f"{str(t)[6:]}-B{b}-S{s}-D{d}-{'causal' if c else 'full'}" for t, b, s, d, c in GPU_CASES]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,b,s,d,causal", GPU_CASES, ids=GPU_IDS)
def test_gpu_matches_reference(no_autotune: None, dtype: torch.dtype, b: int, s: int, d: int, causal: bool) -> None:
    _check_gpu(b, s, d, causal, dtype)


@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuned launch (pruned configs, BLOCK_M-independent column-sum rows) at the model's size."""
    monkeypatch.setenv("TAPE_KERNELS_ATTN_AUTOTUNE", "1")  # also where a quick GPU run switched it off
    assert AT.autotune_enabled()
    _check_gpu(16, 128, 256, False, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_autocast_and_memory(no_autotune: None) -> None:
    """Under autocast the kernel runs in bf16 with fp32 statistics, and forward + backward at S = 8192
    stays below half of one (S, S) fp32 tensor (eager MHA would hold B·H·S² probabilities)."""
    s = 8192
    mod = CriticAttention(256, 4).cuda()
    x = torch.randn(1, s, 256, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, ent, aw = mod(x)
    assert out.dtype == torch.bfloat16 and ent.dtype == aw.dtype == torch.float32
    (out.float().sum() + ent.sum() + (aw * aw).sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = s * s * 4 // 2
    assert peak < bound, f"peak {peak} B ≥ half of one (S, S) fp32 tensor ({bound} B)"
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(aw.sum(), torch.tensor(float(s), device="cuda"), rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_gpu_deterministic(no_autotune: None) -> None:
    params = [p.float().cuda() for p in _params(4, 700, 256)]
    cot = [c.cuda() for c in _cotangents(4, 700, 256)]
    first = _run(critic_attention, params, cot, torch.bfloat16, num_heads=4, backend="triton")
    second = _run(critic_attention, params, cot, torch.bfloat16, num_heads=4, backend="triton")
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_decode(dtype: torch.dtype) -> None:
    q = torch.randn(1, 4, 2, 64, device="cuda")
    k = torch.randn(1, 4, 2000, 64, device="cuda")
    v = torch.randn(1, 4, 2000, 64, device="cuda")
    for causal in (False, True):
        want = critic_attention_decode_ref(q.double(), k.double(), v.double(), causal=causal)
        torch_same = critic_attention_decode_ref(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
        got = critic_attention_decode(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, backend="triton")
        _assert_like_torch("decode", got.double(), want, torch_same.double(), acc.OUT_FACTOR, dtype)


def test_autotune_pruning_by_shared_memory_and_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs are offered per launch type, dropped above the device's per-block shared memory and below
    the occupancy floor (from their registers and shared memory); something always remains."""
    dkv = A.TUNED["dkv", 64]
    configs = dkv.tuned.configs
    res = {id(c): dkv.resources(c) for c in configs}
    cases = ((torch.float16, "ieee", "fp16"), (torch.bfloat16, "ieee", "bf16"), (torch.float32, "ieee", "fp32"),
             (torch.float32, "tf32", "tf32"))  # fmt: skip
    for dtype, prec, key in cases:
        kept = dkv.prune(configs, {"QKV": torch.empty(1, dtype=dtype)}, PREC=prec)
        assert kept and all(key in res[id(c)] for c in kept)
        assert len(kept) == sum(key in res[id(c)] for c in configs)  # every table entry reaches the floor on sm_86
        floor = A.MIN_OCCUPANCY
        assert all(AT.occupancy(res[id(c)][key][1], c.num_warps, res[id(c)][key][0], AT.SM86) >= floor for c in kept)
    limits = dict(AT.SM86, smem_block=min(r["fp16"][0] for r in res.values() if "fp16" in r))
    monkeypatch.setattr(AT, "device_limits", lambda device: limits)
    kept = dkv.prune(configs, {"QKV": torch.empty(1, dtype=torch.float16)}, PREC="ieee")
    assert kept and all(res[id(c)]["fp16"][0] <= limits["smem_block"] for c in kept)
    limits["smem_block"] = 100  # below every config: the smallest tile
    kept = dkv.prune(configs, {"QKV": torch.empty(1, dtype=torch.float32)}, PREC="ieee")
    smallest = min(res[id(c)]["fp32"][0] for c in configs if "fp32" in res[id(c)])
    assert len(kept) == 1 and res[id(kept[0])]["fp32"][0] == smallest
    # A device with half the registers: only the configs still at the floor, or else the best one.
    limits.update(AT.SM86, regs=AT.SM86["regs"] // 2)
    occ = {id(c): AT.occupancy(res[id(c)]["fp16"][1], c.num_warps, res[id(c)]["fp16"][0], limits)
           for c in configs if "fp16" in res[id(c)]}  # fmt: skip
    kept = dkv.prune(configs, {"QKV": torch.empty(1, dtype=torch.float16)}, PREC="ieee")
    at_floor = [i for i, o in occ.items() if o >= A.MIN_OCCUPANCY]
    assert {id(c) for c in kept} == (set(at_floor) if at_floor else {max(occ, key=occ.get)})


def test_aot_specs_cover_every_config() -> None:
    """aot_specs lists every kernel × config × launch type (fp32 with IEEE and TF32 products) and the decode kernels."""
    names = {s.name for s in A.aot_specs()}
    types = {"fp16": ("fp16", "ieee"), "bf16": ("bf16", "ieee"), "fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32")}
    for (name, dp), tuned in A.TUNED.items():
        kernel = tuned.kernel.__name__
        for tc in tuned.table:
            cfg = (f"dp{dp},bm{tc.meta['BLOCK_M']},bn{tc.meta['BLOCK_N']},w{tc.num_warps},s{tc.num_stages}"
                   + (f",r{tc.maxnreg}" if tc.maxnreg else "") + (",stats" if "+stats" in name else "") + "]")
            assert tc.resources
            for key in tc.resources:
                tag, prec = types[key]
                assert f"{kernel}[{tag},{prec},{cfg}" in names
    dec_names = {s.name for s in AD.aot_specs()}
    for tag in ("fp32", "fp16", "bf16"):
        assert {f"_decode_kernel[{tag},split]", f"_decode_kernel[{tag},direct]",
                f"_decode_kernel[{tag},split,devlen]", f"_decode_kernel[{tag},direct,devlen]",
                f"_decode_combine_kernel[{tag}]"} <= dec_names  # fmt: skip
    kernels = {s.kernel for s in A.aot_specs() + AD.aot_specs()}
    assert {t.kernel for t in A.TUNED.values()} | {AD._decode_kernel, AD._decode_combine_kernel} <= kernels


def test_backward_without_a_fitting_config_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose shared memory no backward config fits (e.g. dh > 128 with statistics gradients and
    TF32 on sm_86): the forward kernels run, the backward is the exact eager one, no launch failure."""
    params = [p.float() for p in _params(2, 21, 32, seed=6)]
    cot = [c.float() for c in _cotangents(2, 21, 32, seed=7)]
    leaves = [p.clone().requires_grad_() for p in params]
    out = critic_attention(*leaves, 4, causal=True, backend="triton")
    monkeypatch.setattr(AT, "device_limits", lambda device: dict(AT.SM86, smem_block=100))
    launches = []
    monkeypatch.setattr(AT.TunedKernel, "launch", lambda *a, **k: launches.append(a))
    got = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cot)), leaves)
    want = acc.outputs_and_grads(lambda *a: critic_attention_ref(*a, 4, causal=True), params, cot)[1]
    assert not launches
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_config_tables_cover_every_launch() -> None:
    """A table per kernel, statistics-gradient variant and head-dim class, each with a config for every
    launch type, all within one block of sm_86 shared memory (`make aot` fails above it), but one:
    dK/dV with statistics gradients at DP 256 with TF32 products needs 113 KB even at 16 × 16 tiles, and
    that backward runs eager on such devices (tested above)."""
    for name in ("fwd", "stats", "delta", "delta+stats", "dq", "dq+stats", "dkv", "dkv+stats"):
        for dp in (64, 128, 256):
            table = A.TUNED[name, dp].table
            assert all(smem <= AT.SM86["smem_block"] for tc in table for smem, _ in tc.resources.values())
            for key in ("fp16", "bf16", "fp32", "tf32"):
                covered = any(key in tc.resources for tc in table)
                assert covered == ((name, dp, key) != ("dkv+stats", 256, "tf32")), (name, dp, key)


def test_notebook_configs_reach_half_occupancy_without_spills() -> None:
    """Issue 15: every config the notebook shape (dh 64, no statistics gradient in the training loss) can
    launch, for each launch type, keeps half the sm_86 SM's warps resident (registers and shared memory
    as recorded from ptxas; `benchmarks/kernel_report.py attention` shows the same and flags spills)."""
    for name in ("fwd", "stats", "delta", "dq", "dkv"):
        tuned = A.TUNED[name, 64]
        for key in ("fp16", "bf16", "fp32", "tf32"):
            own = [tc for tc in tuned.table if key in tc.resources]
            assert own, (name, key)
            for tc in own:
                smem, regs = tc.resources[key]
                assert regs is not None and tc.maxnreg is not None and regs <= tc.maxnreg, (name, key, tc)
                assert AT.occupancy(regs, tc.num_warps, smem, AT.SM86) >= 0.5, (name, key, tc)


def test_cpu_without_interpreter_takes_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors without TRITON_INTERPRET run the eager reference; backend='triton' refuses."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = [p.float() for p in _params(2, 9, 32)]
    got = critic_attention(*params, 4, causal=True)
    want = critic_attention_ref(*params, 4, causal=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 6, 8)
    assert torch.equal(critic_attention_decode(q, k, k, causal=True), critic_attention_decode_ref(q, k, k, True))
    with pytest.raises(RuntimeError, match="triton"):
        critic_attention(*params, 4, backend="triton")


def test_fixed_config_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-autotuned GPU launch path (first fitting config of each table), run by the interpreter."""
    monkeypatch.setenv("TAPE_KERNELS_ATTN_AUTOTUNE", "0")
    monkeypatch.setattr(AT, "interpreting", lambda: False)
    _check_case(2, 40, 64, 4, True, torch.float32, seed=4)
    _check_case(1, 37, 32, 4, False, torch.float16, seed=5)


def test_aot_compile_largest_configs() -> None:
    """The attention configs with the most shared memory per launch type compile within the sm_86 limit,
    using the shared memory their table entry records (`make aot` compiles them all)."""
    code = textwrap.dedent(
        """
        from tape_kernels import attention as A
        from tape_kernels._aot import SM86_MAX_SHARED, compile_spec
        largest = {}
        for (name, dp), tuned in A.TUNED.items():
            for tc in tuned.table:
                for key, (smem, _) in tc.resources.items():
                    if dp == 64 and smem > largest.get(key, (0,))[0]:
                        cfg = f"dp{dp},bm{tc.meta['BLOCK_M']},bn{tc.meta['BLOCK_N']},w{tc.num_warps},s{tc.num_stages}"
                        tag = {"fp16": "fp16,ieee", "bf16": "bf16,ieee", "fp32": "fp32,ieee", "tf32": "fp32,tf32"}[key]
                        stats = ",stats" if "+stats" in name else ""
                        reg = f",r{tc.maxnreg}" if tc.maxnreg else ""
                        largest[key] = (smem, f"{tuned.kernel.__name__}[{tag},{cfg}{reg}{stats}]")
        want = {n: smem for smem, n in largest.values()}
        specs = [s for s in A.aot_specs() if s.name in want]
        assert len(specs) == len(want), sorted(set(want) - {s.name for s in specs})
        for s in specs:
            shared = compile_spec(s, 86).metadata.shared
            assert shared == want[s.name] <= SM86_MAX_SHARED, (s.name, shared, want[s.name])
        print("OK", len(specs))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK 4" in proc.stdout


# ---------------------------------------------------------------------------------------------- non-finite values

# Every value in the activations; in the weights, enough to see each path (a V column, the out projection,
# a bias), both masks each.
NONFINITE_CASES = [("x", v) for v in acc.NONFINITE] + [("in_proj_weight", v) for v in acc.NONFINITE[:2]] + [
    ("out_proj_weight", acc.NONFINITE[0]), ("in_proj_bias", acc.NONFINITE[2])]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where,value", NONFINITE_CASES, ids=[f"{w}-{v}" for w, v in NONFINITE_CASES])
def test_nonfinite_propagate_like_eager(
    monkeypatch: pytest.MonkeyPatch, where: str, causal: bool, value: float
) -> None:
    """NaN / ±inf in an activation or a weight: out, entropy, aw and every gradient non-finite exactly
    where the eager reference's are. In the eager causal path the masked probabilities are exact zeros
    that still multiply V (and K, Q, dO in the backward), so a NaN at a later position reaches earlier rows
    through 0·NaN: the kernels, which skip masked tiles (16 × 16 here, 3 blocks), reproduce that."""
    monkeypatch.setattr(A, "INTERP_CONFIG", (16, 16, 4, 1))
    b, s, d, h = 2, 37, 32, 4
    params = [p.float() for p in _params(b, s, d, seed=8)]
    t = params[NAMES.index(where)]
    if where == "x":
        t[1, 21, 3] = value  # a middle position of the second batch row: earlier rows are masked from it
    elif where == "in_proj_weight":
        t[2 * d + 5, 7] = value  # a V column of head 0
    else:
        t.view(-1)[9] = value
    cot = [c.float() for c in _cotangents(b, s, d, seed=9)]
    kw = {"num_heads": h, "causal": causal}
    acc.assert_nonfinite_like_eager(lambda *a: critic_attention(*a, backend="triton", **kw),
                                lambda *a: critic_attention_ref(*a, **kw), params, cot, NAMES,
                                exact=math.isnan(value))  # fmt: skip


@pytest.mark.parametrize("value", acc.NONFINITE, ids=acc.NONFINITE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("device_length", [False, True])
def test_decode_nonfinite_like_eager(device_length: bool, splits: int, where: str, causal: bool, value: float) -> None:
    """Decode: NaN / ±inf in a new query row or at a cached key/value position: the output non-finite
    exactly where the eager decode's is (masked keys included: eager multiplies their zero weights by V)."""
    b, h, tn, t, dh = 2, 4, 3, 80, 16
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(b, h, n, dh, generator=g) for n in (tn, t, t))
    x = {"q": q, "k": k, "v": v}[where]
    if where == "q":
        x[1, 2, 1, 4] = value
    else:
        x[1, 2, 22, 4] = value  # visible to every new row
        x[0, 1, 31, 9] = value  # masked for the first new row when causal with q_offset 30 (its row block)
        x[0, 3, 70, 2] = value  # masked for all new rows then, beyond their row block: a skipped key block
    if device_length:
        cap = t + 9  # rows past the length hold NaN: never read (eager zeroes them)
        k, v = (torch.cat([y, torch.full((b, h, cap - t, dh), float("nan"))], dim=2) for y in (k, v))
        kw = {"length": torch.tensor([t], dtype=torch.int32)}
        want = critic_attention_decode_ref(q, k[:, :, :t], v[:, :, :t], causal=causal)
    else:
        kw = {"q_offset": 30} if causal else {}
        want = critic_attention_decode_ref(q, k, v, causal=causal, **kw)
    got = critic_attention_decode(q, k, v, causal=causal, backend="triton", num_splits=splits, **kw)
    if math.isnan(value):
        assert torch.isnan(want).any()
    acc.assert_same_nonfinite(got, want, "decode", exact=math.isnan(value))
