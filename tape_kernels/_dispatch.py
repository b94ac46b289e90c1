"""Backend dispatch: decide whether an op runs its Triton kernel or its eager reference.

Rules (shared by every op in this package):
  * CUDA tensors run the Triton kernel when Triton is importable.
  * CPU tensors run the Triton kernel only under ``TRITON_INTERPRET=1`` (the test setup);
    otherwise they take the eager ``*_ref`` path, which is also the test oracle.
  * ``backend="eager"`` forces the eager path; ``backend="triton"`` demands the kernel and
    raises if it cannot run (instead of silently falling back).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "eager")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton missing or broken on this platform
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_runnable(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors right now."""
    if not triton_available():
        return False
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return interpreting()
    return False


def use_triton(*tensors: torch.Tensor, backend: str = "auto") -> bool:
    """Resolve ``backend`` for these tensors; ``"triton"`` raises when the kernel cannot run."""
    check_backend(backend)
    if backend == "eager":
        return False
    ok = triton_runnable(*tensors)
    if backend == "triton" and not ok:
        devs = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"backend='triton' cannot run on device(s) {devs}: Triton needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
            + ("" if triton_available() else " (triton is not importable)")
        )
    return ok
