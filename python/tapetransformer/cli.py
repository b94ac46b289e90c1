"""Command line: ``tapetransformer train | generate | demo``.

Every flag is checked before any work starts. A user error prints one line,
``tapetransformer <command>: error: <flag or file>: <problem>``, and exits with status 2: no
traceback, no file written. Ctrl-C (or SIGTERM) during training finishes the step, writes a checkpoint
and the logs, prints one line and exits with status 130 (143 after SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from tapetransformer.checkpoint import check_finite, load_checkpoint, load_weights
from tapetransformer.data import CharVocab, load_text
from tapetransformer.model import DESIGNS, ModelConfig
from tapetransformer.train import (
    AMP_MODES,
    BACKENDS,
    DEFAULT_MODEL,
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    train,
)
from tapetransformer.train.config import (
    COMPILE_AUTO_COST_S,
    COMPILE_AUTO_PROBE_STEPS,
    COMPILE_AUTO_SPEEDUP,
    COMPILE_AUTO_WARM_COST_S,
    COMPILE_MODES,
    CORPORA,
    DEFAULT_LR,
    LR_CHOICE_NOTE,
    check_backend,
    check_device,
    check_input_file,
    validate_config,
)
from tapetransformer.train.schedule import SCHEDULES

PROG = "tapetransformer"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# The demo trains a smaller model than `train` (about a minute on 2 CPU cores).
DEMO_MODEL = ModelConfig(vocab_size=0, seq_len=32, embed_dim=32, num_heads=1, dropout=0.0, causal=True)
MODEL_FLAGS = {"seq_len": "--seq-len", "embed_dim": "--embed-dim", "num_heads": "--num-heads", "dropout": "--dropout",
               "design": "--design"}


class UsageError(Exception):
    """A bad flag found by the CLI's own checks (``flag``: what to name in the message)."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}" if flag else problem)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends every flag's default, unless its help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


# ---------------------------------------------------------------------------------------------
# flags


def _add_model_args(p: argparse.ArgumentParser, d: ModelConfig) -> None:
    # Defaults of None tell flags the user gave from those left out: with --resume/--init-from the
    # left-out ones come from the checkpoint, and a given one that conflicts with it is an error.
    from_ckpt = "with --resume/--init-from: the checkpoint's"
    g = p.add_argument_group("model (with --resume or --init-from, taken from the checkpoint)")
    g.add_argument("--seq-len", type=int, metavar="N", help=f"context length (default: {d.seq_len}; {from_ckpt})")
    g.add_argument("--embed-dim", type=int, metavar="D",
                   help="embedding width, a multiple of 8 (4 attention heads x RoPE pairs) "
                        f"(default: {d.embed_dim}; {from_ckpt})")
    g.add_argument("--num-heads", type=int, metavar="H",
                   help=f"residual TapeHeads ('critics') (default: {d.num_heads}; {from_ckpt})")
    g.add_argument("--dropout", type=float, metavar="P", help=f"dropout in [0, 1) (default: {d.dropout}; {from_ckpt})")
    g.add_argument("--design", choices=DESIGNS,
                   help="reference: the notebook's dataflow; seed: the seed README's design, the critics fed "
                        "coda + prophet and a moderator curating them (always causal) "
                        f"(default: {d.design}; {from_ckpt})")
    sem = g.add_mutually_exclusive_group()
    sem.add_argument("--reference-semantics", dest="causal", action="store_false", default=None,
                     help="train the original notebook's semantics (positions restart at every cached decode "
                          f"call, so its samples are noise-like) (default: causal semantics; {from_ckpt})")
    sem.add_argument("--causal", dest="causal", action="store_true", default=None,
                     help="the repaired causal semantics, already the default (kept so older scripts run) "
                          f"(default: on; {from_ckpt})")


def _add_train_args(p: argparse.ArgumentParser, *, steps: int, out: str, eval_every: int, batch_size: int,
                    model: ModelConfig, overwrite: bool = False) -> None:
    p.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 text file, 'shakespeare' (downloaded once, cached) or 'embedded' (CPython's pydoc "
                        "topics, no network) (default: embedded; with --resume: the run's own corpus)")
    p.add_argument("--steps", type=int, default=steps, metavar="N",
                   help="train up to this step (with --resume: the target beyond the checkpoint's step)")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="B",
                   help="sequences per optimizer step (all DDP ranks and micro-batches together)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, metavar="LR",
                   help=f"peak learning rate of the schedule (default: {DEFAULT_LR:g}; {LR_CHOICE_NOTE})")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine",
                   help="cosine: linear warm-up, then cosine decay to --min-lr-ratio x --lr at --steps; constant: "
                        "warm-up, then --lr (default: cosine). Without a warm-up Adam's first full-size steps "
                        "collapse the hidden state to one vector for every position and the run stalls at the "
                        "unigram loss (benchmarks/results/training-diagnosis.md)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="linear warm-up steps (default: 5%% of --steps, at most 100)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R",
                   help="the cosine schedule's final rate as a fraction of --lr (default: 0.1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="wolf: the notebook's optimizer as one multi-tensor step; wolf-eager: its reference loop "
                        "(default: adam; with --resume: the checkpoint's)")
    p.add_argument("--grad-clip", type=float, default=1.0, metavar="NORM", help="gradient norm clip; 0 disables")
    p.add_argument("--eval-every", type=int, default=eval_every, metavar="N",
                   help="validate, checkpoint and write log.json/loss.png every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=4, metavar="N", help="batches per validation")
    p.add_argument("--out", default=out, metavar="FILE", help="checkpoint path (written atomically)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint at --out (it must exist) up to --steps, appending to its logs")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=overwrite,
                   help="replace an earlier run at --out (its checkpoint and logs); without it or --resume a new run "
                        "there is refused")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="fine-tune from a checkpoint or a bare notebook state_dict (its architecture is kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data sampler")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels: auto (Triton on CUDA, eager PyTorch on CPU), triton or eager")
    p.add_argument("--log-dir", default="auto", metavar="DIR",
                   help="where log.csv (every step), log.json and loss.png (every checkpoint) go; 'auto': "
                        "<out without suffix>-logs next to the checkpoint; 'none': no logs")
    p.add_argument("--log-csv", default=None, metavar="FILE", help="also append the per-step rows to this CSV")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (errors, warnings and the final line still print)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                   help="when stderr is not a terminal (a file, a pipe, CI): one progress line every S seconds and "
                        "at the end, instead of tqdm's bar")
    g = p.add_argument_group("precision and memory")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto: bf16 autocast on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    g.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="per-process memory budget: sets the CUDA memory fraction and picks micro-batch x "
                        "gradient accumulation (and activation recomputation if needed) (default: no budget)")
    g.add_argument("--micro-batch", type=int, default=None, metavar="B",
                   help="force the micro-batch size and accumulate the rest (default: the planner's)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="force activation recomputation per TapeHead block on or off (default: the planner's)")
    g = p.add_argument_group("speed")
    _add_threads_arg(g)
    g.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile of the training step. auto: on a CPU, after steps 2 to "
                        f"{COMPILE_AUTO_PROBE_STEPS + 1}, when the remaining steps x the median of their times x "
                        f"{1 - 1 / COMPILE_AUTO_SPEEDUP:.2f} (the compiled step's saving) exceed "
                        f"{COMPILE_AUTO_COST_S:.0f} s (a cold compile), or "
                        f"{COMPILE_AUTO_WARM_COST_S:.0f} s when Inductor's cache already holds this step (a compiled "
                        "run of the same model, batch and torch finished before; the cache is kept across runs). "
                        "Measured on 2 CPU cores at the notebook's size: compiled steps 1.31x faster, break-even "
                        "after ~99 steps cold and ~17 warm; first compiled step 47 s cold, 8.0 s warm. "
"Never on CUDA, where the CUDA graph holds the step")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: capture the whole training step (forward, backward, clipping, optimizer) in one CUDA "
                        "graph and replay it, and the decode step where a sample follows (default: on where the "
                        "step can be captured)")
    g.add_argument("--sync-every", type=int, default=None, metavar="N",
                   help="read the loss back every N steps (default: 10 with a CUDA graph, else 1)")
    g.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: keep memory a step frees in the process (glibc malloc's mmap and trim thresholds) "
                        "instead of returning it to the OS and faulting it back in on the next step "
                        "(default: on; benchmarks/cpu_heap_ab.py measures it)")
    g = p.add_argument_group("attention visualization (needs Pillow)")
    g.add_argument("--viz", default=None, metavar="DIR",
                   help="write attention frames (PNG) and train.gif to DIR (default: none)")
    g.add_argument("--viz-every", type=int, default=50, metavar="N", help="draw a frame every N steps")
    g.add_argument("--viz-rows", type=int, default=4, metavar="R", help="batch rows drawn per frame")
    _add_model_args(p, model)


THREADS_HELP = ("CPU threads for torch's kernels (torch.set_num_threads). On a machine where other processes keep "
                "cores busy, OpenMP threads spin-wait for a preempted peer and small steps and decode tokens can "
                "become an order of magnitude slower; fewer threads than cores (e.g. 1 on a shared 2-core machine) "
                "avoid that. On an idle machine the default is fastest (default: torch's, one per core)")


def _add_threads_arg(g: Any) -> None:
    g.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def _add_sample_args(p: argparse.ArgumentParser, prompt: str, *, graph_flag: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=prompt,
                   help="text to continue; every character must be in the model's vocabulary "
                        "('' : the vocabulary's first character)")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="characters to generate")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T", help="softmax temperature, > 0")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K likeliest characters (default: all)")
    g.add_argument("--greedy", action="store_true", help="always take the likeliest character")
    g.add_argument("--sample-seed", type=int, default=None, metavar="S",
                   help="seed of the sampler (default: unseeded)")
    g.add_argument("--int8", action="store_true", help="int8 weights for generation (tape_kernels._C)")
    if graph_flag:  # demo's training flag covers its decode too
        g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="capture the decode step in a CUDA graph (default: on for CUDA, off on CPU)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=_Help)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{train,generate,demo}")
    p = sub.add_parser("train", help="train a model and write checkpoints", formatter_class=_Help,
                       description="Train a TapeTransformer; checkpoints and logs are written as it goes. A new run "
                                   "refuses an --out that holds an earlier run (use --resume or --overwrite). With "
                                   "--resume, the run's stored training settings (--data, --batch-size, --lr, "
                                   "--optimizer, --grad-clip, --eval-every, --eval-batches, --seed, --amp and the "
                                   "like) are used unless the flag is given; each override is printed.")
    _add_train_args(p, steps=200, out="runs/tapetransformer.ckpt", eval_every=50, batch_size=8, model=DEFAULT_MODEL)
    p.set_defaults(func=cmd_train, model_defaults=DEFAULT_MODEL)
    p = sub.add_parser("generate", help="sample text from a checkpoint", formatter_class=_Help,
                       description="Sample text from a checkpoint (or a bare notebook state_dict).")
    p.add_argument("checkpoint", help="a checkpoint written by train, or a notebook state_dict")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="corpus whose characters are a bare notebook state_dict's vocabulary: a UTF-8 file, "
                        "'embedded' or 'shakespeare' (downloaded once) (default: embedded, as for train)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="kernels: auto, triton or eager")
    p.add_argument("--quiet", action="store_true", help="no statistics line on stderr after the text")
    _add_threads_arg(p)
    _add_sample_args(p, prompt="")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("demo", help="train briefly on the embedded corpus, then generate", formatter_class=_Help,
                       description="Train a small model for about a minute on CPU, then sample from it.")
    # the demo's run is a scratch run: a second demo replaces the first
    _add_train_args(p, steps=600, out="runs/demo.ckpt", eval_every=200, batch_size=16, model=DEMO_MODEL, overwrite=True)
    _add_sample_args(p, prompt="The ", graph_flag=False)
    p.set_defaults(func=cmd_demo, model_defaults=DEMO_MODEL)
    return ap


# ---------------------------------------------------------------------------------------------
# checks and config


def _flag(a: argparse.Namespace, field: str) -> str:
    """The flag that sets a TrainConfig field (for messages)."""
    name = field.removeprefix("model.")
    if name == "causal":
        return "--causal" if a.causal else "--reference-semantics"
    if name == "checkpoint":  # generate's positional argument
        return name
    return "--" + name.replace("_", "-")


def _check_sampling(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 0:
        raise UsageError("--max-new-tokens", f"must be >= 0, got {a.max_new_tokens}")
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        raise UsageError("--temperature", f"must be a finite number > 0 (use --greedy for argmax), got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise UsageError("--top-k", f"must be >= 1, got {a.top_k}")
    if a.sample_seed is not None and not 0 <= a.sample_seed < 2**63:
        raise UsageError("--sample-seed", f"must be in [0, 2^63), got {a.sample_seed}")


def _check_runtime(a: argparse.Namespace) -> torch.device:
    device = check_device("device", a.device)
    check_backend("backend", a.backend, device)
    if a.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph", f"needs --device cuda (the model runs on {device})")
    return device


def _log_dir(a: argparse.Namespace) -> str | None:
    if a.log_dir == "none":
        return None
    if a.log_dir == "auto":
        out = Path(a.out)
        return str(out.parent / f"{out.stem}-logs")
    return a.log_dir


_UNSET = object()


def _explicit_flags(parser: argparse.ArgumentParser, cmd: str, argv: list[str] | None) -> frozenset[str]:
    """The dests of the flags given on the command line (whatever their value, a default's included):
    parsed again with every default replaced by a marker."""
    sub = next(x for x in parser._actions if isinstance(x, argparse._SubParsersAction)).choices[cmd]
    saved = [(x, x.default) for x in sub._actions if x.option_strings and x.dest != "help"]
    for x, _ in saved:
        x.default = _UNSET
    try:
        ns = parser.parse_args(argv)
    finally:
        for x, d in saved:
            x.default = d
    return frozenset(k for k, v in vars(ns).items() if v is not _UNSET)


def _train_config(a: argparse.Namespace) -> TrainConfig:
    given: dict[str, Any] = {f: getattr(a, f) for f in (*MODEL_FLAGS, "causal") if getattr(a, f) is not None}
    if not (a.resume or a.init_from):  # a new run: this command's defaults, then the flags given
        given = {**a.model_defaults.to_dict(), **given}
    # with --resume the flags left out take the run's stored settings (TrainConfig.explicit)
    explicit = getattr(a, "explicit", frozenset()) & {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(
        data=a.data, steps=a.steps, batch_size=a.batch_size, lr=a.lr, lr_schedule=a.lr_schedule,
        warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio, optimizer=a.optimizer or "adam",
        grad_clip=a.grad_clip, eval_every=a.eval_every, eval_batches=a.eval_batches, out=a.out, resume=a.resume,
        overwrite=a.overwrite and not a.resume, seed=a.seed, device=a.device, backend=a.backend, log_csv=a.log_csv,
        log_dir=_log_dir(a), model=given or None, amp=a.amp, memory_budget_gb=a.memory_budget_gb,
        micro_batch=a.micro_batch, recompute=a.recompute, init_from=a.init_from, viz=a.viz, viz_every=a.viz_every,
        viz_rows=a.viz_rows, compile=a.compile, cuda_graph=a.cuda_graph, sync_every=a.sync_every,
        keep_heap=a.keep_heap, explicit=explicit, progress=not a.quiet, progress_every_s=a.progress_every,
        threads=a.threads,
    )


# ---------------------------------------------------------------------------------------------
# commands


def _generate(model: torch.nn.Module, vocab: CharVocab, a: argparse.Namespace, device: torch.device) -> str:
    from tapetransformer.generate import generate

    prompt = a.prompt or vocab.chars[0]
    try:
        ids = torch.tensor(vocab.encode(prompt), dtype=torch.long, device=device)
    except ValueError as e:
        raise UsageError("--prompt", str(e)) from None
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def stream(tok: torch.Tensor) -> None:
        sys.stdout.write(vocab.decode(tok[:1]))
        sys.stdout.flush()

    stats: dict = {}
    tokens = generate(model, ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, greedy=a.greedy,
                      int8=a.int8, seed=a.sample_seed, cuda_graph=a.cuda_graph, on_token=stream, stats=stats)
    sys.stdout.write("\n")
    if a.quiet:
        return vocab.decode(tokens[0])
    mode = "int8" if a.int8 else str(model.unembedding.dtype).replace("torch.", "")
    graph = f", CUDA graph (capture {stats['capture_ms']:.1f} ms)" if stats.get("cuda_graph") else ""
    print(f"[{a.max_new_tokens} tokens, {stats.get('ms_per_token', 0.0):.2f} ms/token, prefill "
          f"{stats.get('prefill_ms', 0.0):.1f} ms, {mode}{graph}, backend {model.backend} on {device}]",
          file=sys.stderr)
    return vocab.decode(tokens[0])


def cmd_train(a: argparse.Namespace) -> int:
    res = train(_train_config(a))
    if int(os.environ.get("RANK", "0")) == 0:
        peak = res["peak_mem_mb"]
        mem = f"; peak memory of the last step {peak:,.0f} MiB" if a.device.startswith("cuda") else ""
        print(f"step {res['step']}: train loss {res['train_loss']:.4f}, val loss {res['val_loss']:.4f}; "
              f"checkpoint {res['checkpoint']}{mem}")
    return 0


def load_model(
    path: str, device: str | torch.device, data: str | None = None, backend: str = "auto"
) -> tuple[torch.nn.Module, CharVocab]:
    """The model and vocabulary of a checkpoint (or of a bare notebook state_dict and its corpus)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = ModelConfig.from_dict(ckpt["config"])
    if ckpt["vocab"]:
        vocab = CharVocab(ckpt["vocab"])
    else:  # a bare notebook state_dict: the vocabulary comes from the corpus it was trained on
        vocab = CharVocab.from_text(load_text(data if data else "embedded"))  # train's default corpus
    if vocab.size != cfg.vocab_size:
        raise ValueError(f"{path}: the vocabulary has {vocab.size} characters but the model expects {cfg.vocab_size}"
                         + ("" if ckpt["vocab"] else " (pass the corpus it was trained on with --data)"))
    try:
        model = build_model(cfg, backend)
    except ValueError as e:
        raise ValueError(f"{path}: its config cannot build a model ({e})") from None
    load_weights(model, ckpt["model"], path)
    check_finite(ckpt["model"], path)
    return model.to(device).eval(), vocab


def _set_threads(a: argparse.Namespace) -> None:
    if a.threads is not None:
        if a.threads < 1:
            raise UsageError("--threads", f"must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)


def cmd_generate(a: argparse.Namespace) -> int:
    _check_sampling(a)
    device = _check_runtime(a)
    _set_threads(a)
    check_input_file("checkpoint", a.checkpoint, "checkpoint")
    if a.data is not None and a.data not in CORPORA:
        check_input_file("data", a.data, "corpus file")
    model, vocab = load_model(a.checkpoint, device, a.data, a.backend)
    if not model.causal:
        print(f"{PROG} generate: warning: {a.checkpoint} has the reference semantics, whose cached generation "
              "restarts positions at every step, so its samples are not meaningful text; train with the default "
              "causal semantics for text", file=sys.stderr)
    _generate(model, vocab, a, device)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    _check_sampling(a)
    device = _check_runtime(a)
    _set_threads(a)
    cfg = _train_config(a)
    validate_config(cfg)  # the flags first, then the prompt against the corpus, then the work
    if a.prompt and not (a.resume or a.init_from):  # the vocabulary will be the corpus's: check before training
        missing = sorted(set(a.prompt) - set(load_text(a.data)))
        if missing:
            raise UsageError("--prompt", f"character {missing[0]!r} is not in the corpus {a.data}, so not in the "
                                         "vocabulary the demo trains")
    t0 = time.perf_counter()
    causal = a.causal if a.causal is not None else DEMO_MODEL.causal
    corpus = "embedded pydoc" if a.data in (None, "embedded") else a.data
    print(f"demo: training a small TapeTransformer ({'causal' if causal else 'reference'} semantics, backend "
          f"{a.backend}) for {a.steps} steps on the {corpus} corpus (CPU-friendly size)")
    res = train(cfg)
    print(f"trained in {time.perf_counter() - t0:.0f}s: train loss {res['train_loss']:.3f}, "
          f"val loss {res['val_loss']:.3f} (uniform over {res['vocab'].size} chars would be "
          f"{math.log(res['vocab'].size):.3f})")
    if res["model"].causal:
        print("sample (causal semantics):")
    else:
        print("sample (reference semantics: positions restart every call, so expect noise-like text):")
    _generate(res["model"].eval(), res["vocab"], a, device)
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a flag argparse rejected (one line, status 2)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_ERROR
    where = f"{PROG} {a.cmd}"
    a.explicit = _explicit_flags(parser, a.cmd, argv)
    try:
        return a.func(a)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; rank 0 reports
            by = "" if e.signum == signal.SIGINT else f" by {signal.Signals(e.signum).name}"
            print(f"{where}: interrupted{by} at step {e.step} of {e.steps}; checkpoint {e.checkpoint} and the logs "
                  "are written (continue with --resume)", file=sys.stderr)
        return 128 + int(e.signum)  # 130 after Ctrl-C, 143 after SIGTERM, as the shell reports them
    except KeyboardInterrupt:
        if a.cmd == "generate":  # generation writes no file: nothing to keep or lose
            print(f"{where}: interrupted", file=sys.stderr)
        else:
            print(f"{where}: interrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as e:
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"{where}: error: {_one_line(ValueError(e.render(_flag(a, e.field))))}", file=sys.stderr)
        return EXIT_ERROR
    except (UsageError, ValueError, OSError) as e:  # OSError: missing files, a failed download, a full disk
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except torch.OutOfMemoryError as e:
        print(f"{where}: error: out of memory ({_one_line(e)[:200]}); use --memory-budget-gb, a smaller "
              "--batch-size or --micro-batch", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
