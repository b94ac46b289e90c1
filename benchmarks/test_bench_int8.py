"""int8 linear layers (group ``int8``): per-layer latency at decode size and cached generation.

Layers (M rows of x against an N×K weight), cases ``M1-K256-N768`` (in_proj at D=256),
``M1-K256-N2048`` (mlp.expand), ``M1-K2048-N256`` (mlp.linear), ``M1-K2048-N2048``; on CUDA also
``*-K8192-N8192`` (a 64 MiB weight: the bandwidth case; the small ones sit in L2 and are
launch-latency bound) and ``M64-*`` prefill cases. impls:

* CPU: ``fp32`` = ``F.linear``; ``quantize_dynamic`` = ``torch.ao.quantization.quantize_dynamic``'s
  int8 Linear (fbgemm, dynamic activation quantization); ``int8_wo`` = ``int8_linear`` weight-only;
  ``int8_w8a8`` = ``int8_linear(act_quant=True)``.
* CUDA: ``fp16`` = cuBLAS ``F.linear`` in fp16; ``int_mm`` = ``torch._int_mm`` on pre-quantized int8
  activations (only where it applies: M > 16, K and N multiples of 8); ``int8_wo`` (W8A16 GEMV for
  M ≤ 16) and ``int8_w8a8`` (dp4a GEMM) in fp16.

Every layer case records ``weight_bytes``, the achieved ``gbps`` (weight + activation bytes per
call over the median time) and on CUDA ``peak_gbps`` / ``bw_frac`` against the card's memory
bandwidth (from its memory clock and bus width): decode is a weight stream, so that fraction is
the figure of merit.

Generation (case ``gen-notebook``: the reference model at the notebook size, vocab 65, dim 256,
4 critics; batch 1, a 16-token prompt then 16 cached one-token calls) records ``ms_per_token``
for the fp32 reference, ``quantize_dynamic`` of its Linears (CPU only) and
``tapetransformer.quantize.quantize_int8`` in both modes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from common import MODEL_CASES, is_cuda, pick_device, record, synced, warm
from torch import nn

from tape_kernels import int8 as i8

GROUP = "int8"
LAYER_SHAPES = {
    "K256-N768": (256, 768),
    "K256-N2048": (256, 2048),
    "K2048-N256": (2048, 256),
    "K2048-N2048": (2048, 2048),
}
CPU_IMPLS = ["fp32", "quantize_dynamic", "int8_wo", "int8_w8a8"]
CUDA_IMPLS = ["fp16", "int_mm", "int8_wo", "int8_w8a8"]
GEN_PROMPT, GEN_NEW = 16, 16
GEN_IMPLS = ["fp32", "quantize_dynamic", "int8_wo", "int8_w8a8"]


def _quantize_dynamic(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def _peak_gbps(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth: 2 transfers per memory clock × bus width."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * (bus_bits / 8) / 1e9


# CUDA only: a weight big enough (64 MiB) to stream from DRAM rather than L2 and to dwarf the
# launch latency, so that gbps / bw_frac measure the decode GEMV's bandwidth.
CUDA_BW_SHAPES = {"K8192-N8192": (8192, 8192)}


def _layer_cases(device: torch.device) -> list[tuple[str, int, int, int]]:
    shapes = dict(LAYER_SHAPES)
    ms = [1]
    if is_cuda(device):
        shapes.update(CUDA_BW_SHAPES)
        ms = [1, 64]
    return [(f"M{m}-{name}", m, k, n) for m in ms for name, (k, n) in shapes.items()]


def _layer_fn(impl: str, m: int, k: int, n: int, device: torch.device):
    """(callable, weight bytes) for one impl, or None where the impl does not apply."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(m, k, generator=g)
    if not is_cuda(device):
        if impl not in CPU_IMPLS:
            return None
        if impl == "fp32":
            w, b = lin.weight.detach(), lin.bias.detach()
            return (lambda: F.linear(x, w, b)), 4 * n * k
        if impl == "quantize_dynamic":
            qlin = _quantize_dynamic(nn.Sequential(lin))
            return (lambda: qlin(x)), n * k
        q, s = i8.quantize_weight(lin.weight)
        b = lin.bias.detach()
        act = impl == "int8_w8a8"
        return (lambda: i8.int8_linear(x, q, s, b, act)), n * k
    if impl not in CUDA_IMPLS:
        return None
    xh = x.to(device, torch.float16)
    if impl == "fp16":
        w, b = lin.weight.detach().to(device, torch.float16), lin.bias.detach().to(device, torch.float16)
        return (lambda: F.linear(xh, w, b)), 2 * n * k
    q, s = i8.quantize_weight(lin.weight)
    q, s = q.to(device), s.to(device)
    if impl == "int_mm":
        if m <= 16 or k % 8 or n % 8:
            return None
        xq, _ = i8.quantize_rows_ref(x)
        xq, qt = xq.to(device), q.t()  # _int_mm wants (M, K) · (K, N); q.t() is column-major, as cuBLASLt likes
        try:
            torch._int_mm(xq, qt)
        except RuntimeError:  # a build that wants row-major mat2
            qt = qt.contiguous()
        return (lambda: torch._int_mm(xq, qt)), n * k
    b = lin.bias.detach().to(device, torch.float16)
    act = impl == "int8_w8a8"
    return (lambda: i8.int8_linear(xh, q, s, b, act)), n * k


def _layer_params(device_type: str) -> list:
    impls = CUDA_IMPLS if device_type == "cuda" else CPU_IMPLS
    dev = torch.device(device_type)
    return [pytest.param(impl, case, id=f"{impl}-{case[0]}") for case in _layer_cases(dev) for impl in impls]


@pytest.mark.parametrize("impl,case", _layer_params(pick_device().type))
def test_int8_layer(benchmark, device: torch.device, impl: str, case: tuple[str, int, int, int]) -> None:
    name, m, k, n = case
    if impl.startswith("int8") and not i8.extension_available():
        pytest.skip("tape_kernels._C is not built (the fallback is not a speed)")
    made = _layer_fn(impl, m, k, n, device)
    if made is None:
        pytest.skip(f"{impl} does not apply to {name}")
    fn, wbytes = made
    fn = synced(fn, device)
    with torch.inference_mode():
        warm(fn, 5)
        benchmark(fn)
    elt = 2 if is_cuda(device) else 4
    moved = wbytes + elt * m * (k + n)
    gbps = moved / benchmark.stats.stats.median / 1e9 if benchmark.stats else None
    extra = {"weight_bytes": wbytes, "gbps": gbps}
    if is_cuda(device):
        peak = _peak_gbps(device)
        extra.update(peak_gbps=peak, bw_frac=(gbps / peak) if (gbps and peak) else None)
    record(benchmark, group=GROUP, case=name, impl=impl, peak_mem_mb=None, **extra)


# ------------------------------------------------------------------------------------ generation


def _gen_model(impl: str, device: torch.device) -> nn.Module:
    from tapetransformer.quantize import quantize_int8
    from tapetransformer.reference import ReferenceTapeTransformer

    cfg = {k: v for k, v in MODEL_CASES["notebook"].items() if k != "batch"}
    torch.manual_seed(0)
    model = ReferenceTapeTransformer(**cfg, dropout=0.0).eval()
    if impl == "quantize_dynamic":
        return _quantize_dynamic(copy.deepcopy(model))
    if impl in ("int8_wo", "int8_w8a8"):
        model = quantize_int8(model, act_quant=impl == "int8_w8a8", inplace=True)
    return model.to(device)


@pytest.mark.parametrize("impl", GEN_IMPLS)
def test_int8_generation(benchmark, device: torch.device, impl: str) -> None:
    if impl == "quantize_dynamic" and is_cuda(device):
        pytest.skip("torch.ao quantize_dynamic runs on the CPU only")
    if impl.startswith("int8") and not i8.extension_available():
        pytest.skip("tape_kernels._C is not built (the fallback is not a speed)")
    model = _gen_model(impl, device)
    vocab = MODEL_CASES["notebook"]["vocab_size"]
    prompt = torch.randint(0, vocab, (1, GEN_PROMPT), generator=torch.Generator().manual_seed(1)).to(device)

    @torch.inference_mode()
    def generate() -> torch.Tensor:
        logp, cache = model(prompt)
        for _ in range(GEN_NEW):
            logp, cache = model(logp[:, -1].argmax(-1, keepdim=True), cache)
        return logp

    run = synced(generate, device)
    warm(run, 1)
    benchmark.pedantic(run, rounds=3 if not is_cuda(device) else 10, iterations=1)
    ms_tok = benchmark.stats.stats.median / (GEN_NEW + 1) * 1e3 if benchmark.stats else None
    record(benchmark, group=GROUP, case="gen-notebook", impl=impl, peak_mem_mb=None, ms_per_token=ms_tok,
           new_tokens=GEN_NEW, prompt=GEN_PROMPT)
