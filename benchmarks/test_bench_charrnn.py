"""Char-RNN (prophet) benchmarks, group ``charrnn``.

Cases (CUDA): B16 S128 D256 Hd512, 2 layers — forward, forward+backward — and decode-step latency
at B = 1. Implementations: ``eager`` (the reference's Python loop, ``charrnn_ref``), ``fused``
(Triton: persistent one-launch-per-layer kernels where the grid fits on the SMs), ``fused_per_step``
(one launch per step, the fallback layout), ``compile`` (``torch.compile`` of the eager loop;
its first-call time is reported as ``compile_s``).

On CPU only the eager cases run, at a small size (B2 S16 D32 Hd64): the interpreter is not a speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from common import is_cuda, peak_memory_mb, record, skip_unless_cuda, synced, timed_first_call, warm

from tape_kernels.charrnn import CharRNN, charrnn, charrnn_ref, charrnn_step

GROUP = "charrnn"
FULL = (16, 128, 256, 512)
CPU_SMALL = (2, 16, 32, 64)
IMPLS = ["eager", "fused", "fused_per_step", "compile"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _shape(device: torch.device) -> tuple[int, int, int, int]:
    return FULL if is_cuda(device) else CPU_SMALL


def _skip(impl: str, device: torch.device) -> None:
    if impl.startswith("fused"):
        skip_unless_cuda(device, "fused Triton kernels are benchmarked on CUDA only")
    if impl == "compile":
        skip_unless_cuda(device, "torch.compile of the 128-step loop is benchmarked on CUDA only")


def _setup(device: torch.device, dtype: torch.dtype, b: int | None = None, s: int | None = None):
    bb, ss, d, hd = _shape(device)
    torch.manual_seed(0)
    model = CharRNN(d, hd, 2).to(device=device, dtype=dtype)
    emb = torch.randn(b or bb, s or ss, d, device=device, dtype=dtype)
    return model, emb


def _seq_fn(impl: str) -> Callable[..., Any]:
    if impl == "eager":
        return charrnn_ref
    if impl == "fused":
        return lambda e, w, h=None: charrnn(e, w, h, backend="triton")
    if impl == "fused_per_step":
        return lambda e, w, h=None: charrnn(e, w, h, backend="triton", persistent=False)
    return torch.compile(charrnn_ref)


def _case(kind: str, dtype_name: str, device: torch.device, b: int | None = None) -> str:
    bb, s, d, hd = _shape(device)
    return f"{kind}_B{b or bb}_S{s if kind != 'decode' else 1}_D{d}_H{hd}_{dtype_name}"


def _finish(benchmark, fn: Callable[[], Any], device: torch.device, impl: str, case: str) -> None:
    run = synced(fn, device)
    compile_s = None
    if impl == "compile":
        _, compile_s = timed_first_call(run, device)
    warm(run)
    mem = peak_memory_mb(run, device)
    record(benchmark, group=GROUP, case=case, impl=impl, peak_mem_mb=mem, compile_s=compile_s)
    benchmark(run)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_charrnn_forward(benchmark, device: torch.device, impl: str, dtype_name: str) -> None:
    _skip(impl, device)
    model, emb = _setup(device, DTYPES[dtype_name])
    w = [p.detach() for p in model.flat_weights()]
    f = _seq_fn(impl)

    def fn():
        with torch.no_grad():
            return f(emb, w)

    _finish(benchmark, fn, device, impl, _case("fwd", dtype_name, device))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_charrnn_forward_backward(benchmark, device: torch.device, impl: str, dtype_name: str) -> None:
    _skip(impl, device)
    model, emb = _setup(device, DTYPES[dtype_name])
    w = list(model.flat_weights())
    e = emb.clone().requires_grad_(True)
    f = _seq_fn(impl)
    go = torch.randn(emb.shape[0], emb.shape[1], model.hidden_size, device=device, dtype=emb.dtype)

    def fn():
        out, _ = f(e, w)
        return torch.autograd.grad([out], [e] + w, [go])

    _finish(benchmark, fn, device, impl, _case("fwd_bwd", dtype_name, device))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_charrnn_decode_step(benchmark, device: torch.device, impl: str, dtype_name: str) -> None:
    _skip(impl, device)
    model, emb = _setup(device, DTYPES[dtype_name], b=1, s=1)
    w = [p.detach() for p in model.flat_weights()]
    hs = [torch.randn(1, 1, model.hidden_size, device=device, dtype=emb.dtype) * 0.1 for _ in range(2)]
    x = emb[:, 0]
    if impl == "eager":
        step = lambda: charrnn_ref(emb, w, hs)
    elif impl.startswith("fused"):
        persistent = None if impl == "fused" else False
        step = lambda: charrnn_step(x, w, hs, backend="triton", persistent=persistent)
    else:
        compiled = torch.compile(charrnn_ref)
        step = lambda: compiled(emb, w, hs)

    def fn():
        with torch.no_grad():
            return step()

    _finish(benchmark, fn, device, impl, _case("decode", dtype_name, device, b=1))
