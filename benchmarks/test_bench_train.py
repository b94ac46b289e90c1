"""Training-tool benchmarks (group ``train``): tokens/s and peak memory of one optimisation step of
``tapetransformer train`` — the package's :class:`~tapetransformer.train.Stepper` (micro-batches,
autocast, GradScaler, clipping, Adam) — at the notebook's size.

impls: ``eager`` = the reference model in fp32 (what the notebook runs); ``fused`` = the fused
model (Triton) with ``--amp auto`` (bf16, or fp16 + GradScaler); ``fused-8GiB`` = the same under
``--memory-budget-gb 8``: the caching allocator is capped at 8 GiB and the planner's micro-batch ×
accumulation (× recomputation) is used. ``test_bench_model.py`` times the bare model step; this file
times the tool's step, and records ``tokens_per_s`` (batch × seq_len / median step time).

Both models use dropout 0 (the notebook uses 0.1): the fused attention kernels have no dropout, and
with dropout the fused model falls back to the eager attention, which would not measure the kernels.
On CPU only the eager ``small`` case runs (set ``TK_BENCH_CPU_FULL=1`` for the notebook size).
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
    is_cuda,
    make_batch,
    memory_cap,
    record,
    synced,
    warm,
)

from tapetransformer.checkpoint import ModelConfig
from tapetransformer.reference import TapeTransformer as ReferenceTapeTransformer
from tapetransformer.train import Stepper, enable_recompute, estimate_memory, pick_amp, plan_memory
from tapetransformer.train import build_model as tt_build_model

GROUP = "train"
ROUNDS = {"cuda": 10, "cpu": 2}


def _skip(impl: str, case: str, device: torch.device) -> None:
    if impl != "eager" and not is_cuda(device):
        pytest.skip(f"{impl} is benchmarked on CUDA only (the Triton interpreter is not a speed)")
    if case == "notebook" and not is_cuda(device) and os.environ.get("TK_BENCH_CPU_FULL", "0") in ("", "0"):
        pytest.skip("notebook-size model on CPU takes minutes per step (set TK_BENCH_CPU_FULL=1)")


def _stepper(impl: str, case: str, device: torch.device, budget: int | None) -> tuple[Stepper, torch.nn.Module]:
    cfg = MODEL_CASES[case]
    mcfg = ModelConfig(vocab_size=cfg["vocab_size"], seq_len=cfg["seq_len"], embed_dim=cfg["embed_dim"],
                       num_heads=cfg["num_heads"], dropout=0.0)
    torch.manual_seed(0)
    if impl == "eager":
        model = ReferenceTapeTransformer(mcfg.vocab_size, seq_len=mcfg.seq_len, embed_dim=mcfg.embed_dim,
                                         num_heads=mcfg.num_heads, dropout=0.0)
    else:
        model = tt_build_model(mcfg, backend="triton")
    model = model.to(device).train()
    amp_dtype, need_scaler = pick_amp("off" if impl == "eager" else "auto", device)
    est = estimate_memory(mcfg, sum(p.numel() for p in model.parameters()), amp=amp_dtype is not None,
                          fused=impl != "eager")
    plan = plan_memory(cfg["batch"], est, budget)
    if plan.recompute:
        enable_recompute(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if need_scaler else None
    return Stepper(model, opt, plan, device=device, amp_dtype=amp_dtype, scaler=scaler, grad_clip=1.0), model


def _tokens_per_s(benchmark, tokens: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = round(tokens / stats.stats.median, 1)


@pytest.mark.parametrize(
    "impl,case",
    [("eager", "small"), ("eager", "notebook"), ("fused", "small"), ("fused", "notebook")],
    ids=lambda v: v,
)
def test_train_tool_step(benchmark, device: torch.device, impl: str, case: str) -> None:
    _skip(impl, case, device)
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    stepper, _ = _stepper(impl, case, device, None)
    x, y = make_batch(case, device)
    step = synced(lambda: stepper.step(x, y)[0], device)
    warm(step, 2)  # Adam state, Triton JIT/autotuning, cuBLAS heuristics
    peak = None
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) / MIB
    loss = float(step())
    assert torch.isfinite(torch.tensor(loss)), f"{impl}/{case}: non-finite loss {loss}"
    cfg = MODEL_CASES[case]
    tokens = cfg["batch"] * cfg["seq_len"]
    record(benchmark, group=GROUP, case=f"{case}-train-tool", impl=impl, peak_mem_mb=peak, batch=cfg["batch"],
           seq_len=cfg["seq_len"], tokens_per_step=tokens,
           amp=str(stepper.amp_dtype).replace("torch.", "") if stepper.amp_dtype else "fp32",
           micro_batch=stepper.plan.micro_batch, accum_steps=stepper.plan.accum_steps)
    benchmark.pedantic(step, rounds=ROUNDS[device.type], iterations=1)
    _tokens_per_s(benchmark, tokens)


@pytest.mark.gpu
def test_train_tool_step_8gib_budget(benchmark, device: torch.device) -> None:
    """The notebook-size step as ``tapetransformer train --memory-budget-gb 8`` runs it."""
    case, impl = "notebook", "fused-8GiB"
    _skip(impl, case, device)
    gc.collect()
    torch.cuda.empty_cache()
    with memory_cap(device, MEM_CAP_BYTES) as frac:
        stepper, _ = _stepper("fused", case, device, MEM_CAP_BYTES)
        x, y = make_batch(case, device)
        step = synced(lambda: stepper.step(x, y)[0], device)
        warm(step, 2)
        torch.cuda.reset_peak_memory_stats(device)
        benchmark.pedantic(step, rounds=ROUNDS["cuda"], iterations=1)
        peak = torch.cuda.max_memory_allocated(device) / MIB
        reserved = torch.cuda.max_memory_reserved(device) / MIB
    cfg = MODEL_CASES[case]
    tokens = cfg["batch"] * cfg["seq_len"]
    plan = stepper.plan
    record(benchmark, group=GROUP, case=f"{case}-train-tool", impl=impl, peak_mem_mb=peak, batch=cfg["batch"],
           seq_len=cfg["seq_len"], tokens_per_step=tokens, mem_cap_mb=MEM_CAP_BYTES / MIB,
           mem_fraction=round(frac, 5), peak_reserved_mb=round(reserved, 1), micro_batch=plan.micro_batch,
           accum_steps=plan.accum_steps, recompute=plan.recompute,
           estimated_peak_mb=round(plan.estimated_peak_bytes / MIB, 1))
    _tokens_per_s(benchmark, tokens)
    assert reserved <= MEM_CAP_BYTES / MIB
