"""Issue 15's GPU measurement in one command (≤ 3 minutes on an H100/H200): the training step of
``tapetransformer train`` at the notebook's size, graphed and not, against the reference and
``torch.compile``, and the critic attention forward + backward against eager and ``torch.compile``.

    python benchmarks/gpu_train_bench.py --out results.json          # on the CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_train_bench.py --tiny   # CPU smoke run of the script (no figures)

Every training variant is the tool's own step (``Stepper``: forward, mean NLL, backward, gradient
clipping at 1.0, Adam), from the same initial weights and batch, under the autocast ``train --amp
auto`` picks (bf16 where the device has it):

* ``reference``: the notebook's module (prophet loop and every critic run), launch by launch;
* ``fused_eager`` / ``fused``: the fused model with ``backend="eager"`` / ``"triton"``, launch by launch
  (what the kernels add is ``fused_eager`` / ``fused``);
* ``fused_eager_graph`` / ``fused_graph``: the same, the whole step (clip and Adam included) replayed from
  one CUDA graph (``GraphedStepper``, Adam ``capturable=True``): what the graph adds;
* ``compile_<mode>``: ``Stepper.compile(mode=...)`` of the ``fused_eager`` model's loss (forward and
  backward; Adam runs eagerly after it, fused), modes ``default``, ``reduce-overhead``, ``max-autotune``.

Each variant: the first step's wall time (compile, Triton JIT, autotuning, graph capture), then the median
of per-step CUDA-event times over ``--steps`` steps after three warm-up steps, the peak allocated memory
of one step, tokens/s, and (launch by launch only) the kernels one step launches, counted on the device.

The JSON rows follow ``collect_results.py``'s schema: group ``model``, name ``notebook-train``
(``eager_ms`` = the reference, ``fused_ms`` = the fastest fused variant, ``compile_ms`` = the fastest
compile mode, the rest in ``extra``), and group ``attention``, names ``B16-S{128,512,2048}-D256-H4-fwdbwd``
(``eager_ms`` = ``nn.MultiheadAttention(need_weights=True)`` and the statistics on its weights,
``compile_ms`` = ``torch.compile`` of that, ``fused_ms`` = ``tape_kernels.CriticAttention``), bf16.
A time budget (``--budget-s``) skips, in reverse priority, what does not fit; ``extra.skipped`` lists it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    MIB,
    MODEL_CASES,
    attention_calls,
    build_model,
    env_info,
    make_batch,
    median_ms,
    sync,
    write_results,
)
from gpu_decode_bench import Budget, count_launches  # noqa: E402

ATTN_CASES = {"B16-S128-D256-H4": (16, 128, 256, 4), "B16-S512-D256-H4": (16, 512, 256, 4),
              "B16-S2048-D256-H4": (16, 2048, 256, 4)}  # fmt: skip
TINY_ATTN = {"B2-S16-D32-H2": (2, 16, 32, 2)}


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- training step


def train_variant(name: str, case: str, dev: torch.device, steps: int) -> dict[str, Any]:
    from tapetransformer.train import MemoryPlan, Stepper, make_optimizer, pick_amp
    from tapetransformer.train.cudagraph import GraphedStepper, graph_unsupported

    graph = name.endswith("_graph")
    mode = name[len("compile_") :] if name.startswith("compile_") else None
    impl = {"reference": "reference", "fused_eager": "fused_eager", "fused": "fused_triton"}.get(
        name.removesuffix("_graph"), "fused_eager"
    )
    if impl == "fused_triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    cfg = MODEL_CASES[case]
    model = build_model(case, impl, dev)
    amp_dtype, need_scaler = pick_amp("auto", dev)
    opt = make_optimizer("adam", model.parameters(), 1e-3, capturable=graph)
    scaler = torch.amp.GradScaler(dev.type) if need_scaler else None
    plan = MemoryPlan(cfg["batch"], 1, False, None, 0)
    stepper = (GraphedStepper if graph else Stepper)(model, opt, plan, device=dev, amp_dtype=amp_dtype,
                                                     scaler=scaler, grad_clip=1.0)  # fmt: skip
    if graph:
        why = graph_unsupported(stepper, world=1)
        if why is not None:
            raise RuntimeError(why)
    if mode is not None:
        stepper.compile(mode=mode)
    x, y = make_batch(case, dev)

    def step() -> torch.Tensor:
        return stepper.step(x, y)[0]

    t0 = time.perf_counter()
    loss = step()
    sync(dev)
    first_s = time.perf_counter() - t0
    for _ in range(3):
        loss = step()
    sync(dev)
    if not torch.isfinite(loss.float()).all():
        raise RuntimeError(f"{name}: non-finite loss {loss}")
    out: dict[str, Any] = {"first_step_s": round(first_s, 2)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        sync(dev)
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / MIB, 1)
    ms = median_ms(step, steps, dev)
    out["ms"] = round(ms, 4)
    out["tokens_per_s"] = round(cfg["batch"] * cfg["seq_len"] / ms * 1e3)
    if not graph and mode is None:
        try:  # a counter that does not fit this Triton's hook API must not lose the timings above
            with count_launches(dev) as c:
                step()
                sync(dev)
            out["launches_per_step"] = c["triton"] + c["aten"]
            out["triton_launches_per_step"] = c["triton"]
        except Exception as e:  # noqa: BLE001
            out["launches_error"] = f"{type(e).__name__}: {e}"[:200]
    if mode is not None:
        out["amp"] = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    return out


def train_row(args: argparse.Namespace, dev: torch.device, budget: Budget) -> dict[str, Any]:
    case = "tiny" if args.tiny else "notebook"
    cfg = MODEL_CASES[case]
    from tapetransformer.train import pick_amp

    amp_dtype, _ = pick_amp("auto", dev)
    extra: dict[str, Any] = {"config": cfg, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                             "optimizer": "adam (fused; capturable in the graphed variants)", "grad_clip": 1.0,
                             "steps_timed": args.steps}  # fmt: skip
    res: dict[str, dict[str, Any]] = {}
    cuda = dev.type == "cuda"
    # Priority: the headline (graphed fused step) and what it is compared with, then the attribution.
    order = ["fused_graph", "reference", "compile_default", "fused", "fused_eager_graph", "fused_eager",
             "compile_reduce-overhead", "compile_max-autotune"]
    if not cuda:  # no CUDA graphs; one compile mode is enough for a smoke run
        order = [o for o in order if "graph" not in o and o not in ("compile_reduce-overhead", "compile_max-autotune")]
    if args.variants:
        order = [o for o in order if o in args.variants]
    if args.no_compile:
        order = [o for o in order if not o.startswith("compile")]
    need = {"compile_default": 45.0, "compile_reduce-overhead": 45.0, "compile_max-autotune": 120.0}
    for name in order:
        r = budget.run(f"train {name}", released(lambda n=name: train_variant(n, case, dev, args.steps)),
                       need_s=need.get(name, 10.0) if cuda else 5.0)  # fmt: skip
        if r is not None:
            res[name] = r
    for name, r in res.items():
        for k, v in r.items():
            extra[f"{name}_{k}"] = v
    fused = {k: v["ms"] for k, v in res.items() if not k.startswith(("reference", "compile"))}
    comp = {k: v["ms"] for k, v in res.items() if k.startswith("compile")}
    best_fused = min(fused, key=fused.get) if fused else None
    best_comp = min(comp, key=comp.get) if comp else None
    extra["fused_best"] = best_fused
    extra["compile_best"] = best_comp
    ref_ms = res.get("reference", {}).get("ms")
    if best_fused and ref_ms:
        extra["speedup_vs_reference"] = round(ref_ms / fused[best_fused], 2)
    if best_fused and best_comp:
        extra["speedup_vs_best_compile"] = round(comp[best_comp] / fused[best_fused], 2)
    if "fused" in res and "fused_graph" in res:
        extra["graph_gain"] = round(res["fused"]["ms"] / res["fused_graph"]["ms"], 2)
    if "fused_eager_graph" in res and "fused_graph" in res:
        extra["kernels_gain_with_graphs"] = round(res["fused_eager_graph"]["ms"] / res["fused_graph"]["ms"], 2)
    return {"group": "model", "name": f"{case}-train", "eager_ms": ref_ms,
            "compile_ms": comp.get(best_comp) if best_comp else None,
            "fused_ms": fused.get(best_fused) if best_fused else None,
            "peak_mem_mb": res.get(best_fused or "", {}).get("peak_mem_mb"), "extra": extra}  # fmt: skip


# ------------------------------------------------------------------------------------ attention


def attention_case(impl: str, shape: tuple[int, int, int, int], dev: torch.device, iters: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    _, fwdbwd = attention_calls(impl, shape, dev, dtype, dynamic=False)
    t0 = time.perf_counter()
    fwdbwd()
    sync(dev)
    first_s = time.perf_counter() - t0
    fwdbwd()
    out: dict[str, Any] = {"first_call_s": round(first_s, 2)}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        live = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fwdbwd()
        torch.cuda.synchronize(dev)
        out["act_mem_mb"] = round((torch.cuda.max_memory_allocated(dev) - live) / MIB, 1)
    out["ms"] = round(median_ms(fwdbwd, iters, dev), 4)
    return out


def released(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, then its models, compiled graphs and cached blocks freed (earlier cases must not count
    towards a later one's peak memory)."""

    def run() -> Any:
        try:
            return fn()
        finally:
            torch._dynamo.reset()
            _release()

    return run


def attention_rows(args: argparse.Namespace, dev: torch.device, budget: Budget, compiled: bool) -> list[dict]:
    cases = TINY_ATTN if args.tiny else ATTN_CASES
    impls = ["compile"] if compiled else (["eager", "fused"] if dev.type == "cuda" or args.tiny else ["eager"])
    rows = []
    for name, shape in cases.items():
        dtype = "bf16" if dev.type == "cuda" else "fp32"
        row = {"group": "attention", "name": f"{name}-fwdbwd", "eager_ms": None, "compile_ms": None,
               "fused_ms": None, "peak_mem_mb": None, "extra": {"dtype": dtype}}  # fmt: skip
        for impl in impls:
            fn = released(lambda i=impl, s=shape: attention_case(i, s, dev, args.iters))
            r = budget.run(f"attention {name} {impl}", fn, need_s=25.0 if impl == "compile" else 5.0)
            if r is not None:
                row[f"{impl}_ms"] = r["ms"]
                row["extra"].update({f"{impl}_{k}": v for k, v in r.items() if k != "ms"})
        rows.append(row)
    return rows


def _merge(rows: list[dict], more: list[dict]) -> None:
    by = {(r["group"], r["name"]): r for r in rows}
    for m in more:
        r = by[(m["group"], m["name"])]
        for k in ("eager_ms", "compile_ms", "fused_ms"):
            if m[k] is not None:
                r[k] = m[k]
        r["extra"].update(m["extra"])
    for r in rows:
        e, f, c = r["eager_ms"], r["fused_ms"], r["compile_ms"]
        if e and f:
            r["extra"]["fused_vs_eager"] = round(e / f, 2)
        if c and f:
            r["extra"]["fused_vs_compile"] = round(c / f, 2)


def table(rows: list[dict]) -> str:
    lines = ["| group | name | eager ms | compile ms | fused ms | peak MiB |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["group"], r["name"]] + ["" if r[k] is None else f"{r[k]:.4g}" for k in
                                           ("eager_ms", "compile_ms", "fused_ms", "peak_mem_mb")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop starting new cases after this long")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    ap.add_argument("--iters", type=int, default=30, help="timed attention calls per case")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and attention: a smoke run of the script")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="training variants to run (default: all; e.g. reference fused fused_graph compile_default)")
    ap.add_argument("--no-compile", action="store_true", help="leave out every torch.compile case")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        print("no CUDA device: run with TRITON_INTERPRET=1 --tiny for a smoke run (no figures)", file=sys.stderr)
        return 2
    if args.tiny:
        args.steps, args.iters = min(args.steps, 2), min(args.iters, 2)
    budget = Budget(args.budget_s)
    env = env_info(dev)
    print(f"gpu_train_bench on {env['device']} (budget {args.budget_s:.0f} s)", flush=True)
    rows = [train_row(args, dev, budget)]
    rows += attention_rows(args, dev, budget, compiled=False)
    _merge(rows, attention_rows(args, dev, budget, compiled=True) if not args.no_compile else [])
    rows[0]["extra"]["skipped"] = budget.skipped
    out = {**env, "results": rows}
    if not cuda:
        out["note"] = "CPU smoke run: not a measurement"
    if args.out:
        write_results(args.out, out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
