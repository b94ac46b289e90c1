"""CPU training step with and without ``tapetransformer.train.heap.keep_freed_memory`` (glibc's malloc
thresholds), measured A/B in alternating fresh processes.

    python benchmarks/cpu_heap_ab.py --out benchmarks/results [--config notebook] [--pairs 3]

The setting is process-wide and cannot be undone, so each measurement is its own interpreter: per pair,
one process with malloc as it is and one with the thresholds set, alternating so that a machine that
slows down over the run affects both sides alike. Each process times the training tool's step
(``Stepper``: forward, backward, clipping, Adam; fp32; ``backend="eager"``): the median of ``--reps``
steps after two untimed ones, then its peak resident set. ``--compiled`` does the same with
``Stepper.compile()`` (a warm Inductor cache: one untimed compile first). Writes
``<date>-cpu-heap-ab.json`` (group ``train``, name ``<config>-train-cpu-heap``; ``eager_ms`` = the
median over pairs without, ``fused_ms`` = with the thresholds; every process's figure in ``extra``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(config: str, keep: bool, compiled: bool, reps: int) -> None:
    """Runs in the measured process: prints ``RESULT <ms> <peak RSS MiB> <thresholds set>``."""
    set_ = False
    if keep:
        from tapetransformer.train.heap import keep_freed_memory

        set_ = keep_freed_memory()
    from cpu_train_compile import CONFIGS, _median_ms, _stepper

    st, x, y = _stepper(CONFIGS[config], fused=True)
    if compiled:
        st.compile()
        st.step(x, y)
    ms = _median_ms(st.step, x, y, reps, 2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {ms:.3f} {rss:.1f} {int(set_)}", flush=True)


def _run(config: str, keep: bool, compiled: bool, reps: int, threads: int, cache: str) -> tuple[float, float]:
    code = (f"import sys, torch; sys.path.insert(0, {HERE!r}); torch.set_num_threads({threads}); "
            f"import cpu_heap_ab as b; b.child({config!r}, {keep}, {compiled}, {reps})")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                         capture_output=True, text=True)  # fmt: skip
    res = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not res:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    _, ms, rss, set_ = res[-1]
    if keep and set_ != "1":
        raise RuntimeError("keep_freed_memory() did not set the thresholds here (not glibc?)")
    return float(ms), float(rss)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--config", default="notebook", choices=["notebook", "small"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compiled", dest="compiled", action="store_false", help="time the eager step only")
    a = ap.parse_args(argv)
    from common import env_info, write_results

    extra: dict[str, Any] = {"config": a.config, "pairs": a.pairs, "reps": a.reps, "threads": a.threads}
    modes = [("eager", False)] + ([("compiled", True)] if a.compiled else [])
    with tempfile.TemporaryDirectory(prefix="tk-inductor-") as cache:
        if a.compiled:  # the cold compile, untimed: both sides then load the same cached step
            _run(a.config, False, True, 1, a.threads, cache)
        for name, compiled in modes:
            for keep in (False, True):
                extra[f"{name}_{'keep' if keep else 'default'}_ms"] = []
                extra[f"{name}_{'keep' if keep else 'default'}_peak_rss_mib"] = []
            for i in range(a.pairs):
                for keep in (False, True) if i % 2 == 0 else (True, False):
                    t0 = time.time()
                    ms, rss = _run(a.config, keep, compiled, a.reps, a.threads, cache)
                    tag = f"{name}_{'keep' if keep else 'default'}"
                    extra[f"{tag}_ms"].append(ms)
                    extra[f"{tag}_peak_rss_mib"].append(rss)
                    print(f"{tag}: {ms:.0f} ms, peak RSS {rss:.0f} MiB ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for name, _ in modes:
        d, k = statistics.median(extra[f"{name}_default_ms"]), statistics.median(extra[f"{name}_keep_ms"])
        rows.append({"group": "train", "name": f"{a.config}-train-cpu-heap-{name}", "eager_ms": d, "compile_ms": None,
                     "fused_ms": k, "peak_mem_mb": None,
                     "extra": {**{key: v for key, v in extra.items() if key.startswith(name)},
                               "speedup": d / k, "config": a.config, "pairs": a.pairs, "reps": a.reps,
                               "threads": a.threads,
                               "note": "eager_ms: malloc as it is; fused_ms: keep_freed_memory() (medians over "
                                       "alternating processes)"}})  # fmt: skip
        print(f"{name}: {d:.0f} -> {k:.0f} ms ({d / k:.3f}x)")
    date = _dt.date.today().isoformat()
    write_results(os.path.join(a.out, f"{date}-cpu-heap-ab.json"), {**env_info("cpu"), "date": date, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
