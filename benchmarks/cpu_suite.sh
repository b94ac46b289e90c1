#!/usr/bin/env bash
# make bench-cpu: every CPU figure the README quotes, measured in one session (run it on a quiet
# machine: nothing else running; ~40 minutes on 2 cores).
#
#   bash benchmarks/cpu_suite.sh [--before REV] [--only STEP,...]
#
# Steps (results into benchmarks/results/, raw files into benchmarks/.cpu_suite/):
#   native   benchmarks/native_decode_bench.py, threads 1 and 2: ms/token of the reference's cached
#            loop, the model's own decode and the native step (fp32, W8A8, weight-only int8), prefill,
#            dispatches per token, where the time goes -> <date>-cpu-native-decode.json
#   attrib   pytest benchmarks (generation and training step attribution a/b/c/d at the notebook's
#            size, int8 linears) -> collect_results.py -> <date>-cpu-<model>.json/.md
#   compile  benchmarks/cpu_train_compile.py (notebook and small: reference, fused eager, compiled;
#            cold and warm first compiled step) -> <date>-cpu-train-compile.json/.md
#   before   with --before REV: benchmarks/before_after_cpu.py on REV's tree (its extension built in
#            place there) and on this one, back to back -> <date>-cpu-before-after.json
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DATE=$(date -u +%Y-%m-%d)
RAW=$ROOT/benchmarks/.cpu_suite
OUT=$ROOT/benchmarks/results
BEFORE=""
ONLY="native,attrib,compile,before"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --before) BEFORE=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) echo "cpu_suite: unknown argument $1" >&2; exit 2 ;;
    esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
mkdir -p "$RAW" "$OUT"
FAILED=()
run() {  # name, command...
    local name=$1; shift
    echo "[cpu-suite $(date -u +%H:%M:%S)] $name: $*"
    "$@" || FAILED+=("$name")
}
echo "[cpu-suite] $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $($PY -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())')"

if want native; then
    run native "$PY" benchmarks/native_decode_bench.py --threads 1 2 --out "$OUT/$DATE-cpu-native-decode.json"
fi
if want attrib; then
    run attrib env TK_BENCH_CPU_FULL=1 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_generate.py \
        benchmarks/test_bench_model.py benchmarks/test_bench_int8.py --benchmark-only \
        --benchmark-json="$RAW/attrib.json"
    run collect "$PY" benchmarks/collect_results.py "$RAW/attrib.json" --out-dir "$OUT"
fi
if want compile; then
    run compile "$PY" benchmarks/cpu_train_compile.py --configs notebook small --out "$OUT"
fi
if want before && [[ -n "$BEFORE" ]]; then
    tree="$RAW/before-tree"
    rm -rf "$tree"; git worktree prune
    if git worktree add -q --detach "$tree" "$BEFORE"; then
        # its own extension, built in place for this torch (its bindings may differ from ours)
        (cd "$tree" && "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1) || echo "[cpu-suite] before: no extension built"
        run before env PYTHONPATH="$tree:$tree/python" "$PY" benchmarks/before_after_cpu.py --label "before $BEFORE" \
            --out "$RAW/before.json"
        run after env PYTHONPATH="$ROOT:$ROOT/python" "$PY" benchmarks/before_after_cpu.py \
            --label "after $(git rev-parse --short HEAD)" --out "$RAW/after.json"
        "$PY" - "$RAW/before.json" "$RAW/after.json" "$OUT/$DATE-cpu-before-after.json" <<'EOF'
import json, sys
b, a = (json.load(open(p)) for p in sys.argv[1:3])
keys = [k for k in a if k.endswith(("_ms", "_ms_per_token"))]
out = {"before": b, "after": a, "speedup": {k: b[k] / a[k] for k in keys if k in b and a[k]}}
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(json.dumps(out["speedup"]))
EOF
        git worktree remove --force "$tree"
    else
        FAILED+=("before")
    fi
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "[cpu-suite] failed: ${FAILED[*]}"
    exit 1
fi
echo "[cpu-suite] done"
