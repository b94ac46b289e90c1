"""Helpers shared by the benchmark files: device choice, synchronised timing, peak memory,
compile timing, the 8 GiB memory cap and the environment record.

Convention (read by ``collect_results.py``): every benchmark sets ``benchmark.group`` and
``benchmark.extra_info.update(case=..., impl=..., peak_mem_mb=..., [compile_s=...])``; use
:func:`record` to do both. Parametrize ids carry the impl name (``eager``, ``compile``, ``fused``)
so that ``gpu_check.sh`` can run the slow ``torch.compile`` cases in their own time-boxed step
with ``-k compile``.

Timing on CUDA: kernels launch asynchronously, so a benchmarked callable must end with a device
synchronisation (:func:`synced`), and its first call (Triton JIT, autotuning, cuDNN/cuBLAS
heuristics, allocator growth) must happen before timing starts (:func:`warm`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

GIB = 1 << 30
MIB = 1 << 20
# The memory budget the package claims for a training step at the notebook size.
MEM_CAP_BYTES = 8 * GIB


def pick_device() -> torch.device:
    """CUDA when available; ``TK_BENCH_DEVICE=cpu`` (or ``cuda``) overrides."""
    want = os.environ.get("TK_BENCH_DEVICE", "").strip().lower()
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def synced(fn: Callable[..., Any], device: torch.device | str) -> Callable[..., Any]:
    """``fn`` followed by a device synchronisation, so wall time covers the GPU work."""
    if not is_cuda(device):
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(torch.device(device))
        return out

    return run


def warm(fn: Callable[[], Any], n: int = 2) -> None:
    """Call ``fn`` ``n`` times so compilation and autotuning stay out of the timed rounds."""
    for _ in range(n):
        fn()


def timed_first_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """Run ``fn`` once, synchronised; return its result and the seconds it took.

    For ``torch.compile``d callables this is the compile time (plus one execution).
    """
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated (MiB) while ``fn`` runs once, above what was live before it.

    Counts tensors held by the caching allocator (``max_memory_allocated``), not the allocator's
    reserve. ``None`` on CPU: torch's CPU allocator keeps no per-call peak.
    """
    if not is_cuda(device):
        return None
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / MIB


@contextlib.contextmanager
def memory_cap(device: torch.device | str, cap_bytes: int = MEM_CAP_BYTES) -> Iterator[float]:
    """Limit this process's CUDA caching allocator to ``cap_bytes`` (default 8 GiB).

    Yields the fraction of the device's memory that the cap is. An allocation that would take the
    allocator's reserve past the cap raises ``torch.OutOfMemoryError``, so a step that completes
    under the cap has fit into a card with that much memory (minus the CUDA context, which is
    outside the allocator). Restores the full fraction afterwards.
    """
    if not is_cuda(device):
        raise RuntimeError("memory_cap needs a CUDA device")
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    frac = min(1.0, cap_bytes / total)
    # Blocks cached by earlier benchmarks count against the fraction: release them first.
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(frac, idx)
    try:
        yield frac
    finally:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, idx)


def record(
    benchmark: Any,
    *,
    group: str,
    case: str,
    impl: str,
    peak_mem_mb: float | None = None,
    compile_s: float | None = None,
    **extra: Any,
) -> None:
    """Set ``benchmark.group`` and the ``extra_info`` fields ``collect_results.py`` reads."""
    benchmark.group = group
    # pytest-benchmark copies ``group`` when the timing runs but keeps ``extra_info`` live: the copy
    # in extra_info still names the group when record() is called after the benchmark ran.
    info: dict[str, Any] = {"group": group, "case": case, "impl": impl, "peak_mem_mb": peak_mem_mb}
    if compile_s is not None:
        info["compile_s"] = compile_s
    info.update(extra)
    benchmark.extra_info.update(info)


def skip_unless_cuda(device: torch.device | str, why: str = "needs a CUDA device") -> None:
    """Fused Triton benchmarks skip on CPU: the interpreter is not a speed."""
    import pytest

    if not is_cuda(device):
        pytest.skip(why)


def device_name(device: torch.device | str | None = None) -> str:
    dev = torch.device(device) if device is not None else pick_device()
    if is_cuda(dev):
        return torch.cuda.get_device_name(dev)
    return f"cpu-{platform.machine()}"


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What produced a set of figures: device, library versions, date (UTC)."""
    dev = torch.device(device) if device is not None else pick_device()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = None
    info: dict[str, Any] = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
    }
    if is_cuda(dev):
        props = torch.cuda.get_device_properties(dev)
        info["capability"] = f"sm_{props.major}{props.minor}"
        info["total_memory_mb"] = round(props.total_memory / MIB)
        info["multiprocessors"] = props.multi_processor_count
        for attr in ("shared_memory_per_block_optin", "regs_per_multiprocessor"):
            if hasattr(props, attr):
                info[attr] = int(getattr(props, attr))
    else:
        info["threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------------------------
# The model cases shared by test_bench_model.py and cold_warm_start.py.

# notebook: the size the original notebook trains at; small: a quick size for CPU runs; tiny: for
# the tooling's own tests only (never benchmarked).
MODEL_CASES: dict[str, dict[str, int]] = {
    "notebook": {"vocab_size": 65, "seq_len": 128, "embed_dim": 256, "num_heads": 4, "batch": 16},
    "small": {"vocab_size": 65, "seq_len": 64, "embed_dim": 64, "num_heads": 2, "batch": 8},
    "tiny": {"vocab_size": 11, "seq_len": 8, "embed_dim": 16, "num_heads": 1, "batch": 2},
}


def fused_model_class() -> type | None:
    """``tapetransformer.TapeTransformer`` (the fused model) when the package has it, else None."""
    try:
        import tapetransformer
    except ImportError:
        return None
    return getattr(tapetransformer, "TapeTransformer", None)


def build_model(case: str, impl: str, device: torch.device | str, seed: int = 0) -> torch.nn.Module:
    """The model of ``case`` for ``impl``: ``eager``/``compile`` use the eager reference,
    ``fused`` the package's Triton model (``backend="triton"``). Training mode, on ``device``."""
    # dropout 0, as the notebook trained (and the fused attention has no dropout kernel)
    cfg = {k: v for k, v in MODEL_CASES[case].items() if k != "batch"} | {"dropout": 0.0}
    torch.manual_seed(seed)
    if impl == "fused":
        cls = fused_model_class()
        if cls is None:
            raise RuntimeError("tapetransformer.TapeTransformer (the fused model) does not exist yet")
        model = cls(**cfg, backend="triton")
    else:
        from tapetransformer.reference import TapeTransformer

        model = TapeTransformer(**cfg)
    return model.to(device).train()


def make_batch(case: str, device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``x`` and next-token targets ``y``, both (B, S) int64."""
    cfg = MODEL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq_len"] + 1), generator=g)
    return seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)


def make_train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3
) -> Callable[[], torch.Tensor]:
    """One optimisation step as in the notebook: forward, NLL of the targets, backward, Adam step.

    ``model`` may be a ``torch.compile`` wrapper; the optimizer is built on its parameters.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logp = model(x)[0]
        loss = -logp.gather(-1, y.unsqueeze(-1)).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def make_generate(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[Callable[[], tuple[torch.Tensor, Any]], Callable[[torch.Tensor, Any], torch.Tensor]]:
    """Cached greedy generation, split into ``prefill() -> (logp, cache)`` on ``prompt`` (B, P)
    and ``decode(logp, cache) -> tokens (B, new_tokens)``, which feeds one token per call.

    Both run in eval mode without autograd; ``decode(*prefill())`` is a whole generation.
    """
    model.eval()

    @torch.no_grad()
    def prefill() -> tuple[torch.Tensor, Any]:
        return model(prompt)

    @torch.no_grad()
    def decode(logp: torch.Tensor, cache: Any) -> torch.Tensor:
        out = []
        for _ in range(new_tokens):
            nxt = logp[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logp, cache = model(nxt, cache)
        return torch.cat(out, dim=1)

    return prefill, decode
