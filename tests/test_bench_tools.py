"""The benchmark tooling: collect_results.py on synthetic and real pytest-benchmark JSON, the
helpers in benchmarks/common.py, and gpu_check.sh's behaviour without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import collect_results as cr  # noqa: E402
import common  # noqa: E402

ENV = {"device": "NVIDIA GeForce RTX 3060", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "date": "2026-11-28"}


def _bench(group, name, impl, median_s, case=None, peak=None, **info):
    extra = {"impl": impl, "peak_mem_mb": peak, **info}
    if case is not None:
        extra["case"] = case
    return {
        "group": group,
        "name": name,
        "fullname": f"benchmarks/test_x.py::{name}",
        "extra_info": extra,
        "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 7},
    }


def _child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process, without this xdist worker's variables: pytest-benchmark in a child
    pytest that sees PYTEST_XDIST_WORKER disables itself ("Can't have both --benchmark-only and
    --benchmark-disable")."""
    return {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST")}


def _write(tmp_path, benches, env=ENV, name="b.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"benchmarks": benches, "tape_kernels_env": env}))
    return str(p)


SYNTH = [
    _bench("model", "test_train_step[eager-notebook]", "eager", 0.200, case="notebook-train", peak=900.0),
    _bench("model", "test_train_step[compile-notebook]", "compile", 0.100, case="notebook-train", peak=700.0,
           compile_s=42.123456),
    _bench("model", "test_train_step[fused-notebook]", "fused", 0.050, case="notebook-train", peak=300.0),
    _bench("attention", "test_attn[eager-S128-fwd]", "eager", 0.004, case="S128-fwd", peak=10.0),
    _bench("attention", "test_attn[sdpa-S128-fwd]", "sdpa", 0.002, case="S128-fwd", peak=12.0),
    _bench("int8", "test_int8_layer[fp16-K256]", "fp16", 0.010, case="K256"),
    _bench("int8", "test_int8_layer[int8_wo-K256]", "int8_wo", 0.008, case="K256", weight_bytes=65536),
    _bench("charrnn", "test_charrnn[eager-x]", "eager", 0.3, case="S64", dtype="fp32"),
    _bench("charrnn", "test_charrnn[fused-x]", "fused", 0.1, case="S64", dtype="fp16"),
]


def test_rows_one_per_group_and_case(tmp_path):
    res = cr.build_results([_write(tmp_path, SYNTH)])
    for k, v in ENV.items():
        assert res[k] == v
    keys = [(r["group"], r["name"]) for r in res["results"]]
    assert keys == [("attention", "S128-fwd"), ("charrnn", "S64"), ("int8", "K256"), ("model", "notebook-train")]
    for r in res["results"]:
        assert set(r) == {"group", "name", "eager_ms", "compile_ms", "fused_ms", "peak_mem_mb", "extra"}


def test_model_row_times_ratios_and_peak(tmp_path):
    res = cr.build_results([_write(tmp_path, SYNTH)])
    (row,) = [r for r in res["results"] if r["group"] == "model"]
    assert "train" in row["name"]
    assert (row["eager_ms"], row["compile_ms"], row["fused_ms"]) == (200.0, 100.0, 50.0)
    # fused first: the package's own path stands for the row
    assert row["peak_mem_mb"] == 300.0
    ex = row["extra"]
    assert ex["fused_speedup_vs_eager"] == 4.0
    assert ex["compile_speedup_vs_eager"] == 2.0
    assert ex["fused_speedup_vs_compile"] == 2.0
    assert ex["compile_s"] == 42.1
    assert (ex["eager_peak_mem_mb"], ex["compile_peak_mem_mb"], ex["fused_peak_mem_mb"]) == (900.0, 700.0, 300.0)
    assert ex["fused_rounds"] == 7 and ex["eager_iqr_ms"] == 20.0


def test_other_impls_baselines_and_conflicting_info(tmp_path):
    rows = {r["group"]: r for r in cr.build_results([_write(tmp_path, SYNTH)])["results"]}
    att = rows["attention"]
    assert att["eager_ms"] == 4.0 and att["fused_ms"] is None
    assert att["extra"]["sdpa_ms"] == 2.0 and att["extra"]["sdpa_speedup_vs_eager"] == 2.0
    assert att["peak_mem_mb"] == 10.0  # eager before other impls
    i8 = rows["int8"]
    assert i8["eager_ms"] is None and i8["peak_mem_mb"] is None
    assert i8["extra"]["fp16_ms"] == 10.0 and i8["extra"]["int8_wo_speedup_vs_fp16"] == 1.25
    assert i8["extra"]["weight_bytes"] == 65536
    # a key two impls disagree on keeps both values
    ch = rows["charrnn"]["extra"]
    assert ch["dtype"] == "fp32" and ch["fused_dtype"] == "fp16"


def test_defaults_for_unlabelled_benchmarks(tmp_path):
    b = {"group": None, "name": "test_plain_thing[x1]", "extra_info": {}, "stats": {"median": 0.001}}
    res = cr.build_results([_write(tmp_path, [b])])
    (row,) = res["results"]
    assert (row["group"], row["name"], row["eager_ms"]) == ("other", "plain_thing", 1.0)


def test_group_when_set_after_the_timing(tmp_path):
    # pytest-benchmark records group=None when benchmark.group is set after the timed call
    late = _bench(None, "test_a[x]", "eager", 0.001, case="c")
    late["extra_info"]["group"] = "int8"
    from_file = _bench(None, "test_b[x]", "eager", 0.001, case="d")
    from_file["fullname"] = "benchmarks/test_bench_charrnn.py::test_b[x]"
    res = cr.build_results([_write(tmp_path, [late, from_file])])
    assert [(r["group"], r["name"]) for r in res["results"]] == [("charrnn", "d"), ("int8", "c")]
    assert all("group" not in r["extra"] for r in res["results"])


def test_later_files_merge_and_missing_file_is_noted(tmp_path):
    a = _write(tmp_path, SYNTH[:1], name="a.json")
    b = _write(tmp_path, SYNTH[1:3], name="b.json")
    res = cr.build_results([a, b, str(tmp_path / "absent.json")])
    (row,) = res["results"]
    assert row["fused_ms"] == 50.0 and row["eager_ms"] == 200.0
    assert len(res["problems"]) == 1 and "absent.json" in res["problems"][0]


def test_write_results_files_markdown_steps_first_step(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\t0\t31\ntests-gpu\t1\t100\nbench-compile\t-1\t0\n")
    fs = tmp_path / "cw.json"
    run = {"impl": "fused", "case": "notebook", "cold_first_step_s": 20.5, "warm_first_step_s": 1.25,
           "autotune_files_cold": 3, "autotune_files_new_warm": 0}
    fs.write_text(json.dumps({"runs": [run], "errors": []}))
    res = cr.build_results([_write(tmp_path, SYNTH)], str(fs), str(steps))
    assert res["steps"][1] == {"step": "tests-gpu", "rc": 1, "seconds": 100.0}
    assert res["first_step"]["runs"][0]["warm_first_step_s"] == 1.25
    d1, d2 = tmp_path / "out", tmp_path / "results"
    written = cr.write_results(res, [str(d1), str(d2), str(d1)])
    stem = "2026-11-28-nvidia-geforce-rtx-3060"
    assert sorted(os.path.basename(p) for p in written) == sorted([stem + ".json", stem + ".md"] * 2)
    loaded = json.loads((d2 / f"{stem}.json").read_text())
    assert loaded["results"] == json.loads(json.dumps(res["results"]))
    md = (d1 / f"{stem}.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(res["results"]) + 2  # header, rows, first-step header and row
    assert "| model | notebook-train | 200 | 100 | 50 | 4 | 2 | 300 | compile 42.1 s |" in md
    assert "bench-compile skipped" in md and "tests-gpu rc=1" in md


def test_main_writes_to_out_and_results_dir(tmp_path, monkeypatch):
    out, results = tmp_path / "OUT", tmp_path / "res"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(cr, "RESULTS_DIR", str(results))
    assert cr.main([_write(tmp_path, SYNTH)]) == 0
    assert len(list(out.glob("*.json"))) == 1 and len(list(results.glob("*.md"))) == 1
    # nothing measured: files still written (they carry the step log), but the exit status says so
    assert cr.main([str(tmp_path / "none.json"), "--out-dir", str(tmp_path / "empty")]) == 1


# The attributed model rows as the benchmarks write them (a reference, b fused-eager, c fused-Triton,
# d torch.compile of b, e a CUDA-graph replay), bf16 autocast on every side of the training step.
def _att(name, impl, ms, case, role, letter, precision, graph=False, **info):
    return _bench("model", name, impl, ms, case=case, role=role, attribution=letter, precision=precision,
                  cuda_graph=graph, **info)


ATTRIBUTED = [
    _att("test_train_step[reference-notebook]", "reference", 0.800, "notebook-train", "eager", "a", "bf16",
         peak=2000.0, tokens_per_s=2560.0),
    _att("test_train_step[fused_eager-notebook]", "fused_eager", 0.200, "notebook-train", "fused", "b", "bf16",
         peak=900.0, tokens_per_s=10240.0),
    _att("test_train_step[fused_triton-notebook]", "fused_triton", 0.050, "notebook-train", "fused", "c", "bf16",
         peak=700.0, tokens_per_s=40960.0),
    _att("test_train_step[compile_default-notebook]", "compile_default", 0.100, "notebook-train", "compile", "d",
         "bf16", peak=800.0, compile_s=30.0, compile_backend="inductor"),
    _att("test_train_step[compile_max-autotune-notebook]", "compile_max-autotune", 0.080, "notebook-train",
         "compile", "d", "bf16", peak=850.0, compile_s=90.0, compile_backend="inductor"),
    # generation: whole-call medians (s) and per-token latencies (ms)
    _att("test_generate_engine[reference_fp32]", "reference_fp32", 1.0, "notebook-generate-engine", "eager", "a",
         "fp32", ms_per_token=25.0),
    _att("test_generate_engine[fused_eager_fp32_nograph]", "fused_eager_fp32_nograph", 0.3,
         "notebook-generate-engine", "fused", "b", "fp32", ms_per_token=8.0),
    _att("test_generate_engine[fused_fp32_nograph]", "fused_fp32_nograph", 0.26, "notebook-generate-engine",
         "fused", "c", "fp32", ms_per_token=6.0),
    _att("test_generate_engine[fused_fp32]", "fused_fp32", 0.02, "notebook-generate-engine", "fused", "c", "fp32",
         graph=True, ms_per_token=0.5, capture_ms=30.0),
    _att("test_generate_engine[compile_default_fp32]", "compile_default_fp32", 0.1, "notebook-generate-engine",
         "compile", "d", "fp32", ms_per_token=2.0),
    _att("test_generate_engine[fused_int8]", "fused_int8", 0.015, "notebook-generate-engine", "fused", "c", "int8",
         graph=True, ms_per_token=0.4),
    _att("test_generate_engine[fused_int8_nograph]", "fused_int8_nograph", 0.28, "notebook-generate-engine",
         "fused", "c", "int8", ms_per_token=7.0),
]


def test_attributed_training_row_schema_and_ratios(tmp_path):
    res = cr.build_results([_write(tmp_path, ATTRIBUTED)])
    rows = {r["name"]: r for r in res["results"]}
    tr = rows["notebook-train"]
    assert set(tr) == {"group", "name", "eager_ms", "compile_ms", "fused_ms", "peak_mem_mb", "extra"}
    # eager = the reference, fused = the fastest fused path, compile = the best mode of fused-eager
    assert (tr["group"], tr["eager_ms"], tr["fused_ms"], tr["compile_ms"]) == ("model", 800.0, 50.0, 80.0)
    ex = tr["extra"]
    assert (ex["eager_impl"], ex["fused_impl"], ex["compile_impl"]) == ("reference", "fused_triton",
                                                                       "compile_max-autotune")
    assert tr["peak_mem_mb"] == 700.0  # the fused pick's peak
    for impl in ("reference", "fused_eager", "fused_triton", "compile_default", "compile_max-autotune"):
        assert f"{impl}_ms" in ex and f"{impl}_peak_mem_mb" in ex
    assert ex["fused_triton_tokens_per_s"] == 40960.0 and ex["reference_tokens_per_s"] == 2560.0
    assert ex["compile_default_compile_s"] == 30.0 and ex["compile_max-autotune_compile_s"] == 90.0
    assert ex["fused_speedup_vs_eager"] == 16.0 and ex["fused_speedup_vs_compile"] == 1.6
    att = ex["attribution"]
    assert att["metric"] == "ms" and list(att["by_precision"]) == ["bf16"]
    b = att["by_precision"]["bf16"]
    assert (b["a"]["impl"], b["b"]["impl"], b["c"]["impl"], b["d"]["impl"]) == (
        "reference", "fused_eager", "fused_triton", "compile_max-autotune")
    # package vs reference = a / fastest fused; kernels = b / c; kernels vs compiler = d / c
    assert b["ratios"] == {"package_vs_reference": 16.0, "kernels": 4.0, "kernels_vs_compile": 1.6}


def test_attributed_generation_row_per_token_and_graphs(tmp_path):
    res = cr.build_results([_write(tmp_path, ATTRIBUTED)])
    (gen,) = [r for r in res["results"] if r["name"] == "notebook-generate-engine"]
    ex = gen["extra"]
    assert gen["eager_ms"] == 1000.0 and gen["fused_ms"] == 15.0 and gen["compile_ms"] == 100.0
    for v, ms in (("reference_fp32", 25.0), ("fused_eager_fp32_nograph", 8.0), ("fused_fp32", 0.5),
                  ("fused_int8", 0.4), ("fused_int8_nograph", 7.0), ("compile_default_fp32", 2.0)):
        assert ex[f"{v}_ms_per_token"] == ms, v
    assert ex["fused_fp32_capture_ms"] == 30.0
    att = ex["attribution"]
    assert att["metric"] == "ms_per_token"
    fp32, int8 = att["by_precision"]["fp32"], att["by_precision"]["int8"]
    assert fp32["c"]["impl"] == "fused_fp32_nograph" and fp32["c+graph"]["impl"] == "fused_fp32"
    assert fp32["ratios"] == {"package_vs_reference": 50.0, "kernels": 1.33, "kernels_vs_compile": 4.0,
                              "graphs": 12.0}  # fmt: skip
    # int8 has no reference of its own precision: only the labelled comparison with the fp32 reference
    assert "package_vs_reference" not in int8["ratios"] and int8["ratios"]["package_vs_reference_fp32"] == 62.5
    assert int8["ratios"]["graphs"] == 17.5
    md = cr.to_markdown(res)
    assert "| notebook-generate-engine | fp32 | ms_per_token | 25 | 8 | 6 | 2 (compile_default_fp32) | 0.5 | – | 50 " \
        "| 1.33 | 4 | 12 |" in md
    assert "| notebook-train | bf16 | ms | 800 | 200 | 50 | 80 (compile_max-autotune) | – | – | 16 | 4 | 1.6 " \
        "| – |" in md
    assert "62.5 vs fp32 (a)" in md
    for what in cr.RATIOS.values():
        assert what in md


def test_markdown_names_the_hardware(tmp_path):
    env = dict(ENV, cpu="AMD EPYC 9B14")
    res = cr.build_results([_write(tmp_path, SYNTH, env=env)])
    assert res["env"]["cpu"] == "AMD EPYC 9B14"
    assert cr.to_markdown(res).startswith("Measured on NVIDIA GeForce RTX 3060 (host CPU AMD EPYC 9B14)")
    cpu_env = dict(ENV, device="cpu Intel(R) Xeon(R) Platinum 8481C", cpu="Intel(R) Xeon(R) Platinum 8481C",
                   threads=2)
    res = cr.build_results([_write(tmp_path, SYNTH, env=cpu_env, name="c.json")])
    assert cr.to_markdown(res).startswith("Measured on cpu Intel(R) Xeon(R) Platinum 8481C, 2 threads")
    assert common.device_name("cpu") == f"cpu {common.cpu_model()}" and common.cpu_model()


def test_attributed_benchmarks_on_tiny_models(tmp_path):
    """The model and generation benchmarks end to end on CPU at the tiny size: (a), (b) and (d) (torch.compile
    through Dynamo with the eager backend: tracing, not code generation), collected into one results file
    from which the package-vs-reference ratio is computed and labelled."""
    out = tmp_path / "tiny.json"
    env = {**os.environ, "TK_BENCH_DEVICE": "cpu", "TK_BENCH_CASES": "tiny", "TK_BENCH_COMPILE_BACKEND": "eager"}
    env.pop("TRITON_INTERPRET", None)  # the benchmarks' own setting: fused_triton skips on CPU
    sel = ("(test_train_step and tiny and (reference or fused_eager or compile_default)) or (test_generate_engine "
           "and (reference_fp32 or fused_eager_fp32 or fused_eager_int8 or compile_default_fp32))")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(BENCH_DIR, "test_bench_model.py"),
         os.path.join(BENCH_DIR, "test_bench_generate.py"), "--benchmark-only", "-k", sel,
         f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=_child_env(env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = cr.build_results([str(out)])
    rows = {r["name"]: r for r in res["results"]}
    assert set(rows) == {"tiny-train", "tiny-generate-engine"}
    tr, gen = rows["tiny-train"], rows["tiny-generate-engine"]
    assert tr["group"] == gen["group"] == "model"
    assert tr["eager_ms"] == tr["extra"]["reference_ms"] and tr["fused_ms"] == tr["extra"]["fused_eager_ms"]
    assert tr["compile_ms"] == tr["extra"]["compile_default_ms"] and tr["extra"]["compile_default_compile_s"] > 0
    assert tr["extra"]["reference_tokens_per_s"] > 0 and tr["extra"]["fused_eager_tokens_per_s"] > 0
    b = tr["extra"]["attribution"]["by_precision"]["fp32"]
    assert set(b) >= {"a", "b", "d"} and "c" not in b
    # ratios keep 3 significant digits
    assert b["ratios"]["package_vs_reference"] == pytest.approx(b["a"]["value"] / b["b"]["value"], rel=5e-3)
    assert b["d"]["compile_backend"] == "eager"
    for v in ("reference_fp32", "fused_eager_fp32", "fused_eager_int8", "compile_default_fp32"):
        assert gen["extra"][f"{v}_ms_per_token"] > 0, v
    g = gen["extra"]["attribution"]
    assert g["metric"] == "ms_per_token" and "package_vs_reference" in g["by_precision"]["fp32"]["ratios"]
    assert "package_vs_reference_fp32" in g["by_precision"]["int8"]["ratios"]
    md = cr.to_markdown(res)
    assert "| tiny-train | fp32 | ms |" in md and "backend eager: not a figure" in md


TINY_BENCH = (
    "import os, signal, sys\n"
    "sys.path.insert(0, {bench!r})\n"
    "from common import record\n"
    "import pytest\n"
    "@pytest.mark.parametrize('impl', ['eager', 'fused'])\n"
    "def test_tiny(benchmark, impl):\n"
    "    record(benchmark, group='fused_ops', case='tiny', impl=impl, peak_mem_mb=1.5, compile_s=None)\n"
    "    benchmark.pedantic(sum, args=(range(1000 if impl == 'eager' else 10),), rounds=3)\n"
    "def test_zz_killed():\n"
    "    if os.environ.get('KILL_ME'):\n"
    "        os.kill(os.getpid(), getattr(signal, os.environ['KILL_ME']))\n"
)


def _run_tiny_bench(tmp_path, kill=None):
    """pytest-benchmark on a tiny benchmark file, with benchmarks/conftest.py's hooks."""
    (tmp_path / "test_tiny_bench.py").write_text(TINY_BENCH.format(bench=BENCH_DIR))
    bench_conftest = os.path.join(BENCH_DIR, "conftest.py")
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {BENCH_DIR!r})\nexec(open({bench_conftest!r}).read())\n"
    )
    out, partial = tmp_path / "bench.json", tmp_path / "bench.partial.json"
    env = {**os.environ, "TK_BENCH_PARTIAL_JSON": str(partial), "TK_BENCH_DEVICE": "cpu"}
    if kill:
        env["KILL_ME"] = kill
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_tiny_bench.py"), f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_child_env(env),
    )
    return proc, out, partial


def test_real_pytest_benchmark_json(tmp_path):
    """End to end through pytest-benchmark's own JSON, written by a benchmark that uses common.record."""
    proc, out, partial = _run_tiny_bench(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = cr.build_results([str(out)])
    assert res["device"].startswith("cpu") and res["torch"] == torch.__version__  # from conftest's hook
    (row,) = res["results"]
    assert (row["group"], row["name"], row["peak_mem_mb"]) == ("fused_ops", "tiny", 1.5)
    assert 0 < row["fused_ms"] < row["eager_ms"]
    assert row["extra"]["fused_rounds"] == 3 and "compile_s" not in row["extra"]
    assert cr.build_results([str(partial)])["results"] == res["results"]


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_benchmark_run_keeps_its_figures(tmp_path, sig):
    # SIGKILL: no session finish, only the partial file survives; SIGTERM: pytest finishes the session
    proc, out, partial = _run_tiny_bench(tmp_path, kill=sig)
    assert proc.returncode != 0
    assert out.exists() == (sig == "SIGTERM")
    res = cr.build_results([str(out if sig == "SIGTERM" else partial)])
    (row,) = res["results"]
    assert row["eager_ms"] > 0 and row["fused_ms"] > 0
    assert ("problems" in res) == (sig == "SIGKILL")


def test_common_helpers_on_cpu():
    cpu = torch.device("cpu")
    assert common.peak_memory_mb(lambda: torch.ones(10), cpu) is None
    with pytest.raises(RuntimeError, match="CUDA"):
        with common.memory_cap(cpu):
            pass
    out, s = common.timed_first_call(lambda: 7, cpu)
    assert out == 7 and s >= 0

    class Fake:
        group = None
        extra_info: dict = {}

    f = Fake()
    f.extra_info = {}
    common.record(f, group="model", case="c", impl="fused", peak_mem_mb=None, tokens=3)
    assert f.group == "model"
    assert f.extra_info == {"group": "model", "case": "c", "impl": "fused", "peak_mem_mb": None, "tokens": 3}
    env = common.env_info(cpu)
    assert set(cr.ENV_KEYS) <= set(env) and env["torch"] == torch.__version__


def test_train_step_and_generation_on_a_tiny_model():
    cpu = torch.device("cpu")
    model = common.build_model("tiny", "eager", cpu)
    x, y = common.make_batch("tiny", cpu)
    assert x.shape == y.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    before = model.holistic_embed.weight.detach().clone()
    step = common.make_train_step(model, x, y, lr=1e-2)
    losses = [float(step()) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.holistic_embed.weight)
    prefill, decode = common.make_generate(model, x[:1, :3], 4)
    toks = decode(*prefill())
    assert toks.shape == (1, 4) and not model.training
    assert torch.equal(toks, decode(*prefill()))  # eval, no dropout: deterministic


def test_gpu_check_without_cuda_says_so_and_fails():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        ["bash", os.path.join(BENCH_DIR, "gpu_check.sh")],
        capture_output=True, text=True, timeout=120, env=_child_env({**os.environ, "PYTHON": sys.executable}),
    )
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stdout


def test_gpu_session_without_cuda_says_so_and_fails(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(BENCH_DIR, "gpu_session.sh")], capture_output=True, text=True,
                          timeout=120, env=_child_env(env))  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout
    assert "no CUDA device" in (tmp_path / "session.log").read_text()


def test_gpu_train_bench_smoke_on_a_tiny_model(tmp_path):
    """The issue-15 GPU benchmark's pipeline on CPU (no figures): rows, schema, attribution keys."""
    import gpu_train_bench

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the fused attention case needs the Triton interpreter on CPU")
    out = tmp_path / "train.json"
    assert gpu_train_bench.main(["--tiny", "--no-compile", "--variants", "reference", "fused_eager",
                                 "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    train, attn = doc["results"]
    assert (train["group"], train["name"]) == ("model", "tiny-train")
    assert train["eager_ms"] > 0 and train["fused_ms"] > 0 and train["compile_ms"] is None
    ex = train["extra"]
    assert ex["fused_best"] == "fused_eager" and ex["speedup_vs_reference"] > 0
    assert ex["fused_eager_launches_per_step"] > 0 and ex["reference_first_step_s"] >= 0
    assert ex["skipped"] == [] and doc["note"].startswith("CPU smoke run")
    assert (attn["group"], attn["name"]) == ("attention", "B2-S16-D32-H2-fwdbwd")
    assert attn["eager_ms"] > 0 and attn["fused_ms"] > 0
    assert attn["extra"]["fused_vs_eager"] == round(attn["eager_ms"] / attn["fused_ms"], 2)


def test_gpu_check_fails_when_no_gpu_test_ran(tmp_path):
    """A gpu-test step in which every test skipped (here: no CUDA) is a failure, not a pass."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: its gpu tests would run")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1",
           "GPU_CHECK_ONLY": "tests-gpu,tests-gpu-ran", "GPU_CHECK_RAW_DIR": str(tmp_path / "raw"),
           "GPU_CHECK_JOBS": "1",  # no worker processes to start: every gpu test skips here
           "OUT": str(tmp_path / "out")}  # fmt: skip
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", os.path.join(BENCH_DIR, "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, env=_child_env(env))  # fmt: skip
    assert proc.returncode != 0
    out = proc.stdout
    assert "<<< tests-gpu ok" in out  # pytest itself is content: everything skipped
    assert "0 ran" in out and "<<< tests-gpu-ran FAILED" in out
    assert "with failures:" in out and "tests-gpu-ran" in out.rsplit("with failures:", 1)[1]


def test_junit_ran(tmp_path):
    import junit_ran

    def report(tests, skipped, name):
        p = tmp_path / name
        p.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" skipped="{skipped}" errors="0" '
                     f'failures="0"></testsuite></testsuites>')  # fmt: skip
        return str(p)

    assert junit_ran.main([report(5, 5, "a.xml")]) == 1
    assert junit_ran.main([report(0, 0, "b.xml")]) == 1  # pytest exit 5: nothing collected
    assert junit_ran.main([report(5, 4, "c.xml")]) == 0
    assert junit_ran.main([report(5, 4, "d.xml"), "--min", "2"]) == 1
    assert junit_ran.main([str(tmp_path / "missing.xml")]) == 1


def test_kernel_report_occupancy_math():
    import kernel_report as kr

    # 48 regs x 32 lanes = 1536 per warp (a multiple of 256); 4 warps -> 6144 per block -> 10 blocks
    assert kr.occupancy(86, 48, 4, 0) == {"blocks_per_sm": 10, "occupancy": 0.833, "limited_by": "registers"}
    # 42 regs round up to the same 1536 per warp
    assert kr.occupancy(86, 42, 4, 0)["blocks_per_sm"] == 10
    # 32 regs: 16 blocks by registers, but 1536 threads allow 12 blocks of 128
    assert kr.occupancy(86, 32, 4, 0) == {"blocks_per_sm": 12, "occupancy": 1.0, "limited_by": "threads"}
    # 48 KiB of shared memory (+1 KiB reserved per block): two blocks in sm_86's 100 KiB, four in sm_90's 228 KiB
    assert kr.occupancy(86, 32, 4, 49152)["blocks_per_sm"] == 2
    assert kr.occupancy(90, 32, 4, 49152)["blocks_per_sm"] == 4
    # one-warp blocks without shared memory: the 16-blocks-per-SM limit
    assert kr.occupancy(86, 24, 1, 0) == {"blocks_per_sm": 16, "occupancy": 0.333, "limited_by": "blocks"}
    # 255 regs x 8 warps just fills the 64 K register file; 16 warps do not fit
    assert kr.occupancy(86, 255, 8, 0)["blocks_per_sm"] == 1
    assert kr.occupancy(86, 255, 16, 0)["blocks_per_sm"] == 0


def test_kernel_report_on_sm86_without_gpu(tmp_path):
    import kernel_report as kr

    if kr.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (ships with triton's NVIDIA backend)")
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "kernel_report.py"), "--cc", "86", "activation", "-q",
         "--out", str(out), "--md", str(tmp_path / "r.md")],
        capture_output=True, text=True, timeout=600, env=_child_env(env), cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["cc"] == 86 and "error" not in r for r in rows)
    for r in rows:
        assert 0 < r["regs"] <= 255 and 0 <= r["shared"] <= kr.SM_LIMITS[86]["smem_block"]
        assert 0 < r["occupancy"] <= 1
    assert (tmp_path / "r.md").read_text().count("\n| activation |") == len(rows)


def test_cold_warm_start_smoke(tmp_path):
    out = tmp_path / "cw.json"
    env = {**os.environ, "TK_BENCH_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "cold_warm_start.py"), "--impl", "eager", "--case", "tiny",
         "--cache-root", str(tmp_path / "cache"), "--out", str(out), "--timeout", "300"],
        capture_output=True, text=True, timeout=400, env=_child_env(env),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["impl"], run["case"], run["device"]) == ("eager", "tiny", "cpu")
    assert run["cold_first_step_s"] > 0 and run["warm_first_step_s"] > 0
    assert run["autotune_files_cold"] == run["autotune_files_new_warm"] == 0  # eager: no Triton kernels
    # and the collector shows it
    res = cr.build_results([], str(out), env=ENV)
    assert "| eager | tiny |" in cr.to_markdown(res)


def test_cpu_gemm_rate_products_and_bf16_flags() -> None:
    """Every product of the step at the asked dtype, in the form named (x·Wᵀ, dYᵀ·X, dY·W), and the CPU's
    bf16 flags read as a sorted subset of the three that matter."""
    import cpu_gemm_rate as g

    for name, (m, n, k, form) in g._cases().items():
        if name == "square-2048":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            y = g._product(m, n, k, form, dtype)()
            assert y.shape == (m, n) and y.dtype == dtype, name
    flags = g.cpu_bf16_flags()
    assert flags == sorted(flags) and set(flags) <= {"avx512_bf16", "amx_bf16", "amx_tile"}
