"""Issue 16's GPU measurement in one command (≤ 3 minutes on an H100/H200): decode latency, launches
per token, int8 GEMV bandwidth.

    python benchmarks/gpu_decode_bench.py --out results.json          # on the CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_decode_bench.py --tiny   # CPU smoke run of the script (no figures)

What it measures, most important first (a time budget, ``--budget-s``, skips what does not fit and
lists it under ``extra.skipped``):

1. ``int8 / M1-K8192-N8192``: the W8A16 GEMV ``int8_linear(x fp16 (1, 8192), q (8192, 8192))`` with
   the weights rotated over four copies (256 MiB, so every call streams cold weights from DRAM, not
   L2): µs per call and ``int8_wo_bw_frac`` = bytes moved / time / the device's nominal DRAM
   bandwidth (table below; ``int8_wo_bw_frac_of_copy``: relative to a measured device-to-device
   copy). Goal: ≥ 0.70. fp16 ``F.linear`` of the same shape beside it.
2. ``model / notebook-generate-engine`` (vocab 65, seq_len 128, dim 256, 4 critics; reference
   semantics; a 32-token prompt, then ``--new`` tokens, greedy unless noted): ``extra`` keys
   ``<variant>_ms_per_token``, decode steps only (``generate``'s ``stats``):

   * ``fused[_bf16|_int8][_nograph][_b4|_b16]``: the fused per-block decode kernels (the default,
     ``opts.decode = "block"``), fp32 / bf16 / int8 weights (weight-only), CUDA graph or eager,
     batch 1 (no suffix), 4, 16;
   * ``fused_ops...``: the same with the per-op path (``opts.decode = "ops"``, the old path);
   * ``fused_int8_sampled``: int8, graph, B = 1, temperature 0.8, top-k 10 (the draw runs inside
     the graph). Goal: as fast as ``fused_int8``;
   * ``eager``: the reference model's own cached loop (B = 1);
   * ``persistent``: not implemented (issue 16 item 2 was not done), so not measured.

   Goals: ``fused_int8_ms_per_token`` ≤ 0.10 on an H100/H200; launches: ``fused_launches_per_token``
   (counted on this device: Triton launches through Triton's launch hook, ATen ops that launch a
   kernel through a TorchDispatchMode) ≤ 40.
3. GEMVs at the model's shapes (int8 weight-only and fp16, µs and GB/s; L2-resident, so above DRAM
   bandwidth is possible) and one fused decode layer pair (three launches, int8, B = 1, replayed
   in a CUDA graph): µs and the int8 weight bytes it reads per µs.

Writes one JSON file in ``benchmarks/collect_results.py``'s schema: ``device``, ``torch``, ...,
``results``: rows ``{group, name, eager_ms, compile_ms, fused_ms, peak_mem_mb, extra}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, write_results  # noqa: E402

# Nominal DRAM bandwidth, GB/s, by a substring of the device name (first match wins).
NOMINAL_BW = (
    ("H200", 4800.0), ("H100 SXM", 3350.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0),
    ("A10G", 600.0), ("A10", 600.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0), ("RTX 3060", 360.0),
    ("RTX 3050", 224.0),
)  # fmt: skip

NOTEBOOK = {"vocab_size": 65, "seq_len": 128, "embed_dim": 256, "num_heads": 4}
TINY = {"vocab_size": 13, "seq_len": 16, "embed_dim": 32, "num_heads": 2}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any], need_s: float = 5.0) -> Any:
        if self.left() < need_s:
            self.skipped.append(name)
            print(f"  skip {name}: {self.left():.0f} s left", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # one failed case must not lose the others' figures
            print(f"  FAILED {name}: {type(e).__name__}: {e}", flush=True)
            self.skipped.append(f"{name} (failed: {type(e).__name__})")
            return None
        print(f"  {name}: {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return out


def nominal_bw(name: str) -> float | None:
    for key, bw in NOMINAL_BW:
        if key.lower() in name.lower():
            return bw
    return None


def time_us(fn: Callable[[], Any], iters: int, cuda: bool) -> float:
    """Median-free mean µs per call over ``iters`` calls after two warm-up calls (CUDA events)."""
    for _ in range(2):
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / iters


# ------------------------------------------------------------------------------------------ GEMV


def gemv_8192(dev: torch.device, n: int, k: int, iters: int, bw_gbs: float | None) -> dict[str, Any]:
    from tape_kernels.int8 import int8_linear, quantize_weight

    cuda = dev.type == "cuda"
    copies = 4 if cuda else 1
    gen = torch.Generator().manual_seed(0)
    q, s = quantize_weight(torch.randn(n, k, generator=gen))
    qs = [q.to(dev)] + [q.to(dev).clone() for _ in range(copies - 1)]  # > L2: every call reads DRAM
    s = s.to(dev)
    dt = torch.float16 if cuda else torch.float32
    x = torch.randn(1, k, generator=gen).to(dev, dt)
    i = [0]

    def int8_call() -> None:
        i[0] = (i[0] + 1) % copies
        int8_linear(x, qs[i[0]], s, None, act_quant=False)

    us = time_us(int8_call, iters, cuda)
    nbytes = n * k + 4 * n + x.element_size() * (k + n)
    out: dict[str, Any] = {"int8_wo_us": round(us, 3), "int8_wo_gbs": round(nbytes / us / 1e3, 1)}
    if bw_gbs:
        out["int8_wo_bw_frac"] = round(nbytes / us / 1e3 / bw_gbs, 3)
        out["nominal_bw_gbs"] = bw_gbs
    ws = [torch.randn(n, k, generator=gen).to(dev, dt) for _ in range(2 if cuda else 1)]
    j = [0]

    def fp_call() -> None:
        j[0] = (j[0] + 1) % len(ws)
        torch.nn.functional.linear(x, ws[j[0]])

    out["fp16_us" if cuda else "fp32_us"] = round(time_us(fp_call, max(iters // 4, 2), cuda), 3)
    if cuda:
        src = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        cus = time_us(lambda: dst.copy_(src), 10, cuda)
        copy_gbs = 2 * src.numel() / cus / 1e3
        out["copy_gbs"] = round(copy_gbs, 1)
        out["int8_wo_bw_frac_of_copy"] = round(nbytes / us / 1e3 / copy_gbs, 3)
    return out


def gemv_model_shapes(dev: torch.device, d: int, iters: int) -> dict[str, Any]:
    from tape_kernels.int8 import int8_linear, quantize_weight

    cuda = dev.type == "cuda"
    dt = torch.float16 if cuda else torch.float32
    out: dict[str, Any] = {}
    for name, (n, k) in {"in": (3 * d, d), "out": (d, d), "expand": (8 * d, d), "down": (d, 8 * d)}.items():
        w = torch.randn(n, k)
        q, s = (t.to(dev) for t in quantize_weight(w))
        x = torch.randn(1, k).to(dev, dt)
        wf = w.to(dev, dt)
        us = time_us(lambda x=x, q=q, s=s: int8_linear(x, q, s, None, act_quant=False), iters, cuda)
        us16 = time_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf), iters, cuda)
        out[f"{name}_N{n}_K{k}_int8_us"] = round(us, 3)
        out[f"{name}_N{n}_K{k}_int8_gbs"] = round(n * k / us / 1e3, 1)
        out[f"{name}_N{n}_K{k}_{'fp16' if cuda else 'fp32'}_us"] = round(us16, 3)
    return out


def decode_layer_int8(dev: torch.device, d: int, iters: int) -> dict[str, Any]:
    """One fused layer pair (three launches), int8 weights, B = 1, position 64: µs per layer."""
    from tape_kernels import decode_block as db
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(0)
    m = TapeTransformer(65, seq_len=128, embed_dim=d, num_heads=1, dropout=0.0).to(dev).eval()
    m.quantize_int8_(act_quant=False)
    with torch.no_grad():
        head = m.residualheads[-1]
        sides = [head.blocks_left[1].decode_weights(), head.blocks_right[1].decode_weights()]
        prev = (head.blocks_left[0].decode_weights(), head.blocks_right[0].decode_weights())
        kv = torch.randn(2, 2, 1, 4, 128, d // 4, device=dev)
        ws = db.Workspace(2, 1, d, 8 * d, dev)
        ws.r.normal_()
        pos = torch.tensor([64], device=dev)
        inp = db.DecodeInput(db.PAIR, prev=prev, combine=1)

        def layer() -> None:
            db.decode_layer(inp, sides, kv, 0, pos, ws, False, 4)

        if dev.type == "cuda":
            layer()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(20):
                    layer()
            us = time_us(g.replay, max(iters // 20, 2), True) / 20
        else:
            us = time_us(layer, 2, False)
    wbytes = sum(t.numel() for w in sides for t in (w.w_in, w.w_out, w.w_exp, w.w_down))
    return {"decode_layer_int8_us": round(us, 3), "decode_layer_int8_weight_gbs": round(wbytes / us / 1e3, 1)}


# ----------------------------------------------------------------------------------- the model


@contextlib.contextmanager
def count_launches(dev: torch.device) -> Iterator[dict[str, int]]:
    """Triton launches (launch hook; the interpreter's ``run`` on CPU) and ATen ops that launch a
    kernel (not views, allocations, or ops on host tensors only)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    counts = {"triton": 0, "aten": 0}
    free = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
            "alias", "_unsafe_view", "_reshape_alias", "set_", "resize_"}  # fmt: skip
    inside = [0]

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = func.__name__.split(".")[0]
            if not inside[0] and not func.is_view and name not in free:
                ts = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
                if not ts or any(t.device.type != "cpu" for t in ts) or dev.type == "cpu":
                    counts["aten"] += 1
            return func(*args, **(kwargs or {}))

    restore: Callable[[], None]
    if dev.type == "cuda":
        import triton

        def hook(*_a: Any, **_k: Any) -> None:
            counts["triton"] += 1

        triton.knobs.runtime.launch_enter_hook.add(hook)

        def restore() -> None:
            triton.knobs.runtime.launch_enter_hook.remove(hook)
    else:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts["triton"] += 1
            inside[0] += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                inside[0] -= 1

        InterpretedFunction.run = counted

        def restore() -> None:
            InterpretedFunction.run = run

    try:
        with Mode():
            yield counts
    finally:
        restore()


def make_model(cfg: dict[str, int], dev: torch.device, dtype: torch.dtype, decode: str) -> Any:
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(0)
    m = TapeTransformer(**cfg, dropout=0.0).to(dev, dtype).eval()
    m.opts.decode = decode
    return m


def launches_per_token(m: Any, int8: bool, dev: torch.device) -> int:
    x = torch.randint(0, m.vocab_size, (1, 9), device=dev)
    with torch.no_grad(), m.int8_weights(enabled=int8, act_quant=False if int8 else None):
        _, cache = m.prefill(x[:, :8], m.new_cache(1, 16))
        pos = torch.tensor([8], device=dev)
        m.decode_step(x[:, 8:], pos, cache)  # compile first
        with count_launches(dev) as c:
            m.decode_step(x[:, 8:], pos, cache)
    return c["triton"] + c["aten"]


def ms_per_token(m: Any, b: int, new: int, int8: bool, graph: bool, dev: torch.device, **sample: Any) -> float:
    from tapetransformer.generate import generate

    prompt = torch.randint(0, m.vocab_size, (b, 32), generator=torch.Generator().manual_seed(1)).to(dev)
    kw = dict(int8=int8, act_quant=False if int8 else None, cuda_graph=graph if dev.type == "cuda" else False)
    kw.update(sample or {"greedy": True})
    stats: dict[str, Any] = {}
    generate(m, prompt, new, stats=stats, **kw)  # compile, quantize, capture
    best = float("inf")
    for _ in range(2 if dev.type == "cuda" else 1):
        generate(m, prompt, new, stats=stats, **kw)
        best = min(best, stats["ms_per_token"])
    return round(best, 4)


def model_row(args: argparse.Namespace, dev: torch.device, budget: Budget) -> dict[str, Any]:
    cfg = TINY if args.tiny else NOTEBOOK
    cuda = dev.type == "cuda"
    extra: dict[str, Any] = {"config": cfg, "new_tokens": args.new, "prompt": 32}
    dtypes = {"": torch.float32, "_bf16": torch.bfloat16, "_int8": torch.float32}
    if not cuda:
        dtypes = {"": torch.float32, "_int8": torch.float32}
    models: dict[tuple, Any] = {}

    def model(dt: torch.dtype, decode: str) -> Any:
        key = (dt, decode)
        if key not in models:
            models[key] = make_model(cfg, dev, dt, decode)
        return models[key]

    def case(decode: str, tag: str, b: int, graph: bool, **sample: Any) -> Callable[[], float]:
        return lambda: ms_per_token(model(dtypes[tag], decode), b, args.new, tag == "_int8", graph, dev, **sample)

    def put(key: str, value: Any) -> None:
        if value is not None:
            extra[key] = value

    # Launches per token (a handful of seconds) and the headline latencies first.
    for decode, name in (("block", "fused"), ("ops", "fused_ops")):
        for tag in ("", "_int8"):
            put(f"{name}{tag}_launches_per_token",
                budget.run(f"{name}{tag} launches", lambda d=decode, t=tag: launches_per_token(
                    model(dtypes[t], d), t == "_int8", dev)))  # fmt: skip
    order: list[tuple[str, str, str, int, bool, dict]] = []
    graphs = (True, False) if cuda else (False,)
    for b in args.batches:
        suffix = "" if b == 1 else f"_b{b}"
        for graph in graphs:
            for decode, name in (("block", "fused"), ("ops", "fused_ops")):
                for tag in dtypes:
                    key = f"{name}{tag}{'' if graph else '_nograph'}{suffix}"
                    order.append((key, decode, tag, b, graph, {}))
        if b == 1:
            order.append(("fused_int8_sampled", "block", "_int8", 1, cuda, {"temperature": 0.8, "top_k": 10}))
    # Priority: B = 1 with a graph, the sampled case, then the rest in order.
    order.sort(key=lambda o: (o[3] != 1, not o[4], o[1] != "block"))
    for key, decode, tag, b, graph, sample in order:
        put(f"{key}_ms_per_token", budget.run(key, case(decode, tag, b, graph, **sample), need_s=8.0))
    if not args.tiny or not cuda:
        put("eager_ms_per_token", budget.run("eager", lambda: eager_ms(cfg, dev, min(args.new, 16)), need_s=15.0))
    return {"group": "model", "name": "notebook-generate-engine", "eager_ms": None, "compile_ms": None,
            "fused_ms": None, "peak_mem_mb": None, "extra": extra}  # fmt: skip


def eager_ms(cfg: dict[str, int], dev: torch.device, new: int) -> float:
    from tapetransformer import reference as ref
    from tapetransformer.sampling import sample_reference

    torch.manual_seed(0)
    m = ref.ReferenceTapeTransformer(**cfg, dropout=0.0).to(dev).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1)).to(dev)
    sample_reference(m, prompt, 2, greedy=True)
    _, ms = sample_reference(m, prompt, new, greedy=True)
    return round(ms, 4)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new cases after this long")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per timed call")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and GEMV: a smoke run of the script")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("no CUDA device: run with TRITON_INTERPRET=1 --tiny for a smoke run (no figures)", file=sys.stderr)
        return 2
    if args.tiny:
        args.new, args.batches = min(args.new, 4), [1, 2]
    budget = Budget(args.budget_s)
    env = env_info(dev)
    print(f"gpu_decode_bench on {env['device']} (budget {args.budget_s:.0f} s)", flush=True)
    bw = nominal_bw(env["device"]) if cuda else None
    n = 256 if args.tiny else 8192
    int8_extra = budget.run(f"GEMV M1-K{n}-N{n}", lambda: gemv_8192(dev, n, n, 5 if args.tiny else 200, bw)) or {}
    rows = [{"group": "int8", "name": f"M1-K{n}-N{n}", "eager_ms": None, "compile_ms": None, "fused_ms": None,
             "peak_mem_mb": None, "extra": int8_extra}]  # fmt: skip
    model = model_row(args, dev, budget)
    d = (TINY if args.tiny else NOTEBOOK)["embed_dim"]
    shapes = budget.run("GEMV model shapes", lambda: gemv_model_shapes(dev, d, 3 if args.tiny else 200))
    layer = budget.run("decode layer int8", lambda: decode_layer_int8(dev, d, 4 if args.tiny else 400))
    model["extra"].update(shapes or {})
    model["extra"].update(layer or {})
    model["extra"]["persistent"] = "not implemented"
    model["extra"]["skipped"] = budget.skipped
    rows.append(model)
    out = {**env, "results": rows}
    if not cuda:
        out["note"] = "CPU smoke run under the Triton interpreter: not a measurement"
    if args.out:
        write_results(args.out, out)
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
