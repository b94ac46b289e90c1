"""Training-tool benchmarks (group ``train``): tokens/s and peak memory of one optimisation step of
``tapetransformer train`` — the package's ``Stepper`` (micro-batches, autocast, GradScaler,
clipping, Adam) — at the notebook's size.

Every variant runs under the same autocast, the one ``tapetransformer train --amp auto`` picks on
the device (bf16 on CUDA, or fp16 + GradScaler where bf16 is missing; none on CPU): an earlier
version compared the reference in fp32 with the fused model in bf16, which mixed precision into
the speed-up. impls: ``reference`` (a) = the reference model (the tool's step calls the NLL of
its forward); ``fused_eager`` (b) = the fused model with ``backend="eager"``; ``fused_triton`` (c)
= with ``backend="triton"`` (CUDA only); ``fused-8GiB`` = (c) under ``--memory-budget-gb 8``: the
caching allocator is capped at 8 GiB and the planner's micro-batch × accumulation (×
recomputation) is used. ``test_bench_model.py`` times the bare model step (and torch.compile); this
file times the tool's step and records ``tokens_per_s`` (batch × seq_len / median step time).

All models use dropout 0 (the notebook uses 0.1): the fused attention kernels have no dropout, and
with dropout the fused model falls back to the eager attention, which would not measure the kernels.
On CPU the notebook case runs only with ``TK_BENCH_CPU_FULL=1``; ``TK_BENCH_CASES`` picks cases.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch
from common import (
    MEM_CAP_BYTES,
    MIB,
    MODEL_CASES,
    MODEL_IMPLS,
    bench_cases,
    build_model,
    is_cuda,
    make_batch,
    memory_cap,
    record,
    set_tokens_per_s,
    synced,
    warm,
)

GROUP = "train"
ROUNDS = {"cuda": 10, "cpu": 2}


def _train_api() -> dict[str, Any]:
    """What this file uses of ``tapetransformer.train`` (one place, should that module be split)."""
    from tapetransformer import train as t
    from tapetransformer.checkpoint import ModelConfig

    return {"ModelConfig": ModelConfig, "Stepper": t.Stepper, "enable_recompute": t.enable_recompute,
            "estimate_memory": t.estimate_memory, "pick_amp": t.pick_amp, "plan_memory": t.plan_memory}  # fmt: skip


def _skip(impl: str, case: str, device: torch.device) -> None:
    if case not in bench_cases():
        pytest.skip(f"case {case} not in TK_BENCH_CASES")
    if impl.startswith("fused_triton") and not is_cuda(device):
        pytest.skip(f"{impl} is benchmarked on CUDA only (the Triton interpreter is not a speed)")
    if case == "notebook" and not is_cuda(device) and os.environ.get("TK_BENCH_CPU_FULL", "0") in ("", "0"):
        pytest.skip("notebook-size model on CPU takes minutes per step (set TK_BENCH_CPU_FULL=1)")


def _stepper(impl: str, case: str, device: torch.device, budget: int | None) -> tuple[Any, torch.nn.Module]:
    api = _train_api()
    cfg = MODEL_CASES[case]
    mcfg = api["ModelConfig"](vocab_size=cfg["vocab_size"], seq_len=cfg["seq_len"], embed_dim=cfg["embed_dim"],
                              num_heads=cfg["num_heads"], dropout=0.0)  # fmt: skip
    model = build_model(case, impl, device)
    # The same autocast for every impl: what `tapetransformer train --amp auto` uses on this device.
    amp_dtype, need_scaler = api["pick_amp"]("auto", device)
    fused = impl != "reference"
    est = api["estimate_memory"](mcfg, sum(p.numel() for p in model.parameters()), amp=amp_dtype is not None,
                                 fused=fused)  # fmt: skip
    plan = api["plan_memory"](cfg["batch"], est, budget)
    if plan.recompute:
        api["enable_recompute"](model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if need_scaler else None
    stepper = api["Stepper"](model, opt, plan, device=device, amp_dtype=amp_dtype, scaler=scaler, grad_clip=1.0)
    return stepper, model


def _amp_name(stepper: Any) -> str:
    return str(stepper.amp_dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16") \
        if stepper.amp_dtype else "fp32"


@pytest.mark.parametrize("impl", ["reference", "fused_eager", "fused_triton"])
# the notebook size first (the headline; a time-limited GPU run keeps what finished)
@pytest.mark.parametrize("case", ["notebook", "small", "tiny"])
def test_train_tool_step(benchmark, device: torch.device, impl: str, case: str) -> None:  # noqa: ANN001
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
    letter = MODEL_IMPLS[impl]
    record(benchmark, group=GROUP, case=f"{case}-train-tool", impl=impl, peak_mem_mb=peak,
           role="eager" if letter == "a" else "fused", attribution=letter, precision=_amp_name(stepper),
           batch=cfg["batch"], seq_len=cfg["seq_len"], tokens_per_step=tokens, amp=_amp_name(stepper),
           micro_batch=stepper.plan.micro_batch, accum_steps=stepper.plan.accum_steps)  # fmt: skip
    benchmark.pedantic(step, rounds=ROUNDS[device.type], iterations=1)
    set_tokens_per_s(benchmark, tokens)


@pytest.mark.gpu
def test_train_tool_step_8gib_budget(benchmark, device: torch.device) -> None:  # noqa: ANN001
    """The notebook-size step as ``tapetransformer train --memory-budget-gb 8`` runs it."""
    case, impl = "notebook", "fused_triton"
    _skip(impl, case, device)
    gc.collect()
    torch.cuda.empty_cache()
    with memory_cap(device, MEM_CAP_BYTES) as frac:
        stepper, _ = _stepper(impl, case, device, MEM_CAP_BYTES)
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
    record(benchmark, group=GROUP, case=f"{case}-train-tool", impl="fused-8GiB", peak_mem_mb=peak,
           role="fused-8GiB", precision=_amp_name(stepper), batch=cfg["batch"], seq_len=cfg["seq_len"],
           tokens_per_step=tokens, mem_cap_mb=MEM_CAP_BYTES / MIB, mem_fraction=round(frac, 5),
           peak_reserved_mb=round(reserved, 1), micro_batch=plan.micro_batch, accum_steps=plan.accum_steps,
           recompute=plan.recompute, estimated_peak_mb=round(plan.estimated_peak_bytes / MIB, 1))  # fmt: skip
    set_tokens_per_s(benchmark, tokens)
    assert reserved <= MEM_CAP_BYTES / MIB
