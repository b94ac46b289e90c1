"""Generation engine latency (group ``model``): ms per generated token at batch 1 through
``tapetransformer.generate`` against the eager reference's own cached loop.

On CPU, ``generate()`` decodes each token through the lean step of ``tapetransformer.fastdecode``
(the same math as ``_forward_eval``; its checks and int8 weight packing run once per call, before
the prefill, and count in neither ``ms_per_token`` nor ``prefill_ms``), so that is what ``fused`` and
``fused_int8`` measure there.

Case ``notebook-generate-engine`` (vocab 65, seq_len 128, dim 256, 4 critics; a 32-token prompt, then
32 new tokens, greedy). impls: ``eager`` = the reference model's cached loop (it keeps unprojected
inputs and re-projects the whole history every token, and runs all 4 critics and the prophet);
``fused`` = the fused model in fp32 (Triton on CUDA, eager PyTorch ops on CPU), ``fused_int8`` =
the same with int8 weights (``act_quant=None``: W8A8 on CPU, the W8A16 GEMV on CUDA), and on CUDA
``fused_fp16`` / ``fused_bf16``. On CUDA these capture the decode step in a CUDA graph (generate()'s
default there); the ``*_nograph`` impls run the same step eagerly, launch by launch. ``ms_per_token``
counts decode steps only (the prefill is reported as ``prefill_ms``, the one-off graph capture of the
warm-up call as ``capture_ms``; the timed calls replay that graph).
"""

from __future__ import annotations

import pytest
import torch
from common import MODEL_CASES, is_cuda, record

from tapetransformer import reference as ref
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer
from tapetransformer.sampling import sample_reference

GROUP = "model"
CASE = "notebook"
PROMPT, NEW = 32, 32
IMPLS = ["eager", "fused", "fused_int8", "fused_fp16", "fused_bf16",
         "fused_nograph", "fused_int8_nograph", "fused_fp16_nograph", "fused_bf16_nograph"]


def _model(impl: str, device: torch.device) -> torch.nn.Module:
    cfg = {k: v for k, v in MODEL_CASES[CASE].items() if k != "batch"}
    torch.manual_seed(0)
    if impl == "eager":
        m = ref.TapeTransformer(**cfg, dropout=0.0)
    else:
        m = TapeTransformer(**cfg, dropout=0.0)
    m = m.to(device).eval()
    if impl.startswith("fused_fp16"):
        m = m.half()
    elif impl.startswith("fused_bf16"):
        m = m.bfloat16()
    return m


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_engine(benchmark, device: torch.device, impl: str) -> None:  # noqa: ANN001
    if (impl.startswith(("fused_fp16", "fused_bf16")) or impl.endswith("_nograph")) and not is_cuda(device):
        pytest.skip("half-precision generation and CUDA graphs are GPU cases")
    model = _model(impl, device)
    prompt = torch.randint(0, MODEL_CASES[CASE]["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    stats: dict = {}

    if impl == "eager":
        def run() -> None:
            _, ms = sample_reference(model, prompt, NEW, greedy=True)
            stats["ms_per_token"] = ms
    else:
        def run() -> None:
            generate(model, prompt, NEW, greedy=True, int8=impl.startswith("fused_int8"),
                     cuda_graph=False if impl.endswith("_nograph") else None, stats=stats)

    run()  # warm-up (Triton compiles, int8 packing, the CUDA-graph capture that later calls replay)
    first_capture_ms = stats.get("capture_ms")
    record(benchmark, group=GROUP, case=f"{CASE}-generate-engine", impl=impl, peak_mem_mb=None, batch=1,
           prompt_len=PROMPT, new_tokens=NEW)
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_token"] = round(stats["ms_per_token"], 3)
    if "prefill_ms" in stats:
        benchmark.extra_info["prefill_ms"] = round(stats["prefill_ms"], 3)
    if first_capture_ms is not None:  # the timed calls replay the warm-up's graph (capture_ms 0 there)
        benchmark.extra_info["capture_ms"] = round(first_capture_ms, 3)
    if "cuda_graph" in stats:
        benchmark.extra_info["cuda_graph"] = stats["cuda_graph"]
