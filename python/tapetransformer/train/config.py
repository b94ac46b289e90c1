"""What a training run is asked to do (:class:`TrainConfig`), and the checks that run before any work.

:func:`validate_config` checks every field (type, range, that devices and kernels exist here, that
output paths can be written, that input files exist) without creating or touching any file, so a bad
value fails in a second with a message naming the field, never after minutes of training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tapetransformer.model import DESIGNS, ModelConfig
from tapetransformer.train.schedule import SCHEDULES, LRSchedule, default_warmup

GIB = 1 << 30
MIB = 1 << 20


OPTIMIZERS = ("adam", "wolf", "wolf-eager", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("auto", "on", "off")
# compile="auto" on CPU: compile once the run's remaining steps would save more than the compile costs,
# counting a compiled step as COMPILE_AUTO_SPEEDUP times faster than the measured eager step and the
# compile as COMPILE_AUTO_COST_S seconds, or COMPILE_AUTO_WARM_COST_S when Inductor's cache holds the
# step (train.compilecache: a compiled step of the same signature finished before). Measured on a 2-core
# CPU as `train` runs the step, with its malloc thresholds (benchmarks/results/2026-11-30-cpu-train-compile.md):
# compiled steps 1.31x (notebook size) and 1.61x (small) faster; first compiled step 47 s / 43 s cold,
# 8.0 s / 5.8 s warm, from a fresh process. The smaller speed-up and rounded-up costs are used, so `auto`
# compiles only runs that pay back with margin (notebook size, cold: ~99 steps break even, auto needs
# ~116 remaining steps of 2.0 s).
COMPILE_AUTO_SPEEDUP = 1.31
COMPILE_AUTO_COST_S = 55.0
COMPILE_AUTO_WARM_COST_S = 10.0
# The eager step time is the median of steps 2 to 1 + COMPILE_AUTO_PROBE_STEPS (the first pays one-time
# costs): one step slowed by another process on a busy machine must not decide the compile.
COMPILE_AUTO_PROBE_STEPS = 5


def compile_pays(step_times_s: list[float], remaining_steps: int, warm: bool) -> bool:
    """``compile="auto"``: whether ``remaining_steps`` compiled steps save more than the compile costs,
    from the median of the measured eager step times (see COMPILE_AUTO_*)."""
    times = sorted(step_times_s)
    n = len(times)
    median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    saving = median * (1.0 - 1.0 / COMPILE_AUTO_SPEEDUP)
    return remaining_steps * saving > (COMPILE_AUTO_WARM_COST_S if warm else COMPILE_AUTO_COST_S)
BACKENDS = ("auto", "triton", "eager")
CORPORA = ("embedded", "shakespeare")
# The repaired (causal) semantics by default: the reference's cached generation cannot produce text.
DEFAULT_MODEL = ModelConfig(vocab_size=0, seq_len=64, embed_dim=64, num_heads=2, dropout=0.0, causal=True)
# The default peak learning rate and how it was chosen (--help quotes LR_CHOICE_NOTE).
DEFAULT_LR = 3e-3
LR_CHOICE_NOTE = ("the earlier default, kept: with the warm-up it learns where the constant rate collapsed, and on "
                  "tiny-shakespeare it beat a constant 1e-3 over 300 steps (2.41 vs 2.47 nats, "
                  "benchmarks/results/training-diagnosis.md); no wider sweep yet")
# TapeHeadBlock's attention has 4 heads and RoPE rotates pairs within each head: embed_dim must be a
# multiple of 4 x 2 = 8 (the model's own check, reference.ReferenceTapeTransformer).
ATTENTION_HEADS = 4
EMBED_DIM_MULTIPLE = 2 * ATTENTION_HEADS


@dataclass
class TrainConfig:
    data: str | None = None  # None/"embedded", "shakespeare", or a text file
    steps: int = 200  # the target step count (a resumed run continues up to it)
    batch_size: int = 8  # the global batch (summed over DDP ranks and accumulation micro-batches)
    # The peak learning rate of the schedule; the defaults were chosen by measurement (DEFAULT_LR's note).
    lr: float = DEFAULT_LR
    lr_schedule: str = "cosine"  # "cosine": warm-up, then cosine decay to min_lr_ratio·lr; "constant": warm-up, then lr
    warmup_steps: int | None = None  # None: 5 % of steps, at most 100 (train.schedule.default_warmup)
    min_lr_ratio: float = 0.1  # the cosine schedule's floor, as a fraction of lr
    optimizer: str = "adam"  # "adam" | "wolf" (multi-tensor) | "wolf-eager" (the reference's) | "sgd"
    grad_clip: float = 1.0
    eval_every: int = 50  # also the checkpoint interval; 0: only at the end
    eval_batches: int = 4
    out: str = "runs/tapetransformer.ckpt"
    resume: bool = False  # continue from ``out``, which must exist
    # A new run refuses an ``out`` (or a log_dir log.csv) that already exists: pass ``resume`` to continue
    # that run or ``overwrite`` to replace it.
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # kernels: "auto" (Triton on CUDA), "triton", "eager"
    log_csv: str | None = None
    # The model: a ModelConfig, or a dict of some of its fields (the rest: DEFAULT_MODEL for a new run,
    # the checkpoint's for ``resume``/``init_from``), or None. With ``resume`` every given field must
    # match the checkpoint (a ModelConfig's vocab_size 0 matches any); with ``init_from`` the
    # architecture must (dropout and causal may change for fine-tuning).
    model: ModelConfig | dict[str, Any] | None = None
    progress: bool = True  # a tqdm bar on a terminal, else a line every progress_every_s seconds
    progress_every_s: float = 30.0
    # CPU threads of torch's intra-op pool for this run (None: torch's default, one per core); restored
    # after. Fewer threads than cores avoid OpenMP's spin-waiting against other busy processes.
    threads: int | None = None
    amp: str = "auto"  # "auto": bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU
    memory_budget_gb: float | None = None
    micro_batch: int | None = None  # overrides the planner
    recompute: bool | None = None  # None: the planner decides
    init_from: str | None = None  # a checkpoint or a bare notebook state_dict to fine-tune
    log_dir: str | None = None  # log.csv (appended every step), log.json and loss.png (every checkpoint)
    viz: str | None = None  # directory for attention frames (PNG) and train.gif
    viz_every: int = 50
    viz_rows: int = 4
    catch_sigint: bool = True  # Ctrl-C: finish the step, checkpoint, write the logs, raise TrainingInterrupted
    # CUDA: capture the whole step (forward, backward, clipping, GradScaler, optimizer) in one CUDA graph.
    # None: wherever it applies (train.cudagraph.graph_unsupported says where it does not); False: never.
    cuda_graph: bool | None = None
    # torch.compile of the loss path: "on", "off", or "auto" = on a CPU run long enough for the compile
    # to pay back (see COMPILE_AUTO_* below); on CUDA "auto" leaves the step to the CUDA graph.
    compile: str = "auto"
    sync_every: int | None = None  # read losses back every N steps (None: 10 with a CUDA graph, else 1)
    # CPU: keep freed memory in the process (glibc malloc thresholds, see train.heap); process-wide.
    keep_heap: bool = True
    # ``resume``: the fields given on purpose, which override the run's stored settings (the CLI passes the
    # flags on its command line). None (the API's default): the fields whose value differs from this
    # class's default count as given; every other stored setting is taken from the checkpoint.
    explicit: frozenset[str] | None = None


# Fields that say where and how a run is executed, not what it computes: not stored with the checkpoint.
# Every other field (data, batch_size, lr, optimizer, grad_clip, eval_every, eval_batches, seed, amp and any
# field added later, a schedule's among them) is stored in the checkpoint and restored by ``resume``
# (see run_settings and checkpointing.resume_config). ``steps`` is the target of each invocation and the
# model is restored through its own ModelConfig.
LOCAL_FIELDS = frozenset({
    "steps", "out", "resume", "overwrite", "init_from", "model", "progress", "device", "backend", "log_csv",
    "log_dir", "viz", "viz_every", "viz_rows", "catch_sigint", "cuda_graph", "compile", "sync_every", "keep_heap",
    "memory_budget_gb", "micro_batch", "recompute", "explicit", "threads", "progress_every_s",
})


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that define ``cfg``'s run (every field not in LOCAL_FIELDS); a corpus file
    as an absolute path, so a resume from another directory finds it."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in LOCAL_FIELDS}
    if out.get("data") is not None and str(out["data"]) not in CORPORA:
        out["data"] = str(Path(out["data"]).resolve())
    return out


class ConfigError(ValueError):
    """A bad value for one field. ``str(e)`` names it as the API does (``batch_size``);
    :meth:`render` names it as a caller does (``--batch-size``)."""

    def __init__(self, field: str, template: str) -> None:
        self.field = field
        self.template = template  # "{name}" stands for the field's name
        super().__init__(template.replace("{name}", field))

    def render(self, name: str) -> str:
        return self.template.replace("{name}", name)


# ---------------------------------------------------------------------------------------------
# field checks


def check_int(field: str, v: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{field} must be an int, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(field, f"{{name}} must be {rng}, got {v}")


def check_float(field: str, v: Any, lo: float, *, lo_open: bool = False, hi: float | None = None,
                hi_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{field} must be a number, got {type(v).__name__} {v!r}")
    bad = not math.isfinite(v) or v < lo or (lo_open and v == lo)
    bad = bad or (hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lower = f"> {lo}" if lo_open else f">= {lo}"
        upper = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
        raise ConfigError(field, f"{{name}} must be a finite number {lower}{upper}, got {v}")


def check_bool(field: str, v: Any, optional: bool = False) -> None:
    if not (isinstance(v, bool) or (optional and v is None)):
        raise TypeError(f"{field} must be a bool{' or None' if optional else ''}, got {type(v).__name__} {v!r}")


def check_choice(field: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ConfigError(field, f"{{name}} must be one of {', '.join(choices)}; got {v!r}")


def _check_path_type(field: str, v: Any) -> Path:
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{field} must be a path (str or os.PathLike), got {type(v).__name__}")
    if str(v) == "":
        raise ConfigError(field, "{name} must not be empty")
    return Path(v)


def _check_creatable(field: str, d: Path) -> None:
    """Directory ``d`` exists or can be created: its nearest existing ancestor is a writable directory."""
    a = d
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise ConfigError(field, f"{{name}}: cannot create directory {d}: {a} is a file")
    if not os.access(a, os.W_OK | os.X_OK):
        raise ConfigError(field, f"{{name}}: cannot write to {a} (permission denied)")


def check_output_file(field: str, v: Any) -> None:
    """``v`` can be written (its directory exists or can be created) and is not a directory."""
    p = _check_path_type(field, v)
    if p.is_dir():
        raise ConfigError(field, f"{{name}} {p} is a directory; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(field, f"{{name}} {p} is not writable (permission denied)")
    _check_creatable(field, p.parent)


def check_output_dir(field: str, v: Any) -> None:
    p = _check_path_type(field, v)
    if p.exists() and not p.is_dir():
        raise ConfigError(field, f"{{name}} {p} is a file; give a directory")
    _check_creatable(field, p)


def check_input_file(field: str, v: Any, what: str = "file") -> None:
    p = _check_path_type(field, v)
    if p.is_dir():
        raise ConfigError(field, f"{{name}} {p} is a directory, not a {what}")
    if not p.is_file():
        raise ConfigError(field, f"{{name}}: no {what} at {p}")
    if not os.access(p, os.R_OK):
        raise ConfigError(field, f"{{name}} {p} is not readable (permission denied)")


def check_device(field: str, v: Any) -> torch.device:
    """The device, if this machine has it."""
    if not isinstance(v, (str, torch.device)):
        raise TypeError(f"{field} must be a str or torch.device, got {type(v).__name__}")
    try:
        dev = torch.device(v)
    except (RuntimeError, ValueError):
        raise ConfigError(field, f"{{name}} {v!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{{name}} {v}: this machine has no CUDA device (or this torch build has no "
                                     "CUDA support); use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(field, f"{{name}} {v}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(field, f"{{name}} {v}: this machine has no MPS device; use cpu")
    elif dev.type != "cpu":
        raise ConfigError(field, f"{{name}} {v}: {dev.type} devices are not supported; use cpu or cuda")
    return dev


def check_backend(field: str, backend: Any, device: torch.device) -> None:
    """``backend`` is known and, for ``"triton"``, can run its kernels on ``device`` here."""
    from tape_kernels._dispatch import interpreting, triton_available

    check_choice(field, backend, BACKENDS)
    if backend != "triton":
        return
    if not triton_available():
        raise ConfigError(field, "{name} triton: Triton is not installed or cannot load here; use eager or auto")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ConfigError(field, f"{{name}} triton: Triton kernels need a CUDA device, not {device}; use eager or "
                                 "auto (or set TRITON_INTERPRET=1 to run them in Triton's slow CPU interpreter)")


def check_model_config(m: Any, prefix: str = "model.") -> None:
    """Sizes a TapeTransformer can be built with (``vocab_size`` 0: taken from the corpus)."""
    if not isinstance(m, ModelConfig):
        raise TypeError(f"{prefix.rstrip('.')} must be a ModelConfig, got {type(m).__name__}")
    check_int(prefix + "vocab_size", m.vocab_size, 0)
    check_int(prefix + "seq_len", m.seq_len, 1)
    check_int(prefix + "embed_dim", m.embed_dim, EMBED_DIM_MULTIPLE)
    if m.embed_dim % EMBED_DIM_MULTIPLE:
        raise ConfigError(prefix + "embed_dim", f"{{name}} must be a multiple of {EMBED_DIM_MULTIPLE} "
                                                f"({ATTENTION_HEADS} attention heads, RoPE pairs), got {m.embed_dim}")
    check_int(prefix + "num_heads", m.num_heads, 1)
    check_float(prefix + "dropout", m.dropout, 0.0, hi=1.0, hi_open=True)
    check_bool(prefix + "causal", m.causal)
    if m.design not in DESIGNS:
        raise ConfigError(prefix + "design", f"{{name}} must be one of {', '.join(DESIGNS)}, got {m.design!r}")
    if m.design == "seed" and not m.causal:
        raise ConfigError(prefix + "design", "{name} seed always uses the causal semantics; drop "
                                             "--reference-semantics (causal=False)")


def make_schedule(cfg: TrainConfig) -> LRSchedule:
    """The run's learning-rate schedule over its ``steps`` (a resumed run recomputes the same one)."""
    warmup = default_warmup(cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
    return LRSchedule(cfg.lr, cfg.steps, warmup, cfg.min_lr_ratio, cfg.lr_schedule)


def validate_config(cfg: TrainConfig) -> torch.device:
    """Check every field; returns the device. Raises TypeError/ConfigError (a ValueError) naming the
    first bad field. Creates, opens and changes no file."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(cfg).__name__}")
    if cfg.data is not None and str(cfg.data) not in CORPORA:
        check_input_file("data", cfg.data, "corpus file")
    check_int("steps", cfg.steps, 1)
    check_int("batch_size", cfg.batch_size, 1)
    check_float("lr", cfg.lr, 0.0)
    check_choice("lr_schedule", cfg.lr_schedule, SCHEDULES)
    if cfg.warmup_steps is not None:
        check_int("warmup_steps", cfg.warmup_steps, 0)
    check_float("min_lr_ratio", cfg.min_lr_ratio, 0.0, hi=1.0)
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    check_float("grad_clip", cfg.grad_clip, 0.0)
    check_int("eval_every", cfg.eval_every, 0)
    check_int("eval_batches", cfg.eval_batches, 1)
    check_output_file("out", cfg.out)
    check_bool("resume", cfg.resume)
    if cfg.init_from is not None:
        check_input_file("init_from", cfg.init_from, "checkpoint")
        if cfg.resume:
            raise ConfigError("init_from", "{name} cannot be combined with resume: a resumed run continues its own "
                                           "checkpoint")
    if cfg.resume and not Path(cfg.out).is_file():
        raise ConfigError("resume", f"{{name}}: there is no checkpoint at {cfg.out} to continue (leave out resume "
                                    "to start a new run there)")
    check_bool("overwrite", cfg.overwrite)
    if cfg.explicit is not None and not (isinstance(cfg.explicit, (set, frozenset))
                                         and all(isinstance(f, str) for f in cfg.explicit)):
        raise TypeError(f"explicit must be a frozenset of field names or None, got {cfg.explicit!r}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("overwrite", "{name} cannot be combined with resume: a resumed run continues its checkpoint")
    if not (cfg.resume or cfg.overwrite):
        earlier = [p for p in (Path(cfg.out), Path(cfg.log_dir) / "log.csv" if cfg.log_dir is not None else None)
                   if p is not None and p.exists()]
        if earlier:
            raise ConfigError("out", f"{{name}}: {earlier[0]} holds an earlier run; continue it (--resume, "
                                     "resume=True), replace it (--overwrite, overwrite=True) or choose another path")
    check_int("seed", cfg.seed, 0, 2**63 - 1)
    device = check_device("device", cfg.device)
    check_backend("backend", cfg.backend, device)
    if cfg.log_csv is not None:
        check_output_file("log_csv", cfg.log_csv)
    if cfg.log_dir is not None:
        check_output_dir("log_dir", cfg.log_dir)
    check_choice("amp", cfg.amp, AMP_MODES)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp", "{name} fp16 needs a CUDA device; use bf16 or off on CPU")
    if cfg.memory_budget_gb is not None:
        check_float("memory_budget_gb", cfg.memory_budget_gb, 0.0, lo_open=True)
    if cfg.micro_batch is not None:
        check_int("micro_batch", cfg.micro_batch, 1)
    check_bool("recompute", cfg.recompute, optional=True)
    if cfg.viz is not None:
        check_output_dir("viz", cfg.viz)
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ConfigError("viz", "{name} draws with Pillow, which is not installed: pip install pillow") from None
    check_int("viz_every", cfg.viz_every, 1)
    check_int("viz_rows", cfg.viz_rows, 1)
    check_bool("progress", cfg.progress)
    check_float("progress_every_s", cfg.progress_every_s, 0.0)
    if cfg.threads is not None:
        check_int("threads", cfg.threads, 1)
    check_bool("catch_sigint", cfg.catch_sigint)
    check_bool("cuda_graph", cfg.cuda_graph, optional=True)
    check_bool("keep_heap", cfg.keep_heap)
    if cfg.cuda_graph and device.type != "cuda":
        raise ConfigError("cuda_graph", f"{{name}} needs a CUDA device, not {device}")
    check_choice("compile", cfg.compile, COMPILE_MODES)
    if cfg.compile == "on" and cfg.cuda_graph:
        raise ConfigError("compile", "{name} on and a CUDA-graph step exclude each other: the graph holds the eager "
                                     "step (drop one of them)")
    if cfg.sync_every is not None:
        check_int("sync_every", cfg.sync_every, 1)
    if isinstance(cfg.model, dict):
        unknown = sorted(set(cfg.model) - set(DEFAULT_MODEL.to_dict()))
        if unknown:
            raise ConfigError("model", f"{{name}} has unknown field(s) {', '.join(map(repr, unknown))}; ModelConfig "
                                       f"has {', '.join(DEFAULT_MODEL.to_dict())}")
        check_model_config(ModelConfig.from_dict({**DEFAULT_MODEL.to_dict(), **cfg.model}))
    elif cfg.model is not None:
        check_model_config(cfg.model)
    return device


@dataclass
class MemoryPlan:
    """The micro-batch × gradient-accumulation (× recomputation) plan a training step runs
    (``train.memory.plan_memory`` makes it; ``train.step.Stepper`` runs it)."""

    micro_batch: int
    accum_steps: int
    recompute: bool
    budget_bytes: int | None
    estimated_peak_bytes: int

    def describe(self) -> str:
        b = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GIB:.2f} GiB"
        return (f"micro-batch {self.micro_batch} x {self.accum_steps} accumulation step(s), recompute "
                f"{'on' if self.recompute else 'off'}, estimated peak {self.estimated_peak_bytes / MIB:.0f} MiB "
                f"({b})")
