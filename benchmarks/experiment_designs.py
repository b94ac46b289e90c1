"""Experiment v2 (issue 30, item 4): does the seed README's design beat the reference's, and does either
beat controls of the same live size, under a learning-rate sweep, several seeds, equal steps and an
equal compute budget?

Models (all built here, all trained by :func:`train_model`):

* ``reference``: ``TapeTransformer(design="reference", causal=True)``;
* ``seed``: ``TapeTransformer(design="seed")`` (critics fed a mixture of coda and prophet, a moderator);
* ``seed-noprophet``: the ablation, :class:`NoProphetTapeTransformer`: the seed design with the
  prophet's projected output replaced by zeros, so no RNN runs (``prophet``, ``rnn_projection`` and the
  half of ``merge_projection`` that reads the prophecy get no gradient);
* ``gpt``: :class:`GPT`, a GPT-style causal transformer (pre-LN, learned positions, GELU MLP 4x, GPT-2
  init with the residual output projections scaled by 1/sqrt(2 n_layers), tied unembedding);
* ``charrnn``: :class:`CharRNN`, a plain Char-RNN (embedding, ``nn.LSTM`` layers, a linear head).

The two controls are sized so that their parameter count matches the *live* parameters of ``seed``:
the tensors to which the NLL of one batch gives a gradient that is not None and not identically zero
(:func:`count_parameters`; checked against what the structure says, the script stops if they differ).

The loop, one for every model: Adam, gradient-norm clipping at 1.0, the project's schedule
(``LRSchedule`` with ``default_warmup(total)``: linear warm-up, cosine decay to 10 %), batches from a
``torch.Generator`` seeded with the run's seed (every model sees the same windows at a given seed);
the initialisation comes from ``torch.manual_seed(seed)``.

The plan (:func:`plan_runs`), in this order so that a cut-short run leaves usable results:

1. sweep: every model at each of its three peak learning rates, seed 0, ``steps`` steps;
2. seeds: every model at its best learning rate (lowest final val bpc; ties: the lower rate), the other
   seeds, ``steps`` steps;
3. equal-time: every model at its best rate, every seed, for ``budget / s_per_step`` steps, where the
   budget is the seed design's mean training CPU time over its equal-step runs at its best rate and
   ``s_per_step`` a model's mean CPU seconds per step over its own such runs, so that its schedule
   completes within the budget. A run whose step count equals the equal-step one is the same run and
   is not repeated (the seed design's, by construction).

Time is the process's CPU time (``time.process_time()``) with one torch thread: on a machine shared
with other jobs, an equal CPU-time budget at one thread stands in for equal wall-clock.

Every finished run is appended to the results JSON at once; a restart skips the finished runs.
``--summarize`` writes the Markdown (sweep, seeds, equal-step vs equal-time, time-to-quality), the
plot and the samples file from the JSON, marking them partial when the plan did not finish.

Usage (CPU, as committed)::

    python benchmarks/experiment_designs.py --data /path/to/tinyshakespeare.txt --threads 1
    python benchmarks/experiment_designs.py --data /path/to/tinyshakespeare.txt --summarize

The v1 results (``experiment-designs-*``, constant lr, one seed, an ``nn.Transformer`` control) were
made by this script's previous version (git history) and are kept as they were.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "python") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "python"))
    sys.path.insert(0, str(ROOT))

from tapetransformer.data import CharDataset, load_text  # noqa: E402
from tapetransformer.model import TapeTransformer  # noqa: E402
from tapetransformer.sampling import pick_next  # noqa: E402
from tapetransformer.train.schedule import LRSchedule, default_warmup  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
WORK_DIR = ROOT / "build" / "experiment-v2"
SCHEMA = 2
LN2 = math.log(2.0)
MODELS = ("reference", "seed", "seed-noprophet", "gpt", "charrnn")
LABELS = {
    "reference": "(a) reference design, causal",
    "seed": "(b) seed design",
    "seed-noprophet": "(b-) seed design without its prophet",
    "gpt": "(c) GPT-style transformer",
    "charrnn": "(d) Char-RNN (LSTM)",
}
TAPE_MODELS = ("reference", "seed", "seed-noprophet")
BUDGET_MODEL = "seed"  # the equal-time budget is this model's equal-step CPU time
TIME_NOTE = ("time is the process's CPU time (time.process_time()) with 1 torch thread: on a machine shared with "
             "other jobs, an equal CPU-time budget at 1 thread stands in for equal wall-clock")
# Parameters the structure says get no gradient from the NLL (prefixes of parameter names).
NEVER_REACH = ("embed_ln.", "norm_gate")
REFERENCE_DEAD = ("prophet.", "rnn_projection.", "merger.", "final_norm.", "merge_projection.",
                  "merge_projection_final.")
NOPROPHET_DEAD = ("prophet.", "rnn_projection.")


@dataclass(frozen=True)
class ExpConfig:
    """One experiment size; every model trains with these."""

    seq_len: int
    embed_dim: int  # the TapeTransformers' width (a multiple of 8)
    num_critics: int  # the TapeTransformers' residual heads (``num_heads``)
    batch_size: int
    steps: int  # the equal-step budget
    eval_points: int  # validation points per run (at evenly spaced steps), besides step 0
    curve_windows: int  # validation windows per curve point (a fixed random subset)
    final_windows: int | None  # windows of the final figure (the same subset's first ones; None: all)
    gpt_layers: int  # the GPT's depth and heads; its width is solved for the parameter count
    gpt_heads: int
    lstm_layers: int  # the Char-RNN's depth; its width is solved for the parameter count
    lrs_tape: tuple[float, ...]  # peak learning rates of the sweep
    lrs_gpt: tuple[float, ...]
    lrs_charrnn: tuple[float, ...]
    seeds: tuple[int, ...]
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # the cosine's floor (LRSchedule's default)
    eval_batch: int = 64
    sample_chars: int = 300
    sample_temperature: float = 0.8
    sample_seed: int = 1234
    prompt_chars: int = 32
    val_subset_seed: int = 1234

    def lrs(self, model: str) -> tuple[float, ...]:
        return {"gpt": self.lrs_gpt, "charrnn": self.lrs_charrnn}.get(model, self.lrs_tape)


CONFIGS: dict[str, ExpConfig] = {
    # seconds on a CPU: the smoke test's size (two rates, two seeds: the pipeline, not a result)
    "tiny": ExpConfig(seq_len=16, embed_dim=16, num_critics=2, batch_size=4, steps=5, eval_points=2,
                      curve_windows=8, final_windows=16, gpt_layers=2, gpt_heads=2, lstm_layers=1,
                      lrs_tape=(3e-3, 1e-2), lrs_gpt=(3e-3, 1e-2), lrs_charrnn=(3e-3, 1e-2), seeds=(0, 1),
                      eval_batch=16, sample_chars=24, prompt_chars=8),
    # about an hour of one CPU core for the whole plan (the committed run)
    "small": ExpConfig(seq_len=64, embed_dim=64, num_critics=2, batch_size=8, steps=300, eval_points=10,
                       curve_windows=32, final_windows=256, gpt_layers=4, gpt_heads=4, lstm_layers=2,
                       lrs_tape=(1e-3, 3e-3, 1e-2), lrs_gpt=(3e-4, 1e-3, 3e-3), lrs_charrnn=(1e-3, 3e-3, 1e-2),
                       seeds=(0, 1, 2)),
}


# ---------------------------------------------------------------------------------------------
# the models


class NoProphetTapeTransformer(TapeTransformer):
    """The seed design with its prophet removed: the projected prophecy ``p`` is zeros, so the
    Char-RNN never runs; everything after it (``merge_projection``, critics, moderator, merger) is the
    seed design's. Only for this experiment's ablation."""

    def __init__(self, vocab_size: int, **kw: Any) -> None:
        super().__init__(vocab_size, design="seed", **kw)

    def _seed_train(self, x: torch.Tensor, stats: bool = True) -> tuple[torch.Tensor, list[tuple[Any, Any]]]:
        e = self.holistic_embed(x)
        coda, _, ent, attn = self.codahead(e, None, None, stats=stats)
        p = torch.zeros_like(coda)
        pairs = [(ent, attn)]

        def critic(i: int, head: Any, mix: torch.Tensor) -> torch.Tensor:
            c, _, ent_i, attn_i = head(e, mix, None, stats=stats)
            pairs.append((ent_i, attn_i))
            return c

        return self._seed_hidden(coda, p, critic), pairs


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        h = h + self.attn_proj(a)
        return h + self.mlp_proj(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks (causal attention, GELU MLP 4x), a final
    LayerNorm, an unembedding tied to the token embedding. GPT-2's initialisation: weights normal(0,
    0.02), biases zero, the two projections that write into the residual stream normal(0, 0.02 /
    sqrt(2 n_layers)) so the stream's variance does not grow with depth."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_GPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S) ids -> logits (B, S, V)."""
        h = self.tok_emb(x) + self.pos_emb.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok_emb.weight.T

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).reshape(-1, self.vocab_size), y.reshape(-1))


class CharRNN(nn.Module):
    """Karpathy's char-rnn with an embedding for the one-hot input: embedding, ``nn.LSTM`` layers, a
    linear head (PyTorch's default initialisation)."""

    def __init__(self, vocab_size: int, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, n_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S) ids -> logits (B, S, V); every window starts from a zero state."""
        return self.head(self.lstm(self.embed(x))[0])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).reshape(-1, self.vocab_size), y.reshape(-1))


def gpt_count(vocab: int, seq_len: int, d: int, layers: int) -> int:
    """Parameters of :class:`GPT` (the tied unembedding counted once)."""
    return vocab * d + seq_len * d + layers * (12 * d * d + 13 * d) + 2 * d


def charrnn_count(vocab: int, hidden: int, layers: int) -> int:
    """Parameters of :class:`CharRNN` (nn.LSTM keeps two bias vectors per layer)."""
    return vocab * hidden + layers * (8 * hidden * hidden + 8 * hidden) + hidden * vocab + vocab


def size_gpt(target: int, vocab: int, seq_len: int, layers: int, heads: int) -> int:
    """The width (a multiple of ``heads``) whose :func:`gpt_count` is closest to ``target``."""
    return min(range(heads, 4096, heads), key=lambda d: abs(gpt_count(vocab, seq_len, d, layers) - target))


def size_charrnn(target: int, vocab: int, layers: int) -> int:
    """The hidden size whose :func:`charrnn_count` is closest to ``target``."""
    return min(range(1, 4096), key=lambda h: abs(charrnn_count(vocab, h, layers) - target))


def build_tape(name: str, vocab: int, cfg: ExpConfig, backend: str = "eager") -> TapeTransformer:
    kw = dict(seq_len=cfg.seq_len, embed_dim=cfg.embed_dim, num_heads=cfg.num_critics, dropout=0.0,
              backend=backend)
    if name == "seed-noprophet":
        return NoProphetTapeTransformer(vocab, causal=True, **kw)
    return TapeTransformer(vocab, causal=True, design=name, **kw)


# ---------------------------------------------------------------------------------------------
# counting the parameters that reach the output


def reaching_parameters(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """name -> the gradient the NLL of (x, y) gives the tensor (None: none); the model is left as it was."""
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def expected_unreached(name: str, names: Sequence[str], num_critics: int) -> set[str]:
    """The parameters the model's structure says never reach the output."""
    dead: tuple[str, ...] = ()
    if name in TAPE_MODELS:
        dead = NEVER_REACH
    if name == "reference":
        dead += REFERENCE_DEAD + tuple(f"residualheads.{i}." for i in range(num_critics - 1))
    elif name == "seed-noprophet":
        dead += NOPROPHET_DEAD
    return {n for n in names if n.startswith(dead) or n in dead}


def count_parameters(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_critics: int) -> dict[str, Any]:
    """Total and live (reaching the output) counts; raises if the measured set differs from the
    structural one. For the ablation, the columns of ``merge_projection`` that multiply the (zero)
    prophecy are counted out of the live figure after checking that their gradient is exactly zero."""
    params = dict(model.named_parameters())
    grads = reaching_parameters(model, x, y)
    reach = {n: g is not None and bool(g.abs().sum() > 0) for n, g in grads.items()}
    unreached = {n for n, r in reach.items() if not r}
    expected = expected_unreached(name, list(params), num_critics)
    if unreached != expected:
        raise RuntimeError(f"{name}: parameters without gradient {sorted(unreached ^ expected)} disagree with the "
                           "design's structure")
    live = sum(p.numel() for n, p in params.items() if reach[n])
    dead_columns = 0
    if name == "seed-noprophet":
        g = grads["merge_projection.weight"]
        d = g.shape[0]
        if bool(g[:, d:].abs().sum() > 0) or not bool(g[:, :d].abs().sum() > 0):
            raise RuntimeError("seed-noprophet: merge_projection's prophecy columns are not the only dead ones")
        dead_columns = g[:, d:].numel()
    groups = sorted({n.split(".")[0] + (f".{n.split('.')[1]}" if n.startswith("residualheads") else "")
                     for n in unreached})
    out = {"total": sum(p.numel() for p in params.values()), "live": live - dead_columns, "not_reaching": groups}
    if dead_columns:
        out["dead_columns"] = {"merge_projection.weight[:, D:]": dead_columns}
    return out


# ---------------------------------------------------------------------------------------------
# data, evaluation, sampling


def val_windows(ds: CharDataset, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split as consecutive non-overlapping windows: x, y (W, seq_len)."""
    val = ds.val
    w = (len(val) - 1) // seq_len
    if w < 1:
        raise ValueError(f"the validation split has {len(val)} characters, fewer than seq_len + 1 = {seq_len + 1}")
    return val[: w * seq_len].view(w, seq_len), val[1 : w * seq_len + 1].view(w, seq_len)


@torch.no_grad()
def evaluate_bpc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Bits per character over every position of the windows (x, y) (W, S): summed NLL / count / ln 2."""
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        total += model.loss(xb, yb).float().item() * yb.numel()
        count += yb.numel()
    return total / count / LN2


@torch.no_grad()
def next_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, P) -> log-probs of the next character (1, V), from the same forward the loss trains."""
    if isinstance(model, TapeTransformer):
        return model(ids, need_aux=False)[0][:, -1].float()  # training mode, dropout 0: the loss's log-probs
    return F.log_softmax(model(ids)[:, -1].float(), dim=-1)


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, n: int, temperature: float, seed: int, seq_len: int) -> list[int]:
    """Temperature sampling with a fixed generator; the context is the last ``seq_len`` characters
    (a sliding window, full forward every step: the same sampler for every model, no cache)."""
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.tolist()
    for _ in range(n):
        ctx = torch.tensor([ids[-seq_len:]])
        # the PyTorch draw (the Triton kernel gives the same ids; under TRITON_INTERPRET it is slow)
        logp = next_logprobs(model, ctx)
        ids.append(int(pick_next(logp, temperature=temperature, generator=gen, backend="eager")[0]))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------
# the loop: one for every model


def eval_steps(steps: int, points: int) -> list[int]:
    """The steps after which a run is evaluated: ``points`` evenly spaced ones, the last step included."""
    return sorted({max(1, round(k * steps / points)) for k in range(1, points + 1)})


def train_model(model: nn.Module, ds: CharDataset, cfg: ExpConfig, *, lr: float, steps: int, seed: int,
                curve: tuple[torch.Tensor, torch.Tensor],
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Adam under ``LRSchedule(lr, steps, default_warmup(steps))``, clipping, ``model.loss``, batches from a
    generator seeded with ``seed``. Returns the per-step training losses, the curve (val bpc on ``curve``
    at step 0 and at :func:`eval_steps`, with the training CPU seconds spent by then) and the CPU and
    wall times of training and evaluation apart. A non-finite loss ends the run (``diverged_at``)."""
    gen = torch.Generator().manual_seed(seed)
    sched = LRSchedule(peak=lr, total=steps, warmup=default_warmup(steps), min_ratio=cfg.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=sched.rate(1))
    model.train()
    at = set(eval_steps(steps, cfg.eval_points))
    e0 = time.process_time()
    points = [{"step": 0, "cpu_s": 0.0, "val_bpc": evaluate_bpc(model, *curve, cfg.eval_batch), "train_bpc": None}]
    eval_cpu = time.process_time() - e0
    losses: list[float] = []
    cpu = 0.0
    wall0 = time.perf_counter()
    diverged = None
    for step in range(1, steps + 1):
        t0 = time.process_time()
        for group in opt.param_groups:
            group["lr"] = sched.rate(step)
        x, y = ds.get_batch("train", cfg.batch_size, cfg.seq_len, gen)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = loss.item()
        cpu += time.process_time() - t0
        losses.append(value)
        if not math.isfinite(value):
            diverged = step
            break
        if step in at:
            t1 = time.process_time()
            since = [v for v in losses[len(losses) - (step - points[-1]["step"]):]]
            val = evaluate_bpc(model, *curve, cfg.eval_batch)
            points.append({"step": step, "cpu_s": cpu, "val_bpc": val, "train_bpc": sum(since) / len(since) / LN2})
            eval_cpu += time.process_time() - t1
            if progress is not None:
                progress(f"step {step}/{steps}: train {points[-1]['train_bpc']:.3f} bpc, val {val:.3f} bpc, "
                         f"{cpu / step:.3f} CPU s/step")
    done = len(losses)
    return {"steps": steps, "warmup": sched.warmup, "train_loss": [round(v, 5) for v in losses], "curve": points,
            "train_cpu_s": cpu, "cpu_s_per_step": cpu / done, "eval_cpu_s": eval_cpu,
            "wall_s": time.perf_counter() - wall0, "diverged_at": diverged}


# ---------------------------------------------------------------------------------------------
# the plan and its results


def run_key(model: str, lr: float, seed: int, kind: str) -> str:
    return f"{model}|{lr:g}|{seed}|{kind}"


def best_lr(result: dict[str, Any], model: str) -> float | None:
    """The sweep's pick for ``model``: the lowest final val bpc of its seed-0 equal-step runs (a
    diverged run loses; ties: the lower rate); None until every rate of the sweep has run."""
    cfg = result["config"]
    seed0 = cfg["seeds"][0]
    runs = [result["runs"].get(run_key(model, lr, seed0, "equal-step")) for lr in _lrs(cfg, model)]
    if any(r is None for r in runs):
        return None
    ok = [r for r in runs if r["final_val_bpc"] is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["final_val_bpc"], r["lr"]))["lr"]


def _lrs(cfg: dict[str, Any], model: str) -> list[float]:
    return list(cfg["lrs_gpt"] if model == "gpt" else cfg["lrs_charrnn"] if model == "charrnn" else cfg["lrs_tape"])


def equal_time_plan(result: dict[str, Any]) -> dict[str, Any] | None:
    """The equal-time budget and each model's step count, frozen in the results once known (None while
    an equal-step run at a best rate is missing)."""
    if result.get("equal_time") is not None:
        return result["equal_time"]
    cfg = result["config"]
    sps: dict[str, float] = {}
    budget_runs: list[float] = []
    for m in result["models_planned"]:
        lr = best_lr(result, m)
        if lr is None:
            return None
        runs = [result["runs"].get(run_key(m, lr, s, "equal-step")) for s in cfg["seeds"]]
        if any(r is None for r in runs):
            return None
        sps[m] = statistics.fmean(r["cpu_s_per_step"] for r in runs)
        if m == BUDGET_MODEL:
            budget_runs = [r["train_cpu_s"] for r in runs]
    if not budget_runs:
        return None
    budget = statistics.fmean(budget_runs)
    steps = {m: max(1, round(budget / s)) for m, s in sps.items()}
    return {"budget_cpu_s": budget, "budget_model": BUDGET_MODEL, "s_per_step": sps, "steps": steps,
            "method": f"budget = the mean training CPU time of {BUDGET_MODEL}'s equal-step runs at its best rate; a "
                      "model's steps = budget / its mean CPU s/step over its own equal-step runs at its best rate, "
                      "so its schedule (warm-up + cosine over those steps) completes within the budget"}


def plan_runs(result: dict[str, Any]) -> Iterator[tuple[str, float, int, str, int]]:
    """The runs still to do, (model, lr, seed, kind, steps), in the plan's order; runs that depend on
    results not yet there are not yielded (call again after each run)."""
    cfg, models = result["config"], result["models_planned"]
    seeds, n = cfg["seeds"], cfg["steps"]
    for m in models:
        for lr in _lrs(cfg, m):
            yield m, lr, seeds[0], "equal-step", n
    for s in seeds[1:]:
        for m in models:
            lr = best_lr(result, m)
            if lr is not None:
                yield m, lr, s, "equal-step", n
    plan = equal_time_plan(result)
    if plan is not None:
        for s in seeds:
            for m in models:
                yield m, best_lr(result, m), s, "equal-time", plan["steps"][m]


def missing_runs(result: dict[str, Any]) -> list[str]:
    """What the plan still lacks, in words (the runs known, and the phases that cannot be listed yet)."""
    todo = [run_key(m, lr, s, k) + f" ({n} steps)" for m, lr, s, k, n in plan_runs(result)
            if run_key(m, lr, s, k) not in result["runs"]]
    cfg, models = result["config"], result["models_planned"]
    unknown = [m for m in models if best_lr(result, m) is None]
    if unknown:
        todo.append(f"seeds {cfg['seeds'][1:]} at the best rate of {', '.join(unknown)} (sweep unfinished)")
    if equal_time_plan(result) is None:
        todo.append(f"equal-time runs of every model, seeds {cfg['seeds']} (budget not yet measurable)")
    return todo


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _device_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs)"


IDENTITY_KEYS = ("schema", "corpus", "config", "corpus_chars", "vocab_size", "models_planned")


class ExperimentError(ValueError):
    """A user error the CLI reports in one line."""


def run_experiment(cfg: ExpConfig, text: str, *, corpus: str, data_desc: str, json_path: Path, work_dir: Path,
                   models: Sequence[str] = MODELS, max_runs: int | None = None, stop_at: float | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run what the plan still lacks, appending each finished run to ``json_path`` (read first, if it
    exists: its finished runs are skipped). ``max_runs``: stop after that many new runs; ``stop_at``:
    start no run after that time (``time.time()``). The weights of each model's best run so far are kept
    under ``work_dir`` for the samples. Returns the results."""
    for m in models:
        if m not in MODELS:
            raise ExperimentError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if BUDGET_MODEL not in models:
        raise ExperimentError(f"the equal-time budget is {BUDGET_MODEL}'s CPU time: --models must include it")
    ds = CharDataset(text)
    vocab = ds.vocab.size
    vx, vy = val_windows(ds, cfg.seq_len)
    subset = torch.randperm(vx.shape[0], generator=torch.Generator().manual_seed(cfg.val_subset_seed))
    curve = (vx[subset[: cfg.curve_windows]], vy[subset[: cfg.curve_windows]])
    keep = subset[: cfg.final_windows]
    final = (vx, vy) if cfg.final_windows is None else (vx[keep], vy[keep])
    probe = ds.get_batch("train", 2, cfg.seq_len, torch.Generator().manual_seed(cfg.val_subset_seed))
    prompt = ds.val[: cfg.prompt_chars]

    counts: dict[str, dict[str, Any]] = {}
    for m in TAPE_MODELS:
        torch.manual_seed(0)
        counts[m] = count_parameters(m, build_tape(m, vocab, cfg), *probe, cfg.num_critics)
    target = counts[BUDGET_MODEL]["live"]
    gpt_d = size_gpt(target, vocab, cfg.seq_len, cfg.gpt_layers, cfg.gpt_heads)
    lstm_h = size_charrnn(target, vocab, cfg.lstm_layers)
    shapes: dict[str, dict[str, Any]] = {m: {"embed_dim": cfg.embed_dim, "critics": cfg.num_critics, "causal": True}
                                         for m in TAPE_MODELS}
    shapes["gpt"] = {"d_model": gpt_d, "layers": cfg.gpt_layers, "heads": cfg.gpt_heads, "d_ff": 4 * gpt_d,
                     "matched_to": f"{BUDGET_MODEL}'s live parameters"}
    shapes["charrnn"] = {"hidden": lstm_h, "layers": cfg.lstm_layers, "embedding": lstm_h,
                         "matched_to": f"{BUDGET_MODEL}'s live parameters"}

    def build(name: str) -> nn.Module:
        if name in TAPE_MODELS:
            return build_tape(name, vocab, cfg)
        if name == "gpt":
            return GPT(vocab, cfg.seq_len, gpt_d, cfg.gpt_layers, cfg.gpt_heads)
        return CharRNN(vocab, lstm_h, cfg.lstm_layers)

    for m in ("gpt", "charrnn"):
        torch.manual_seed(0)
        counts[m] = count_parameters(m, build(m), *probe, cfg.num_critics)
    expect = {"gpt": gpt_count(vocab, cfg.seq_len, gpt_d, cfg.gpt_layers),
              "charrnn": charrnn_count(vocab, lstm_h, cfg.lstm_layers)}
    for m, n in expect.items():
        if counts[m]["total"] != n:
            raise RuntimeError(f"{m}: {counts[m]['total']} parameters, its count formula says {n}")

    fresh: dict[str, Any] = {
        "schema": SCHEMA, "corpus": corpus, "data": data_desc, "corpus_chars": len(text), "vocab_size": vocab,
        "config": json.loads(json.dumps(asdict(cfg))), "models_planned": list(models),
    }
    result: dict[str, Any]
    if json_path.is_file():
        result = json.loads(json_path.read_text(encoding="utf-8"))
        bad = [k for k in IDENTITY_KEYS if result.get(k) != fresh[k]]
        if bad:
            raise ExperimentError(f"{json_path} holds an experiment with another {', '.join(bad)}: give another "
                                  "--out-dir or move it away")
    else:
        result = {**fresh, "runs": {}, "equal_time": None, "samples": {}}
    result.update({
        "device": _device_name(), "threads": torch.get_num_threads(), "backend": "eager",
        "torch": torch.__version__, "python": platform.python_version(), "time_measure": TIME_NOTE,
        "noise": "the 2-core machine was shared with other jobs during the runs; CPU time is less affected than "
                 "wall time, not immune (caches, frequency)",
        "models": {m: {"label": LABELS[m], "parameters": counts[m], "shape": shapes[m]} for m in models},
        "validation": {
            "split": "val (the last 10% of the corpus, CharDataset's split)", "val_chars": len(ds.val),
            "windows_total": int(vx.shape[0]), "curve_windows": int(curve[0].shape[0]),
            "final_windows": int(final[0].shape[0]), "subset_seed": cfg.val_subset_seed,
            "method": "consecutive non-overlapping windows of seq_len characters, every position scored (contexts "
                      "of 1..seq_len characters); bpc = mean NLL (nats) / ln 2; curve points over a fixed random "
                      "subset of curve_windows windows, the final figure over the first final_windows of the same "
                      "random order (all windows when final_windows is None)",
        },
        "sampler": {"prompt": prompt.tolist(), "prompt_text": ds.vocab.decode(prompt), "new_chars": cfg.sample_chars,
                    "temperature": cfg.sample_temperature, "seed": cfg.sample_seed,
                    "method": "temperature sampling (tapetransformer.sampling.pick_next, fixed torch.Generator), "
                              "context = the last seq_len characters, full forward per character, no cache; from "
                              "each model's best run (lowest final val bpc of all its runs)"},
    })
    work_dir.mkdir(parents=True, exist_ok=True)
    new = 0
    while True:
        todo = next(((m, lr, s, k, n) for m, lr, s, k, n in plan_runs(result)
                     if run_key(m, lr, s, k) not in result["runs"]), None)
        out_of_time = stop_at is not None and time.time() >= stop_at
        if todo is None or (max_runs is not None and new >= max_runs) or out_of_time:
            break
        m, lr, s, kind, n = todo
        key = run_key(m, lr, s, kind)
        if kind == "equal-time" and result.get("equal_time") is None:
            result["equal_time"] = equal_time_plan(result)  # frozen from here on
        same = result["runs"].get(run_key(m, lr, s, "equal-step"))
        if kind == "equal-time" and same is not None and same["steps"] == n:
            result["runs"][key] = {**same, "kind": kind, "same_run_as": run_key(m, lr, s, "equal-step")}
        else:
            torch.manual_seed(s)
            model = build(m)
            say = (lambda msg, k=key: progress(f"[{k}] {msg}")) if progress else None
            run = train_model(model, ds, cfg, lr=lr, steps=n, seed=s, curve=curve, progress=say)
            t0 = time.process_time()
            run["final_val_bpc"] = None if run["diverged_at"] else evaluate_bpc(model, *final, cfg.eval_batch)
            run["final_eval_cpu_s"] = time.process_time() - t0
            run.update({"model": m, "lr": lr, "seed": s, "kind": kind})
            _keep_if_best(result, m, run, model, work_dir)
            result["runs"][key] = run
            new += 1
            if progress is not None:
                progress(f"[{key}] final val {run['final_val_bpc']} bpc, {run['train_cpu_s']:.1f} CPU s")
        result["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        write_json(result, json_path)
    make_samples(result, work_dir, build, prompt, ds)
    result["missing"] = missing_runs(result)
    result["status"] = "complete" if not result["missing"] else "partial"
    write_json(result, json_path)
    return result


def _keep_if_best(result: dict[str, Any], model: str, run: dict[str, Any], net: nn.Module, work_dir: Path) -> None:
    """Save ``net``'s weights when ``run`` is ``model``'s best so far (for the samples)."""
    if run["final_val_bpc"] is None:
        return
    best = [r["final_val_bpc"] for r in result["runs"].values()
            if r["model"] == model and r["final_val_bpc"] is not None]
    if best and min(best) <= run["final_val_bpc"]:
        return
    key = run_key(model, run["lr"], run["seed"], run["kind"])
    torch.save({"key": key, "state": net.state_dict()}, work_dir / f"best-{model}.pt")
    result["samples"].pop(model, None)  # made again from the new best


def make_samples(result: dict[str, Any], work_dir: Path, build: Callable[[str], nn.Module], prompt: torch.Tensor,
                 ds: CharDataset) -> None:
    """A sample from each model's best run whose weights are kept and whose sample is not made yet."""
    cfg = result["config"]
    for m in result["models_planned"]:
        path = work_dir / f"best-{m}.pt"
        if m in result["samples"] or not path.is_file():
            continue
        saved = torch.load(path, map_location="cpu")
        net = build(m)
        net.load_state_dict(saved["state"])
        net.train()  # dropout 0: the loss's forward, as the loop evaluates it
        ids = sample(net, prompt, cfg["sample_chars"], cfg["sample_temperature"], cfg["sample_seed"], cfg["seq_len"])
        result["samples"][m] = {"run": saved["key"], "text": ds.vocab.decode(ids)}


# ---------------------------------------------------------------------------------------------
# summaries: tables, time-to-quality, plot, samples


def _mean_sd(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f} (1 seed)"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f} (n={len(xs)})"


def _runs(result: dict[str, Any], model: str, kind: str, lr: float | None) -> list[dict[str, Any]]:
    return sorted((r for r in result["runs"].values() if r["model"] == model and r["kind"] == kind and r["lr"] == lr),
                  key=lambda r: r["seed"])


def first_reach(curve: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """The training CPU seconds of the first curve point at or below ``threshold`` (None: never)."""
    return next((p["cpu_s"] for p in curve if p["val_bpc"] <= threshold), None)


def ttq_thresholds(result: dict[str, Any]) -> list[float]:
    """Two val-bpc levels for time-to-quality, from the equal-time runs: the lowest that every model's
    best run reaches on its curve (rounded up to 0.05), and 0.25 bpc below it."""
    lows = []
    for m in result["models_planned"]:
        runs = _runs(result, m, "equal-time", best_lr(result, m))
        if not runs:
            return []
        lows.append(min(p["val_bpc"] for r in runs for p in r["curve"]))
    common = math.ceil(max(lows) * 20 - 1e-9) / 20
    return [common, round(common - 0.25, 2)]


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]


def summarize(result: dict[str, Any], notes: str = "", stem: str = "experiment-v2") -> str:
    """The Markdown of one corpus's results, after ``notes`` (the hand-written reading, kept between
    the NOTES markers when the file is regenerated)."""
    cfg = result["config"]
    models = result["models_planned"]
    missing = missing_runs(result)
    corpus = result["corpus"]
    et = result.get("equal_time")
    out = [f"# Experiment v2: the seed design against its ablation and controls ({corpus})", "",
           "Generated by `benchmarks/experiment_designs.py --summarize` from "
           f"`{stem}-{corpus}.json`; plot `{stem}-{corpus}.png`, samples `{stem}-{corpus}-samples.md`.", ""]
    if missing:
        out += ["**Status: partial.** Missing:", ""] + [f"- {m}" for m in missing] + [""]
    else:
        out += ["**Status: complete** (every planned run finished).", ""]
    out += [NOTES_BEGIN, notes.strip(), NOTES_END, "", "## Set-up", "",
            f"{result['data']}, {result['corpus_chars']:,} characters, vocabulary {result['vocab_size']}. "
            f"seq_len {cfg['seq_len']}, batch {cfg['batch_size']}; Adam, gradient clipping {cfg['grad_clip']}, "
            f"linear warm-up (`default_warmup`: 5 % of the run, at most 100 steps) then cosine decay to "
            f"{cfg['min_lr_ratio']} x the peak; equal-step budget {cfg['steps']} steps "
            f"({cfg['steps'] * cfg['batch_size'] * cfg['seq_len']:,} training characters); seeds "
            f"{', '.join(map(str, cfg['seeds']))}; {result['device']}, {result['threads']} torch thread(s), "
            f"backend {result['backend']}, torch {result['torch']}, {result.get('date', '')}.", "",
            f"Timing: {_capital(result['time_measure'])}. {_capital(result['noise'])}.", ""]
    val = result["validation"]
    out += [f"Validation: the {val['split']}, {val['val_chars']:,} characters ({val['windows_total']} windows of "
            f"{cfg['seq_len']}); the final figure is over {val['final_windows']} windows "
            f"({val['final_windows'] * cfg['seq_len']:,} characters), curve points over {val['curve_windows']} "
            "windows of a fixed random subset.", "",
            "| model | shape | parameters | live (reach the output) | not reaching |", "|---|---|---:|---:|---|"]
    for m in models:
        e = result["models"][m]
        p, s = e["parameters"], e["shape"]
        desc = ", ".join(f"{k} {v}" for k, v in s.items() if k != "matched_to")
        dead = p.get("dead_columns", {})
        extra = "; " + ", ".join(f"{k} ({v:,})" for k, v in dead.items()) if dead else ""
        out.append(f"| {e['label']} | {desc} | {p['total']:,} | {p['live']:,} | "
                   f"{', '.join(p['not_reaching']) or '–'}{extra} |")

    out += ["", "## Learning-rate sweep (seed 0, equal steps)", "",
            "Final val bpc of each peak learning rate; **bold**: the rate picked (lowest final val bpc; ties: the "
            "lower rate); *edge*: the pick is the grid's highest or lowest rate, so a rate outside the grid might "
            "do better.", "", "| model | " + " | ".join(["rate", "final val bpc"] * 3) + " |",
            "|---|" + "---:|" * 6]
    for m in models:
        best = best_lr(result, m)
        cells = []
        for lr in _lrs(cfg, m):
            r = result["runs"].get(run_key(m, lr, cfg["seeds"][0], "equal-step"))
            v = "not run" if r is None else (f"diverged at step {r['diverged_at']}" if r["final_val_bpc"] is None
                                             else f"{r['final_val_bpc']:.3f}")
            edge = " *edge*" if lr == best and lr in (min(_lrs(cfg, m)), max(_lrs(cfg, m))) else ""
            cells += [f"{lr:g}", f"**{v}**{edge}" if lr == best else v]
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")

    out += ["", "## Seeds at the best rate: equal steps vs equal CPU time", ""]
    if et:
        out += [f"Equal-time budget: {et['budget_cpu_s']:.1f} CPU s of training at 1 thread. How: {et['method']}. "
                "The CPU seconds a run actually used differ from the budget by the machine's noise.", ""]
    out += ["| model | rate | equal steps: steps | final val bpc, mean ± sd | equal time: steps | CPU s used (mean) "
            "| final val bpc, mean ± sd |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        lr = best_lr(result, m)
        es, tm = _runs(result, m, "equal-step", lr), _runs(result, m, "equal-time", lr)
        fin = [r["final_val_bpc"] for r in es if r["final_val_bpc"] is not None]
        tfin = [r["final_val_bpc"] for r in tm if r["final_val_bpc"] is not None]
        tsteps = str(et["steps"][m]) if et else "–"
        tcpu = f"{statistics.fmean(r['train_cpu_s'] for r in tm):.1f}" if tm else "–"
        per_seed = ", ".join(f"{r['final_val_bpc']:.3f}" for r in es if r["final_val_bpc"] is not None)
        tper = ", ".join(f"{r['final_val_bpc']:.3f}" for r in tm if r["final_val_bpc"] is not None)
        out.append(f"| {LABELS[m]} | {'–' if lr is None else f'{lr:g}'} | {cfg['steps']} | {_mean_sd(fin)}"
                   f"{f' [{per_seed}]' if per_seed else ''} | {tsteps} | {tcpu} | {_mean_sd(tfin)}"
                   f"{f' [{tper}]' if tper else ''} |")
    out += ["", "Per-seed values in brackets, in seed order. sd: the sample standard deviation over seeds. CPU s/step "
            "of each model (mean of its equal-step runs at the best rate): " +
            (", ".join(f"{m} {s:.3f}" for m, s in et["s_per_step"].items()) if et else "not yet measured") + "."]

    out += ["", "## Time to quality (equal-time runs)", ""]
    ths = ttq_thresholds(result)
    if not ths:
        out += ["Not measurable yet: a model has no equal-time run.", ""]
    else:
        out += ["Training CPU seconds (1 thread) until the curve first reaches the level (curve points only: "
                f"{cfg['eval_points']} per run, so the figure is the first evaluated point at or below it; the "
                "curve subset is smaller than the final one). The first level is the lowest that every model's "
                "best run reaches; the second is 0.25 bpc below it.", "",
                "| model | " + " | ".join(f"to {t:.2f} bpc, per seed | mean" for t in ths) + " |",
                "|---|" + "---:|---:|" * len(ths)]
        for m in models:
            runs = _runs(result, m, "equal-time", best_lr(result, m))
            cells = []
            for t in ths:
                hits = [first_reach(r["curve"], t) for r in runs]
                cells.append(", ".join("not reached" if h is None else f"{h:.0f}" for h in hits))
                got = [h for h in hits if h is not None]
                cells.append(f"{statistics.fmean(got):.0f}" + ("" if len(got) == len(hits) else
                                                                 f" ({len(got)} of {len(hits)} seeds)")
                             if got else "not reached")
            out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    out += ["", f"![val bpc vs step and vs CPU seconds]({stem}-{corpus}.png)", "",
            "Left: equal-step runs at the best rate (seed 0 thick, other seeds thin) against the step. Right: "
            "equal-time runs at the best rate against training CPU seconds (1 thread). The axis stops at the highest "
            "value after step 0: the untrained models' step-0 points (~log2 V bpc) are drawn at its top edge.", "",
            "## Samples", "",
            f"{cfg['sample_chars']} characters, temperature {cfg['sample_temperature']}, sampler seed "
            f"{cfg['sample_seed']}, prompt {result['sampler']['prompt_text']!r}; from each model's best run; "
            f"also in `{stem}-{corpus}-samples.md`.", ""]
    out += samples_md(result)
    return "\n".join(out) + "\n"


def samples_md(result: dict[str, Any]) -> list[str]:
    out = []
    for m in result["models_planned"]:
        s = result["samples"].get(m)
        if s is None:
            out += [f"{LABELS[m]}: not made (no finished run).", ""]
            continue
        r = result["runs"][s["run"]]
        out += [f"{LABELS[m]} (run {s['run']}, final val {r['final_val_bpc']:.3f} bpc):", "```",
                result["sampler"]["prompt_text"] + s["text"], "```", ""]
    return out


NOTES_BEGIN, NOTES_END = "<!-- notes: kept by --summarize -->", "<!-- /notes -->"
COLOURS = {"reference": (31, 90, 200), "seed": (210, 50, 30), "seed-noprophet": (230, 150, 20),
           "gpt": (20, 140, 60), "charrnn": (140, 60, 170)}


def plot_results(result: dict[str, Any], path: Path, size: tuple[int, int] = (1100, 480)) -> Path:
    """Two panels: val bpc against the step (equal-step runs at the best rate) and against training
    CPU seconds (equal-time runs at the best rate); seed 0 thick with dots, other seeds thin."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    models = result["models_planned"]
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    legend_h = 16 * ((len(models) + 2) // 3) + 8
    panels = [("equal-step", "step", "training step", 0), ("equal-time", "cpu_s", "training CPU seconds (1 thread)", 1)]
    series = {}
    for kind, axis, _, _ in panels:
        series[kind] = [(m, r["seed"] == result["config"]["seeds"][0], [(p[axis], p["val_bpc"]) for p in r["curve"]])
                        for m in models for r in _runs(result, m, kind, best_lr(result, m))]
    later = [v for ss in series.values() for _, _, c in ss for x, v in c if x > 0 and math.isfinite(v)]
    if not later:
        raise ValueError("no finished run to plot")
    y0, y1 = math.floor(min(later) * 10) / 10, math.ceil(max(later) * 10) / 10
    pw = (w - 40) // 2
    for kind, _, xlabel, col in panels:
        left, right, top, bottom = 50 + col * (pw + 20), (1 - col) * (pw + 20) + 16, 28, 40 + legend_h
        xs = [x for _, _, c in series[kind] for x, _ in c] or [1.0]
        x1 = max(xs) or 1.0

        def pt(x: float, v: float, left: int = left, right: int = right, top: int = top, bottom: int = bottom,
               x1: float = x1) -> tuple[float, float]:
            v = min(max(v, y0), y1)
            return (left + x / x1 * (w - left - right), top + (y1 - v) / (y1 - y0) * (h - top - bottom))

        draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
        for i in range(6):
            v = y0 + i * (y1 - y0) / 5
            _, py = pt(0, v)
            draw.line([(left, py), (w - right, py)], fill=(225, 225, 225))
            draw.text((left - 34, py - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
            px, _ = pt(x1 * i / 5, y0)
            draw.text((px - 10, h - bottom + 6), f"{x1 * i / 5:.0f}", fill=(0, 0, 0), font=font)
        draw.text((left, h - bottom + 20), xlabel, fill=(0, 0, 0), font=font)
        title = (("equal steps" if kind == "equal-step" else "equal CPU-time budget")
                 + ": val bpc (curve subset), best rate")
        draw.text((left, 8), title, fill=(0, 0, 0), font=font)
        for m, first, c in sorted(series[kind], key=lambda t: t[1]):
            line = [pt(x, v) for x, v in c if math.isfinite(v)]
            if len(line) >= 2:
                draw.line(line, fill=COLOURS[m], width=3 if first else 1)
            if first:
                for px, py in line:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[m])
    for i, m in enumerate(models):
        x, y = 50 + (i % 3) * 340, h - legend_h + 4 + 16 * (i // 3)
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=COLOURS[m], width=3)
        draw.text((x + 30, y), LABELS[m], fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def write_summary(json_path: Path) -> list[Path]:
    """The Markdown, the plot and the samples file beside ``json_path``; returns their paths."""
    result = json.loads(json_path.read_text(encoding="utf-8"))
    stem = "experiment-v2"
    corpus = result["corpus"]
    md = json_path.parent / f"{stem}-{corpus}.md"
    old = md.read_text(encoding="utf-8") if md.is_file() else ""
    notes = old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0] if NOTES_BEGIN in old and NOTES_END in old else ""
    result["missing"] = missing_runs(result)
    result["status"] = "complete" if not result["missing"] else "partial"
    write_json(result, json_path)
    md.write_text(summarize(result, notes, stem), encoding="utf-8")
    png = plot_results(result, json_path.parent / f"{stem}-{corpus}.png")
    samples = json_path.parent / f"{stem}-{corpus}-samples.md"
    head = [f"# Experiment v2 samples ({corpus})", "",
            f"{result['config']['sample_chars']} characters each, temperature "
            f"{result['config']['sample_temperature']}, "
            f"sampler seed {result['config']['sample_seed']}, prompt {result['sampler']['prompt_text']!r} (shown "
            f"before each sample); {result['sampler']['method']}.", ""]
    samples.write_text("\n".join(head + samples_md(result)) + "\n", encoding="utf-8")
    return [md, png, samples]


# ---------------------------------------------------------------------------------------------
# CLI


def corpus_name(data: str) -> str:
    if data == "embedded":
        return "embedded"
    stem = Path(data).stem
    return "shakespeare" if "shakespeare" in stem.lower() else stem


def _parse_stop(value: str) -> float:
    """'HH:MM' (UTC, today; tomorrow if already past) -> time.time()."""
    try:
        hh, mm = (int(v) for v in value.split(":"))
        now = _dt.datetime.now(_dt.timezone.utc)
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stop-at wants HH:MM (UTC), got {value!r}") from None
    if at <= now:
        at += _dt.timedelta(days=1)
    return at.timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--data", default="embedded", help="'embedded' or a text file (e.g. tinyshakespeare.txt)")
    ap.add_argument("--name", help="the corpus's name in the output files (default: from --data)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help=f"a subset of {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU-time budget assumes 1)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--work-dir", default=str(WORK_DIR), help="kept weights of each model's best run (for samples)")
    ap.add_argument("--max-runs", type=int, help="stop after this many new runs (the results say what is missing)")
    ap.add_argument("--stop-at", type=_parse_stop, metavar="HH:MM", help="start no run after this UTC time")
    ap.add_argument("--summarize", action="store_true", help="write the md, plot and samples file from the JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    corpus = args.name or corpus_name(args.data)
    json_path = out_dir / f"experiment-v2-{corpus}.json"
    if args.summarize:
        if not json_path.is_file():
            ap.error(f"no {json_path.name} in {out_dir}")
        for p in write_summary(json_path):
            print(p)
        return 0
    if args.threads < 1 or (args.max_runs is not None and args.max_runs < 0):
        ap.error("--threads must be >= 1 and --max-runs >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        text = load_text(args.data)
    except (OSError, ValueError) as e:
        ap.error(f"--data: {e}")
    desc = ("CPython's pydoc topics (the embedded corpus)" if args.data == "embedded" else
            f"tiny-shakespeare ({Path(args.data).name})" if corpus == "shakespeare" else Path(args.data).name)
    say = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        result = run_experiment(CONFIGS[args.config], text, corpus=corpus, data_desc=desc, json_path=json_path,
                                work_dir=Path(args.work_dir) / corpus, models=args.models, max_runs=args.max_runs,
                                stop_at=args.stop_at, progress=say)
    except ExperimentError as e:
        ap.error(str(e))
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own
    for p in write_summary(json_path):
        print(p)
    if result["status"] == "partial" and say is not None:
        say(f"partial: {len(result['missing'])} item(s) missing (see {json_path.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
