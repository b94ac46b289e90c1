"""Fused elementwise/reduction ops around the attention (group ``fused_ops``): forward + backward.

Ops at the notebook's training size (batch 16 × seq 128 = 2048 rows, D = 256, vocab 65):
  * ``unembed``: Student-t unembedding + log_softmax (fp32), and ``unembed-V4096`` (the multi-tile
    online log-sum-exp path);
  * ``nll``: the NLL of targets: eager/compile gather from the log-probs, fused uses
    ``student_t_nll`` (no (N, V) log-probs in the forward);
  * ``add_ln``: LayerNorm(x + residual) (fp32 and bf16);
  * ``combine-xor`` / ``combine-pairsm``: the TapeHead combines.

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
from tape_kernels.layernorm import add_layer_norm, add_layer_norm_ref
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
