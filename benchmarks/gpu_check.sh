#!/usr/bin/env bash
# make gpu-check: every GPU figure of this package from one call on a CUDA machine, in ~6 minutes.
#
#   bash benchmarks/gpu_check.sh                  # on the CUDA machine (no network, system python3)
#   bash benchmarks/gpu_check.sh --prepare-deps   # here: copy the pure-Python test stack (pytest,
#                                                 # pytest-benchmark, hypothesis, setuptools) from
#                                                 # .venv into benchmarks/.pydeps, for a machine that lacks it
#
# Steps, each under its own `timeout` and all inside one time budget (GPU_CHECK_BUDGET_S, default
# 350 s), printing progress; a failed step does not stop the later ones, but the script exits
# non-zero at the end when any failed:
#   1. environment (nvidia-smi, versions)   2. build the extension in place (setup.py build_ext)
#   3. pytest -m gpu (compiled kernels vs eager, fp16/bf16, memory assertions); "no tests collected"
#      (pytest exit 5) and a run where every test skipped count as failures
#   4. the benchmark suite, one pytest per benchmarks/test_bench_*.py (a CUDA fault in one file
#      cannot spoil the others), torch.compile cases left out
#   5. cold- and warm-start time of the first training step (benchmarks/cold_warm_start.py)
#   6. the torch.compile benchmark cases (-k compile: the slowest step, so it goes last)
#   7. benchmarks/collect_results.py: <date>-<device>.json and .md into $OUT (when set) and
#      benchmarks/results/
# Triton's kernel cache and autotune results persist in benchmarks/.triton_cache
# (TRITON_CACHE_DIR, TRITON_CACHE_AUTOTUNING=1), inductor's in benchmarks/.triton_cache/inductor.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, OUT, GPU_CHECK_SKIP (comma list of
# step names to leave out, e.g. "build,bench-compile"), GPU_CHECK_ONLY (comma list: run only these
# steps), GPU_CHECK_RAW_DIR (where the raw outputs go, default benchmarks/.gpu_check),
# GPU_CHECK_ALLOW_CPU=1 (run the pipeline without CUDA: a dry run of this script, not a GPU check;
# it still exits non-zero).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PY=${PYTHON:-python3}
PYDEPS=${GPU_CHECK_PYDEPS:-$ROOT/benchmarks/.pydeps}

if [[ "${1:-}" == "--prepare-deps" ]]; then
    site=$(ls -d "$ROOT"/.venv/lib/python3*/site-packages | head -1)
    [[ -d "$site" ]] || { echo "no .venv site-packages to copy from" >&2; exit 1; }
    rm -rf "$PYDEPS"; mkdir -p "$PYDEPS/test" "$PYDEPS/build"
    (cd "$site" && cp -r pytest _pytest py.py pluggy iniconfig packaging pygments pytest_benchmark cpuinfo \
        hypothesis _hypothesis_*.py sortedcontainers \
        pytest-*.dist-info pluggy-*.dist-info iniconfig-*.dist-info packaging-*.dist-info pygments-*.dist-info \
        pytest_benchmark-*.dist-info py_cpuinfo*.dist-info hypothesis-*.dist-info sortedcontainers-*.dist-info \
        "$PYDEPS/test/") || exit 1
    (cd "$site" && cp -r setuptools _distutils_hack setuptools-*.dist-info "$PYDEPS/build/") || exit 1
    find "$PYDEPS" -name __pycache__ -prune -exec rm -rf {} +
    echo "$PYDEPS: $(du -sh "$PYDEPS" | cut -f1) (carry it to the device machine)"
    exit 0
fi

BUDGET=${GPU_CHECK_BUDGET_S:-350}
RESERVE=25 # seconds kept back for collecting the results
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
FAILED=()
DRY_RUN=
echo "[gpu-check   0s] tape-kernels gpu-check, budget ${BUDGET}s"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
        echo "gpu-check: no CUDA device (torch.cuda.is_available() is False for $PY, or torch is missing)."
        echo "gpu-check: nothing is measured without a GPU; exiting non-zero."
        exit 2
    fi
    echo "gpu-check: no CUDA device, GPU_CHECK_ALLOW_CPU=1: dry run of the pipeline on CPU (no GPU figure)"
    FAILED+=("no-cuda(dry run)")
    DRY_RUN=1
fi
# Raw files stay out of $OUT (the device tool brings back at most 8 files): they travel as one tarball.
RAW=${GPU_CHECK_RAW_DIR:-$ROOT/benchmarks/.gpu_check}/$STAMP
mkdir -p "$RAW"
STEPS=$RAW/steps.tsv
: >"$STEPS"
exec > >(tee -a "$RAW/gpu_check.log") 2>&1
TEE_PID=$!
# Let tee write everything out before the script's exit status reaches the caller.
trap 'exec >&- 2>&-; wait $TEE_PID 2>/dev/null' EXIT

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu-check $(printf '%3d' "$(elapsed)")s] $*"; }

# step NAME CAP_SECONDS CMD...: run CMD under min(CAP, what is left of the budget).
step() {
    local name=$1 cap=$2
    shift 2
    if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]] ||
        [[ -n "${GPU_CHECK_ONLY:-}" && ",${GPU_CHECK_ONLY}," != *",$name,"* ]]; then
        say "SKIP $name: named in GPU_CHECK_SKIP, or not in GPU_CHECK_ONLY"
        printf '%s\t%s\t%s\n' "$name" -1 0 >>"$STEPS"
        return
    fi
    local left=$((BUDGET - $(elapsed) - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        say "SKIP $name: time budget spent"
        printf '%s\t%s\t%s\n' "$name" 124 0 >>"$STEPS"
        FAILED+=("$name(no time)")
        return
    fi
    say ">>> $name (limit ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    local dt=$(($(date +%s) - t0))
    # pytest's 5 = no tests collected (a -m/-k that selects nothing, a renamed marker): nothing was
    # checked or measured, so it is a failure like any other.
    ((rc == 5)) && say "!!! $name: pytest collected no tests (exit 5)"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$STEPS"
    if ((rc == 0)); then
        say "<<< $name ok (${dt}s)"
    else
        [[ $rc == 124 || $rc == 137 ]] && say "<<< $name TIMED OUT after ${dt}s" || say "<<< $name FAILED rc=$rc (${dt}s)"
        FAILED+=("$name")
    fi
}

say "raw output in $RAW"
# The package from this tree (extension built in place), never an installed copy.
export PYTHONPATH=$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import pytest, pytest_benchmark, hypothesis" 2>/dev/null && [[ -d $PYDEPS/test ]]; then
    say "pytest/pytest-benchmark/hypothesis missing from $PY: using benchmarks/.pydeps/test"
    export PYTHONPATH=$PYTHONPATH:$PYDEPS/test
fi
if ! "$PY" -c "import setuptools" 2>/dev/null && [[ -d $PYDEPS/build ]]; then
    say "setuptools missing from $PY: using benchmarks/.pydeps/build"
    export PYTHONPATH=$PYTHONPATH:$PYDEPS/build
fi
# Compiled kernels, not the interpreter (tests/conftest.py only sets it when unset).
export TRITON_INTERPRET=0
export TRITON_CACHE_DIR=$ROOT/benchmarks/.triton_cache/triton
export TORCHINDUCTOR_CACHE_DIR=$ROOT/benchmarks/.triton_cache/inductor
export TRITON_CACHE_AUTOTUNING=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
# Build the extension for this device only: one gencode instead of three.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null) &&
        export TORCH_CUDA_ARCH_LIST=$arch
fi

envinfo() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    "$PY" - <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from common import env_info
print(json.dumps(env_info()))
for mod in ("pytest", "pytest_benchmark", "hypothesis", "setuptools", "ninja"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"{mod} MISSING")
EOF
    command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not found (the extension builds CPU-only)"
}

export -f envinfo

BENCH_OPTS=(-q -p no:cacheprovider --benchmark-only --benchmark-warmup=on --benchmark-warmup-iterations=3
    --benchmark-min-rounds=5 --benchmark-max-time=0.25 --benchmark-disable-gc
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name)

step env 30 bash -c envinfo
step build 120 "$PY" setup.py build_ext --inplace
# One config per attention kernel here (TAPE_KERNELS_ATTN_AUTOTUNE=0): correctness does not need the
# autotuner, whose every config would be compiled first; the benchmarks below autotune.
# pytest-xdist, where installed, spreads the tests (and their Triton compiles) over 4 processes.
XDIST=()  # GPU_CHECK_JOBS: pytest-xdist workers for the gpu tests (4; 1 runs in one process)
(( ${GPU_CHECK_JOBS:-4} > 1 )) && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_JOBS:-4}")
step tests-gpu 150 env TAPE_KERNELS_ATTN_AUTOTUNE=0 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfEs \
    --durations=8 --junitxml="$RAW/tests-gpu.xml" "${XDIST[@]}"
# A run in which every gpu test skipped (CUDA unseen by pytest, a missing fixture) passes in pytest's
# eyes but checked nothing: count what ran from the JUnit report.
step tests-gpu-ran 10 "$PY" benchmarks/junit_ran.py "$RAW/tests-gpu.xml"
# The model file first (the training step and the 8 GiB claim), then generation, then the ops; any
# file not named here runs last.
ORDER="model generate attention charrnn int8 train fused_ops"
for f in $(for g in $ORDER; do echo benchmarks/test_bench_$g.py; done; ls benchmarks/test_bench_*.py |
    grep -v -E "test_bench_($(echo $ORDER | tr ' ' '|'))\.py"); do
    [[ -e $f ]] || continue
    g=$(basename "$f" .py)
    g=${g#test_bench_}
    # The partial file (rewritten after every test) keeps the figures of a step killed at its limit.
    step "bench-$g" "$([[ $g == model ]] && echo 100 || echo 80)" env TK_BENCH_PARTIAL_JSON="$RAW/bench-$g.partial.json" \
        "$PY" -m pytest "$f" "${BENCH_OPTS[@]}" -k "not compile" --benchmark-json="$RAW/bench-$g.json"
done
# The two child processes share what the step may use, less the parent's own start-up.
cw_left=$((BUDGET - $(elapsed) - RESERVE))
cw_child=$(((cw_left < 100 ? cw_left : 100) - 8))
step cold-warm 100 "$PY" benchmarks/cold_warm_start.py --impl auto --timeout $((cw_child > 10 ? cw_child : 10)) \
    --out "$RAW/cold_warm.json"
# In the benchmark order above: the training step's compile case first (a headline goal); the
# attention cases alone took ~100 s of compiling on an H200.
COMPILE_FILES=()
for g in $ORDER; do [[ -e benchmarks/test_bench_$g.py ]] && COMPILE_FILES+=("benchmarks/test_bench_$g.py"); done
step bench-compile 120 env TK_BENCH_PARTIAL_JSON="$RAW/bench-compile.partial.json" \
    "$PY" -m pytest "${COMPILE_FILES[@]}" "${BENCH_OPTS[@]}" -k compile --benchmark-json="$RAW/bench-compile.json"

# A finished step's own JSON supersedes its partial file.
for p in "$RAW"/bench-*.partial.json; do
    [[ -e $p && -e ${p%.partial.json}.json ]] && rm -f "$p"
done

say ">>> collect"
outs=(--out-dir "$ROOT/benchmarks/results")
[[ -n "${OUT:-}" ]] && outs=(--out-dir "$OUT" "${outs[@]}")
# A CPU dry run keeps its (non-GPU) tables out of benchmarks/results.
[[ -n $DRY_RUN ]] && outs=(--out-dir "${OUT:-$RAW}")
shopt -s nullglob
first=()
[[ -e $RAW/cold_warm.json ]] && first=(--first-step "$RAW/cold_warm.json")
timeout 60 "$PY" benchmarks/collect_results.py "$RAW"/bench-*.json "${first[@]}" --steps "$STEPS" "${outs[@]}" ||
    FAILED+=("collect")

if [[ -n "${OUT:-}" ]]; then
    cp "$RAW/gpu_check.log" "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu-check-raw.tar.gz" -C "$(dirname "$RAW")" "$(basename "$RAW")" || FAILED+=("tar")
fi
if ((${#FAILED[@]})); then
    say "gpu-check finished in $(elapsed)s with failures: ${FAILED[*]}"
    exit 1
fi
say "gpu-check finished in $(elapsed)s: all steps ok"
