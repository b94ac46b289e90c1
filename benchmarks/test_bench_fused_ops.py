"""Fused elementwise/reduction ops around the attention (group ``fused_ops``): forward + backward.

Ops at the notebook's training size (batch 16 × seq 128 = 2048 rows, D = 256, vocab 65):
  * ``unembed``: Student-t unembedding + log_softmax (fp32), and ``unembed-V4096`` (the multi-tile
    online log-sum-exp path);
  * ``nll``: the NLL of targets: eager/compile gather from the log-probs, fused uses
    ``student_t_nll`` (no (N, V) log-probs in the forward);
  * ``add_ln``: LayerNorm(x + residual) (fp32 and bf16);
  * ``combine-xor`` / ``combine-pairsm``: the TapeHead combines;
  * a TapeHead layer's block pair (two blocks sharing their input, G = 2), fp32 and bf16 autocast:
    ``pair-in_proj`` (grouped Linear D -> 3D), ``pair-out_proj_ln`` (Linear D -> D + residual +
    LayerNorm), ``pair-mlp_ln_combine`` (Linear D -> 8D, ReferenceActivation, Linear 8D -> D, residual,
    LayerNorm and the pair-softmax combine), ``pair-rope`` (pos_emb + RoPE of both first-layer blocks).
    eager = the ops PyTorch runs for the two blocks (``tape_kernels.fused_linear`` / ``rope`` ``*_ref``).

impls: ``eager`` = the eager ``*_ref`` (runs on CPU too), ``compile`` = ``torch.compile`` of it
(CUDA only), ``fused`` = the Triton op (CUDA only: the interpreter is not a speed). A round is one
forward and one backward with a fixed upstream gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from common import is_cuda, peak_memory_mb, record, synced, timed_first_call, warm

from tape_kernels.combine import tapehead_combine, tapehead_combine_ref
from tape_kernels.fused_linear import (
    grouped_linear,
    grouped_linear_add_layer_norm,
    grouped_linear_add_layer_norm_ref,
    grouped_linear_ref,
    grouped_mlp_add_layer_norm,
    grouped_mlp_add_layer_norm_ref,
)
from tape_kernels.layernorm import add_layer_norm, add_layer_norm_ref
from tape_kernels.rope import rope_embed, rope_embed_ref
from tape_kernels.unembedding import (
    student_t_nll,
    student_t_nll_ref,
    student_t_unembedding,
    student_t_unembedding_ref,
)

GROUP = "fused_ops"
ROWS, D, V = 2048, 256, 65
ROUNDS = {"cuda": 50, "cpu": 5}
IMPLS = ["eager", "compile", "fused"]


def _skip(impl: str, device: torch.device) -> None:
    if impl in ("compile", "fused") and not is_cuda(device):
        pytest.skip(f"{impl} impl is benchmarked on CUDA only")


def _leaf(shape, device, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor | None):
    def step() -> None:
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        if grad is None:
            out.backward()
        else:
            out.backward(grad)

    return step


def _bench(benchmark, device, impl, case, ref_fn, fused_fn, inputs, grad, **extra) -> None:
    compile_s = None
    if impl == "eager":
        fn = ref_fn
    elif impl == "compile":
        fn = torch.compile(ref_fn)
    else:
        fn = fused_fn
    step = synced(_fwd_bwd(fn, inputs, grad), device)
    if impl == "compile":
        _, compile_s = timed_first_call(step, device)
    warm(step, 2)
    peak = peak_memory_mb(step, device)
    record(benchmark, group=GROUP, case=case, impl=impl, peak_mem_mb=peak, compile_s=compile_s, **extra)
    benchmark.pedantic(step, rounds=ROUNDS[device.type], iterations=1, warmup_rounds=1)


def _unembed_ref_2d(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return student_t_unembedding_ref(h[None], u)[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [V, 4096], ids=lambda v: f"V{v}")
def test_unembed(benchmark, device: torch.device, impl: str, v: int) -> None:
    _skip(impl, device)
    if v > V and not is_cuda(device):
        pytest.skip("large-vocab case on CUDA only")
    h = _leaf((ROWS, D), device)
    u = _leaf((D, v), device, seed=1)
    grad = torch.randn(ROWS, v, device=device)
    case = "unembed" if v == V else f"unembed-V{v}"
    _bench(
        benchmark, device, impl, case, _unembed_ref_2d, lambda a, b: student_t_unembedding(a, b), [h, u], grad,
        rows=ROWS, dim=D, vocab=v,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_nll(benchmark, device: torch.device, impl: str) -> None:
    _skip(impl, device)
    h = _leaf((ROWS, D), device)
    u = _leaf((D, V), device, seed=1)
    y = torch.randint(0, V, (ROWS,), device=device)
    _bench(
        benchmark, device, impl, "nll",
        lambda a, b: student_t_nll_ref(a[None], b, y[None]),
        lambda a, b: student_t_nll(a, b, y),
        [h, u], None, rows=ROWS, dim=D, vocab=V,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_layer_norm(benchmark, device: torch.device, impl: str, dtype: torch.dtype) -> None:
    _skip(impl, device)
    if dtype == torch.bfloat16 and not is_cuda(device):
        pytest.skip("bf16 case on CUDA only")
    x = _leaf((ROWS, D), device, dtype)
    r = _leaf((ROWS, D), device, dtype, seed=1)
    w = _leaf((D,), device, dtype, seed=2)
    b = _leaf((D,), device, dtype, seed=3)
    grad = torch.randn(ROWS, D, device=device, dtype=dtype)
    _bench(
        benchmark, device, impl, f"add_ln-{'fp32' if dtype == torch.float32 else 'bf16'}",
        add_layer_norm_ref, add_layer_norm, [x, r, w, b], grad, rows=ROWS, dim=D,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", [0, 1], ids=["xor", "pairsm"])
def test_combine(benchmark, device: torch.device, impl: str, mode: int) -> None:
    _skip(impl, device)
    hl = _leaf((ROWS, D), device)
    hr = _leaf((ROWS, D), device, seed=1)
    grad = torch.randn(ROWS, D, device=device)
    _bench(
        benchmark, device, impl, f"combine-{'xor' if mode == 0 else 'pairsm'}",
        lambda a, b: tapehead_combine_ref(a, b, mode), lambda a, b: tapehead_combine(a, b, mode),
        [hl, hr], grad, rows=ROWS, dim=D,
    )


# ------------------------------------------------------------------ a TapeHead layer's block pair (G = 2)

PAIR_CASES = ["in_proj", "out_proj_ln", "mlp_ln_combine", "rope"]


def _pair_inputs(op: str, device: torch.device) -> tuple[list[torch.Tensor], Callable, Callable, tuple]:
    """(leaves, eager fn, fused fn, output shape) of one pair op at the notebook's size; the fns take
    the leaves flat."""
    f = 8 * D
    if op == "in_proj":
        leaves = [_leaf((ROWS, D), device), *(_leaf((3 * D, D), device, scale=D**-0.5, seed=1 + i) for i in range(2)),
                  *(_leaf((3 * D,), device, seed=3 + i) for i in range(2))]  # fmt: skip

        def ref(x, w0, w1, b0, b1):
            return grouped_linear_ref(x, [w0, w1], [b0, b1])

        def fused(x, w0, w1, b0, b1):
            return grouped_linear(x, [w0, w1], [b0, b1])

        return leaves, ref, fused, (2, ROWS, 3 * D)
    if op == "out_proj_ln":
        leaves = [_leaf((2, ROWS, D), device), _leaf((ROWS, D), device, seed=1),
                  *(_leaf((D, D), device, scale=D**-0.5, seed=2 + i) for i in range(2)),
                  *(_leaf((D,), device, seed=4 + i) for i in range(6))]  # fmt: skip

        def ref(o, x, w0, w1, b0, b1, g0, g1, be0, be1):
            return grouped_linear_add_layer_norm_ref(o, x, [w0, w1], [b0, b1], [g0, g1], [be0, be1])

        def fused(o, x, w0, w1, b0, b1, g0, g1, be0, be1):
            return grouped_linear_add_layer_norm(o, x, [w0, w1], [b0, b1], [g0, g1], [be0, be1])

        return leaves, ref, fused, (2, ROWS, D)
    if op == "mlp_ln_combine":
        leaves = [_leaf((2, ROWS, D), device), *(_leaf((f, D), device, scale=D**-0.5, seed=1 + i) for i in range(2)),
                  *(_leaf((f,), device, seed=3 + i) for i in range(2)),
                  *(_leaf((D, f), device, scale=f**-0.5, seed=5 + i) for i in range(2)),
                  *(_leaf((D,), device, seed=7 + i) for i in range(4))]  # fmt: skip

        def ref(h, we0, we1, be0, be1, wl0, wl1, g0, g1, b0, b1):
            return grouped_mlp_add_layer_norm_ref(h, [we0, we1], [be0, be1], [wl0, wl1], [g0, g1], [b0, b1], combine=1)

        def fused(h, we0, we1, be0, be1, wl0, wl1, g0, g1, b0, b1):
            return grouped_mlp_add_layer_norm(h, [we0, we1], [be0, be1], [wl0, wl1], [g0, g1], [b0, b1], combine=1)

        return leaves, ref, fused, (ROWS, D)
    from tapetransformer.reference import rope_frequencies, sinusoidal_positions

    seq = 128
    pos = [sinusoidal_positions(seq, D).to(device)] * 2
    freqs = [rope_frequencies(D).to(device)] * 2
    leaves = [_leaf((ROWS // seq, seq, D), device)]
    return leaves, (lambda t: rope_embed_ref(t, pos, freqs)), (lambda t: rope_embed(t, pos, freqs)), \
        (2, ROWS // seq, seq, D)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("op", PAIR_CASES)
def test_block_pair_ops(benchmark, device: torch.device, impl: str, amp: str, op: str) -> None:
    _skip(impl, device)
    if amp == "bf16" and not is_cuda(device):
        pytest.skip("bf16 autocast case on CUDA only")
    if amp == "bf16" and op == "rope":
        pytest.skip("rope runs before any GEMM: no autocast dtype")
    leaves, ref, fused, shape = _pair_inputs(op, device)
    if amp == "bf16":
        ref = _autocast(ref, device)
        fused = _autocast(fused, device)
    grad = torch.randn(shape, device=device, dtype=torch.float32)
    _bench(benchmark, device, impl, f"pair-{op}-{amp}", ref, fused, leaves, grad, rows=ROWS, dim=D, groups=2)


def _autocast(fn: Callable, device: torch.device) -> Callable:
    def run(*args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args).float()

    return run
