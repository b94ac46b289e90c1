"""Cold- and warm-start time of the first training step of a fresh process.

    python benchmarks/cold_warm_start.py [--impl auto|eager|fused|compile[,...]] [--case notebook|small]
                                         [--cache-root DIR] [--out FILE] [--timeout S]

For each impl, two fresh child processes run the same first training step (forward, NLL, backward,
Adam step) on the same cache folder: the first with an emptied folder (cold: every Triton kernel is
compiled and autotuned, every inductor graph compiled), the second reusing it (warm: kernels load
from ``TRITON_CACHE_DIR``, autotune choices from Triton's autotune cache, ``TRITON_CACHE_AUTOTUNING=1``,
graphs from ``TORCHINDUCTOR_CACHE_DIR``). Each child reports import, model-build, first-step and
second-step seconds; the parent also counts the ``*.autotune.json`` files in the cache after the
cold run and the new ones the warm run added: a persistent autotune cache adds none.

``auto`` is ``fused`` when the package has its fused model and CUDA is present, else ``eager``
(the eager reference on CPU is a smoke test of this script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CACHE_ROOT = os.path.join(HERE, ".triton_cache", "cold_warm")


def _child(impl: str, case: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    sys.path.insert(0, HERE)
    from common import build_model, make_batch, make_train_step, pick_device, timed_first_call

    import_s = time.perf_counter() - t0
    device = pick_device()
    t1 = time.perf_counter()
    model = build_model(case, impl, device)
    if impl == "compile":
        model = torch.compile(model)
    x, y = make_batch(case, device)
    step = make_train_step(model, x, y)
    build_s = time.perf_counter() - t1
    loss, first_s = timed_first_call(step, device)
    _, second_s = timed_first_call(step, device)
    return {
        "impl": impl,
        "case": case,
        "device": str(device),
        "import_s": import_s,
        "build_s": build_s,
        "first_step_s": first_s,
        "second_step_s": second_s,
        "loss": float(loss),
    }


def _autotune_files(root: str) -> set[str]:
    found = set()
    for dirpath, _, files in os.walk(root):
        found.update(os.path.join(dirpath, f) for f in files if f.endswith(".autotune.json"))
    return found


def _run_child(impl: str, case: str, cache: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels: the point is their compile/load time
    env.update(
        TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
        TRITON_CACHE_AUTOTUNING="1",
    )
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--case", case]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {impl}/{case} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(last)
    out["process_wall_s"] = wall
    return out


def resolve_impls(spec: str) -> list[str]:
    impls = []
    for impl in spec.split(","):
        impl = impl.strip()
        if impl == "auto":
            import torch

            sys.path.insert(0, HERE)
            from common import fused_model_class

            impl = "fused" if torch.cuda.is_available() and fused_model_class() is not None else "eager"
        if impl not in ("eager", "fused", "compile"):
            raise SystemExit(f"unknown impl {impl!r}: use auto, eager, fused or compile")
        impls.append(impl)
    return list(dict.fromkeys(impls))


def measure(impls: list[str], case: str, cache_root: str, timeout: float) -> dict[str, Any]:
    runs = []
    errors = []
    for impl in impls:
        cache = os.path.join(cache_root, f"{impl}-{case}")
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)
        try:
            # The cold run compiles and autotunes everything: it may take most of the time allowed.
            t0 = time.perf_counter()
            cold = _run_child(impl, case, cache, 0.8 * timeout)
            cold_files = _autotune_files(cache)
            warm = _run_child(impl, case, cache, max(5.0, timeout - (time.perf_counter() - t0)))
            new_files = _autotune_files(cache) - cold_files
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors.append(f"{impl}/{case}: {e}")
            print(f"cold/warm {impl}/{case}: FAILED: {e}", file=sys.stderr, flush=True)
            continue
        run = {
            "impl": impl,
            "case": case,
            "device": cold["device"],
            "cold_first_step_s": cold["first_step_s"],
            "warm_first_step_s": warm["first_step_s"],
            "cold_second_step_s": cold["second_step_s"],
            "warm_second_step_s": warm["second_step_s"],
            "cold_process_s": cold["process_wall_s"],
            "warm_process_s": warm["process_wall_s"],
            "cold_import_s": cold["import_s"],
            "warm_import_s": warm["import_s"],
            "autotune_files_cold": len(cold_files),
            "autotune_files_new_warm": len(new_files),
        }
        runs.append(run)
        print(
            f"cold/warm {impl}/{case} on {run['device']}: first step cold {run['cold_first_step_s']:.3f} s, "
            f"warm {run['warm_first_step_s']:.3f} s (second step {run['warm_second_step_s']:.3f} s); "
            f"autotune cache files {run['autotune_files_cold']}, new when warm {run['autotune_files_new_warm']}",
            flush=True,
        )
    return {"runs": runs, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="auto", help="auto, eager, fused, compile, or a comma list")
    ap.add_argument("--case", default=None, help="notebook or small (default: notebook on CUDA, small on CPU)")
    ap.add_argument("--cache-root", default=DEFAULT_CACHE_ROOT)
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for the cold and warm run of one impl")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.impl, args.case)), flush=True)
        return 0

    import torch

    case = args.case or ("notebook" if torch.cuda.is_available() else "small")
    res = measure(resolve_impls(args.impl), case, args.cache_root, args.timeout)
    text = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if res["runs"] and not res["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
