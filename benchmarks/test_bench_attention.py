"""Critic-head attention (group ``attention``): MHA with head-averaged weights + entropy/aw statistics.

impls: ``eager`` = ``nn.MultiheadAttention(need_weights=True)`` and the statistics on its (B, S, S)
weights, as the reference TapeHeadBlock runs it (CPU too, at a small size); ``compile`` =
``torch.compile`` of that (CUDA only); ``fused`` = ``tape_kernels.CriticAttention`` (CUDA only: the
Triton interpreter is not a speed). Modes: ``fwd`` (forward with autograd recording, as in training)
and ``fwdbwd`` (forward + backward of out·g + Σ entropy + Σ aw·w into x and all parameters).

Cases: the notebook's training size (B16, S128, D256, H4) and the sequence sweep S = 512, 2048 at
B16 (S² attention-weight memory grows 256× over the sweep). bf16 parameters and inputs on CUDA, fp32 on
CPU. ``peak_mem_mb`` is the allocator's peak during one call; ``act_mem_mb`` the part above what was live
before the call (inputs, parameters): the attention's activation and workspace memory.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from common import MIB, attention_calls, is_cuda, record, synced, timed_first_call, warm

GROUP = "attention"
ROUNDS = {"cuda": 30, "cpu": 3}
IMPLS = ["eager", "compile", "fused"]
MODES = ["fwd", "fwdbwd"]
# name -> (B, S, D, H)
CASES = {
    "B16-S128-D256-H4": (16, 128, 256, 4),
    "B16-S512-D256-H4": (16, 512, 256, 4),
    "B16-S2048-D256-H4": (16, 2048, 256, 4),
}
CPU_CASE = ("B2-S64-D64-H4", (2, 64, 64, 4))


def _peak_and_act_mb(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    if not is_cuda(device):
        return None, None
    torch.cuda.synchronize(device)
    live = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / MIB, (peak - live) / MIB


def _cases(device_is_cuda: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    return list(CASES.items()) if device_is_cuda else [CPU_CASE]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [*CASES, CPU_CASE[0]])
def test_attention(benchmark, device: torch.device, case: str, impl: str, mode: str) -> None:  # noqa: ANN001
    cuda = is_cuda(device)
    if impl in ("compile", "fused") and not cuda:
        pytest.skip(f"{impl} impl is benchmarked on CUDA only")
    if (case == CPU_CASE[0]) == cuda:
        pytest.skip("CUDA runs the GPU cases, CPU the small case")
    dtype = torch.bfloat16 if cuda else torch.float32
    fwd, fwdbwd = attention_calls(impl, dict(_cases(cuda))[case], device, dtype)
    step = synced(fwd if mode == "fwd" else fwdbwd, device)
    compile_s = None
    if impl == "compile":
        _, compile_s = timed_first_call(step, device)
    warm(step, 2)
    peak, act = _peak_and_act_mb(step, device)
    record(benchmark, group=GROUP, case=f"{case}-{mode}", impl=impl, peak_mem_mb=peak, compile_s=compile_s,
           act_mem_mb=act, mode=mode, dtype=str(dtype).replace("torch.", ""))  # fmt: skip
    benchmark.pedantic(step, rounds=ROUNDS[device.type], iterations=1, warmup_rounds=1)
