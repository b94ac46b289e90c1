"""Ahead-of-time compilation of every Triton kernel for sm_86 and sm_90, without a GPU.

Each op module that owns Triton kernels exposes ``aot_specs() -> list[AotSpec]``: one entry per
kernel × autotune config × dtype it can launch, built with :func:`kernel_spec`, which derives the
Triton signature from the kernel's own parameter list (see :func:`signature` for the naming
convention it relies on). ``python -m tape_kernels._aot`` compiles them all with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and fails when a kernel does not
compile or needs more shared memory than an RTX 3050/3060 (sm_86) gives one block.

This must run where ``TRITON_INTERPRET`` is unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Shared memory per block on sm_86 (RTX 30xx): 99 KB opt-in (101376 bytes).
SM86_MAX_SHARED = 101376
SM90_MAX_SHARED = 232448
TARGET_CCS = (86, 90)


@dataclass
class AotSpec:
    """One compilable instance of a kernel.

    ``signature`` maps every argument name to a Triton type string ("*fp32", "i32", "fp32",
    "constexpr"); ``constexprs`` gives the constexpr values; ``ccs`` restricts the targets.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    ccs: tuple[int, ...] = TARGET_CCS
    maxnreg: int | None = None


def _jit_fn(kernel: Any) -> Any:
    # Autotuner / Heuristics wrap the JITFunction in `.fn`, possibly several levels deep.
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


# Scalar annotations a kernel parameter may carry (a string under `from __future__ import annotations`).
_SCALAR_ANNOTATIONS = {"float32": "fp32", "int32": "i32", "int64": "i64"}


def _params(kernel: Any) -> list[tuple[str, str, Any]]:
    """(name, normalised annotation, default or ``inspect.Parameter.empty``) of each parameter of a JIT
    or interpreted kernel."""
    fn = _jit_fn(kernel)
    py = getattr(fn, "fn", fn)
    out = []
    for p in inspect.signature(py).parameters.values():
        ann = "" if p.annotation is inspect.Parameter.empty else str(getattr(p.annotation, "__name__", p.annotation))
        ann = ann.removeprefix("triton.language.").removeprefix("tl.")
        out.append((p.name, ann, p.default))
    return out


def signature(
    kernel: Any,
    dtype: torch.dtype,
    pointers: dict[str, torch.dtype] | None = None,
    scalars: dict[str, str] | None = None,
) -> dict[str, str]:
    """The Triton signature of ``kernel`` when its data tensors have ``dtype``, from its parameter list.

    The kernels of this package follow one naming convention, which is what makes this possible:
    ``tl.constexpr`` parameters are "constexpr"; UPPERCASE parameters are tensors (pointers), of
    element type ``dtype`` unless ``pointers`` names another one (fp32 statistics, int32 counters;
    names the kernel lacks are ignored, so one map serves all kernels of a module); lower-case parameters are scalars: the type they are annotated with (float scalars carry
    ``tl.float32``), else i32. ``scalars`` gives the Triton type of parameters that are scalars
    whatever their case or annotation (a kernel's UPPERCASE sizes B, D).
    """
    from tape_kernels._utils import TRITON_TYPE

    pointers = pointers or {}
    scalars = scalars or {}
    sig = {}
    for name, ann, _ in _params(kernel):
        if ann == "constexpr":
            sig[name] = "constexpr"
        elif name in scalars:
            sig[name] = scalars[name]
        elif name in pointers or name.isupper():
            sig[name] = "*" + TRITON_TYPE[pointers.get(name, dtype)]
        else:
            sig[name] = _SCALAR_ANNOTATIONS.get(ann, "i32")
    return sig


def kernel_spec(
    name: str,
    kernel: Any,
    dtype: torch.dtype,
    constexprs: dict[str, Any],
    *,
    pointers: dict[str, torch.dtype] | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    maxnreg: int | None = None,
) -> AotSpec:
    """An :class:`AotSpec` with :func:`signature`'s signature. ``constexprs`` gives the constexpr
    parameters' values (those with a default may be left out) and nothing else."""
    sig = signature(kernel, dtype, pointers)
    params = _params(kernel)
    defaults = {n: d for n, ann, d in params if ann == "constexpr" and d is not inspect.Parameter.empty}
    allowed = {n for n, ann, _ in params if ann == "constexpr"}
    values = {**defaults, **constexprs}
    if set(values) != allowed:
        raise ValueError(f"{name}: constexprs {sorted(constexprs)} do not fit the kernel's {sorted(allowed)}")
    return AotSpec(name, kernel, sig, values, num_warps, num_stages, maxnreg=maxnreg)


def compile_spec(spec: AotSpec, cc: int) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(spec.kernel)
    missing = [a for a in fn.arg_names if a not in spec.signature]
    if missing:
        raise ValueError(f"{spec.name}: signature lacks {missing}")
    src = ASTSource(fn, signature=spec.signature, constexprs=spec.constexprs)
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        opts["maxnreg"] = spec.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def collect_specs(modules: list[str] | None = None) -> list[tuple[str, AotSpec]]:
    import tape_kernels

    names = modules or sorted(m.name for m in pkgutil.iter_modules(tape_kernels.__path__) if not m.name.startswith("_"))
    out: list[tuple[str, AotSpec]] = []
    for name in names:
        mod = importlib.import_module(f"tape_kernels.{name}")
        if hasattr(mod, "aot_specs"):
            out.extend((name, s) for s in mod.aot_specs())
    return out


_SPECS: list[tuple[str, AotSpec]] | None = None


def _compile_one(job: tuple[int, int]) -> tuple[dict[str, Any] | None, str | None]:
    """Compile spec #i for one cc; returns (row, None) or (None, failure)."""
    global _SPECS
    if _SPECS is None:
        _SPECS = collect_specs()
    i, cc = job
    mod, spec = _SPECS[i]
    t0 = time.perf_counter()
    try:
        k = compile_spec(spec, cc)
    except Exception as e:  # report every failure, not just the first
        return None, f"{mod}:{spec.name} sm_{cc}: {type(e).__name__}: {str(e)[:400]}"
    shared = int(k.metadata.shared)
    row = {"module": mod, "name": spec.name, "cc": cc, "shared": shared, "s": time.perf_counter() - t0}
    limit = SM86_MAX_SHARED if cc == 86 else SM90_MAX_SHARED
    if shared > limit:
        return row, f"{mod}:{spec.name} sm_{cc}: shared memory {shared} B > {limit} B"
    return row, None


def run(modules: list[str] | None = None, verbose: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    global _SPECS
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    _SPECS = collect_specs(modules)
    work = [(i, cc) for i, (_, spec) in enumerate(_SPECS) for cc in spec.ccs]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp

        # fork: workers inherit the collected specs; no CUDA context exists to be broken by it.
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.imap(_compile_one, work, chunksize=1)
            for row, err in results:
                _report(row, err, rows, failures, verbose)
    else:
        for job in work:
            _report(*_compile_one(job), rows, failures, verbose)
    if failures:
        raise SystemExit("AOT compile failures:\n" + "\n".join(failures))
    return rows


def _report(row: dict | None, err: str | None, rows: list, failures: list, verbose: bool) -> None:
    if row is not None:
        rows.append(row)
        if verbose:
            print(f"  sm_{row['cc']} {row['module']}:{row['name']:<60} shared={row['shared']:>6} B  {row['s']:.1f}s",
                  flush=True)
    if err is not None:
        failures.append(err)
        print(f"  FAILED {err}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help="tape_kernels submodules (default: all)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.modules or None, jobs=max(1, args.jobs))
    print(f"AOT: {len(rows)} kernel compilations OK for sm_86/sm_90 in {time.perf_counter() - t0:.0f}s")
    if not rows:
        print("AOT: no kernels registered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
