"""CPU training under torch.compile (issue "CPU training at compiler speed"), measured in one run.

    python benchmarks/cpu_train_compile.py --out benchmarks/results [--configs notebook small] [--reps 5]

Per config, in this process unless noted, the training tool's step (``Stepper``: forward, backward,
clipping, Adam; fp32; ``backend="eager"``):

* ``reference_ms``: the reference module (``tapetransformer.reference``), its full training forward
  + NLL + backward + Adam (the notebook's step);
* ``eager_ms``: the fused model, eager ops (the package without the compiler);
* ``compile_ms``: the same step with the loss path under ``torch.compile`` (``Stepper.compile``);
* ``compile_cold_s`` / ``compile_warm_s``: wall time from launching a fresh process to the end of its
  first compiled step, with an empty Inductor cache (cold) and again with the cache the cold run
  left (warm; ``--warm-runs`` of them, median) — each in a subprocess with its own
  ``TORCHINDUCTOR_CACHE_DIR``;
* the break-even step count ``compile_cold_s / (eager_ms − compile_ms)``;
* ``gemm_ms``: the matrix products' share of one compiled step (``aten::mm``/``addmm``/``bmm`` self time
  under the profiler). Inductor leaves them to the same BLAS as eager, so no compile can make the step
  faster than ``eager_ms / gemm_ms`` (``compile_bound``): the ceiling the ratio is judged against.

Medians of ``--reps`` steps after ``--warmup`` untimed ones. Writes ``<date>-cpu-train-compile.json``
(rows ``{group: "train", name: "<config>-train-cpu", eager_ms, compile_ms, fused_ms, extra}``, the
results schema) and a markdown table beside it. Threads: ``torch.get_num_threads()`` (set
``--threads``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CONFIGS = {
    "notebook": dict(vocab_size=65, seq_len=128, embed_dim=256, num_heads=4, batch=16),
    "small": dict(vocab_size=65, seq_len=64, embed_dim=64, num_heads=2, batch=8),
}


def _stepper(cfg: dict[str, int], fused: bool) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from tapetransformer import TapeTransformer
    from tapetransformer.reference import ReferenceTapeTransformer
    from tapetransformer.train import MemoryPlan, Stepper, make_optimizer

    torch.manual_seed(0)
    kw = dict(seq_len=cfg["seq_len"], embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"], dropout=0.0)
    if fused:
        model = TapeTransformer(cfg["vocab_size"], **kw, causal=True, backend="eager")
    else:
        model = ReferenceTapeTransformer(cfg["vocab_size"], **kw)
    model.train()
    plan = MemoryPlan(cfg["batch"], 1, False, None, 0)
    st = Stepper(model, make_optimizer("adam", model.parameters(), 1e-3), plan, grad_clip=1.0)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq_len"] + 1), generator=g)
    return st, seq[:, :-1], seq[:, 1:]


def _median_ms(step: Any, x: torch.Tensor, y: torch.Tensor, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(x, y)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def gemm_ms(step: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Milliseconds of one ``step`` spent in matrix products (profiler self time of GEMM_OPS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e3


def first_compiled_step(config: str, keep_heap: bool = True) -> float:
    """Seconds from this process's start of work to the end of its first compiled step."""
    t0 = time.perf_counter()
    if keep_heap:  # as `tapetransformer train` does on a CPU
        from tapetransformer.train.heap import keep_freed_memory

        keep_freed_memory()
    st, x, y = _stepper(CONFIGS[config], fused=True)
    st.compile()
    st.step(x, y)
    return time.perf_counter() - t0


def _subprocess_first_step(config: str, cache_dir: str, threads: int, keep_heap: bool = True) -> float:
    """Seconds from launching a fresh interpreter to the end of its first compiled step: interpreter
    start, imports, model, compile (or cache load) and the step, what a user waits for the first step.
    The child stamps the wall clock when its step ends (its teardown afterwards is not counted)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    code = (f"import sys, time, torch; sys.path.insert(0, {HERE!r}); torch.set_num_threads({threads}); "
            f"import cpu_train_compile as b; b.first_compiled_step({config!r}, {keep_heap}); "
            "print('DONE_AT', time.time())")
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    done = [ln for ln in out.stdout.splitlines() if ln.startswith("DONE_AT ")]
    if out.returncode != 0 or not done:
        raise RuntimeError(f"first compiled step failed: {out.stderr[-2000:]}")
    return float(done[-1].split()[1]) - launched


def measure(config: str, reps: int, warmup: int, threads: int, warm_runs: int = 3, keep_heap: bool = True
            ) -> dict[str, Any]:
    cfg = CONFIGS[config]
    ref, x, y = _stepper(cfg, fused=False)
    reference_ms = _median_ms(ref.step, x, y, reps, warmup)
    del ref
    st, x, y = _stepper(cfg, fused=True)
    eager_ms = _median_ms(st.step, x, y, reps, warmup)
    st.compile()
    compile_ms = _median_ms(st.step, x, y, reps, max(warmup, 1))  # the first call compiles
    gemm = gemm_ms(st.step, x, y)
    with tempfile.TemporaryDirectory(prefix="tk-inductor-") as cache:
        cold = _subprocess_first_step(config, cache, threads, keep_heap)
        warms = [_subprocess_first_step(config, cache, threads, keep_heap) for _ in range(warm_runs)]
        warm = statistics.median(warms)
    saving_s = (eager_ms - compile_ms) / 1e3
    return {
        "group": "train", "name": f"{config}-train-cpu", "eager_ms": eager_ms, "compile_ms": compile_ms,
        "fused_ms": compile_ms if compile_ms < eager_ms else eager_ms, "peak_mem_mb": None,
        "extra": {
            "reference_ms": reference_ms, "compile_cold_s": cold, "compile_warm_s": warm,
            "compile_speedup_vs_eager": eager_ms / compile_ms, "eager_speedup_vs_reference": reference_ms / eager_ms,
            "compile_speedup_vs_reference": reference_ms / compile_ms,
            "break_even_steps_cold": cold / saving_s if saving_s > 0 else None,
            "break_even_steps_warm": warm / saving_s if saving_s > 0 else None,
            "gemm_ms": gemm, "compile_bound": eager_ms / gemm, "compile_warm_runs_s": warms,
            "config": cfg, "threads": threads, "reps": reps, "keep_heap": keep_heap,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--configs", nargs="+", default=["notebook", "small"], choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warm-runs", type=int, default=3, help="warm-cache first steps to take the median of")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-keep-heap", dest="keep_heap", action="store_false",
                    help="leave glibc's malloc thresholds alone (the tool sets them on a CPU: train.heap)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.keep_heap:
        from tapetransformer.train.heap import keep_freed_memory

        keep_freed_memory()
    from common import env_info

    rows = []
    for c in a.configs:
        print(f"{c} ...", flush=True)
        rows.append(measure(c, a.reps, a.warmup, a.threads, a.warm_runs, a.keep_heap))
        e = rows[-1]
        print(f"  reference {e['extra']['reference_ms']:.0f} ms, eager {e['eager_ms']:.0f} ms, compiled "
              f"{e['compile_ms']:.0f} ms; first compiled step cold {e['extra']['compile_cold_s']:.1f} s, warm "
              f"{e['extra']['compile_warm_s']:.1f} s", flush=True)
    env = env_info("cpu")
    date = _dt.date.today().isoformat()
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{date}-cpu-train-compile")
    with open(stem + ".json", "w") as f:
        json.dump({**env, "date": date, "results": rows}, f, indent=1)
    lines = [f"# CPU training under torch.compile — {env.get('device')}, {a.threads} threads, {date}", "",
             "Medians of the training tool's step (forward, backward, clipping, Adam), fp32, in one run"
             + (", with the tool's CPU malloc thresholds (train.heap). " if a.keep_heap else ". ") +
             "First step: wall time from launching a fresh process to the end of its first compiled step, with an "
             f"empty Inductor cache (cold) and with the cache the cold run left (warm: median of {a.warm_runs} runs). "
             "GEMM ms: the matrix "
             "products in one compiled step, which the compiler leaves to the same BLAS as eager; bound = "
             "eager ms / GEMM ms, the most any compile of this step could gain.", "",
             "| config | reference ms | fused eager ms | compiled ms | compiled × eager | first step cold s | "
             "warm s | break-even steps (cold / warm) | GEMM ms | bound |",
             "|---|" + "---:|" * 9]
    for r in rows:
        e = r["extra"]
        be, bw = e["break_even_steps_cold"], e["break_even_steps_warm"]
        lines.append(f"| {r['name']} | {e['reference_ms']:.0f} | {r['eager_ms']:.0f} | {r['compile_ms']:.0f} | "
                     f"{e['compile_speedup_vs_eager']:.2f} | {e['compile_cold_s']:.1f} | {e['compile_warm_s']:.1f} | "
                     f"{'—' if be is None else f'{be:.0f} / {bw:.0f}'} | {e['gemm_ms']:.0f} | "
                     f"{e['compile_bound']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
