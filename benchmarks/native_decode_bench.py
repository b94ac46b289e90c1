"""CPU decode speed: the reference's cached loop vs the model's own decode vs the native step, plus prefill.

    python benchmarks/native_decode_bench.py [--out FILE] [--threads 1 2] [--tiny]

Notebook size by default (vocab 65, seq_len 128, embed_dim 256, num_heads 4), batch 1: a random
prompt of ``--prompt`` tokens is prefilled, then ``--new`` tokens are fed one by one (the same
tokens to every implementation, so each step sees the same context length) and the mean ms per
decode step is reported: the median of ``--reps`` repetitions (``ms_per_token``; the best is kept as
``ms_per_token_best``), and the speed-ups are ratios of medians from the same run:

* ``reference``: ``tapetransformer.reference.ReferenceTapeTransformer``'s cached loop (fp32; it re-projects
  the whole history on every call);
* ``model``: the fused model's own decode, op by op (``model.prefill`` of one token; fp32, W8A8,
  weight-only int8): what ``generate`` runs where the native step does not apply;
* ``native``: ``tapetransformer.native_decode.NativeDecoder`` (fp32, W8A8, weight-only int8).

Designs (``--designs``, both by default): ``reference`` (the coda and the last critic) and ``seed`` (the
seed README's design: the coda, every critic, the prophet's Char-RNN, the merges; the plain reference
model has no seed-design loop, so its rows are ``model`` and ``native`` only). Every row names its
design. ``generate`` rows: ``generate()`` itself at its CPU default (the native step and the native
draw), a 32-token prompt then ``--gen-new`` (64) new tokens, greedy and sampled (temperature 0.8,
top-k 20), fp32 and int8 (W8A8), ``stats["ms_per_token"]`` (median of ``--reps``); the ratios
``seed_over_reference`` (same precision, mode and thread count) and ``sampled_over_greedy`` (same design,
precision and thread count) are ratios of those medians.

Also: torch dispatches per decode step (TorchDispatchMode: every ATen / custom op call, the
benchmark's own ``x[:, t]`` slice included), the prefill of a ``seq_len``-token prompt by the fused
model (with the share of its op time spent in the linear layers, torch.profiler) and by the native
batched path (``NativeDecoder.extend``), and speed-ups over the reference. Writes JSON (``--out``). Timings need a quiet
machine; ``--tiny`` is a smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tapetransformer import native_decode as nd
from tapetransformer import reference as ref
from tapetransformer.model import TapeTransformer

NOTEBOOK = dict(vocab_size=65, seq_len=128, embed_dim=256, num_heads=4)
TINY = dict(vocab_size=13, seq_len=16, embed_dim=32, num_heads=1)
WEIGHTS = ("fp32", "w8a8", "w8")
LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "tape_kernels::w8a8_linear_packed", "tape_kernels::w8_linear")


class CountDispatches(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


def build(cfg: dict[str, int], seed: int = 0, design: str = "reference") -> tuple[TapeTransformer,
                                                                                   ref.ReferenceTapeTransformer]:
    torch.manual_seed(seed)
    fused = TapeTransformer(**cfg, dropout=0.0, backend="eager", design=design).eval()
    plain = ref.ReferenceTapeTransformer(**cfg, dropout=0.0).eval()
    plain.load_state_dict(fused.state_dict(), strict=True)
    return fused, plain


def set_weights(model: TapeTransformer, weights: str) -> None:
    model.dequantize_()
    if weights != "fp32":
        model.quantize_int8_(act_quant=weights == "w8a8")


# ------------------------------------------------------------------------------------------ decoders
# Each returns (step(t) -> None feeding token t of x, reset() restoring the prompt-only state).


def reference_runner(plain: ref.ReferenceTapeTransformer, x: torch.Tensor, p: int) -> tuple[Any, Any]:
    state: dict[str, Any] = {}

    def reset() -> None:
        _, state["cache"] = plain(x[:, :p])

    def step(t: int) -> None:
        _, state["cache"] = plain(x[:, t : t + 1], past_kv=state["cache"])

    return step, reset


def model_runner(model: TapeTransformer, x: torch.Tensor, p: int) -> tuple[Any, Any]:
    cache = model.new_cache(x.shape[0], x.shape[1])
    model.prefill(x[:, :p], cache)

    def reset() -> None:
        cache.length = p  # rows p.. are rewritten by the steps

    def step(t: int) -> None:
        model.prefill(x[:, t : t + 1], cache, check=False)

    return step, reset


def native_runner(model: TapeTransformer, x: torch.Tensor, p: int, weights: str) -> tuple[Any, Any]:
    _, dec = nd.prefill(model, x[:, :p], x.shape[1], weights=weights)

    def reset() -> None:
        dec.length = p

    def step(t: int) -> None:
        dec.step(x[:, t])

    return step, reset


def time_decode(step: Any, reset: Any, p: int, n: int, reps: int) -> dict[str, float]:
    """Median and best (over ``reps``) of the mean ms per step of steps p..p+n-1; one untimed warm-up pass."""
    runs = []
    for r in range(reps + 1):
        reset()
        t0 = time.perf_counter()
        for t in range(p, p + n):
            step(t)
        if r:
            runs.append((time.perf_counter() - t0) * 1e3 / n)
    return {"ms_per_token": statistics.median(runs), "ms_per_token_best": min(runs)}


def dispatches_per_step(step: Any, reset: Any, p: int) -> int:
    reset()
    step(p)  # warm (packing caches, lazy init)
    reset()
    with CountDispatches() as c:
        step(p)
    return c.n


# ------------------------------------------------------------------------------------------ prefill


def time_prefill(model: TapeTransformer, ctx: torch.Tensor, reps: int, weights: str,
                 native_only: bool = False) -> list[dict[str, Any]]:
    """ms for one prefill of ctx: the fused model (with the share of its op time spent in the linear
    layers, torch.profiler) and the native one (NativeDecoder.extend, one call)."""
    dec = nd.NativeDecoder(model, nd.new_kv(model, ctx.shape[0], ctx.shape[1]), weights=weights)

    def fused() -> None:
        model.prefill(ctx, model.new_cache(ctx.shape[0], ctx.shape[1]))

    def native() -> None:
        dec.length = 0
        dec.extend(ctx)

    rows = []
    for impl, fn in (("native", native),) if native_only else (("fused", fused), ("native", native)):
        fn()
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        row = {"impl": impl, "ms": statistics.median(runs), "ms_best": min(runs)}
        if impl == "fused":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            total = linear = 0.0
            for ev in prof.key_averages():
                total += ev.self_cpu_time_total
                if ev.key in LINEAR_OPS:
                    linear += ev.self_cpu_time_total
            row["linear_share"] = linear / total if total else None
        rows.append(row)
    return rows


def time_generate(model: TapeTransformer, prompt: torch.Tensor, new: int, reps: int) -> list[dict[str, Any]]:
    """generate() at its CPU default: ms per new token (median of reps, one untimed warm-up call), greedy
    and sampled (T 0.8, top-k 20), fp32 and int8 (W8A8)."""
    from tapetransformer.generate import generate

    rows = []
    for precision in ("fp32", "int8"):
        for mode in ("greedy", "sampled"):
            kw = {"greedy": True} if mode == "greedy" else {"temperature": 0.8, "top_k": 20, "seed": 0}
            runs = []
            for r in range(reps + 1):
                st: dict[str, Any] = {}
                generate(model, prompt, new, int8=precision == "int8", act_quant=True if precision == "int8" else None,
                         stats=st, **kw)  # fmt: skip
                if r:
                    runs.append(st["ms_per_token"])
            rows.append({"precision": precision, "mode": mode, "ms_per_token": statistics.median(runs),
                         "ms_per_token_best": min(runs)})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ main


def env() -> dict[str, Any]:
    from tape_kernels import _C

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": _C.cpu_isa(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/native-decode-cpu.json")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default seq_len // 2)")
    ap.add_argument("--new", type=int, default=None, help="decoded tokens (default seq_len // 2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="smoke-run on a tiny model")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--native-only", action="store_true",
                    help="only the native rows (no reference loop, no op-by-op decode, no fused prefill): on a busy "
                         "machine the op-by-op rows at 2 threads take minutes per row")
    ap.add_argument("--designs", nargs="+", default=["reference", "seed"], choices=["reference", "seed"])
    ap.add_argument("--gen-new", type=int, default=None, help="new tokens of the generate rows (default 64)")
    ap.add_argument("--note", default=None, help="a remark stored with the results (e.g. the machine was shared)")
    args = ap.parse_args(argv)
    if not nd.native_available():
        raise SystemExit("tape_kernels._C without decode_step: build it (python setup.py build_ext --inplace)")
    cfg = TINY if args.tiny else NOTEBOOK
    seq = cfg["seq_len"]
    p = args.prompt if args.prompt is not None else seq // 2
    n = args.new if args.new is not None else seq - p
    reps = 1 if args.tiny else args.reps
    gen_new = args.gen_new if args.gen_new is not None else (8 if args.tiny else 64)
    models = {design: build(cfg, design=design) for design in args.designs}
    x = torch.randint(0, cfg["vocab_size"], (1, p + n), generator=torch.Generator().manual_seed(1))
    ctx = torch.randint(0, cfg["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(2))
    gen_prompt = torch.randint(0, cfg["vocab_size"], (1, min(32, seq // 2)), generator=torch.Generator().manual_seed(3))
    result: dict[str, Any] = {"config": cfg, "batch": 1, "prompt": p, "new": n, "reps": reps, "env": env(),
                              "note": args.note, "native_only": args.native_only,
                              "generate_prompt": gen_prompt.shape[1], "generate_new": gen_new,
                              "decode": [], "prefill": [], "generate": []}  # fmt: skip
    prev = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads in args.threads:
                torch.set_num_threads(threads)
                for design, (fused, plain) in models.items():
                    rows = []
                    if not (args.skip_reference or args.native_only) and design == "reference":
                        step, reset = reference_runner(plain, x, p)
                        rows.append({"impl": "reference", "weights": "fp32", **time_decode(step, reset, p, n, reps),
                                     "dispatches": dispatches_per_step(step, reset, p)})  # fmt: skip
                    for weights in WEIGHTS:
                        set_weights(fused, weights)
                        for impl in ("native",) if args.native_only else ("model", "native"):
                            if impl == "model":
                                step, reset = model_runner(fused, x, p)
                            else:
                                step, reset = native_runner(fused, x, p, weights)
                            rows.append({"impl": impl, "weights": weights, **time_decode(step, reset, p, n, reps),
                                         "dispatches": dispatches_per_step(step, reset, p)})  # fmt: skip
                        for row in time_prefill(fused, ctx, reps, weights, native_only=args.native_only):
                            result["prefill"].append({"design": design, "threads": threads, "weights": weights,
                                                      "tokens": seq, **row})  # fmt: skip
                    set_weights(fused, "fp32")
                    base = next((r["ms_per_token"] for r in rows if r["impl"] == "reference"), None)
                    for r in rows:
                        r["design"], r["threads"] = design, threads
                        if base:
                            r["speedup_vs_reference"] = base / r["ms_per_token"]
                        print(f"threads={threads} {design:9s} {r['impl']:9s} {r['weights']:5s} "
                              f"{r['ms_per_token']:9.3f} ms/token dispatches={r['dispatches']}"
                              + (f" x{r['speedup_vs_reference']:.1f}" if base else ""), flush=True)  # fmt: skip
                    result["decode"] += rows
                    for r in time_generate(fused, gen_prompt, gen_new, reps):
                        r.update(design=design, threads=threads)
                        result["generate"].append(r)
                    set_weights(fused, "fp32")
    finally:
        torch.set_num_threads(prev)
    gen = {(r["design"], r["threads"], r["precision"], r["mode"]): r for r in result["generate"]}
    for (design, threads, precision, mode), r in gen.items():
        ref_row = gen.get(("reference", threads, precision, mode))
        if design == "seed" and ref_row:
            r["seed_over_reference"] = r["ms_per_token"] / ref_row["ms_per_token"]
        if mode == "sampled":
            r["sampled_over_greedy"] = r["ms_per_token"] / gen[(design, threads, precision, "greedy")]["ms_per_token"]
        extra = "".join(f" {k}={r[k]:.2f}" for k in ("seed_over_reference", "sampled_over_greedy") if k in r)
        print(f"generate threads={threads} {design:9s} {precision:4s} {mode:7s} {r['ms_per_token']:8.3f} ms/token"
              + extra)  # fmt: skip
    for r in result["prefill"]:
        share = f", linear layers {100 * r['linear_share']:.0f}% of op time" if r.get("linear_share") else ""
        print(f"prefill threads={r['threads']} {r['design']:9s} {r['impl']:6s} {r['weights']:5s} {r['ms']:9.3f} ms "
              f"for {r['tokens']} tokens{share}")  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
