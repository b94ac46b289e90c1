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
import functools
import json
import math
import os
import platform
import statistics
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


def median_ms(fn: Callable[[], Any], n: int, device: torch.device | str, warmup: int = 0) -> float:
    """Median of ``n`` per-call times of ``fn`` in ms, after ``warmup`` untimed calls: CUDA events on
    the current stream on a GPU (no synchronisation between calls), the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    if not is_cuda(device):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(torch.device(device))
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def write_results(path: str, doc: dict[str, Any]) -> str:
    """``doc`` (``env_info`` fields, ``results`` rows, anything else) as indented JSON at ``path``,
    its folder made; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return path


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


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or ``cpu <model name>``: results files and tables name the hardware."""
    dev = torch.device(device) if device is not None else pick_device()
    if is_cuda(dev):
        return torch.cuda.get_device_name(dev)
    return f"cpu {cpu_model()}"


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
        # the host CPU runs the Python side of every step (launch overhead on a GPU): named always
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
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


def bench_cases() -> list[str]:
    """The model cases to benchmark: ``TK_BENCH_CASES`` (comma list), default small and notebook."""
    raw = os.environ.get("TK_BENCH_CASES", "").strip()
    cases = [c.strip() for c in raw.split(",") if c.strip()] if raw else ["small", "notebook"]
    unknown = [c for c in cases if c not in MODEL_CASES]
    if unknown:
        raise ValueError(f"TK_BENCH_CASES names unknown cases {unknown}; known: {sorted(MODEL_CASES)}")
    return cases


def compile_backend() -> str:
    """torch.compile's backend for the ``compile_*`` variants: ``TK_BENCH_COMPILE_BACKEND``, default
    inductor (``eager`` = Dynamo's tracing only, for the tooling's quick tests: not a figure)."""
    return os.environ.get("TK_BENCH_COMPILE_BACKEND", "").strip() or "inductor"


def compile_fn(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``torch.compile(fn, mode=mode)`` with :func:`compile_backend` (modes apply to inductor only)."""
    backend = compile_backend()
    if backend == "inductor":
        return torch.compile(fn, mode=mode)
    return torch.compile(fn, backend=backend)


def reset_graph_breaks() -> None:
    """Clear Dynamo's graph-break counters (before a compiled variant's first call)."""
    from torch._dynamo.utils import counters

    counters["graph_break"].clear()


def graph_breaks() -> int:
    """Graph breaks Dynamo met since :func:`reset_graph_breaks`: each splits the compiled region
    (the model's input checks read values on the host, e.g. ``check_tokens``' min/max)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


# The attribution of a speed-up (see collect_results.py): what each variant runs.
#   a  reference    tapetransformer.reference.ReferenceTapeTransformer (the notebook's module, all its work)
#   b  fused_eager  the fused model with backend="eager": the same dead-work skipping, no kernels
#   c  fused_triton the fused model with backend="triton" (CUDA; the interpreter is not a speed)
#   d  compile_*    torch.compile of (b), one variant per mode
#   e  (c) replayed from a CUDA graph (generation)
# Legacy impl names: "eager" = the reference, "fused" = fused_triton.
MODEL_IMPLS = {"reference": "a", "eager": "a", "fused_eager": "b", "fused_triton": "c", "fused": "c"}
COMPILE_MODES = ("default", "max-autotune")


def build_model(case: str, impl: str, device: torch.device | str, seed: int = 0, design: str | None = None
                ) -> torch.nn.Module:
    """The model of ``case`` for ``impl`` (``reference``/``eager``, ``fused_eager``, ``fused_triton``/
    ``fused``, or ``compile``: the reference, for cold_warm_start.py), in training mode on ``device``.
    Every impl gets the same initial weights (the fused model subclasses the reference). ``design``: the fused
    model's design (None: its default, the reference design)."""
    # dropout 0, as the notebook trained (and the fused attention has no dropout kernel)
    cfg = {k: v for k, v in MODEL_CASES[case].items() if k != "batch"} | {"dropout": 0.0}
    torch.manual_seed(seed)
    if impl in ("fused", "fused_triton", "fused_eager"):
        cls = fused_model_class()
        if cls is None:
            raise RuntimeError("tapetransformer.TapeTransformer (the fused model) does not exist")
        model = cls(**cfg, backend="eager" if impl == "fused_eager" else "triton",
                    **({"design": design} if design is not None else {}))
    elif impl in ("reference", "eager", "compile"):
        from tapetransformer.reference import ReferenceTapeTransformer as TapeTransformer

        model = TapeTransformer(**cfg)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return model.to(device).train()


def make_batch(case: str, device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``x`` and next-token targets ``y``, both (B, S) int64."""
    cfg = MODEL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq_len"] + 1), generator=g)
    return seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)


def bench_amp(device: torch.device | str) -> str:
    """The autocast every side of a training benchmark runs under: ``TK_BENCH_AMP`` (fp32 or bf16),
    else bf16 on a CUDA device that has it (what ``tapetransformer train`` uses), else fp32."""
    want = os.environ.get("TK_BENCH_AMP", "").strip().lower()
    if want:
        if want not in ("fp32", "bf16"):
            raise ValueError(f"TK_BENCH_AMP must be fp32 or bf16, got {want!r}")
        return want
    if is_cuda(device) and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def reference_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The notebook's objective: mean NLL of the targets under the training forward's log-probs."""
    logp = model(x)[0]
    return -logp.float().gather(-1, y.unsqueeze(-1)).mean()


def fused_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same objective through the fused model's ``loss`` (only the modules it depends on), as the
    training tool calls it: ``check=False``, the token-range check (two host reads, a graph break under
    ``torch.compile``) done once outside the timed step (:func:`make_train_step`)."""
    return model.loss(x, y, check=False)


def make_train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3, *, amp: str = "fp32",
    loss: str = "forward", compile_mode: str | None = None,
) -> Callable[[], torch.Tensor]:
    """One optimisation step as in the notebook: forward, NLL of the targets, backward, Adam step.

    ``loss="forward"`` takes the NLL of ``model(x)[0]`` (the reference; ``model`` may be a
    ``torch.compile`` wrapper), ``loss="fused"`` calls ``model.loss`` (the fused model).
    ``compile_mode`` compiles the loss computation (forward and, through AOTAutograd, backward)
    with ``torch.compile(mode=...)``; the optimizer is built on ``model``'s parameters either way.
    ``amp``: the autocast of the forward (fp32 = none).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fn = {"forward": reference_nll, "fused": fused_loss}[loss]
    if loss == "fused":
        from tapetransformer.reference import check_tokens

        check_tokens(x, model.vocab_size, model.seq_len)
        check_tokens(y, model.vocab_size, model.seq_len)
    if compile_mode is not None:
        fn = compile_fn(functools.partial(fn, model), compile_mode)
    else:
        fn = functools.partial(fn, model)
    dev = x.device

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            value = fn(x, y)
        value.backward()
        opt.step()
        return value.detach()

    return step


def set_tokens_per_s(benchmark: Any, tokens: int, key: str = "tokens_per_s") -> None:
    """``tokens`` / the benchmark's median seconds, into ``extra_info[key]``."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info[key] = round(tokens / stats.stats.median, 1)


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


# --------------------------------------------------------------------------------------------
# The fused model's internals that the benchmarks use, one function each (the model's author may
# rename them: change them here only).


def new_cache(model: Any, batch: int, capacity: int, device: torch.device | str) -> Any:
    """An empty preallocated decode cache (``TapeTransformer.new_cache``)."""
    return model.new_cache(batch, capacity, torch.device(device))


def cache_length(cache: Any) -> int:
    """Tokens held by a decode cache."""
    return cache.length


def advance_cache(cache: Any, n: int = 1) -> None:
    """Record that a static decode step filled ``n`` more rows (the step itself does not)."""
    cache.length += n


def quantize_int8_weights(model: Any, act_quant: bool | None = None) -> None:
    """Give the fused model int8 copies of its decode weights (``TapeTransformer.quantize_int8_``)."""
    model.quantize_int8_(act_quant=act_quant)


def static_decode_step(model: Any, x: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
    """The decode step ``generate`` captures in a CUDA graph: x (B, 1) ids, pos (1,) int64 on the
    device (the row this token fills) -> log-probs (B, 1, V); static shapes, no host sync."""
    return model.decode_step(x, pos, cache)


def compiled_greedy_decode(model: Any, mode: str) -> Callable[[torch.Tensor, int, dict], torch.Tensor]:
    """Greedy generation whose decode step is ``torch.compile(static_decode_step, mode=mode)``.

    Returns ``run(prompt (B, P), new_tokens, stats) -> tokens (B, P + new)``: an eager prefill into a
    cache of capacity P + new, then one compiled step per token (the position is a device tensor, so
    one compiled graph serves every position). ``stats`` gets ``prefill_ms`` and ``ms_per_token``
    (decode only), as ``generate`` reports them. Reference semantics (``causal=False``) only: a
    causal model would slide its window past seq_len, which this loop does not do.
    """
    import time

    if getattr(model, "causal", False):
        raise ValueError("compiled_greedy_decode runs reference semantics (causal=False) only")
    step = compile_fn(functools.partial(static_decode_step, model), mode)

    @torch.no_grad()
    def run(prompt: torch.Tensor, new_tokens: int, stats: dict) -> torch.Tensor:
        dev = prompt.device
        cache = new_cache(model, prompt.shape[0], prompt.shape[1] + new_tokens, dev)
        sync(dev)
        t0 = time.perf_counter()
        logp, cache = model(prompt, past_kv=cache)
        sync(dev)
        t1 = time.perf_counter()
        out = [prompt]
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        for i in range(new_tokens):
            nxt = logp[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if i + 1 == new_tokens:
                break
            pos.fill_(cache_length(cache))
            logp = step(nxt, pos, cache)
            advance_cache(cache)
        sync(dev)
        stats.update(prefill_ms=(t1 - t0) * 1e3, ms_per_token=(time.perf_counter() - t1) * 1e3 / max(new_tokens, 1))
        return torch.cat(out, dim=1)

    return run


PLOT_COLOURS = [(31, 90, 200), (210, 50, 30), (20, 140, 60), (140, 60, 170), (200, 140, 0), (0, 150, 160)]


def line_panels(panels: list[dict[str, Any]], path: str, panel_size: tuple[int, int] = (420, 320)) -> str:
    """Side-by-side line plots with Pillow (no plotting library needed). A panel: {"title", "xlabel",
    "ylabel", "log": bool, "series": [(label, [(x, y), ...]), ...], "hline": (label, y) or None}; the
    legend of the first panel is shared (same label, same colour in every panel)."""
    from PIL import Image, ImageDraw, ImageFont

    pw, ph = panel_size
    labels: list[str] = []
    for p in panels:
        labels += [lab for lab, _ in p["series"] if lab not in labels]
    legend_h = 14 * len(labels) + 8
    img = Image.new("RGB", (pw * len(panels), ph + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 58, 12, 26, 40
    for k, p in enumerate(panels):
        ox = k * pw
        tf = (lambda v: math.log10(v)) if p.get("log") else (lambda v: v)
        pts = [(x, tf(y)) for _, s in p["series"] for x, y in s if math.isfinite(y) and (y > 0 or not p.get("log"))]
        if p.get("hline"):
            pts.append((pts[0][0] if pts else 0, tf(p["hline"][1])))
        if not pts:
            continue
        x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
        y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def at(x: float, y: float, ox: int = ox, box: tuple = (x0, x1, y0, y1)) -> tuple[float, float]:
            bx0, bx1, by0, by1 = box
            return (ox + left + (x - bx0) / (bx1 - bx0) * (pw - left - right),
                    top + (by1 - y) / (by1 - by0) * (ph - top - bottom))

        draw.rectangle([ox + left, top, ox + pw - right, ph - bottom], outline=(0, 0, 0))
        for i in range(5):
            yv = y0 + i * (y1 - y0) / 4
            _, py = at(x0, yv)
            draw.line([(ox + left, py), (ox + pw - right, py)], fill=(228, 228, 228))
            lab = f"{10 ** yv:.2g}" if p.get("log") else f"{yv:.3g}"
            draw.text((ox + 4, py - 6), lab, fill=(0, 0, 0), font=font)
            xv = x0 + i * (x1 - x0) / 4
            px, _ = at(xv, y0)
            draw.text((px - 8, ph - bottom + 4), f"{xv:.0f}", fill=(0, 0, 0), font=font)
        draw.text((ox + left, 6), p["title"], fill=(0, 0, 0), font=font)
        draw.text((ox + left, ph - bottom + 18), f"{p['xlabel']}; y: {p['ylabel']}", fill=(0, 0, 0), font=font)
        if p.get("hline"):
            _, py = at(x0, tf(p["hline"][1]))
            draw.line([(ox + left, py), (ox + pw - right, py)], fill=(90, 90, 90))
            draw.text((ox + pw - right - 110, py - 12), p["hline"][0], fill=(90, 90, 90), font=font)
        for lab, s in p["series"]:
            col = PLOT_COLOURS[labels.index(lab) % len(PLOT_COLOURS)]
            xy = [at(x, tf(y)) for x, y in s if math.isfinite(y) and (y > 0 or not p.get("log"))]
            if len(xy) >= 2:
                draw.line(xy, fill=col, width=2)
            for px, py in xy if len(xy) < 12 else []:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
    for i, lab in enumerate(labels):
        y = ph + 4 + 14 * i
        draw.line([(left, y + 6), (left + 24, y + 6)], fill=PLOT_COLOURS[i % len(PLOT_COLOURS)], width=3)
        draw.text((left + 30, y), lab, fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------ attention


class EagerCritic(torch.nn.Module):
    """The reference's CachedMultiheadAttention training path."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, w = self.attn(x, x, x, need_weights=True)
        entropy = -(w * torch.log(w + 1e-12)).sum(dim=-1)
        aw = (w.sum(dim=-1) + w.sum(dim=-2)) / 2
        return out, entropy, aw


def attention_calls(impl: str, shape: tuple[int, int, int, int], device: torch.device | str, dtype: torch.dtype,
                    dynamic: bool | None = None) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward + backward) of one case: ``impl`` eager / compile (``torch.compile(eager,
    dynamic=dynamic)``) / fused, shape (B, S, D, H), seeded weights and inputs. The backward is that of
    out·g + Σ entropy + Σ aw·w into x and every parameter."""
    from tape_kernels.attention import CriticAttention

    b, s, d, h = shape
    torch.manual_seed(0)
    eager = EagerCritic(d, h).to(device=device, dtype=dtype).train()
    if impl == "fused":
        mod: torch.nn.Module = CriticAttention(d, h, backend="triton").to(device=device, dtype=dtype).train()
        mod.load_state_dict(eager.attn.state_dict())
    elif impl == "compile":
        mod = torch.compile(eager, dynamic=dynamic)
    else:
        mod = eager
    x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
    g_out = torch.randn(b, s, d, device=device, dtype=dtype)
    w_aw = torch.randn(b, s, device=device, dtype=torch.float32)
    params = [x, *mod.parameters()]

    def fwd() -> object:
        return mod(x)

    def fwdbwd() -> object:
        out, ent, aw = mod(x)
        loss = (out.float() * g_out.float()).sum() + ent.float().sum() + (aw.float() * w_aw).sum()
        return torch.autograd.grad(loss, params)

    return fwd, fwdbwd
