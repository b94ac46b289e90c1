"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at the top of the first file pytest imports: Triton kernels then run on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is dominated by tiny eager ops and interpreted kernels: one intra-op thread avoids
# OpenMP spin contention on the 2-core CI machine (measured 10x slower steps with 2 threads under load).
torch.set_num_threads(1)

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "reference_small.pt")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(GOLDEN_PATH, weights_only=True)
