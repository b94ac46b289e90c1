"""The training loop: :func:`train` checks the config, resolves where the run starts, builds the model
and its memory plan, then runs steps, evaluating and checkpointing every ``eval_every`` steps.

``TrainConfig`` is never modified: what a run derives from it (the device of this rank, the model
config taken from a checkpoint, the plan) lives in a :class:`Run`. Ctrl-C finishes the current step,
writes a checkpoint and the logs, and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from tapetransformer.checkpoint import ModelConfig, check_finite, load_weights
from tapetransformer.data import CharDataset, CharVocab, load_text
from tapetransformer.fileio import remove_stale_temp
from tapetransformer.train import checkpointing as ckpt
from tapetransformer.train.compilecache import is_warm
from tapetransformer.train.config import (
    COMPILE_AUTO_PROBE_STEPS,
    ConfigError,
    TrainConfig,
    compile_pays,
    make_schedule,
    validate_config,
)
from tapetransformer.train.cudagraph import GraphedStepper, graph_unsupported
from tapetransformer.train.heap import keep_freed_memory
from tapetransformer.train.logs import RunLog
from tapetransformer.train.memory import (
    FIT_MARGIN,
    GIB,
    MIB,
    MemoryEstimate,
    MemoryPlan,
    available_bytes,
    calibrate_memory,
    check_fits,
    count_parameters,
    describe_bytes,
    estimate_memory,
    plan_memory,
    set_memory_budget,
)
from tapetransformer.train.schedule import LRSchedule
from tapetransformer.train.step import Stepper, build_model, enable_recompute, make_optimizer, pick_amp

__all__ = ["Run", "TrainingDiverged", "TrainingInterrupted", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`train`: the run stopped after ``step``; its checkpoint and logs
    are written."""

    def __init__(self, step: int, steps: int, checkpoint: str, signum: int | None = None) -> None:
        super().__init__(f"interrupted at step {step} of {steps}; checkpoint {checkpoint}")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint
        self.signum = signum if signum is not None else signal.SIGINT  # SIGINT or SIGTERM


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf at ``step``: the run stopped there, its rows up to that step
    are logged, and no checkpoint of the diverged weights was written (the last good one is kept)."""

    def __init__(self, step: int, loss: float, saved_at: int, checkpoint: str) -> None:
        if saved_at > 0:  # written by this run, or the one a resume started from
            kept = f"the last good checkpoint, step {saved_at}, is kept at {checkpoint}"
        else:
            kept = "no checkpoint was written (none came before it)"
        super().__init__(f"the training loss became {loss} at step {step}; stopped there, {kept}; try a lower lr or "
                         "grad_clip (--lr, --grad-clip)")
        self.step, self.loss, self.saved_at, self.checkpoint = step, loss, saved_at, checkpoint


@dataclass
class Run:
    """What a run derives from its config and holds while it trains."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    mcfg: ModelConfig
    vocab: CharVocab
    ds: CharDataset
    model: torch.nn.Module
    stepper: Stepper
    gen: torch.Generator
    eval_gen: torch.Generator
    start_step: int
    n_params: int
    schedule: LRSchedule
    memory_fraction: float | None = None
    val_loss: float = math.nan
    loss: float = math.nan
    peak_mb: float = math.nan
    sync_every: int = 1  # steps whose losses are read back together (see _loop)
    graph_note: str | None = None  # why the step is not a CUDA graph (None: it is)
    first_step_s: float | None = None  # the run's first step, compile or graph capture included
    probe_s: list[float] = field(default_factory=list)  # eager step times --compile auto decides from
    rows: list[dict[str, Any]] = field(default_factory=list)  # ranks > 0 keep theirs here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns {"step", "train_loss", "val_loss", "checkpoint", "vocab", "model", "log", "plan",
    "peak_mem_mb", "compiled", "cuda_graph", "first_step_s"} ("log": every row of the run, resumed ones
    included; "first_step_s": the run's first step, a compile or graph capture included). Under ``torchrun``
    (WORLD_SIZE > 1) every rank calls this; rank 0 writes files.

    ``resume``: the run's stored training settings (``config.run_settings``: every field outside
    ``config.LOCAL_FIELDS``) replace those not given on purpose (``cfg.explicit``; by default the fields
    left at TrainConfig's default), and each given one that differs from the run's is printed.

    Raises TypeError/ValueError naming the field for a bad config before any work, and
    :class:`TrainingInterrupted` (a KeyboardInterrupt) after Ctrl-C has been handled."""
    device = validate_config(cfg)
    cfg, overrides = ckpt.resume_config(cfg)  # a resumed run keeps its own settings unless given
    if cfg.resume:
        device = validate_config(cfg)  # the run's corpus may have moved since
    rank, world, own_group = _dist_setup(device)
    cleanup: list[Any] = []
    if cfg.threads is not None:  # the pool is process-wide: restored when training ends
        before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        cleanup.append(lambda: torch.set_num_threads(before))
    try:
        return _train(cfg, rank, world, cleanup, overrides)
    finally:
        for fn in reversed(cleanup):
            fn()
        if own_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, cleanup: list[Any], overrides: list[str]) -> dict[str, Any]:
    run = _setup(cfg, rank, world, cleanup)
    if run.main:  # once the run is known to start (a refused one prints its one error line only)
        for note in overrides:
            print(f"resume: {note}", file=sys.stderr)
    log = _open_log(run) if run.main else None
    viz = _open_viz(run) if run.main and cfg.viz else None
    _announce(run)
    try:
        with _SigintDeferral(cfg.catch_sigint) as stop:
            _loop(run, log, viz, stop)
    finally:
        if log is not None:
            log.close()
    rows = log.rows if log is not None else run.rows
    return {"step": cfg.steps, "train_loss": run.loss, "val_loss": run.val_loss, "checkpoint": cfg.out,
            "vocab": run.vocab, "model": run.model, "log": rows, "plan": run.stepper.plan, "peak_mem_mb": run.peak_mb,
            "compiled": run.stepper.compiled, "cuda_graph": run.graph_note is None, "first_step_s": run.first_step_s}


# ---------------------------------------------------------------------------------------------
# set-up: everything that can fail on bad input runs here, before any file is written


def _start(cfg: TrainConfig) -> tuple[ckpt.StartPoint, CharDataset]:
    """Where the run starts and its data; the checks a checkpoint settles run before the corpus is read."""
    opened = ckpt.open_start(cfg)
    text = load_text(cfg.data)
    start = ckpt.start_point(cfg, text, opened)
    ds = CharDataset(text, start.vocab)
    seq_len = start.model.seq_len
    if len(ds.train) < seq_len + 2:
        raise ConfigError("data", f"{{name}}: the corpus's training split has {len(ds.train)} characters, too few "
                                  f"for windows of seq_len {seq_len} (need {seq_len + 2})")
    return start, ds


def _setup(cfg: TrainConfig, rank: int, world: int, cleanup: list[Any]) -> Run:
    """Device, data, model, memory plan, optimizer and, for ``resume``, the restored state."""
    device = _rank_device(torch.device(cfg.device), world)
    if cfg.batch_size % world:
        raise ConfigError("batch_size", f"{{name}} {cfg.batch_size} must be divisible by the {world} DDP ranks")
    if device.type == "cpu" and cfg.keep_heap:
        keep_freed_memory()  # before the model's and the steps' allocations
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, ds = _start(cfg)
    mcfg = start.model
    _check_fits(cfg, mcfg, device, world)  # before the model and the first batch are allocated
    model = build_model(mcfg, cfg.backend)
    if start.init is not None:  # casts a float64 notebook state_dict to fp32
        load_weights(model, start.init["model"], cfg.init_from)
        check_finite(start.init["model"], cfg.init_from)
    model.to(device)
    amp_dtype, need_scaler = pick_amp(cfg.amp, device)
    n_params = sum(p.numel() for p in model.parameters())
    plan = _plan(cfg, model, mcfg, ds, device, world, n_params, amp_dtype)
    frac = _apply_budget(plan, device, cleanup)
    if plan.recompute:
        enable_recompute(model)
    # --compile on takes the step away from the graph (one of the two holds it: see validate_config)
    graph = device.type == "cuda" and cfg.cuda_graph is not False and cfg.compile != "on"
    # a CUDA-graph step needs the optimizer's step count on the device (fused Adam: one launch)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, capturable=graph)
    scaler = torch.amp.GradScaler(device.type, enabled=True) if need_scaler else None
    val_loss = math.nan
    if start.resume is not None:
        ckpt.restore(start.resume, cfg.out, model, opt, scaler, gen, eval_gen)
        val_loss = float(start.resume["extra"].get("val_loss", math.nan))
    kw = dict(device=device, amp_dtype=amp_dtype, scaler=scaler, grad_clip=cfg.grad_clip, ddp=world > 1)
    stepper = Stepper(model, opt, plan, **kw)
    why_not = graph_unsupported(stepper, world=world) if graph else "off"
    if graph and why_not is None:
        stepper = GraphedStepper(model, opt, plan, **kw)
    elif cfg.cuda_graph:
        raise ConfigError("cuda_graph", f"{{name}}: the step cannot be captured here: {why_not}")
    if cfg.compile == "on":  # "auto" decides on CPU after the second step (_compile_pays); never on CUDA
        stepper.compile()
    sync_every = cfg.sync_every or (10 if stepper.deferred else 1)
    return Run(cfg=cfg, device=device, rank=rank, world=world, mcfg=mcfg, vocab=start.vocab, ds=ds, model=model,
               stepper=stepper, gen=gen, eval_gen=eval_gen, start_step=start.step, n_params=n_params,
               schedule=make_schedule(cfg),
               memory_fraction=frac, val_loss=val_loss, sync_every=sync_every, graph_note=why_not)


def _check_fits(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device, world: int) -> None:
    """Refuse, naming the sizes and the estimate, a configuration whose training step cannot fit the
    memory available (memory.check_fits: parameters, gradients and optimizer state + activations per
    sample x batch + the batch's ids; with a budget or a micro-batch, the smallest step the planner can
    choose)."""
    amp_dtype, _ = pick_amp(cfg.amp, device)
    n_params = count_parameters(mcfg, cfg.backend)
    triton = cfg.backend == "triton" or (cfg.backend == "auto" and device.type == "cuda")
    est = estimate_memory(mcfg, n_params, optimizer=cfg.optimizer, amp=amp_dtype is not None,
                          need_aux=cfg.viz is not None, fused=triton, ddp=world > 1)
    planned = cfg.memory_budget_gb is not None and cfg.micro_batch is None  # the planner may go down to 1
    micro = cfg.micro_batch if cfg.micro_batch is not None else (1 if planned else None)
    recompute = bool(cfg.recompute) or (planned and cfg.recompute is None)
    avail = available_bytes(device)
    parts = check_fits(est, cfg.batch_size // world, mcfg.seq_len, device, micro_batch=micro, recompute=recompute,
                       available=avail)
    if parts is None or avail is None:
        return
    fixed, act, data = parts
    field = "batch_size" if act + data > fixed else "model.embed_dim"
    raise ConfigError(field, f"{{name}}: a training step of this configuration (batch_size {cfg.batch_size}, seq_len "
                             f"{mcfg.seq_len}, embed_dim {mcfg.embed_dim}, num_heads {mcfg.num_heads}: {n_params:,} "
                             f"parameters) needs about {describe_bytes(sum(parts))} (weights, gradients and optimizer "
                             f"state {describe_bytes(fixed)}, activations {describe_bytes(act)}, batch "
                             f"{describe_bytes(data)}), more than {FIT_MARGIN:g}x the {describe_bytes(avail)} "
                             f"available on {device.type}; use a smaller batch or model")


def _plan(cfg: TrainConfig, model: torch.nn.Module, mcfg: ModelConfig, ds: CharDataset, device: torch.device,
          world: int, n_params: int, amp_dtype: torch.dtype | None) -> MemoryPlan:
    budget = int(cfg.memory_budget_gb * GIB) if cfg.memory_budget_gb else None
    est: MemoryEstimate
    if budget is not None and cfg.micro_batch is None:
        # measure what this model/backend/device saves for backward (2 tiny probe forwards; a separate
        # sampler and restored RNG states keep the training run unchanged)
        px, py = ds.get_batch("train", 2, mcfg.seq_len, torch.Generator().manual_seed(12345))
        model.train()
        est = calibrate_memory(model, mcfg, px.to(device), py.to(device), n_params, optimizer=cfg.optimizer,
                               amp_dtype=amp_dtype, need_aux=cfg.viz is not None, ddp=world > 1)
    else:
        triton = cfg.backend == "triton" or (cfg.backend == "auto" and device.type == "cuda")
        est = estimate_memory(mcfg, n_params, optimizer=cfg.optimizer, amp=amp_dtype is not None,
                              need_aux=cfg.viz is not None, fused=triton, ddp=world > 1)
    try:
        return plan_memory(cfg.batch_size // world, est, budget, micro_batch=cfg.micro_batch, recompute=cfg.recompute)
    except ValueError as e:
        raise ConfigError("memory_budget_gb", f"{{name}}: {e}") from None


def _apply_budget(plan: MemoryPlan, device: torch.device, cleanup: list[Any]) -> float | None:
    """Cap the CUDA allocator at the plan's budget; the cap is process-wide, so it is lifted when
    training ends (tests and notebooks call train() repeatedly)."""
    if plan.budget_bytes is None or device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    frac = set_memory_budget(plan.budget_bytes, device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cleanup.append(lambda: torch.cuda.set_per_process_memory_fraction(1.0, idx))
    return frac


def _open_log(run: Run) -> RunLog:
    cfg = run.cfg
    paths = ([cfg.log_csv] if cfg.log_csv else []) + ([os.path.join(cfg.log_dir, "log.csv")] if cfg.log_dir else [])
    summary = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "explicit")},
               "model": run.mcfg.to_dict(),
               "parameters": run.n_params, "world_size": run.world, "plan": asdict(run.stepper.plan)}
    remove_stale_temp(cfg.out)
    return RunLog(paths, cfg.log_dir, summary=summary, resume_step=run.start_step if cfg.resume else None)


def _open_viz(run: Run) -> Any:
    from tapetransformer.viz import FrameWriter

    return FrameWriter(run.cfg.viz, run.vocab.chars, start_step=run.start_step)


def _announce(run: Run) -> None:
    cfg = run.cfg
    if not (run.main and cfg.progress):
        return
    st = run.stepper
    amp = "fp32" if st.amp_dtype is None else str(st.amp_dtype).replace("torch.", "") + (
        " + GradScaler" if st.scaler else "")
    frac = f", memory fraction {run.memory_fraction:.4f}" if run.memory_fraction is not None else ""
    sem = "causal" if run.mcfg.causal else "reference (its samples are not meaningful text)"
    resume = f"; resuming at step {run.start_step}" if run.start_step else ""
    tqdm.write(f"train: {run.n_params / 1e6:.2f}M parameters on {run.device} x{run.world}, {amp}, {cfg.optimizer}; "
               f"{sem} semantics; {st.plan.describe()}{frac}{resume}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# the loop


def _loop(run: Run, log: RunLog | None, viz: Any, stop: _SigintDeferral) -> None:
    """Steps are launched one by one and *settled* (losses read back, rows logged) in batches: after
    ``run.sync_every`` steps, and at every evaluation, checkpoint, frame and stop. Each read-back
    synchronises with the device, so a CUDA-graph run reads every few steps, not every step."""
    cfg = run.cfg
    bar = _Progress(run)
    run.model.train()
    saved_at = run.start_step
    pending: list[_Launched] = []
    try:
        for step in range(run.start_step, cfg.steps):
            done = step + 1
            bar.tick()
            pending.append(_launch(run, done))
            # eval_every 0: validate (and checkpoint) only at the end
            evaluate_now = done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
            stop_now = done < cfg.steps and _stop_agreed(stop, run)
            settle = evaluate_now or stop_now or done == cfg.steps or pending[-1].frame
            if not (settle or len(pending) >= run.sync_every):
                continue
            rows, tok_s, mem_kind = _settle(run, pending, viz)
            pending = []
            bad = next((r for r in rows if not math.isfinite(r["loss"])), None)
            if _agreed(bad is not None, run):  # never evaluate or checkpoint diverged weights
                rows = rows[: rows.index(bad) + 1] if bad is not None else rows
                for row in rows:
                    _record(run, log, row)
                if log is not None:
                    log.snapshot("diverged")
                last = bad if bad is not None else rows[-1]
                raise TrainingDiverged(last["step"], last["loss"], saved_at, cfg.out)
            if evaluate_now:
                _evaluate(run, rows[-1])
            for row in rows:
                _record(run, log, row)
            if evaluate_now or done == cfg.steps:  # checkpoints at validations and at the end
                saved_at = _checkpoint(run, log, done, "finished" if done == cfg.steps else "running")
            post = {"loss": f"{run.loss:.4f}"}
            if math.isfinite(run.val_loss):
                post["val"] = f"{run.val_loss:.4f}"
            bar.show(done, **post, tok_s=f"{tok_s:,.0f}", step=f"{rows[-1]['step_s']:.3g}s",
                     mem=f"{run.peak_mb:,.0f}MB" + ("" if mem_kind == "cuda" else " rss"))
            if stop_now:
                if saved_at != done:
                    _checkpoint(run, log, done, "interrupted")
                elif log is not None:
                    log.snapshot("interrupted")
                raise TrainingInterrupted(done, cfg.steps, cfg.out, signum=stop.signum)
    finally:
        bar.close()


class _Progress:
    """tqdm's bar when stderr is a terminal; otherwise (a file, a pipe, CI) one plain line every
    ``cfg.progress_every_s`` seconds and at the last step, so a log file gets a few lines, not a
    redrawn bar (~200 bytes a step) with other output (Dynamo's warnings) torn into it. Nothing with
    ``cfg.progress`` off (``--quiet``) or on ranks other than 0."""

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.on = cfg.progress and run.main
        self.tty = self.on and _stderr_is_tty()
        self.steps, self.every = cfg.steps, cfg.progress_every_s
        self.last = time.perf_counter()
        self.bar = tqdm(initial=run.start_step, total=cfg.steps, disable=not self.tty, desc="train",
                        dynamic_ncols=True, file=sys.stderr)

    def tick(self) -> None:
        self.bar.update(1)

    def show(self, done: int, **post: str) -> None:
        if self.tty:
            self.bar.set_postfix(**post)
            return
        now = time.perf_counter()
        if self.on and (done == self.steps or now - self.last >= self.every):
            self.last = now
            fields = " ".join(f"{k}={v}" for k, v in sorted(post.items()))
            print(f"train: step {done}/{self.steps} {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


@dataclass
class _Launched:
    """A step whose work is queued: its loss is still on the device."""

    done: int
    loss: torch.Tensor
    started: float
    frame: bool
    x: torch.Tensor
    attn: Any


def _launch(run: Run, done: int) -> _Launched:
    """Queue one training step on this rank's slice of the global batch; retried with a smaller
    micro-batch after a CUDA out-of-memory error."""
    cfg, dev = run.cfg, run.device
    x, y = run.ds.get_batch("train", cfg.batch_size, run.mcfg.seq_len, run.gen)  # same global batch on every rank
    lo, hi = run.rank * run.local_batch, (run.rank + 1) * run.local_batch
    x, y = x[lo:hi].to(dev, non_blocking=True), y[lo:hi].to(dev, non_blocking=True)
    # every rank runs the same (aux) graph on frame steps; rank 0 draws
    want_frame = bool(cfg.viz) and (done % cfg.viz_every == 0 or done == cfg.steps)
    run.stepper.set_lr(run.schedule.rate(done))
    t0 = time.perf_counter()
    while True:
        try:
            loss, attn = run.stepper.step(x, y, aux=want_frame)
            break
        except torch.OutOfMemoryError:
            if dev.type != "cuda" or run.world > 1 or not run.stepper.shrink():
                raise
            torch.cuda.empty_cache()
            if run.main:
                tqdm.write(f"out of memory: retrying with {run.stepper.plan.describe()}", file=sys.stderr)
    if run.first_step_s is None:  # compile / capture included: the cost of starting
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        run.first_step_s = time.perf_counter() - t0
    else:
        _consider_compile(run, done, time.perf_counter() - t0)
    return _Launched(done, loss, t0, want_frame, x, attn)


def _consider_compile(run: Run, done: int, eager_step_s: float) -> None:
    """``compile="auto"`` on CPU: once COMPILE_AUTO_PROBE_STEPS steps after the first are timed, compile
    when the remaining steps save more than a compile costs (config.compile_pays, from their median; a
    warm start when Inductor's cache holds this step, else a cold compile)."""
    cfg = run.cfg
    if cfg.compile != "auto" or run.device.type != "cpu" or run.stepper.compiled:
        return
    if len(run.probe_s) >= COMPILE_AUTO_PROBE_STEPS:  # decided already
        return
    run.probe_s.append(eager_step_s)
    if len(run.probe_s) < COMPILE_AUTO_PROBE_STEPS:
        return
    if compile_pays(run.probe_s, cfg.steps - done, is_warm(run.stepper.compile_signature())):
        run.stepper.compile()
        if run.main and cfg.progress:
            tqdm.write(f"compiling the training step (torch.compile, --compile auto: {cfg.steps - done} steps left)",
                       file=sys.stderr)


def _settle(run: Run, pending: list[_Launched], viz: Any) -> tuple[list[dict[str, Any]], float, str]:
    """Read the queued steps' losses back (one synchronisation) -> their log rows, tokens/s over the
    window, memory kind. The peak memory is the window's."""
    cfg, dev = run.cfg, run.device
    losses = torch.stack([p.loss.float() for p in pending]).tolist()
    now = time.perf_counter()
    # The run's first step (compile or graph capture included) is timed on its own; the others share
    # the window's time.
    first = pending[0].done == run.start_step + 1
    steady = pending[1:] if first else pending
    step_s = (now - steady[0].started) / len(steady) if steady else run.first_step_s
    tok_s = cfg.batch_size * run.mcfg.seq_len / max(step_s, 1e-9)
    run.peak_mb, mem_kind = _peak_mem_mb(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if first and run.main and cfg.progress and run.stepper.compiled:
        tqdm.write(f"first step {run.first_step_s:.1f}s (torch.compile included)", file=sys.stderr)
    rows = []
    for p, loss in zip(pending, losses):
        run.loss = loss
        own = run.first_step_s if p.done == run.start_step + 1 else step_s
        rows.append({"step": p.done, "loss": loss, "tokens_per_s": cfg.batch_size * run.mcfg.seq_len / max(own, 1e-9),
                     "step_s": own, "peak_mem_mb": run.peak_mb})
        if viz is not None:
            viz.observe(p.done, loss)
            if p.frame and p.attn is not None:  # attention of the first micro-batch's rows
                r = min(cfg.viz_rows, p.attn.shape[0])
                viz.frame(p.done, p.x[:r].cpu(), p.attn[:r].float().cpu())
    return rows, tok_s, mem_kind


def _evaluate(run: Run, row: dict[str, Any]) -> None:
    cfg = run.cfg
    if run.main:  # fp32: rare, and the reference's precision
        run.val_loss = ckpt.evaluate(run.model, run.ds, run.eval_gen, batch_size=cfg.batch_size,
                                     batches=cfg.eval_batches)
        row["val_loss"] = run.val_loss
    else:  # other ranks advance the validation sampler too, so a resumed run is the same everywhere
        ckpt.skip_evaluation(run.ds, run.eval_gen, seq_len=run.mcfg.seq_len, batch_size=cfg.batch_size,
                             batches=cfg.eval_batches)


def _record(run: Run, log: RunLog | None, row: dict[str, Any]) -> None:
    if log is not None:
        log.append(row)
    else:
        run.rows.append(row)


def _checkpoint(run: Run, log: RunLog | None, done: int, status: str) -> int:
    """Write the checkpoint (rank 0), then log.json and loss.png; returns the step saved."""
    if run.main:
        st = run.stepper
        ckpt.save(run.cfg, model=run.model, mcfg=run.mcfg, vocab=run.vocab, opt=st.opt, scaler=st.scaler, step=done,
                  gen=run.gen, eval_gen=run.eval_gen, val_loss=run.val_loss, plan=st.plan, world=run.world)
    if log is not None:
        log.snapshot(status)
    return done


# ---------------------------------------------------------------------------------------------
# Ctrl-C, distributed, memory


class _SigintDeferral:
    """While active (main thread only), a first Ctrl-C or SIGTERM (what ``kill``, job schedulers and
    container stops send) only asks the loop to stop after the current step, so the checkpoint it then
    writes is never of a half-applied optimizer step; a second one raises KeyboardInterrupt at once
    (the last checkpoint stays as it was)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SigintDeferral:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tqdm.write(f"{name}: stopping after this step to write a checkpoint and the logs (again: abort at once)",
                   file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _stop_agreed(stop: _SigintDeferral, run: Run) -> bool:
    """Whether to stop now; under DDP every rank must stop at the same step, so the ranks agree."""
    return _agreed(stop.requested, run)


def _agreed(flag: bool, run: Run) -> bool:
    """``flag`` on any rank (under DDP every rank must stop at the same step)."""
    if run.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group) from torchrun's env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _rank_device(device: torch.device, world: int) -> torch.device:
    if world > 1 and device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _peak_mem_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of the last step: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, "cuda"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss / MIB if sys.platform == "darwin" else rss / 1024), "rss"
    except ImportError:  # Windows
        return math.nan, "rss"
