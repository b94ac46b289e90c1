"""Whole-model benchmarks (group ``model``): the training step and cached generation.

impls: ``eager`` = the reference ``tapetransformer.reference.TapeTransformer``; ``compile`` =
``torch.compile`` of it (CUDA only: compiling the model takes minutes on a CPU); ``fused`` = the
package's ``tapetransformer.TapeTransformer(backend="triton")`` (CUDA only; skipped while the
package has no such model). Cases: ``notebook`` (vocab 65, seq 128, dim 256, 4 critics, batch 16)
and ``small`` (vocab 65, seq 64, dim 64, 2 critics, batch 8).

On CPU only the small case runs by default: the reference's notebook-size step takes one to three
minutes on a 2-core machine (set ``TK_BENCH_CPU_FULL=1`` to run it anyway). On CUDA the
notebook-size training step runs once more with the caching allocator capped at 8 GiB
(``torch.cuda.set_per_process_memory_fraction``): an out-of-memory error there fails the
benchmark, and its peak memory is recorded.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from common import (
    MEM_CAP_BYTES,
    MIB,
    MODEL_CASES,
    build_model,
    fused_model_class,
    is_cuda,
    make_batch,
    make_generate,
    make_train_step,
    memory_cap,
    peak_memory_mb,
    record,
    synced,
    timed_first_call,
    warm,
)

GROUP = "model"
# Timed rounds (after the warm-up calls): the CPU step takes seconds, a GPU step milliseconds.
ROUNDS = {"cuda": {"train": 10, "generate": 5}, "cpu": {"train": 2, "generate": 3}}
GEN_NEW_TOKENS = 16


def _skip_if_unavailable(impl: str, case: str, device: torch.device) -> None:
    if impl in ("compile", "fused") and not is_cuda(device):
        pytest.skip(f"{impl} impl is benchmarked on CUDA only")
    if impl == "fused" and fused_model_class() is None:
        pytest.skip("tapetransformer.TapeTransformer (fused model, issue 6) does not exist yet")
    if case == "notebook" and not is_cuda(device) and os.environ.get("TK_BENCH_CPU_FULL", "0") in ("", "0"):
        pytest.skip("notebook-size model on CPU takes minutes per step (set TK_BENCH_CPU_FULL=1)")


def _release(device: torch.device) -> None:
    # Models of earlier benchmarks must not count towards this one's peak.
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


@pytest.mark.parametrize(
    "impl,case",
    [
        ("eager", "small"),
        ("eager", "notebook"),
        ("compile", "notebook"),
        ("fused", "small"),
        ("fused", "notebook"),
    ],
    ids=lambda v: v,
)
def test_train_step(benchmark, device: torch.device, impl: str, case: str) -> None:
    _skip_if_unavailable(impl, case, device)
    _release(device)
    model = build_model(case, impl, device)
    x, y = make_batch(case, device)
    compile_s = None
    if impl == "compile":
        model = torch.compile(model)
    step = synced(make_train_step(model, x, y), device)
    if impl == "compile":
        _, compile_s = timed_first_call(step, device)
    loss = float(step())  # warm-up: allocates Adam's state, runs cuBLAS/Triton first-call work
    peak = peak_memory_mb(step, device)
    assert torch.isfinite(torch.tensor(loss)), f"{impl}/{case}: non-finite loss {loss}"
    record(
        benchmark,
        group=GROUP,
        case=f"{case}-train",
        impl=impl,
        peak_mem_mb=peak,
        compile_s=compile_s,
        batch=MODEL_CASES[case]["batch"],
        seq_len=MODEL_CASES[case]["seq_len"],
        tokens_per_step=MODEL_CASES[case]["batch"] * MODEL_CASES[case]["seq_len"],
    )
    benchmark.pedantic(step, rounds=ROUNDS[device.type]["train"], iterations=1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_train_step_8gib(benchmark, device: torch.device, impl: str) -> None:
    """The notebook-size training step under a caching-allocator cap of 8 GiB."""
    case = "notebook"
    _skip_if_unavailable(impl, case, device)
    _release(device)
    with memory_cap(device, MEM_CAP_BYTES) as frac:
        model = build_model(case, impl, device)
        x, y = make_batch(case, device)
        step = synced(make_train_step(model, x, y), device)
        warm(step, 1)  # the first step also allocates Adam's state
        torch.cuda.reset_peak_memory_stats(device)
        benchmark.pedantic(step, rounds=5, iterations=1)
        peak = torch.cuda.max_memory_allocated(device) / MIB
        reserved = torch.cuda.max_memory_reserved(device) / MIB
    record(
        benchmark,
        group=GROUP,
        case=f"{case}-train-8GiB",
        impl=impl,
        peak_mem_mb=peak,
        mem_cap_mb=MEM_CAP_BYTES / MIB,
        mem_fraction=round(frac, 5),
        peak_reserved_mb=round(reserved, 1),
    )
    # The cap is enforced by the native caching allocator only (not, e.g., by cudaMallocAsync): check.
    assert reserved <= MEM_CAP_BYTES / MIB, f"allocator reserved {reserved:.0f} MiB despite the 8 GiB cap"


@pytest.mark.parametrize(
    "impl,case",
    [("eager", "small"), ("eager", "notebook"), ("fused", "small"), ("fused", "notebook")],
    ids=lambda v: v,
)
def test_generate(benchmark, device: torch.device, impl: str, case: str) -> None:
    """Greedy cached generation, batch 1: the prompt (a quarter of seq_len) is prefilled untimed
    before each round; a round times 16 one-token calls."""
    _skip_if_unavailable(impl, case, device)
    _release(device)
    model = build_model(case, impl, device)
    x, _ = make_batch(case, device)
    prompt_len = MODEL_CASES[case]["seq_len"] // 4
    prefill, decode = make_generate(model, x[:1, :prompt_len], GEN_NEW_TOKENS)
    prefill = synced(prefill, device)

    def setup() -> tuple[tuple, dict]:
        return prefill(), {}

    run = synced(decode, device)
    warm(lambda: run(*prefill()), 1)
    peak = peak_memory_mb(lambda: run(*prefill()), device)
    assert run(*prefill()).shape == (1, GEN_NEW_TOKENS)
    record(
        benchmark,
        group=GROUP,
        case=f"{case}-generate",
        impl=impl,
        peak_mem_mb=peak,
        batch=1,
        prompt_len=prompt_len,
        new_tokens=GEN_NEW_TOKENS,
    )
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS[device.type]["generate"], iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["ms_per_token"] = round(stats.stats.median * 1e3 / GEN_NEW_TOKENS, 4)
