"""Autotuning with configs that are known to fit: each tile config carries the resources the compiler
reported for it, and the autotuner only times the configs that fit the device.

A :class:`TileConfig` lists, per data type of the launch ("fp16", "bf16", "fp32" with IEEE products,
"tf32" for fp32 data with TF32 products), the shared memory (bytes per block) and the registers (per
thread) that ptxas reported for sm_86 (``python -m tape_kernels._aot`` and ``benchmarks/kernel_report.py``
re-measure them). Before timing, :meth:`TunedKernel.prune` keeps the configs listed for the launch's
type whose shared memory fits one block on this device and, when registers are known, whose estimated
occupancy reaches ``min_occupancy``: a config that fits but leaves the SM mostly idle is slower at the
small shapes this package runs, and timing it costs a compile.

Under the Triton interpreter nothing is timed: one fixed config runs (autotuning would re-run the numpy
emulation per config). ``TAPE_KERNELS_ATTN_AUTOTUNE=0`` launches the first config that survives the
prune instead of autotuning (one compile per kernel: quick GPU correctness runs).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tape_kernels._dispatch import interpreting

# sm_86 (RTX 30xx) per-SM limits, used when no CUDA device is there to ask.
SM86 = {"regs": 65536, "smem_sm": 102400, "smem_block": 101376, "threads": 1536}
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block


@dataclass(frozen=True)
class TileConfig:
    """One autotune config and, per launch type (see :func:`resource_key`), (shared bytes, registers per
    thread or None) on sm_86.

    ``maxnreg`` caps the registers per thread (ptxas ``.maxnreg``): ptxas otherwise spends registers
    freely (up to 255) for instruction-level parallelism, which caps occupancy instead."""

    meta: dict[str, int]
    num_warps: int
    num_stages: int
    resources: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    maxnreg: int | None = None


def resource_key(dtype: torch.dtype, precision: str | None = None) -> str:
    """The key of a launch in :attr:`TileConfig.resources`: its data type, "tf32" for fp32 data whose
    products run in TF32 (``input_precision="tf32"``: another kernel, other registers)."""
    from tape_kernels._utils import TRITON_TYPE

    key = TRITON_TYPE[dtype]
    return "tf32" if key == "fp32" and precision == "tf32" else key


def autotune_enabled() -> bool:
    """``TAPE_KERNELS_ATTN_AUTOTUNE=0`` launches the first fitting config of each kernel instead of
    autotuning (compiles one config per kernel: quick GPU correctness runs)."""
    return os.environ.get("TAPE_KERNELS_ATTN_AUTOTUNE", "1") not in ("", "0")


@functools.lru_cache(maxsize=8)
def _cuda_limits(index: int) -> dict[str, int]:
    props = torch.cuda.get_device_properties(index)
    return {
        "regs": int(getattr(props, "regs_per_multiprocessor", 0) or SM86["regs"]),
        "smem_sm": int(getattr(props, "shared_memory_per_multiprocessor", 0) or SM86["smem_sm"]),
        "smem_block": int(getattr(props, "shared_memory_per_block_optin", 0) or SM86["smem_block"]),
        "threads": int(getattr(props, "max_threads_per_multi_processor", 0) or SM86["threads"]),
    }


def device_limits(device: torch.device) -> dict[str, int]:
    """Per-SM registers, shared memory (per SM and per block) and threads of ``device`` (sm_86's off CUDA)."""
    if device.type != "cuda":
        return dict(SM86)
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


def occupancy(regs: int | None, num_warps: int, smem: int, limits: dict[str, int]) -> float:
    """Resident warps / the SM's maximum, as limited by registers, shared memory and threads."""
    threads = 32 * num_warps
    by_threads = limits["threads"] // threads
    by_smem = limits["smem_sm"] // (smem + SMEM_RESERVED_PER_BLOCK)
    by_regs = by_threads
    if regs is not None:
        warp_regs = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
        by_regs = limits["regs"] // (warp_regs * num_warps)
    return min(by_threads, by_smem, by_regs) * threads / limits["threads"]


class TunedKernel:
    """A Triton kernel, its :class:`TileConfig` table and how to launch it.

    ``key``: the launch arguments whose values pick a tuning result; ``data_arg``: the tensor argument
    whose element size and device select the configs; ``interp_meta``: a callable returning the
    (meta, num_warps) launched under the interpreter (read at each launch, so tests can vary it).
    """

    def __init__(
        self,
        kernel: Any,
        configs: Sequence[TileConfig],
        key: list[str],
        data_arg: str,
        interp_meta: Callable[[], tuple[dict[str, int], int]],
        min_occupancy: float = 0.0,
    ) -> None:
        self.kernel = kernel
        self.table = tuple(configs)
        self.key = key
        self.data_arg = data_arg
        self.interp_meta = interp_meta
        self.min_occupancy = min_occupancy
        self._tuned: Any = None
        # Resources by Config object identity. Not stored on the Config: Triton's autotune disk cache
        # rebuilds Configs with Config(**c.all_kwargs()), which an extra attribute breaks (triton 3.6,
        # TRITON_CACHE_AUTOTUNING=1).
        self._resources: dict[int, tuple[object, dict[str, tuple[int, int | None]]]] = {}

    @property
    def tuned(self) -> Any:
        """The ``triton.autotune`` wrapper (built on first use)."""
        if self._tuned is None:
            import triton

            configs = []
            for tc in self.table:
                c = triton.Config(dict(tc.meta), num_warps=tc.num_warps, num_stages=tc.num_stages, maxnreg=tc.maxnreg)
                self._resources[id(c)] = (c, tc.resources)
                configs.append(c)
            self._tuned = triton.autotune(configs=configs, key=self.key, prune_configs_by={"early_config_prune": self.prune})(
                self.kernel
            )
        return self._tuned

    def resources(self, config: Any) -> dict[str, tuple[int, int | None]]:
        """{launch type: (shared bytes, registers)} recorded for an autotune config ({} if unknown)."""
        hit = self._resources.get(id(config))
        return hit[1] if hit is not None and hit[0] is config else {}

    def fits(self, t: torch.Tensor, precision: str) -> bool:
        """Whether some config of this launch type fits one block's shared memory on ``t``'s device."""
        key, limit = resource_key(t.dtype, precision), device_limits(t.device)["smem_block"]
        return any(key in tc.resources and tc.resources[key][0] <= limit for tc in self.table)

    def prune(self, configs: list, named_args: dict, **kwargs: Any) -> list:
        """Keep the configs measured for this launch type that fit one block's shared memory on this
        device and reach ``min_occupancy``; when none does, the one with the highest occupancy (or, when
        none fits, the smallest shared memory) so that something always launches. ``kwargs``: the launch's
        constexprs (Triton passes them), of which ``PREC`` tells fp32 from TF32."""
        t = named_args[self.data_arg]
        elt, limits = resource_key(t.dtype, kwargs.get("PREC")), device_limits(t.device)
        own = [c for c in configs if elt in self.resources(c)]
        if not own:  # callers check fits() first and take another path
            raise RuntimeError(f"{self.kernel.__name__}: no autotune config for {elt} launches")

        def occ(c: Any) -> float:
            smem, regs = self.resources(c)[elt]
            return occupancy(regs, c.num_warps, smem, limits)

        fits = [c for c in own if self.resources(c)[elt][0] <= limits["smem_block"]]
        kept = [c for c in fits if occ(c) >= self.min_occupancy]
        if kept:
            return kept
        if fits:
            return [max(fits, key=occ)]
        return [min(own, key=lambda c: self.resources(c)[elt][0])]

    def launch(self, grid: Callable[[dict], tuple], args: tuple, consts: dict) -> None:
        """Launch: one fixed config under the interpreter, autotuned on a GPU (or the first fitting config)."""
        if interpreting():
            meta, warps = self.interp_meta()
            self.kernel[grid(meta)](*args, **consts, **meta, num_warps=warps)
        elif autotune_enabled():
            self.tuned[grid](*args, **consts)
        else:
            named = dict(zip(self.kernel.arg_names, args))
            c = self.prune(self.tuned.configs, named, **consts)[0]
            meta = dict(c.kwargs)
            opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
            if c.maxnreg is not None:
                opts["maxnreg"] = c.maxnreg
            self.kernel[grid(meta)](*args, **consts, **meta, **opts)
