#!/usr/bin/env bash
# Issue 16 on a CUDA machine, one command (~6 minutes): build the int8 extension for this device,
# check the fused decode kernels and the int8 GEMV against their references (pytest -m gpu), then
# measure (benchmarks/gpu_decode_bench.py, ≤ 3 minutes). Results: $OUT/decode-bench.json (when OUT
# is set) and benchmarks/results/<date>-decode-<device>.json; the log beside them.
#
#   bash benchmarks/gpu_decode_check.sh
#
# Environment: PYTHON (default python3), OUT, DECODE_SKIP_BUILD=1 (extension already built in place).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
[[ -d $ROOT/benchmarks/.pydeps/test ]] && export PYTHONPATH=$PYTHONPATH:$ROOT/benchmarks/.pydeps/test
[[ -d $ROOT/benchmarks/.pydeps/build ]] && export PYTHONPATH=$PYTHONPATH:$ROOT/benchmarks/.pydeps/build
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export TRITON_CACHE_DIR=$ROOT/benchmarks/.triton_cache/triton MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$TRITON_CACHE_DIR" benchmarks/results
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')") &&
        export TORCH_CUDA_ARCH_LIST=$arch
fi
FAILED=()
T0=$(date +%s)
say() { echo "[decode-check $(($(date +%s) - T0))s] $*"; }
if [[ "${DECODE_SKIP_BUILD:-0}" != 1 ]]; then
    say "build the extension (sm_${TORCH_CUDA_ARCH_LIST:-?})"
    timeout 150 "$PY" setup.py build_ext --inplace >/tmp/decode-build.log 2>&1 || { FAILED+=(build); tail -30 /tmp/decode-build.log; }
fi
say "correctness: fused decode kernels, int8 GEMV, model decode (pytest -m gpu)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_block.py tests/test_int8_gemv_gpu.py \
    tests/test_model_gpu.py tests/test_sampling.py -x || FAILED+=(tests)
say "measure"
stamp=$(date -u +%Y-%m-%d)
dev=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
res=benchmarks/results/$stamp-decode-$dev.json
timeout 200 "$PY" benchmarks/gpu_decode_bench.py --out "$res" --budget-s 150 2>&1 | tee "${res%.json}.log" ||
    FAILED+=(bench)
[[ -n "${OUT:-}" ]] && cp "$res" "$OUT/decode-bench.json" && cp "${res%.json}.log" "$OUT/decode-bench.log"
if ((${#FAILED[@]})); then
    say "done with failures: ${FAILED[*]}"
    exit 1
fi
say "done: $res"
