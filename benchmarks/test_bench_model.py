"""The training step (group ``model``, case ``<case>-train``), attributed: one variant per cause.

Every variant runs forward, the mean NLL of the targets, backward and an Adam step, under the same
autocast (:func:`common.bench_amp`: bf16 on a CUDA device that has it, as ``tapetransformer train``
trains, else fp32; ``TK_BENCH_AMP`` overrides), from the same initial weights and batch:

* ``reference`` (a): ``tapetransformer.reference.ReferenceTapeTransformer``, the notebook's module — the
  prophet's Char-RNN loop and every critic run, NLL of ``model(x)[0]``;
* ``fused_eager`` (b): the fused model with ``backend="eager"``: ``model.loss`` skips the dead work
  (prophet, ``rnn_projection``, critics 0..n−2) exactly as the kernels do, in plain PyTorch ops;
* ``fused_triton`` (c): the same with ``backend="triton"`` (CUDA only: the interpreter is not a speed);
* ``compile_default``, ``compile_max-autotune`` (d): ``torch.compile`` of (b)'s loss (forward and
  backward), the compiler given the same dataflow the kernels get.

So: (a)/(best fused) = what a user gains; (b)/(c) = what the kernels add; (d)/(c) = kernels vs
the compiler. ``collect_results.py`` puts the reference in ``eager_ms``, the fastest fused path in
``fused_ms``, the best compile mode in ``compile_ms`` and every variant, its tokens/s and peak
memory in ``extra``, and computes those ratios.

Cases (``TK_BENCH_CASES``, default ``small,notebook``): ``notebook`` (vocab 65, seq 128, dim 256,
4 critics, batch 16), ``small`` (vocab 65, seq 64, dim 64, 2 critics, batch 8); ``tiny`` is for the
tooling's tests. On CPU the notebook case runs only with ``TK_BENCH_CPU_FULL=1`` (the reference
takes one to three minutes per step on a 2-core machine). ``TK_BENCH_COMPILE_BACKEND`` (default
inductor) picks torch.compile's backend: the tooling's tests use ``eager`` (Dynamo only, no code
generation). On CUDA the notebook-size step runs once more with the caching allocator capped at
8 GiB: an out-of-memory error there fails the benchmark.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from common import (
    COMPILE_MODES,
    MEM_CAP_BYTES,
    MIB,
    MODEL_CASES,
    MODEL_IMPLS,
    bench_amp,
    bench_cases,
    build_model,
    compile_backend,
    fused_model_class,
    graph_breaks,
    is_cuda,
    make_batch,
    make_train_step,
    memory_cap,
    peak_memory_mb,
    record,
    reset_graph_breaks,
    set_tokens_per_s,
    synced,
    timed_first_call,
    warm,
)

GROUP = "model"
# Timed rounds (after the warm-up calls): the CPU step takes seconds, a GPU step milliseconds.
ROUNDS = {"cuda": 10, "cpu": 2}
IMPLS = ["reference", "fused_eager", "fused_triton", *(f"compile_{m}" for m in COMPILE_MODES)]


def _skip_if_unavailable(impl: str, case: str, device: torch.device) -> None:
    if case not in bench_cases():
        pytest.skip(f"case {case} not in TK_BENCH_CASES")
    if impl == "fused_triton" and not is_cuda(device):
        pytest.skip("fused_triton is benchmarked on CUDA only (the Triton interpreter is not a speed)")
    if impl != "reference" and fused_model_class() is None:
        pytest.skip("tapetransformer.TapeTransformer (the fused model) is missing")
    if case == "notebook" and not is_cuda(device) and os.environ.get("TK_BENCH_CPU_FULL", "0") in ("", "0"):
        pytest.skip("notebook-size model on CPU takes minutes per step (set TK_BENCH_CPU_FULL=1)")


def _release(device: torch.device) -> None:
    # Models of earlier benchmarks must not count towards this one's peak.
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def _step(impl: str, case: str, device: torch.device, amp: str):  # noqa: ANN202
    """(model, step, compile mode or None) of a variant."""
    mode = impl[len("compile_"):] if impl.startswith("compile_") else None
    model_impl = "fused_eager" if mode is not None else impl
    model = build_model(case, model_impl, device)
    x, y = make_batch(case, device)
    loss = "forward" if impl == "reference" else "fused"
    step = make_train_step(model, x, y, amp=amp, loss=loss, compile_mode=mode)
    return model, synced(step, device), mode


@pytest.mark.parametrize("impl", IMPLS)
# the notebook size first (the headline; a time-limited GPU run keeps what finished)
@pytest.mark.parametrize("case", ["notebook", "small", "tiny"])
def test_train_step(benchmark, device: torch.device, impl: str, case: str) -> None:  # noqa: ANN001
    _skip_if_unavailable(impl, case, device)
    _release(device)
    amp = bench_amp(device)
    _, step, mode = _step(impl, case, device, amp)
    compile_s = breaks = None
    if mode is not None:
        reset_graph_breaks()
        _, compile_s = timed_first_call(step, device)
        breaks = graph_breaks()
    warm(step, 1)  # Adam's state, cuBLAS/Triton first-call work, a second compiled call
    peak = peak_memory_mb(step, device)
    loss = float(step())
    assert torch.isfinite(torch.tensor(loss)), f"{impl}/{case}: non-finite loss {loss}"
    cfg = MODEL_CASES[case]
    tokens = cfg["batch"] * cfg["seq_len"]
    letter = "d" if mode is not None else MODEL_IMPLS[impl]
    record(
        benchmark,
        group=GROUP,
        case=f"{case}-train",
        impl=impl,
        peak_mem_mb=peak,
        compile_s=compile_s,
        role={"a": "eager", "d": "compile"}.get(letter, "fused"),
        attribution=letter,
        precision=amp,
        batch=cfg["batch"],
        seq_len=cfg["seq_len"],
        tokens_per_step=tokens,
        **({"compile_backend": compile_backend(), "graph_breaks": breaks} if mode is not None else {}),
    )
    benchmark.pedantic(step, rounds=ROUNDS[device.type], iterations=1)
    set_tokens_per_s(benchmark, tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "fused_triton"])
def test_train_step_8gib(benchmark, device: torch.device, impl: str) -> None:  # noqa: ANN001
    """The notebook-size training step under a caching-allocator cap of 8 GiB."""
    case = "notebook"
    _skip_if_unavailable(impl, case, device)
    _release(device)
    amp = bench_amp(device)
    with memory_cap(device, MEM_CAP_BYTES) as frac:
        _, step, _ = _step(impl, case, device, amp)
        warm(step, 1)  # the first step also allocates Adam's state
        torch.cuda.reset_peak_memory_stats(device)
        benchmark.pedantic(step, rounds=5, iterations=1)
        peak = torch.cuda.max_memory_allocated(device) / MIB
        reserved = torch.cuda.max_memory_reserved(device) / MIB
    cfg = MODEL_CASES[case]
    record(
        benchmark,
        group=GROUP,
        case=f"{case}-train-8GiB",
        impl=impl,
        peak_mem_mb=peak,
        role="eager" if impl == "reference" else "fused",
        attribution=MODEL_IMPLS[impl],
        precision=amp,
        mem_cap_mb=MEM_CAP_BYTES / MIB,
        mem_fraction=round(frac, 5),
        peak_reserved_mb=round(reserved, 1),
    )
    set_tokens_per_s(benchmark, cfg["batch"] * cfg["seq_len"])
    # The cap is enforced by the native caching allocator only (not, e.g., by cudaMallocAsync): check.
    assert reserved <= MEM_CAP_BYTES / MIB, f"allocator reserved {reserved:.0f} MiB despite the 8 GiB cap"
