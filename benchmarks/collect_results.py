"""Turn pytest-benchmark JSON files into the results file and its markdown table.

    python benchmarks/collect_results.py bench-main.json [bench-compile.json ...]
        [--first-step cold_warm.json] [--steps steps.tsv] [--out-dir DIR ...]

Writes ``<date>-<device>.json`` and ``<date>-<device>.md`` into every ``--out-dir`` (default:
``$OUT`` when set, and ``benchmarks/results/``). The JSON holds ``device`` (the GPU, or ``cpu <CPU
model>``), ``torch``, ``triton``, ``cuda``, ``date``, ``env`` (host CPU, versions) and ``results``:
one row per (group, case)::

    {group, name, eager_ms, compile_ms, fused_ms, peak_mem_mb, extra}

Each benchmark has an ``impl`` and may name its ``role`` (``eager``, ``fused`` or ``compile``; an impl
named ``eager``/``compile``/``fused`` has that role). ``<role>_ms`` is the pytest-benchmark median of
the fastest impl of that role (``extra["<role>_impl"]`` names it when several compete or the name
differs): for the model rows ``eager_ms`` = the reference, ``fused_ms`` = the fastest fused path,
``compile_ms`` = the best torch.compile mode. Every impl not named after a role appears in
``extra`` as ``<impl>_ms``, with speed ratios (``<impl>_speedup_vs_<base>`` = base ms / impl ms,
base = the eager-role impl, else ``fp16``, else ``fp32``; ``fused_speedup_vs_eager``,
``fused_speedup_vs_compile`` from the row's role times), ``compile_s`` and every other
``extra_info`` key: per-variant figures (``ms_per_token``, ``tokens_per_s``, ``prefill_ms``,
``capture_ms``, ``compile_s`` ...) as ``<impl>_<key>``; for impls named after a role, a key shared
with one value stays plain. ``peak_mem_mb`` is the peak of the fused pick, else compile, else
eager, else the first other impl that recorded one; each impl's own peak is in ``extra`` as
``<impl>_peak_mem_mb`` when the row has more than one.

Benchmarks that record ``attribution`` (a = reference, b = fused model with eager ops, c = fused
model with Triton kernels, d = torch.compile of b; ``cuda_graph`` marks e, a CUDA-graph replay) and
``precision`` give the row ``extra["attribution"]``: per precision, the fastest impl of each letter
and the ratios ``package_vs_reference`` (a / fastest of b, c: what a user gains), ``kernels`` (b / c,
launch by launch), ``kernels_with_graphs`` (b / c, both graph-replayed), ``kernels_vs_compile``
(d / c, each side's best) and ``graphs`` (c / c+graph), measured in ``ms_per_token`` when every
attributed impl of the row has it (generation), else in ms per call.

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


# Per-variant figures: always ``<impl>_<key>`` in a row's extra for impls not named after a role.
PER_IMPL_KEYS = frozenset(["ms_per_token", "tokens_per_s", "prefill_ms", "capture_ms", "compile_s", "cuda_graph",
                           "compile_backend", "graph_breaks", "amp"])  # fmt: skip
# What each attribution ratio measures (the markdown legend; README wording).
RATIOS = {
    "package_vs_reference": "(a) / fastest of (b), (c): what a user gains over the notebook's module",
    "kernels": ("(b) / (c), launch by launch: what the Triton kernels (on CPU: the native step) add over the same "
                "dataflow in PyTorch ops"),
    "kernels_with_graphs": "(b) / (c), both replayed from a CUDA graph",
    "kernels_vs_compile": "(d) / (c), each side's fastest: the kernels against torch.compile of (b)",
    "graphs": "(c) / (c) replayed from a CUDA graph: what the graph adds",
}


def _entry(b: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
    info = dict(b.get("extra_info") or {})
    group = str(b.get("group") or info.get("group") or _group_from_file(b) or "other")
    info.pop("group", None)
    impl = str(info.pop("impl", None) or "eager")
    info.pop("case", None)
    role = info.pop("role", None) or (impl if impl in MAIN_IMPLS else None)
    stats = b.get("stats") or {}
    median = stats.get("median")
    entry = {
        "ms": None if median is None else median * 1e3,
        "iqr_ms": None if stats.get("iqr") is None else stats["iqr"] * 1e3,
        "rounds": stats.get("rounds"),
        "peak_mem_mb": info.pop("peak_mem_mb", None),
        "role": role,
        "attribution": info.pop("attribution", None),
        "precision": info.get("precision"),
        "cuda_graph": bool(info.get("cuda_graph", False)),
        "info": info,
        "test": b.get("fullname") or b.get("name"),
    }
    return group, _case_of(b), impl, entry


def _fastest(impls: dict[str, dict[str, Any]], names: list[str], key: str = "ms") -> str | None:
    timed = [n for n in names if impls[n][key] is not None]
    return min(timed, key=lambda n: impls[n][key]) if timed else None


def attribution(impls: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The attribution block of a row (see the module docstring), or None without attributed impls."""
    att = {n: e for n, e in impls.items() if e["attribution"]}
    if not att:
        return None
    per_token = all(e["info"].get("ms_per_token") is not None for e in att.values())
    metric = "ms_per_token" if per_token else "ms"
    for e in att.values():
        e["value"] = e["info"].get("ms_per_token") if per_token else e["ms"]

    def pick(names: list[str]) -> dict[str, Any] | None:
        best = _fastest(att, names, "value")
        if best is None:
            return None
        out = {"impl": best, "value": _sig(att[best]["value"])}
        backend = att[best]["info"].get("compile_backend")
        if backend not in (None, "inductor"):  # Dynamo without code generation: a tooling test, not a figure
            out["compile_backend"] = backend
        if att[best]["info"].get("graph_breaks") is not None:
            out["graph_breaks"] = att[best]["info"]["graph_breaks"]
        return out

    out: dict[str, Any] = {"metric": metric, "by_precision": {}}
    ref_fp32 = None
    precisions = list(dict.fromkeys(str(e["precision"]) for e in att.values()))
    for prec in precisions:
        mine = [n for n, e in att.items() if str(e["precision"]) == prec]

        def of(letter: str, graph: bool | None = None, mine: list[str] = mine) -> list[str]:
            return [n for n in mine
                    if att[n]["attribution"] == letter and (graph is None or att[n]["cuda_graph"] == graph)]

        cols = {
            "a": pick(of("a")),
            "b": pick(of("b", False)),
            "b+graph": pick(of("b", True)),
            "c": pick(of("c", False)),
            "c+graph": pick(of("c", True)),
            "d": pick(of("d")),
        }
        fused = pick(of("b") + of("c"))
        c_best = pick(of("c"))

        def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
            if not num or not den or not num["value"] or not den["value"]:
                return None
            return _sig(num["value"] / den["value"], 3)

        ratios = {
            "package_vs_reference": ratio(cols["a"], fused),
            "kernels": ratio(cols["b"], cols["c"]),
            "kernels_with_graphs": ratio(cols["b+graph"], cols["c+graph"]),
            "kernels_vs_compile": ratio(cols["d"], c_best),
            "graphs": ratio(cols["c"], cols["c+graph"]),
        }
        block = {k: v for k, v in cols.items() if v is not None}
        block["fastest_fused"] = fused
        block["ratios"] = {k: v for k, v in ratios.items() if v is not None}
        out["by_precision"][prec] = block
        if prec == "fp32":
            ref_fp32 = cols["a"]
    # Quantized or half-precision generation against the fp32 reference: labelled, it includes the precision.
    for block in out["by_precision"].values():
        fastest = block.get("fastest_fused")
        if "a" not in block and ref_fp32 is not None and fastest and fastest["value"] and ref_fp32["value"]:
            block["ratios"]["package_vs_reference_fp32"] = _sig(ref_fp32["value"] / fastest["value"], 3)
    return out


def build_rows(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group benchmark entries into one row per (group, case)."""
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for b in benches:
        group, case, impl, entry = _entry(b)
        by_key.setdefault((group, case), {})[impl] = entry

    rows = []
    for (group, case), impls in by_key.items():
        row: dict[str, Any] = {"group": group, "name": case}
        extra: dict[str, Any] = {}
        picks: dict[str, str | None] = {}
        for role in MAIN_IMPLS:
            picks[role] = _fastest(impls, [i for i, e in impls.items() if e["role"] == role])
            if picks[role] is None and any(e["role"] == role for e in impls.values()):
                picks[role] = next(i for i, e in impls.items() if e["role"] == role)  # untimed, still named
            row[f"{role}_ms"] = _sig(impls[picks[role]]["ms"]) if picks[role] else None
            if picks[role] is not None and picks[role] != role:
                extra[f"{role}_impl"] = picks[role]
        others = [i for i in impls if i not in MAIN_IMPLS]
        for impl in others:
            extra[f"{impl}_ms"] = _sig(impls[impl]["ms"])

        peaks = {i: e["peak_mem_mb"] for i, e in impls.items() if e["peak_mem_mb"] is not None}
        row["peak_mem_mb"] = None
        for impl in [*(picks[r] for r in PEAK_PRIORITY if picks[r]), *others]:
            if impl in peaks:
                row["peak_mem_mb"] = _sig(float(peaks[impl]))
                break
        if len(peaks) > 1:
            for impl, p in peaks.items():
                extra[f"{impl}_peak_mem_mb"] = _sig(float(p))

        # Speed-ups against the eager pick; groups without one (int8) against their fp16/fp32 layer.
        base = picks["eager"] or next((i for i in BASELINES if i in impls), None)
        base_ms = impls[base]["ms"] if base else None
        for impl, e in impls.items():
            if impl != base and base_ms and e["ms"]:
                extra[f"{impl}_speedup_vs_{base}"] = _sig(base_ms / e["ms"], 3)
        f_ms = impls[picks["fused"]]["ms"] if picks["fused"] else None
        for role in ("eager", "compile"):
            r_ms = impls[picks[role]]["ms"] if picks[role] else None
            if f_ms and r_ms:
                extra[f"fused_speedup_vs_{role}"] = _sig(r_ms / f_ms, 3)

        for impl, e in impls.items():
            extra[f"{impl}_iqr_ms"] = _sig(e["iqr_ms"], 3)
            extra[f"{impl}_rounds"] = e["rounds"]
            for k, v in e["info"].items():
                if k == "compile_s" and v is not None:
                    v = _sig(float(v), 3)
                if k in PER_IMPL_KEYS and impl not in MAIN_IMPLS:
                    extra[f"{impl}_{k}"] = v
                # Keys shared by every impl with one value stay plain; otherwise prefix the impl.
                elif k not in extra or extra[k] == v:
                    extra[k] = v
                else:
                    extra[f"{impl}_{k}"] = v
        att = attribution(impls)
        if att is not None:
            extra["attribution"] = att
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
    bits = [f"{role} = {ex[f'{role}_impl']}" for role in MAIN_IMPLS if f"{role}_impl" in ex]
    for k, v in ex.items():
        if k.endswith("_ms") and not k.endswith(("_iqr_ms", "_prefill_ms", "_capture_ms")) and \
                k[: -len("_ms")] not in MAIN_IMPLS:
            bits.append(f"{k[:-3]} {_fmt(v)} ms")
    if "compile_s" in ex:
        bits.append(f"compile {_fmt(ex['compile_s'])} s")
    if "mem_cap_mb" in ex:
        bits.append(f"mem_cap_mb {_fmt(ex['mem_cap_mb'])}")
    # Generation: every variant's per-token latency; training: tokens/s.
    for k, v in ex.items():
        if k.endswith(("ms_per_token", "tokens_per_s")):
            bits.append(f"{k} {_fmt(v)}")
    return "; ".join(bits)


def _hardware(res: dict[str, Any]) -> str:
    """``device``, plus the host CPU when the device is a GPU (it runs every step's Python side)."""
    dev = str(res.get("device") or "unknown device")
    cpu = (res.get("env") or {}).get("cpu")
    if cpu and not dev.startswith("cpu"):
        return f"{dev} (host CPU {cpu})"
    threads = (res.get("env") or {}).get("threads")
    return f"{dev}, {threads} threads" if threads and dev.startswith("cpu") else dev


def _cell(pick: dict[str, Any] | None, show_impl: bool = False) -> str:
    if not pick:
        return "–"
    if not show_impl:
        return _fmt(pick["value"])
    backend = f", backend {pick['compile_backend']}: not a figure" if "compile_backend" in pick else ""
    breaks = f", {pick['graph_breaks']} graph breaks" if pick.get("graph_breaks") else ""
    return f"{_fmt(pick['value'])} ({pick['impl']}{breaks}{backend})"


def attribution_markdown(res: dict[str, Any]) -> list[str]:
    """The attribution table of every row that has one, with what each ratio measures."""
    rows = [(r, p, b) for r in res["results"] if "attribution" in r["extra"]
            for p, b in r["extra"]["attribution"]["by_precision"].items()]  # fmt: skip
    if not rows:
        return []
    lines = [
        "",
        f"Attribution on {_hardware(res)}, each row one precision/autocast on every side, one run "
        "(medians; ms per call, or ms per token for generation):",
        "",
        "| case | precision | metric | (a) reference | (b) fused, eager ops | (c) fused kernels (Triton on CUDA; the "
        "native step on CPU) | (d) torch.compile "
        "of (b), best mode | (e) = (c) + CUDA graph | (b) + CUDA graph | package vs reference | kernels b/c | "
        "kernels vs compiler d/c | graphs c/e |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, prec, b in rows:
        ra = b.get("ratios", {})
        gain = ra.get("package_vs_reference")
        gain_s = _fmt(gain) if gain is not None else (
            f"{_fmt(ra['package_vs_reference_fp32'])} vs fp32 (a)" if "package_vs_reference_fp32" in ra else "–")
        lines.append(
            f"| {r['name']} | {prec} | {r['extra']['attribution']['metric']} | {_cell(b.get('a'))} | "
            f"{_cell(b.get('b'))} | {_cell(b.get('c'))} | {_cell(b.get('d'), True)} | {_cell(b.get('c+graph'))} | "
            f"{_cell(b.get('b+graph'))} | {gain_s} | {_fmt(ra.get('kernels'))} | "
            f"{_fmt(ra.get('kernels_vs_compile'))} | {_fmt(ra.get('graphs'))} |"
        )
    lines += ["", "What each figure measures: (a) `tapetransformer.reference.ReferenceTapeTransformer`, the notebook's "
              "module with all its work (prophet, every critic); (b) the fused model with `backend=\"eager\"`: the "
              "same dead-work skipping as (c), plain PyTorch ops; (c) `backend=\"triton\"` on CUDA; on a CPU, "
              "generation's native step (`tape_kernels._C`, one call per token; training has no (c) on CPU); "
              "(d) `torch.compile` of (b); (e) a CUDA-graph replay. Ratios (× = how many times faster):"]
    lines += [f"- {name}: {what}" for name, what in RATIOS.items()]
    lines.append("- a ratio shown as – needs a variant this run did not have (on CPU: graphs, and (c) for training).")
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    head = ", ".join(f"{k} `{res.get(k)}`" for k in ENV_KEYS)
    lines = [
        f"Measured on {_hardware(res)}: {head}.",
        "",
        "Median ms per call (pytest-benchmark); × = speed-up (eager or compile time / fused time); eager = the "
        "reference, fused = the fastest fused path, compile = the best torch.compile mode where a row has "
        "several (notes name the picks); peak MiB = CUDA peak allocated of the fused pick, else compile, else eager.",
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
    lines += attribution_markdown(res)
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
