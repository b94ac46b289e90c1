"""Static resource use of every Triton kernel config on a target GPU, without the GPU.

    python benchmarks/kernel_report.py [--cc 86] [module ...] [--out FILE.json] [--md FILE.md]
                                       [--fail-on-spill] [-j JOBS]

Compiles every ``aot_specs()`` entry of the ``tape_kernels`` op modules for compute capability
``--cc`` (default 86, the RTX 30xx the package is tuned for) exactly as ``tape_kernels._aot`` does,
reads the registers per thread and local memory of the cubin with ``cuobjdump`` (shipped with
Triton) and, where local memory is used, the register spills from ``ptxas -v`` on the same PTX;
takes the dynamic shared memory from Triton's metadata, and estimates how many blocks fit on one
SM by registers, by shared memory and by threads. A config that spills registers, needs more
shared memory than a block may have, or cannot place one block is what an autotune prune should
remove on that device.

No speed is measured: these are the compiler's resource counts (ptxas), the same on any machine.
Must run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

# Per-SM limits (CUDA programming guide, compute capabilities table).
SM_LIMITS: dict[int, dict[str, int]] = {
    86: {"regs": 65536, "threads": 1536, "blocks": 16, "smem_sm": 102400, "smem_block": 101376},
    89: {"regs": 65536, "threads": 1536, "blocks": 24, "smem_sm": 102400, "smem_block": 101376},
    90: {"regs": 65536, "threads": 2048, "blocks": 32, "smem_sm": 233472, "smem_block": 232448},
}
# Registers are allocated per warp in units of 256; each block also reserves 1 KiB of shared memory.
REG_UNIT = 256
SMEM_RESERVED_PER_BLOCK = 1024


def find_cuobjdump() -> str | None:
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env and os.path.exists(env):
        return env
    try:
        import triton.backends.nvidia as nv

        cand = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def find_ptxas() -> str | None:
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.path.exists(env):
        return env
    tool = find_cuobjdump()
    cand = os.path.join(os.path.dirname(tool), "ptxas") if tool else None
    return cand if cand and os.path.exists(cand) else shutil.which("ptxas")


def spill_stats(ptx: str, cc: int, tool: str) -> dict[str, int]:
    """Spill stores/loads and stack frame bytes from ``ptxas -v`` on the kernel's PTX.

    cuobjdump's STACK mixes register spills with dynamically indexed local arrays; ptxas
    separates them. Triton's own ptxas call may add options, so this is the spill picture of
    the same PTX under default ptxas options.
    """
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    out = {}
    for key, pat in (("stack_frame", r"(\d+) bytes stack frame"), ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pat, log)
        if m:
            out[key] = int(m.group(1))
    return out


def resource_usage(cubin: bytes, tool: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) function in a cubin, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage: dict[str, int] = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key.lower()] = int(m.group(1))
    return usage


def occupancy(cc: int, regs: int, num_warps: int, shared: int) -> dict[str, Any]:
    """Blocks per SM as limited by registers, shared memory and threads, and the resulting occupancy."""
    lim = SM_LIMITS.get(cc, SM_LIMITS[86])
    warp_regs = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = lim["regs"] // (warp_regs * num_warps)
    by_smem = lim["smem_sm"] // (shared + SMEM_RESERVED_PER_BLOCK) if shared else 1 << 30
    by_threads = lim["threads"] // (32 * num_warps)
    blocks = max(0, min(by_regs, by_smem, by_threads, lim["blocks"]))
    limiter = min(
        (("registers", by_regs), ("shared", by_smem), ("threads", by_threads), ("blocks", lim["blocks"])),
        key=lambda kv: kv[1],
    )[0]
    return {
        "blocks_per_sm": blocks,
        "occupancy": round(blocks * num_warps * 32 / lim["threads"], 3),
        "limited_by": limiter,
    }


_SPECS: list = []


def _analyse(job: tuple[int, int, str, str | None]) -> dict[str, Any]:
    """Compile spec #i of _SPECS for cc and read its resources (runs in a worker process)."""
    from tape_kernels._aot import compile_spec

    i, cc, tool, ptxas = job
    mod, spec = _SPECS[i]
    lim = SM_LIMITS.get(cc, SM_LIMITS[86])
    row: dict[str, Any] = {"module": mod, "name": spec.name, "cc": cc, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages}
    try:
        k = compile_spec(spec, cc)
    except Exception as e:  # reported, not fatal: `make aot` is the compile gate
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    use = resource_usage(k.asm["cubin"], tool)
    shared = int(k.metadata.shared)
    row.update(regs=use.get("reg"), local_bytes=use.get("local", 0), stack_bytes=use.get("stack", 0),
               shared=shared)
    if ptxas and (row["stack_bytes"] or row["local_bytes"]):
        row.update(spill_stats(k.asm["ptx"], cc, ptxas))
    row.update(occupancy(cc, row["regs"] or 0, spec.num_warps, shared))
    problems = []
    if row.get("spill_stores"):
        problems.append(f"spills {row['spill_stores']} B of registers")
    elif row["local_bytes"] or row["stack_bytes"]:
        problems.append(f"local memory {row['local_bytes'] + row['stack_bytes']} B (stack frame, no spills)"
                        if "spill_stores" in row else "uses local memory (spills or local arrays)")
    if shared > lim["smem_block"]:
        problems.append(f"shared {shared} B > {lim['smem_block']} B per block")
    if row["blocks_per_sm"] == 0:
        problems.append("no block fits on an SM")
    row["problems"] = problems
    return row


def report(cc: int, modules: list[str] | None = None, verbose: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    global _SPECS
    from tape_kernels._aot import collect_specs

    tool = find_cuobjdump()
    if tool is None:
        raise SystemExit("cuobjdump not found (set TRITON_CUOBJDUMP_PATH)")
    ptxas = find_ptxas()
    _SPECS = [(mod, spec) for mod, spec in collect_specs(modules) if cc in spec.ccs]
    work = [(i, cc, tool, ptxas) for i in range(len(_SPECS))]
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp

        # fork: workers inherit the collected specs; no CUDA context exists to be broken by it.
        with mp.get_context("fork").Pool(jobs) as pool:
            rows = list(pool.imap(_analyse, work, chunksize=1))
    else:
        rows = [_analyse(job) for job in work]
    for row in rows:
        if verbose and "error" not in row:
            flag = ("  <-- " + "; ".join(row["problems"])) if row["problems"] else ""
            print(f"sm_{cc} {row['module']}:{row['name']:<58} w{row['num_warps']} s{row['num_stages']} "
                  f"regs={row['regs']:>3} shared={row['shared']:>6} occ={row['occupancy']:.2f}({row['limited_by']})"
                  f"{flag}", flush=True)
        elif verbose:
            print(f"sm_{cc} {row['module']}:{row['name']}  ERROR {row['error']}", flush=True)
    return rows


def notebook_attention(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attention configs the notebook shape (dh 64, training loss: no statistics gradient) can launch."""
    return [r for r in rows if r["module"] == "attention" and ",dp64," in r["name"] and ",stats" not in r["name"]]


def to_markdown(rows: list[dict[str, Any]], cc: int) -> str:
    bad = [r for r in rows if r.get("problems") or r.get("error")]
    lines = [
        f"Static resource use on sm_{cc} (ptxas via cuobjdump; no GPU involved): {len(rows)} kernel configs, "
        f"{len(bad)} flagged.",
        "",
    ]
    nb = notebook_attention(rows)
    if nb:
        ok = [r for r in nb if "error" not in r]
        occ = min((r["occupancy"] for r in ok), default=0.0)
        flagged = sum(bool(r.get("problems") or r.get("error")) for r in nb)
        lines += [
            f"Attention at the notebook shape (dh 64, no statistics gradient; fp16, bf16, fp32 and TF32 launches, "
            f"forward and backward): {len(nb)} configs, lowest occupancy {occ:.2f}, {flagged} flagged.",
            "",
        ]
    lines += [
        "| module | kernel config | warps | stages | regs | local B | shared B | blocks/SM | occ. | limit | problems |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['module']} | {r['name']} | {r['num_warps']} | {r['num_stages']} | | | | | | | "
                         f"{r['error']} |")
            continue
        lines.append(
            f"| {r['module']} | {r['name']} | {r['num_warps']} | {r['num_stages']} | {r['regs']} | "
            f"{r['local_bytes'] + r['stack_bytes']} | {r['shared']} | {r['blocks_per_sm']} | {r['occupancy']:.2f} | "
            f"{r['limited_by']} | {'; '.join(r['problems'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help="tape_kernels submodules (default: all)")
    ap.add_argument("--cc", type=int, default=86, help="compute capability, e.g. 86 or 90")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--md", help="write a markdown table here")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any config is flagged")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = report(args.cc, args.modules or None, verbose=not args.quiet, jobs=max(1, args.jobs))
    for path, text in ((args.out, json.dumps(rows, indent=1)), (args.md, to_markdown(rows, args.cc))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + ("\n" if path == args.out else ""))
    flagged = [r for r in rows if r.get("problems") or r.get("error")]
    print(f"kernel report sm_{args.cc}: {len(rows)} configs, {len(flagged)} flagged", file=sys.stderr)
    return 1 if (flagged and args.fail_on_spill) else 0


if __name__ == "__main__":
    raise SystemExit(main())
