"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at the top of the first file pytest imports: Triton kernels then run on the CPU."""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is dominated by tiny eager ops and interpreted kernels: one intra-op thread avoids
# OpenMP spin contention on the 2-core CI machine (measured 10x slower steps with 2 threads under load).
torch.set_num_threads(1)

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "reference_small.pt")


# Test files whose behaviour depends on the torch version: the C++ extension (built against torch's
# ABI, registered through torch.library), torch.compile / DDP / checkpoint I/O, autocast and the dispatch.
# Tests elsewhere whose name says autocast or dispatch are too (autocast's dtype policy is torch's).
# CI runs the whole suite on the pinned torch and only these on the newest one; .ci/run says why.
TORCH_DEPENDENT_FILES = frozenset({
    "test_compile.py", "test_data_cli.py", "test_decode_block.py", "test_decode_launches.py", "test_int8.py",
    "test_int8_gemv_gpu.py", "test_int8_nonfinite.py", "test_launches.py", "test_model.py", "test_model_gpu.py",
    "test_native_decode.py", "test_quantize.py", "test_reference_golden.py", "test_seed.py", "test_train.py",
    "test_train_cudagraph.py", "test_train_files.py", "test_user_errors.py",
    # the seed design's native decode and the native sampler (extension ops); training runs (the optimizer,
    # the schedule, checkpoint I/O, signals); the seed design's CUDA graphs
    "test_native_seed.py", "test_charrnn_native.py",
    "test_sampling.py", "test_reliability.py", "test_learning.py", "test_seed_graphs_gpu.py",
})  # fmt: skip


# Tests in those files that run the model's Triton path through the interpreter (the name says triton,
# or a decode-block kernel test without int8) depend on torch as the per-op kernel tests do — plain
# tensor ops around interpreted kernels — so the pinned pass covers them, as it covers those.
TRITON_PATH = re.compile(r"^test_triton_|\[triton[\]-]")


def _torch_dependent(item: pytest.Item) -> bool:
    if "autocast" in item.name or "dispatch" in item.name:
        return True
    if item.path.name not in TORCH_DEPENDENT_FILES:
        return False
    if item.path.name == "test_decode_block.py":
        return "int8" in item.name
    return not TRITON_PATH.search(item.name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dependent = pytest.mark.torch_dependent
    for item in items:
        if _torch_dependent(item):
            item.add_marker(dependent)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(GOLDEN_PATH, weights_only=True)
