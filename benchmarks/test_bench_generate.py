"""Generation latency (group ``model``, case ``<case>-generate-engine``), attributed: ms per token.

Batch 1, greedy, a 32-token prompt then 32 new tokens at the notebook's size (vocab 65, seq_len 128,
dim 256, 4 critics; ``TK_BENCH_CASES``' first case, default notebook). ``ms_per_token`` (the
median over the 3 timed calls) counts decode steps only: the prefill is ``prefill_ms``, the one-off
CUDA-graph capture of the warm-up call ``capture_ms`` (the timed calls replay that graph); for
``compile_*`` the warm-up call compiles, and ``graph_breaks`` counts where Dynamo split the step.
Variants, ``<how>_<precision>[_nograph]``:

* ``reference_fp32`` (a): the reference model's own cached loop (``sampling.sample_reference``): it
  keeps unprojected inputs and re-projects the whole history every token, and runs all 4 critics
  and the prophet;
* ``fused_eager_*`` (b): ``generate()`` on the fused model with ``backend="eager"`` and
  ``native=False``: projected K/V cache and dead-work skipping, no kernels of ours (ATen op by op);
* ``fused_*`` (c): ``generate()`` on the fused model with ``backend="triton"`` (CUDA only);
* ``native_*`` (c on CPU): ``generate()``'s default on a CPU: one native call per token
  (``tapetransformer.native_decode``, the package's CPU kernel) and its native prefill;
* ``compile_<mode>_fp32`` (d): (b)'s static decode step (the one ``generate`` captures) through
  ``torch.compile(mode=...)``, an eager prefill, the same greedy loop;
* (e): on CUDA ``generate()`` replays the step from a CUDA graph by default; ``*_nograph`` runs the
  same step launch by launch (``cuda_graph=False``). Variants without the suffix are what
  ``generate()`` does by default on the device.

The seed design (``design="seed"``: the coda, every critic, the prophet and the merges) is its own row,
case ``<case>-seed-generate-engine`` (``test_seed_design_generate``), CPU only: ``seed_fused_eager_*`` (b,
``native=False``: the model's own decode, op by op) and ``seed_native_<precision>_<mode>_t<threads>``
(c, ``generate()``'s CPU default), greedy and sampled (temperature 0.8, top-k 20), at 1 and 2 threads
(``torch.set_num_threads`` for the call). There is no (a): the reference model has no seed-design loop.

Precisions: ``fp32``; ``int8`` (int8 weights, ``act_quant=None``: W8A8 on CPU, the W8A16 GEMV on
CUDA); ``fp16``/``bf16`` (CUDA, model cast). The extra key ``<variant>_ms_per_token`` of the results
row holds each variant's latency (``collect_results.py``).
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch
from common import (
    COMPILE_MODES,
    MODEL_CASES,
    bench_cases,
    build_model,
    compile_backend,
    compiled_greedy_decode,
    graph_breaks,
    is_cuda,
    record,
    reset_graph_breaks,
)

GROUP = "model"
# name -> (model impl, precision, int8, CUDA graph, attribution letter, devices)
VARIANTS: dict[str, tuple[str, str, bool, bool, str, tuple[str, ...]]] = {
    "reference_fp32": ("reference", "fp32", False, False, "a", ("cpu", "cuda")),
    "fused_eager_fp32": ("fused_eager", "fp32", False, True, "b", ("cpu", "cuda")),
    "fused_eager_fp32_nograph": ("fused_eager", "fp32", False, False, "b", ("cuda",)),
    "fused_eager_int8": ("fused_eager", "int8", True, True, "b", ("cpu",)),
    "native_fp32": ("fused_eager", "fp32", False, False, "c", ("cpu",)),
    "native_int8": ("fused_eager", "int8", True, False, "c", ("cpu",)),
    "fused_eager_int8_nograph": ("fused_eager", "int8", True, False, "b", ("cuda",)),
    "fused_fp32": ("fused_triton", "fp32", False, True, "c", ("cuda",)),
    "fused_fp32_nograph": ("fused_triton", "fp32", False, False, "c", ("cuda",)),
    "fused_int8": ("fused_triton", "int8", True, True, "c", ("cuda",)),
    "fused_int8_nograph": ("fused_triton", "int8", True, False, "c", ("cuda",)),
    "fused_fp16": ("fused_triton", "fp16", False, True, "c", ("cuda",)),
    "fused_fp16_nograph": ("fused_triton", "fp16", False, False, "c", ("cuda",)),
    "fused_bf16": ("fused_triton", "bf16", False, True, "c", ("cuda",)),
    "fused_bf16_nograph": ("fused_triton", "bf16", False, False, "c", ("cuda",)),
    **{f"compile_{m}_fp32": ("fused_eager", "fp32", False, False, "d", ("cpu", "cuda")) for m in COMPILE_MODES},
}


def _case() -> str:
    """notebook, or the first of ``TK_BENCH_CASES`` when that is set (the tooling's tests use tiny)."""
    return bench_cases()[0] if os.environ.get("TK_BENCH_CASES", "").strip() else "notebook"


def _lengths(case: str) -> tuple[int, int]:
    """(prompt, new tokens): 32 + 32 at the notebook's size, a quarter of seq_len each below it."""
    s = MODEL_CASES[case]["seq_len"]
    return min(32, max(1, s // 4)), min(32, max(2, s // 4))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_engine(benchmark, device: torch.device, variant: str) -> None:  # noqa: ANN001
    impl, precision, int8, graph, letter, devices = VARIANTS[variant]
    if device.type not in devices:
        pytest.skip(f"{variant} is a {'/'.join(devices)} variant (no CUDA graphs or compiled Triton kernels on CPU)")
    case = _case()
    prompt_len, new = _lengths(case)
    model = build_model(case, impl, device).eval()
    if precision == "fp16":
        model = model.half()
    elif precision == "bf16":
        model = model.bfloat16()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, MODEL_CASES[case]["vocab_size"], (1, prompt_len), generator=g).to(device)
    stats: dict = {}
    per_token: list[float] = []  # each call's ms/token; the row reports their median
    mode = None
    if letter == "a":
        from tapetransformer.sampling import sample_reference

        def once() -> None:
            _, ms = sample_reference(model, prompt, new, greedy=True)
            stats["ms_per_token"] = ms
    elif letter == "d":
        mode = variant[len("compile_"): -len("_fp32")]
        loop = compiled_greedy_decode(model, mode)

        def once() -> None:
            loop(prompt, new, stats)
    else:
        from tapetransformer.generate import generate

        def once() -> None:
            generate(model, prompt, new, greedy=True, int8=int8, cuda_graph=None if graph else False,
                     native=variant.startswith("native") if device.type == "cpu" else None, stats=stats)

    def run() -> None:
        once()
        per_token.append(stats["ms_per_token"])

    if mode is not None:
        reset_graph_breaks()
    run()  # warm-up: Triton compiles, int8 packing, the CUDA-graph capture later calls replay, torch.compile
    breaks = graph_breaks() if mode is not None else None
    first_capture_ms = stats.get("capture_ms")
    per_token.clear()
    record(benchmark, group=GROUP, case=f"{case}-generate-engine", impl=variant, peak_mem_mb=None,
           role={"a": "eager", "d": "compile"}.get(letter, "fused"), attribution=letter, precision=precision,
           cuda_graph=bool(graph and is_cuda(device)), batch=1, prompt_len=prompt_len, new_tokens=new,
           **({"compile_backend": compile_backend(), "graph_breaks": breaks} if mode is not None else {}))  # fmt: skip
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_token"] = round(statistics.median(per_token), 4)
    if "prefill_ms" in stats:
        benchmark.extra_info["prefill_ms"] = round(stats["prefill_ms"], 3)
    if first_capture_ms is not None:  # the timed calls replay the warm-up's graph (capture_ms 0 there)
        benchmark.extra_info["capture_ms"] = round(first_capture_ms, 3)
    if "cuda_graph" in stats:
        assert stats["cuda_graph"] == (graph and is_cuda(device)), f"{variant}: generate() graph use differs"


# name -> (model impl, precision, int8, sampled, threads (None: the session's), attribution letter)
SEED_VARIANTS: dict[str, tuple[str, str, bool, bool, int | None, str]] = {
    "seed_fused_eager_fp32": ("fused_eager", "fp32", False, False, None, "b"),
    "seed_fused_eager_int8": ("fused_eager", "int8", True, False, None, "b"),
    **{f"seed_native_{p}_{m}_t{t}": ("fused_eager", p, p == "int8", m == "sampled", t, "c")
       for p in ("fp32", "int8") for m in ("greedy", "sampled") for t in (1, 2)},
}


@pytest.mark.parametrize("variant", list(SEED_VARIANTS))
def test_seed_design_generate(benchmark, device: torch.device, variant: str) -> None:  # noqa: ANN001
    from tapetransformer.generate import generate

    impl, precision, int8, sampled, threads, letter = SEED_VARIANTS[variant]
    if device.type != "cpu":
        pytest.skip("the seed design's native decode is a CPU path")
    case = _case()
    prompt_len, new = _lengths(case)
    model = build_model(case, impl, device, design="seed").eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, MODEL_CASES[case]["vocab_size"], (1, prompt_len), generator=g)
    kw = {"temperature": 0.8, "top_k": 20, "seed": 0} if sampled else {"greedy": True}
    stats: dict = {}
    per_token: list[float] = []

    def run() -> None:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads or prev)
        try:
            generate(model, prompt, new, int8=int8, native=letter == "c", stats=stats, **kw)
        finally:
            torch.set_num_threads(prev)
        per_token.append(stats["ms_per_token"])

    run()  # warm-up: int8 packing
    per_token.clear()
    record(benchmark, group=GROUP, case=f"{case}-seed-generate-engine", impl=variant, peak_mem_mb=None, role="fused",
           attribution=letter, precision=precision, cuda_graph=False, batch=1, prompt_len=prompt_len, new_tokens=new,
           design="seed", sampled=sampled, threads=threads or torch.get_num_threads())  # fmt: skip
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_token"] = round(statistics.median(per_token), 4)
    benchmark.extra_info["prefill_ms"] = round(stats["prefill_ms"], 3)
