"""Benchmark setup: ``gpu``-marked benchmarks skip without CUDA, a ``device`` fixture, and the
environment (device, torch/triton/CUDA versions, date) written into pytest-benchmark's JSON so
``collect_results.py`` can name the results file after it.

Unlike ``tests/conftest.py`` this does not turn on the Triton interpreter: benchmarks measure
compiled kernels on CUDA, and the fused cases skip on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import env_info, pick_device  # noqa: E402


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# gpu_check.sh stops an overrunning step with `timeout` (SIGTERM): as a KeyboardInterrupt, pytest
# still finishes the session and pytest-benchmark still writes the JSON of what was measured.
signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return pick_device()


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    """With ``TK_BENCH_PARTIAL_JSON`` set, rewrite that file after every test with what has been
    measured so far: a step killed by its time limit (SIGKILL, no session finish) keeps its figures."""
    path = os.environ.get("TK_BENCH_PARTIAL_JSON")
    bs = getattr(_CONFIG, "_benchmarksession", None) if _CONFIG is not None else None
    if not path or bs is None:
        return
    done = []
    for b in bs.benchmarks:
        try:
            done.append(b.as_dict(include_data=False))
        except (ValueError, ArithmeticError):  # started, but no round finished
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        # Parametrized benchmarks carry their params (a torch.dtype, say): written as strings.
        json.dump({"benchmarks": done, "tape_kernels_env": _env(), "partial": True}, f, default=str)
    os.replace(tmp, path)


_CONFIG: pytest.Config | None = None
_ENV: dict | None = None


def _env() -> dict:
    global _ENV
    if _ENV is None:
        _ENV = env_info()
    return _ENV


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    output_json["tape_kernels_env"] = _env()
