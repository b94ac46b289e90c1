"""Benchmark setup: ``gpu``-marked benchmarks skip without CUDA, a ``device`` fixture, and the
environment (device, torch/triton/CUDA versions, date) written into pytest-benchmark's JSON so
``collect_results.py`` can name the results file after it.

Unlike ``tests/conftest.py`` this does not turn on the Triton interpreter: benchmarks measure
compiled kernels on CUDA, and the fused cases skip on CPU.
"""

from __future__ import annotations

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


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    output_json["tape_kernels_env"] = env_info()
