# Set-up is idempotent: every target that needs the environment depends on $(STAMP).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
# Empty: the Triton pip picks with torch (the release the torch wheel pins, else the newest). CI pins it
# for the torch==2.13.0 pass to the one the newest torch pins, so both passes run the same Triton.
TRITON_SPEC ?=
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
NVCC ?= nvcc
PYTEST_ARGS ?=
# Test workers: both cores of the CI machine (pytest-xdist); TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2
# make test's budget on the 2-core CI machine (seconds); .ci/run fails a run over TEST_BUDGET_S * 1.2.
# The goal is 600 s (issue 26); the suite is not there yet (~920 s estimated from its CPU time on two
# cores), so the budget is set where the suite stands, to stop it growing, until the tests are shrunk.
TEST_BUDGET_S ?= 900

.PHONY: setup test demo bench bench-cpu lint aot cuda-check gpu-check kernel-report clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TRITON_SPEC),"$(TRITON_SPEC)")
	$(PIP) install -q -e '.[test]' --no-build-isolation
	$(PY) -c "import torch, tape_kernels.int8 as q; print('torch', torch.__version__); print(q.extension_info())"
	touch $(STAMP)

# --dist loadfile keeps a file's tests in one worker, so module fixtures (trained models, compiles) are
# built once; the slowest 25 tests are printed so that the budget is kept on purpose.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=25 $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/tapetransformer demo

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-json=benchmarks/results/bench-cpu.json $(PYTEST_ARGS)

# Every CPU figure the README quotes, in one session on a quiet machine (~40 min); BEFORE=REV adds
# the same measurements on an older commit, back to back.
bench-cpu: $(STAMP)
	bash benchmarks/cpu_suite.sh $(if $(BEFORE),--before $(BEFORE))

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Ahead-of-time compile of every Triton kernel for sm_86 and sm_90 (no GPU needed).
aot: $(STAMP)
	env -u TRITON_INTERPRET TRITON_CACHE_DIR=$$(mktemp -d) $(PY) -m tape_kernels._aot

# Every .cu file must compile for sm_86 and sm_90 (no GPU needed).
cuda-check: $(STAMP)
	@set -e; n=0; for f in csrc/*.cu; do [ -e "$$f" ] || continue; n=$$((n+1)); \
	  echo "nvcc $$f (sm_86, sm_90)"; \
	  $(NVCC) -std=c++20 -O3 -c "$$f" -o /dev/null -Icsrc \
	    -gencode arch=compute_86,code=sm_86 -gencode arch=compute_90,code=sm_90; \
	done; echo "cuda-check: $$n .cu file(s) compiled"

gpu-check:
	bash benchmarks/gpu_check.sh

# Registers, spills, shared memory and occupancy of every kernel config on sm_86 (no GPU needed).
kernel-report: $(STAMP)
	env -u TRITON_INTERPRET $(PY) benchmarks/kernel_report.py --cc 86 --md benchmarks/results/kernels-sm_86.md

clean:
	rm -rf build *.egg-info tape_kernels/*.so .pytest_cache
