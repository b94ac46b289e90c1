"""Turn pytest-benchmark JSON files into the results file and its markdown table.

    python benchmarks/collect_results.py bench-main.json [bench-compile.json ...]
        [--first-step cold_warm.json] [--steps steps.tsv] [--out-dir DIR ...]

Writes ``<date>-<device>.json`` and ``<date>-<device>.md`` into every ``--out-dir`` (default:
``$OUT`` when set, and ``benchmarks/results/``). The JSON holds ``device``, ``torch``, ``triton``,
``cuda``, ``date`` and ``results``: one row per (group, case)::

    {group, name, eager_ms, compile_ms, fused_ms, peak_mem_mb, extra}

where the ``*_ms`` are pytest-benchmark medians of the benchmarks whose ``extra_info["impl"]`` is
``eager``/``compile``/``fused``; other impls appear in ``extra`` as ``<impl>_ms``, together with
speed ratios (``<impl>_speedup_vs_eager`` = eager_ms / <impl>_ms, ``fused_speedup_vs_compile``; a
row without an eager impl is compared with its ``fp16``, else ``fp32`` impl),
``compile_s`` and every other ``extra_info`` key. ``peak_mem_mb`` is the peak of the fused impl,
else compile, else eager, else the first other impl that recorded one; each impl's own peak is in
``extra`` as ``<impl>_peak_mem_mb`` when the row has more than one.

Benchmarks without ``case`` use their test name (minus ``test_`` and the parameter id); without
``impl`` they count as ``eager``; without ``group`` they take ``extra_info["group"]``, else the
``<group>`` of their ``test_bench_<group>.py`` file, else ``other``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from typing import Any

MAIN_IMPLS = ("eager", "compile", "fused")
# Which impl's peak memory stands for the row: the package's own path first.
PEAK_PRIORITY = ("fused", "compile", "eager")
BASELINES = ("eager", "fp16", "fp32")
GROUP_ORDER = ("attention", "charrnn", "int8", "fused_ops", "model", "train")
ENV_KEYS = ("device", "torch", "triton", "cuda", "date")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sig(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _case_of(bench: dict[str, Any]) -> str:
    info = bench.get("extra_info") or {}
    if info.get("case"):
        return str(info["case"])
    name = str(bench.get("name", "?")).split("[", 1)[0]
    return name[5:] if name.startswith("test_") else name


def _group_from_file(bench: dict[str, Any]) -> str | None:
    m = re.search(r"test_bench_(\w+)\.py::", str(bench.get("fullname", "")))
    return m.group(1) if m else None


def load_benchmarks(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """All benchmark entries of the readable files, the first recorded environment, and problems."""
    benches: list[dict[str, Any]] = []
    env: dict[str, Any] = {}
    problems: list[str] = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if data.get("partial"):
            problems.append(f"{os.path.basename(path)}: partial (its step was stopped at the time limit)")
        if not env and isinstance(data.get("tape_kernels_env"), dict):
            env = dict(data["tape_kernels_env"])
        benches.extend(data.get("benchmarks") or [])
    return benches, env, problems


def build_rows(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group benchmark entries into one row per (group, case)."""
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for b in benches:
        info = dict(b.get("extra_info") or {})
        group = str(b.get("group") or info.get("group") or _group_from_file(b) or "other")
        info.pop("group", None)
        impl = str(info.pop("impl", None) or "eager")
        info.pop("case", None)
        stats = b.get("stats") or {}
        median = stats.get("median")
        entry = {
            "ms": None if median is None else median * 1e3,
            "iqr_ms": None if stats.get("iqr") is None else stats["iqr"] * 1e3,
            "rounds": stats.get("rounds"),
            "peak_mem_mb": info.pop("peak_mem_mb", None),
            "info": info,
            "test": b.get("fullname") or b.get("name"),
        }
        by_key.setdefault((group, _case_of(b)), {})[impl] = entry

    rows = []
    for (group, case), impls in by_key.items():
        row: dict[str, Any] = {"group": group, "name": case}
        extra: dict[str, Any] = {}
        for impl in MAIN_IMPLS:
            row[f"{impl}_ms"] = _sig(impls[impl]["ms"]) if impl in impls else None
        others = [i for i in impls if i not in MAIN_IMPLS]
        for impl in others:
            extra[f"{impl}_ms"] = _sig(impls[impl]["ms"])

        peaks = {i: e["peak_mem_mb"] for i, e in impls.items() if e["peak_mem_mb"] is not None}
        row["peak_mem_mb"] = None
        for impl in [*PEAK_PRIORITY, *others]:
            if impl in peaks:
                row["peak_mem_mb"] = _sig(float(peaks[impl]))
                break
        if len(peaks) > 1:
            for impl, p in peaks.items():
                extra[f"{impl}_peak_mem_mb"] = _sig(float(p))

        # Speed-ups against the eager impl; groups without one (int8) against their fp16/fp32 layer.
        base = next((i for i in BASELINES if i in impls), None)
        base_ms = impls[base]["ms"] if base else None
        for impl, e in impls.items():
            if impl != base and base_ms and e["ms"]:
                extra[f"{impl}_speedup_vs_{base}"] = _sig(base_ms / e["ms"], 3)
        if "fused" in impls and "compile" in impls and impls["fused"]["ms"] and impls["compile"]["ms"]:
            extra["fused_speedup_vs_compile"] = _sig(impls["compile"]["ms"] / impls["fused"]["ms"], 3)

        for impl, e in impls.items():
            extra[f"{impl}_iqr_ms"] = _sig(e["iqr_ms"], 3)
            extra[f"{impl}_rounds"] = e["rounds"]
            for k, v in e["info"].items():
                if k == "compile_s":
                    v = _sig(float(v), 3)
                # Keys shared by every impl with one value stay plain; otherwise prefix the impl.
                if k not in extra or extra[k] == v:
                    extra[k] = v
                else:
                    extra[f"{impl}_{k}"] = v
        row["extra"] = extra
        rows.append(row)

    def order(r: dict[str, Any]) -> tuple[int, str, str]:
        g = r["group"]
        return (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g, r["name"])

    rows.sort(key=order)
    return rows


def _live_env() -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import env_info

    return env_info()


def read_steps(path: str | None) -> list[dict[str, Any]]:
    """``gpu_check.sh``'s step log: one ``name<TAB>rc<TAB>seconds`` line per step."""
    if not path or not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                steps.append({"step": parts[0], "rc": int(parts[1]), "seconds": float(parts[2])})
    return steps


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def build_results(
    bench_paths: list[str],
    first_step_path: str | None = None,
    steps_path: str | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    benches, file_env, problems = load_benchmarks(bench_paths)
    env = dict(env or file_env or _live_env())
    env.setdefault("date", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"))
    out: dict[str, Any] = {k: env.get(k) for k in ENV_KEYS}
    out["env"] = {k: v for k, v in env.items() if k not in ENV_KEYS}
    out["results"] = build_rows(benches)
    if first_step_path:
        try:
            with open(first_step_path) as f:
                out["first_step"] = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{first_step_path}: {type(e).__name__}: {e}")
    steps = read_steps(steps_path)
    if steps:
        out["steps"] = steps
    out["sources"] = [os.path.basename(p) for p in bench_paths]
    if problems:
        out["problems"] = problems
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _notes(row: dict[str, Any]) -> str:
    ex = row["extra"]
    bits = []
    for k, v in ex.items():
        if k.endswith("_ms") and not k.endswith("_iqr_ms") and k[: -len("_ms")] not in MAIN_IMPLS:
            bits.append(f"{k[:-3]} {_fmt(v)} ms")
    if "compile_s" in ex:
        bits.append(f"compile {_fmt(ex['compile_s'])} s")
    if "mem_cap_mb" in ex:
        bits.append(f"mem_cap_mb {_fmt(ex['mem_cap_mb'])}")
    # Generation: every impl's per-token latency (the first impl's key stays unprefixed).
    for k, v in ex.items():
        if k.endswith("ms_per_token"):
            bits.append(f"{k} {_fmt(v)}")
    return "; ".join(bits)


def to_markdown(res: dict[str, Any]) -> str:
    head = ", ".join(f"{k} `{res.get(k)}`" for k in ENV_KEYS)
    lines = [
        f"Measured on {head}.",
        "",
        "Median ms per call (pytest-benchmark); × = speed-up (eager or compile time / fused time); "
        "peak MiB = CUDA peak allocated of the fused impl, else compile, else eager.",
        "",
        "| group | case | eager ms | compile ms | fused ms | fused × eager | fused × compile | peak MiB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["results"]:
        ex = r["extra"]
        lines.append(
            f"| {r['group']} | {r['name']} | {_fmt(r['eager_ms'])} | {_fmt(r['compile_ms'])} | "
            f"{_fmt(r['fused_ms'])} | {_fmt(ex.get('fused_speedup_vs_eager'))} | "
            f"{_fmt(ex.get('fused_speedup_vs_compile'))} | {_fmt(r['peak_mem_mb'])} | {_notes(r)} |"
        )
    fs = res.get("first_step")
    if fs:
        lines += [
            "",
            "First training step of a fresh process (cold = empty Triton/inductor caches, warm = reused):",
            "",
            "| impl | case | cold s | warm s | autotune files (cold / new when warm) |",
            "|---|---|---:|---:|---|",
        ]
        for r in fs.get("runs", []):
            lines.append(
                f"| {r.get('impl')} | {r.get('case')} | {_fmt(r.get('cold_first_step_s'))} | "
                f"{_fmt(r.get('warm_first_step_s'))} | {r.get('autotune_files_cold', '–')} / "
                f"{r.get('autotune_files_new_warm', '–')} |"
            )
    steps = res.get("steps")
    if steps:
        done = ", ".join(
            f"{s['step']} skipped" if s["rc"] < 0 else f"{s['step']} rc={s['rc']} ({s['seconds']:.0f} s)" for s in steps
        )
        lines += ["", f"gpu-check steps: {done}"]
    if res.get("problems"):
        lines += ["", "Problems: " + "; ".join(res["problems"])]
    return "\n".join(lines) + "\n"


def write_results(res: dict[str, Any], out_dirs: list[str]) -> list[str]:
    stem = f"{res.get('date') or 'undated'}-{slug(str(res.get('device') or 'unknown'))}"
    written = []
    for d in dict.fromkeys(out_dirs):  # keep order, drop repeats
        os.makedirs(d, exist_ok=True)
        jp, mp = os.path.join(d, stem + ".json"), os.path.join(d, stem + ".md")
        with open(jp, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(mp, "w") as f:
            f.write(to_markdown(res))
        written += [jp, mp]
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json", nargs="*", help="pytest-benchmark --benchmark-json files (missing ones are noted)")
    ap.add_argument("--first-step", help="cold_warm_start.py JSON")
    ap.add_argument("--steps", help="gpu_check.sh step log (name, rc, seconds per line)")
    ap.add_argument("--out-dir", action="append", help="output folder (repeatable); default: $OUT, benchmarks/results")
    args = ap.parse_args(argv)
    out_dirs = args.out_dir or ([os.environ["OUT"]] if os.environ.get("OUT") else []) + [RESULTS_DIR]
    res = build_results(args.bench_json, args.first_step, args.steps)
    for p in write_results(res, out_dirs):
        print(f"wrote {p}")
    print(to_markdown(res))
    return 0 if res["results"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
