"""Keep freed memory in the process during CPU training (glibc's malloc).

A CPU training step frees and allocates the same few hundred MB every step: the gradients
(``zero_grad(set_to_none=True)``), the activations and the temporaries. By default glibc serves a block
above its mmap threshold (128 KiB, raised adaptively) with a fresh ``mmap`` and gives a freed heap top
above 128 KiB back to the OS, so every step pays ``munmap`` and then one page fault per 4 KiB page when
the memory is written again (``zero_grad`` alone frees every gradient, and the faults spread over the
next step's kernels; the A/B measurement is benchmarks/results/2026-11-30-cpu-heap-ab.json).

:func:`keep_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit; larger
blocks still get their own mapping) and the trim threshold to 1 GiB, so those pages stay in the
process and are reused. The process's peak resident memory does not grow: a step reuses what the last
one freed. The setting is process-wide and lasts until the process ends (glibc has no per-allocation
switch), which is why the training tool applies it only to a CPU run and ``TrainConfig.keep_heap=False``
(``--no-keep-heap``) leaves malloc alone. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
``benchmarks/cpu_heap_ab.py`` measures the effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt is a no-op)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); True where they are set."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)  # fmt: skip
    return _applied
