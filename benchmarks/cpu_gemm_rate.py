"""The fp32 matrix products of one notebook-size training step, each timed alone on the CPU (MKL through
``torch.matmul``), against a large square product: how close the step's GEMMs already run to what
this machine's BLAS can do.

    python benchmarks/cpu_gemm_rate.py --out benchmarks/results [--threads 2] [--dtype bfloat16]

Per TapeHead block of the notebook's size (B·S = 2048 tokens, D 256, MLP 8·D, fp32), the forward
product ``x·Wᵀ``, the weight gradient ``dYᵀ·X`` and the input gradient ``dY·W`` of the in-projection
(768 outputs), the out-projection, the MLP expand and down projection; plus 2048³. Median ms of
``--reps`` calls after three warm-up calls, GFLOP/s = 2·M·N·K / time. ``per_block_ms`` sums the
twelve; the live part of a training step runs 12 blocks. Writes ``<date>-cpu-gemm-rate.json``
(``<date>-cpu-gemm-rate-bf16.json`` for ``--dtype bfloat16``: the rate CPU bf16 autocast could reach,
AVX-512 BF16 or AMX where the CPU has them; group ``gemm``, one row per product: ``fused_ms`` = its
time, ``extra.gflops``). The CPU's bf16 flags (from /proc/cpuinfo) are recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TOKENS, D, HIDDEN = 2048, 256, 2048
# name -> (M, N, K, form): "nt" x·Wᵀ (forward), "tn" dYᵀ·X (weight gradient), "nn" dY·W (input gradient)
LAYERS = {"in_proj": 3 * D, "out_proj": D, "expand": HIDDEN}


def _cases() -> dict[str, tuple[int, int, int, str]]:
    cases: dict[str, tuple[int, int, int, str]] = {}
    for name, n_out in LAYERS.items():
        cases[f"{name}-fwd"] = (TOKENS, n_out, D, "nt")
        cases[f"{name}-dW"] = (n_out, D, TOKENS, "tn")
        cases[f"{name}-dX"] = (TOKENS, D, n_out, "nn")
    cases["down-fwd"] = (TOKENS, D, HIDDEN, "nt")
    cases["down-dW"] = (D, HIDDEN, TOKENS, "tn")
    cases["down-dX"] = (TOKENS, HIDDEN, D, "nn")
    cases["square-2048"] = (2048, 2048, 2048, "nn")
    return cases


def _product(m: int, n: int, k: int, form: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    if form == "nt":  # x (M, K) · W (N, K)ᵀ
        a, b = rnd(m, k), rnd(n, k)
        return lambda: a @ b.t()
    if form == "tn":  # dY (K, M)ᵀ · X (K, N)
        a, b = rnd(k, m), rnd(k, n)
        return lambda: a.t() @ b
    a, b = rnd(m, k), rnd(k, n)
    return lambda: a @ b


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets this CPU reports (AVX-512 BF16, AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(a.threads)
    from common import env_info, median_ms, write_results

    rows, block_ms = [], 0.0
    for name, (m, n, k, form) in _cases().items():
        ms = median_ms(_product(m, n, k, form, dtype), a.reps, "cpu", warmup=3)
        gflops = 2 * m * n * k / ms / 1e6
        if name != "square-2048":
            block_ms += ms
        extra = {"m": m, "n": n, "k": k, "form": form, "gflops": gflops}
        rows.append({"group": "gemm", "name": name, "eager_ms": None, "compile_ms": None, "fused_ms": ms,
                     "peak_mem_mb": None, "extra": extra})  # fmt: skip
        print(f"{name:14s} M {m:5d} N {n:5d} K {k:5d} {form}: {ms:7.2f} ms {gflops:6.1f} GFLOP/s", flush=True)
    print(f"one block's twelve products: {block_ms:.1f} ms; x12 blocks: {12 * block_ms:.0f} ms")
    date = _dt.date.today().isoformat()
    suffix = "-bf16" if dtype == torch.bfloat16 else ""
    write_results(os.path.join(a.out, f"{date}-cpu-gemm-rate{suffix}.json"),
                  {**env_info("cpu"), "date": date, "threads": a.threads, "reps": a.reps, "dtype": a.dtype,
                   "cpu_bf16_flags": cpu_bf16_flags(), "per_block_ms": block_ms, "twelve_blocks_ms": 12 * block_ms,
                   "results": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
