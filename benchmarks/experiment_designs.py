"""The experiment the seed author asks for ("my work is garbage until proven otherwise"): does the seed
README's design beat the reference's, and does either beat a plain transformer of the same live size?

Trained on the same corpus, with the same seed, batch sampler, steps, optimizer and loop:

* ``reference``: (a) the reference design with causal semantics (``design="reference", causal=True``);
* ``seed``: (b) the seed design (``design="seed"``: critics fed a mixture of coda and prophet, a
  moderator; always causal);
* ``control-seed`` / ``control-reference``: (c) a plain causal pre-LN transformer built from
  ``torch.nn`` (``nn.TransformerEncoder`` with a causal mask, learned positions, tied unembedding)
  whose parameter count matches the parameters of (b) / (a) that *reach the output*.

"Reaching the output" is measured, not assumed: a parameter tensor reaches the output when the NLL of
one batch gives it a gradient that is not None and not identically zero. In the reference design the
gradient of critics 0..n-2, the prophet, ``rnn_projection`` and the never-called modules is exactly
zero (or None); in the seed design only ``embed_ln`` and ``norm_gate`` get none. The measured set is
checked against that structural statement and the script stops if they disagree.

The loop (:func:`train_model`) is one function for every model: Adam at a constant learning rate,
gradient-norm clipping at 1.0, the mean next-character NLL of ``model.loss(x, y)`` (the fused
Student-t NLL for (a) and (b), ``F.cross_entropy`` for (c)), batches drawn from the training split by
one ``torch.Generator`` seeded identically for every model, so every model sees the same windows in
the same order. Validation (:func:`evaluate_bpc`): the validation split (the last 10% of the corpus,
as ``CharDataset`` splits it) cut into consecutive non-overlapping windows of ``seq_len``
characters; each window's ``seq_len`` next-character predictions are scored (contexts of 1 to
``seq_len`` characters) and bits per character = mean NLL in nats / ln 2. The curve uses a fixed
random subset of those windows (``torch.randperm`` under a fixed seed, the same for every model and
every evaluation); the final figure uses every window of the split.

Usage (CPU, as committed)::

    python benchmarks/experiment_designs.py --config small --data embedded --threads 1
    python benchmarks/experiment_designs.py --config small --data tinyshakespeare.txt --name shakespeare --threads 1
    python benchmarks/experiment_designs.py --summarize      # benchmarks/results/experiment-designs.md from the JSONs

The notebook's size on a GPU (prepared, not run here)::

    python benchmarks/experiment_designs.py --device cuda --config notebook --data FILE --name shakespeare-notebook \\
        --tokens 20000000
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
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

RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = 1
LN2 = math.log(2.0)
MODELS = ("reference", "seed", "control-seed", "control-reference")
LABELS = {
    "reference": "(a) reference design, causal",
    "seed": "(b) seed design",
    "control-seed": "(c) nn.Transformer control, sized to (b)",
    "control-reference": "(c') nn.Transformer control, sized to (a)",
}
# Parameters the structure says get no gradient from the NLL (prefixes of parameter names).
NEVER_REACH = ("embed_ln.", "norm_gate")
REFERENCE_DEAD = ("prophet.", "rnn_projection.", "merger.", "final_norm.", "merge_projection.",
                  "merge_projection_final.")


@dataclass(frozen=True)
class ExpConfig:
    """One experiment size; every model trains with these."""

    seq_len: int
    embed_dim: int  # the TapeTransformer's width (a multiple of 8)
    num_critics: int  # the TapeTransformer's residual heads (its ``num_heads``)
    batch_size: int
    steps: int
    lr: float
    eval_every: int
    curve_windows: int  # validation windows per curve point (a fixed subset)
    final_windows: int | None  # None: every window of the validation split
    control_width: int  # the control's d_model; its depth and FFN width are solved for the count
    control_heads: int
    grad_clip: float = 1.0
    eval_batch: int = 64
    sample_chars: int = 300
    sample_temperature: float = 0.8
    sample_seed: int = 1234
    prompt_chars: int = 32
    val_subset_seed: int = 1234


CONFIGS: dict[str, ExpConfig] = {
    # seconds on a CPU: the smoke test's size
    "tiny": ExpConfig(seq_len=16, embed_dim=16, num_critics=2, batch_size=4, steps=8, lr=1e-2, eval_every=4,
                      curve_windows=8, final_windows=16, control_width=32, control_heads=2, eval_batch=8,
                      sample_chars=24, prompt_chars=8),
    # minutes per model on a CPU (one thread)
    "small": ExpConfig(seq_len=64, embed_dim=64, num_critics=2, batch_size=16, steps=1000, lr=3e-3, eval_every=100,
                       curve_windows=128, final_windows=None, control_width=128, control_heads=4),
    # the notebook's size (vocab 65 on tiny-shakespeare, seq_len 128, dim 256, 4 critics, batch 16): for a GPU
    "notebook": ExpConfig(seq_len=128, embed_dim=256, num_critics=4, batch_size=16, steps=5000, lr=1e-3,
                          eval_every=250, curve_windows=512, final_windows=None, control_width=512, control_heads=8,
                          eval_batch=128),
}


# ---------------------------------------------------------------------------------------------
# the control: a plain causal transformer from torch.nn


class PlainTransformer(nn.Module):
    """Token + learned position embeddings, a pre-LN ``nn.TransformerEncoder`` under a causal mask,
    a final LayerNorm and an unembedding tied to the token embedding (log-softmax over the vocabulary)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2's embedding scale: with the tied unembedding, unit-variance rows would start the
        # logits at a standard deviation of sqrt(d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S) token ids -> log-probs (B, S, V)."""
        s = x.shape[1]
        h = self.tok_emb(x) + self.pos_emb.weight[:s]
        h = self.encoder(h, mask=self.mask[:s, :s], is_causal=True)
        return F.log_softmax(self.ln_f(h) @ self.tok_emb.weight.T, dim=-1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(self(x).reshape(-1, self.vocab_size), y.reshape(-1))


def control_count(vocab: int, seq_len: int, d: int, layers: int, d_ff: int) -> int:
    """Parameters of :class:`PlainTransformer` (the tied unembedding counted once)."""
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * d_ff + d_ff) + (d_ff * d + d) + 4 * d
    return vocab * d + seq_len * d + layers * per_layer + 2 * d


def size_control(target: int, vocab: int, seq_len: int, d: int) -> tuple[int, int]:
    """(layers, d_ff) of a width-``d`` control whose count is closest to ``target``: the depth that
    would match with the usual d_ff = 4d, then the d_ff that matches exactly at that depth."""
    fixed = control_count(vocab, seq_len, d, 0, 0)
    per_4d = control_count(vocab, seq_len, d, 1, 4 * d) - fixed
    layers = max(1, round((target - fixed) / per_4d))
    # count = fixed + layers * (4d² + 4d + d + 4d + d_ff (2d + 1))
    rest = (target - fixed) / layers - (4 * d * d + 9 * d)
    d_ff = max(d, round(rest / (2 * d + 1)))
    return layers, d_ff


# ---------------------------------------------------------------------------------------------
# building and counting


def build_tape(design: str, vocab: int, cfg: ExpConfig, backend: str) -> TapeTransformer:
    return TapeTransformer(vocab, seq_len=cfg.seq_len, embed_dim=cfg.embed_dim, num_heads=cfg.num_critics,
                           dropout=0.0, causal=True, backend=backend, design=design)


def reaching_parameters(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, bool]:
    """name -> whether the NLL of (x, y) gives the tensor a nonzero gradient (the model is left as it was)."""
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    reach = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return reach


def expected_unreached(design: str, names: Sequence[str], num_critics: int) -> set[str]:
    """The parameters the model's structure says never reach the output."""
    dead = NEVER_REACH
    if design == "reference":
        dead = dead + REFERENCE_DEAD + tuple(f"residualheads.{i}." for i in range(num_critics - 1))
    elif design.startswith("control"):
        dead = ()
    return {n for n in names if n.startswith(dead) or n in dead}


def count_parameters(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_critics: int) -> dict[str, Any]:
    """Total and reaching-output counts; raises if the measured set differs from the structural one."""
    params = dict(model.named_parameters())
    reach = reaching_parameters(model, x, y)
    unreached = {n for n, r in reach.items() if not r}
    expected = expected_unreached(name, list(params), num_critics)
    if unreached != expected:
        raise RuntimeError(f"{name}: parameters without gradient {sorted(unreached ^ expected)} disagree with the "
                           "design's structure")
    return {"total": sum(p.numel() for p in params.values()),
            "reach_output": sum(p.numel() for n, p in params.items() if reach[n]),
            "not_reaching": sorted({n.split(".")[0] + (f".{n.split('.')[1]}" if n.startswith("residualheads") else "")
                                    for n in unreached})}


# ---------------------------------------------------------------------------------------------
# data, evaluation, sampling


def val_windows(ds: CharDataset, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split as consecutive non-overlapping windows: x, y (W, seq_len)."""
    val = ds.val
    w = (len(val) - 1) // seq_len
    if w < 1:
        raise ValueError(f"the validation split has {len(val)} characters, fewer than seq_len + 1 = {seq_len + 1}")
    x = val[: w * seq_len].view(w, seq_len)
    y = val[1 : w * seq_len + 1].view(w, seq_len)
    return x, y


@torch.no_grad()
def evaluate_bpc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                 amp: torch.dtype | None = None) -> float:
    """Bits per character over every position of the windows (x, y) (W, S): summed NLL / count / ln 2."""
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with _autocast(device, amp):
            nll = model.loss(xb, yb).float().item()
        total += nll * yb.numel()
        count += yb.numel()
    return total / count / LN2


@torch.no_grad()
def next_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, P) -> log-probs of the next character (1, V), from the same forward the loss trains."""
    if isinstance(model, TapeTransformer):
        logp = model(ids, need_aux=False)[0]  # training mode, dropout 0: the loss's own log-probs
    else:
        logp = model(ids)
    return logp[:, -1].float()


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, n: int, temperature: float, seed: int, seq_len: int,
           device: torch.device) -> list[int]:
    """Temperature sampling with a fixed generator; the context is the last ``seq_len`` characters
    (a sliding window, full forward every step: the same sampler for every model, no cache)."""
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.tolist()
    for _ in range(n):
        ctx = torch.tensor([ids[-seq_len:]], device=device)
        ids.append(int(pick_next(next_logprobs(model, ctx), temperature=temperature, generator=gen)[0]))
    return ids[len(prompt):]


def _autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    if amp is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the loop: one for every model


def train_model(model: nn.Module, ds: CharDataset, cfg: ExpConfig, *, seed: int, device: torch.device,
                curve: tuple[torch.Tensor, torch.Tensor], amp: torch.dtype | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Adam (constant lr), clipping, ``model.loss``; the data sampler seeded with ``seed``. Returns the
    per-step train losses, the curve (val bpc on ``curve`` every ``eval_every`` steps and at step 0)
    and the wall times (training and evaluation apart)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    cx, cy = curve
    model.train()
    points = [{"step": 0, "val_bpc": evaluate_bpc(model, cx, cy, cfg.eval_batch, device, amp), "train_bpc": None}]
    losses: list[float] = []
    train_s = eval_s = 0.0
    pending: list[torch.Tensor] = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        x, y = ds.get_batch("train", cfg.batch_size, cfg.seq_len, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        pending.append(loss.detach().float())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            losses += torch.stack(pending).tolist()  # one device read per interval
            pending = []
            _sync(device)
            t1 = time.perf_counter()
            train_s += t1 - t0
            window = losses[-cfg.eval_every:]
            val = evaluate_bpc(model, cx, cy, cfg.eval_batch, device, amp)
            points.append({"step": step, "val_bpc": val, "train_bpc": sum(window) / len(window) / LN2})
            eval_s += time.perf_counter() - t1
            if not all(math.isfinite(v) for v in window):
                raise FloatingPointError(f"non-finite training loss by step {step}")
            if progress is not None:
                progress(f"step {step}/{cfg.steps}: train {points[-1]['train_bpc']:.3f} bpc, val {val:.3f} bpc, "
                         f"{train_s / step:.3f} s/step")
        else:
            train_s += time.perf_counter() - t0
    return {"train_loss": losses, "curve": points, "train_wall_s": train_s, "eval_wall_s": eval_s,
            "steps_per_s": cfg.steps / train_s if train_s > 0 else None}


# ---------------------------------------------------------------------------------------------
# the experiment


def models_for(control_match: str) -> tuple[str, ...]:
    controls = {"seed": ("control-seed",), "reference": ("control-reference",),
                "both": ("control-seed", "control-reference")}
    if control_match not in controls:
        raise ValueError(f"control_match must be one of {tuple(controls)}, got {control_match!r}")
    return ("reference", "seed") + controls[control_match]


def run_experiment(cfg: ExpConfig, text: str, *, corpus: str, data_desc: str, seeds: Sequence[int] = (0,),
                   device: str | torch.device = "cpu", backend: str | None = None, amp: str = "off",
                   control_match: str = "both", models: Sequence[str] | None = None,
                   on_model_done: Callable[[dict[str, Any]], None] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every model on ``text`` for every seed; returns the results dict (the JSON's schema).

    ``models``: a subset of :func:`models_for`'s names (default: all of them); ``on_model_done`` is
    called with the partial results after each model (the CLI writes the JSON there)."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    dev = torch.device(device)
    backend = backend or ("eager" if dev.type == "cpu" else "auto")
    amp_dtype = {"off": None, "bf16": torch.bfloat16}.get(amp, "bad")
    if amp_dtype == "bad":
        raise ValueError(f"amp must be 'off' or 'bf16', got {amp!r}")
    names = tuple(models) if models is not None else models_for(control_match)
    for n in names:
        if n not in MODELS:
            raise ValueError(f"unknown model {n!r}; choose from {MODELS}")
    ds = CharDataset(text)
    vocab = ds.vocab.size
    vx, vy = val_windows(ds, cfg.seq_len)
    subset = torch.randperm(vx.shape[0], generator=torch.Generator().manual_seed(cfg.val_subset_seed))
    curve = (vx[subset[: cfg.curve_windows]], vy[subset[: cfg.curve_windows]])
    keep = subset[: cfg.final_windows]
    final = (vx, vy) if cfg.final_windows is None else (vx[keep], vy[keep])
    probe = ds.get_batch("train", 2, cfg.seq_len, torch.Generator().manual_seed(cfg.val_subset_seed))
    prompt = ds.val[: cfg.prompt_chars]

    # parameter counts of the two designs (on the CPU, before any training): they size the controls
    counts: dict[str, dict[str, Any]] = {}
    for design in ("reference", "seed"):
        torch.manual_seed(seeds[0])
        counts[design] = count_parameters(design, build_tape(design, vocab, cfg, "eager"), *probe, cfg.num_critics)
    shapes = {f"control-{m}": size_control(counts[m]["reach_output"], vocab, cfg.seq_len, cfg.control_width)
              for m in ("seed", "reference")}

    def build(name: str) -> nn.Module:
        if name in ("reference", "seed"):
            return build_tape(name, vocab, cfg, backend)
        layers, d_ff = shapes[name]
        return PlainTransformer(vocab, cfg.seq_len, cfg.control_width, layers, cfg.control_heads, d_ff)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "corpus": corpus,
        "data": data_desc,
        "corpus_chars": len(text),
        "vocab_size": vocab,
        "config": asdict(cfg),
        "seeds": list(seeds),
        "device": _device_name(dev),
        "backend": backend,
        "amp": amp,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "tokens_per_model": cfg.steps * cfg.batch_size * cfg.seq_len,
        "validation": {
            "split": "val (the last 10% of the corpus, CharDataset's split)",
            "val_chars": len(ds.val),
            "windows_total": int(vx.shape[0]),
            "curve_windows": int(curve[0].shape[0]),
            "final_windows": int(final[0].shape[0]),
            "subset_seed": cfg.val_subset_seed,
            "method": "consecutive non-overlapping windows of seq_len characters; every position of a window is "
                      "scored (contexts of 1..seq_len characters); bpc = mean NLL (nats) / ln 2; the curve uses a "
                      "fixed random subset (torch.randperm, subset_seed), the final figure the whole split "
                      "(or final_windows of that subset)",
        },
        "sampler": {"prompt": prompt.tolist(), "prompt_text": ds.vocab.decode(prompt), "new_chars": cfg.sample_chars,
                    "temperature": cfg.sample_temperature, "seed": cfg.sample_seed,
                    "method": "temperature sampling (tapetransformer.sampling.pick_next, fixed torch.Generator), "
                              "context = the last seq_len characters, full forward per character, no cache"},
        "models": {},
    }
    for name in names:
        entry: dict[str, Any] = {"label": LABELS[name], "runs": []}
        for seed in seeds:
            torch.manual_seed(seed)  # the same initialisation stream for every model
            model = build(name)
            if name not in counts:
                counts[name] = count_parameters(name, model, *probe, cfg.num_critics)
            model.to(dev)
            say = (lambda m, n=name, s=seed: progress(f"[{corpus} {n} seed {s}] {m}")) if progress else None
            run = train_model(model, ds, cfg, seed=seed, device=dev, curve=curve, amp=amp_dtype, progress=say)
            t0 = time.perf_counter()
            run["final_val_bpc"] = evaluate_bpc(model, *final, cfg.eval_batch, dev, amp_dtype)
            run["final_eval_s"] = time.perf_counter() - t0
            ids = sample(model, prompt, cfg.sample_chars, cfg.sample_temperature, cfg.sample_seed, cfg.seq_len, dev)
            run["sample"] = ds.vocab.decode(ids)
            run["seed"] = seed
            entry["runs"].append(run)
            del model
        _seed_stats(entry)
        entry["parameters"] = counts[name]
        if name in shapes:
            entry["shape"] = {"d_model": cfg.control_width, "layers": shapes[name][0], "d_ff": shapes[name][1],
                              "heads": cfg.control_heads, "matched_to": name.removeprefix("control-")}
        else:
            entry["shape"] = {"embed_dim": cfg.embed_dim, "critics": cfg.num_critics, "design": name, "causal": True}
        result["models"][name] = entry
        if on_model_done is not None:
            on_model_done(result)
    return result


def _seed_stats(entry: dict[str, Any]) -> None:
    finals = [r["final_val_bpc"] for r in entry["runs"]]
    entry["final_val_bpc_mean"] = sum(finals) / len(finals)
    entry["final_val_bpc_min"], entry["final_val_bpc_max"] = min(finals), max(finals)


MERGE_KEYS = ("schema", "corpus", "config", "corpus_chars", "vocab_size")


def merge_results(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the runs of ``extra`` (the same config and corpus) added: a seed that both hold
    takes ``extra``'s run; models only one holds are kept. Parameter counts and shapes must agree."""
    for k in MERGE_KEYS:
        if base.get(k) != extra.get(k):
            raise ValueError(f"cannot merge results with different {k}: {base.get(k)!r} vs {extra.get(k)!r}")
    out = dict(base)
    models = dict(base["models"])
    for name, e in extra["models"].items():
        old = models.get(name)
        if old is not None and (old["parameters"], old["shape"]) != (e["parameters"], e["shape"]):
            raise ValueError(f"cannot merge {name}: its parameters or shape differ")
        seeds = {r["seed"] for r in e["runs"]}
        kept = [r for r in (old or {}).get("runs", []) if r["seed"] not in seeds]
        entry = {**e, "runs": sorted(kept + e["runs"], key=lambda r: r["seed"])}
        _seed_stats(entry)
        models[name] = entry
    out["models"] = {m: models[m] for m in MODELS if m in models}
    out["seeds"] = sorted(set(base["seeds"]) | set(extra["seeds"]))
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# outputs: JSON, plot, Markdown


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


COLOURS = {"reference": (31, 90, 200), "seed": (210, 50, 30), "control-seed": (20, 140, 60),
           "control-reference": (140, 60, 170)}


def plot_results(result: dict[str, Any], path: Path, size: tuple[int, int] = (760, 440)) -> Path:
    """Validation bpc (thick, dots) and training bpc per interval (thin) of every model against the step."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 64, 16, 30, 44 + 14 * len(result["models"])
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    series, others = [], []
    for name, entry in result["models"].items():
        run = entry["runs"][0]
        val = [(p["step"], p["val_bpc"]) for p in run["curve"]]
        tr = [(p["step"], p["train_bpc"]) for p in run["curve"] if p["train_bpc"] is not None]
        series.append((name, val, tr))
        others += [(name, [(p["step"], p["val_bpc"]) for p in r["curve"]]) for r in entry["runs"][1:]]
    pts = [v for _, val, tr in series for _, v in val + tr if math.isfinite(v)]
    steps = [s for _, val, _ in series for s, _ in val]
    if not pts:
        raise ValueError("no finite values to plot")
    # the first points (untrained models, ~log2(V) bpc) would flatten the rest: clip the axis at the
    # highest value after the first evaluation, and draw what lies above at the top edge
    later = [v for _, val, tr in series for s, v in val + tr if s > 0 and math.isfinite(v)] or pts
    y0, y1 = min(pts), max(later)
    y0, y1 = math.floor(y0 * 10) / 10, math.ceil(y1 * 10) / 10 + 0.1
    x0, x1 = 0, max(steps) or 1

    def pt(s: float, v: float) -> tuple[float, float]:
        v = min(max(v, y0), y1)
        return left + (s - x0) / (x1 - x0) * (w - left - right), top + (y1 - v) / (y1 - y0) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(6):
        v = y0 + i * (y1 - y0) / 5
        _, py = pt(0, v)
        draw.line([(left, py), (w - right, py)], fill=(225, 225, 225))
        draw.text((left - 40, py - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
        s = x0 + i * (x1 - x0) / 5
        px, _ = pt(s, y0)
        draw.line([(px, h - bottom), (px, h - bottom + 4)], fill=(0, 0, 0))
        draw.text((px - 10, h - bottom + 6), f"{s:.0f}", fill=(0, 0, 0), font=font)
    cfg = result["config"]
    draw.text((left, h - bottom + 20), f"training step (batch {cfg['batch_size']} x {cfg['seq_len']} characters)",
              fill=(0, 0, 0), font=font)
    label = Image.new("RGB", (190, 12), (255, 255, 255))
    ImageDraw.Draw(label).text((0, 0), "bits per character (validation)", fill=(0, 0, 0), font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (4, int((top + h - bottom) / 2 - label.height / 2)))
    more = f"; seeds {', '.join(map(str, result['seeds'][1:]))}: validation, thin" if others else ""
    draw.text((left, 8), f"{result['corpus']}: seed {result['seeds'][0]}: validation bpc (thick, dots), training bpc "
                         f"(faint){more}", fill=(0, 0, 0), font=font)
    for name, val in others:  # further seeds: their validation curves, thin
        draw.line([pt(s, v) for s, v in val], fill=COLOURS[name], width=1)
    for name, val, tr in series:
        col = COLOURS[name]
        faint = tuple(int(c + (255 - c) * 0.55) for c in col)
        if len(tr) >= 2:
            draw.line([pt(s, v) for s, v in tr], fill=faint, width=1)
        draw.line([pt(s, v) for s, v in val], fill=col, width=3)
        for s, v in val:
            px, py = pt(s, v)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
    for i, (name, _, _) in enumerate(series):
        y = h - bottom + 34 + 14 * i
        draw.line([(left, y + 6), (left + 24, y + 6)], fill=COLOURS[name], width=3)
        finals = ", ".join(f"{r['final_val_bpc']:.3f}" for r in result["models"][name]["runs"])
        draw.text((left + 30, y), f"{LABELS[name]}: final val {finals} bpc", fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


NOTES_BEGIN, NOTES_END = "<!-- notes: kept by --summarize -->", "<!-- /notes -->"


def summarize(paths: Sequence[Path], notes: str = "") -> str:
    """The Markdown tables of the JSON results at ``paths``, after ``notes`` (hand-written reading of
    the results, kept between the NOTES markers when the file is regenerated)."""
    out = ["# The seed design, measured: reference vs seed vs a plain transformer", "",
           "Tables, plots and samples generated by `benchmarks/experiment_designs.py --summarize` from the JSON "
           "files beside this one.", "", NOTES_BEGIN, notes.strip(), NOTES_END, ""]
    for path in paths:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg, val = r["config"], r["validation"]
        out += [f"## {r['corpus']}", "",
                f"{r['data']}, {r['corpus_chars']:,} characters, vocabulary {r['vocab_size']}. "
                f"seq_len {cfg['seq_len']}, batch {cfg['batch_size']}, {cfg['steps']} steps "
                f"({r['tokens_per_model']:,} training characters per model), Adam lr {cfg['lr']} constant, "
                f"gradient clipping {cfg['grad_clip']}, seed(s) "
                f"{', '.join(map(str, r['seeds']))}; {r['device']}, {r['threads']} thread(s), backend {r['backend']}, "
                f"torch {r['torch']}, {r['date']}.", "",
                f"Validation: the {val['split']}, {val['val_chars']:,} characters, as {val['windows_total']} "
                f"non-overlapping windows of {cfg['seq_len']}; final bpc over {val['final_windows']} windows, curve "
                f"points over a fixed subset of {val['curve_windows']}.", "",
                "| model | parameters | reaching the output | final val bpc | best curve val bpc | train s/step |",
                "|---|---:|---:|---:|---:|---:|"]
        for e in r["models"].values():
            p = e["parameters"]
            bpcs = [f"{x['final_val_bpc']:.3f}" for x in e["runs"]]
            final = bpcs[0] if len(bpcs) == 1 else (f"{e['final_val_bpc_mean']:.3f} ({', '.join(bpcs)})")
            best = min(q["val_bpc"] for q in e["runs"][0]["curve"])
            sps = e["runs"][0]["steps_per_s"]
            shape = e["shape"]
            desc = (f"{shape['layers']} layers, d {shape['d_model']}, d_ff {shape['d_ff']}" if "layers" in shape
                    else f"dim {shape['embed_dim']}, {shape['critics']} critics")
            out.append(f"| {e['label']} ({desc}) | {p['total']:,} | {p['reach_output']:,} | **{final}** | "
                       f"{best:.3f} | {1 / sps:.3f} |")
        steps = [q["step"] for q in next(iter(r["models"].values()))["runs"][0]["curve"]]
        pick = [s for i, s in enumerate(steps) if s == 0 or i % max(1, (len(steps) - 1) // 5) == 0 or s == steps[-1]]
        out += ["", "Validation bpc on the curve subset during training (first seed):", "",
                "| model | " + " | ".join(f"@{s}" for s in pick) + " |", "|---|" + "---:|" * len(pick)]
        for _name, e in r["models"].items():
            by = {q["step"]: q["val_bpc"] for q in e["runs"][0]["curve"]}
            out.append(f"| {e['label']} | " + " | ".join(f"{by[s]:.3f}" for s in pick) + " |")
        out += ["", f"![loss curves](experiment-designs-{r['corpus']}.png)", "",
                f"Samples ({r['sampler']['new_chars']} characters, temperature {r['sampler']['temperature']}, sampler "
                f"seed {r['sampler']['seed']}, prompt {r['sampler']['prompt_text']!r}):", ""]
        for _name, e in r["models"].items():
            out += [f"{e['label']}:", "```", r["sampler"]["prompt_text"] + e["runs"][0]["sample"], "```", ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def corpus_name(data: str | None) -> str:
    if data in (None, "embedded"):
        return "embedded"
    if data == "shakespeare":
        return "shakespeare"
    return Path(data).stem


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--data", default="embedded", help="'embedded', 'shakespeare' (downloads) or a text file")
    ap.add_argument("--name", help="the corpus's name in the output files (default: from --data)")
    ap.add_argument("--steps", type=int, help="override the config's steps")
    ap.add_argument("--tokens", type=int,
                    help="training characters per model (sets steps = tokens / (batch x seq_len))")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", choices=("eager", "triton", "auto"), help="default: eager on CPU, auto on CUDA")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off")
    ap.add_argument("--control-match", choices=("seed", "reference", "both"), default="both")
    ap.add_argument("--models", nargs="+", choices=MODELS, help="train only these (default: per --control-match)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of the existing JSON (same config and corpus) and add these seeds/models")
    ap.add_argument("--combine", nargs=2, metavar=("BASE", "EXTRA"),
                    help="add EXTRA's runs (a JSON of the same config and corpus) to BASE, in place, and exit")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (1 on a loaded CPU)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--summarize", action="store_true", help="write experiment-designs.md from the JSONs in --out-dir")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.combine:
        base, extra = (json.loads(Path(p).read_text(encoding="utf-8")) for p in args.combine)
        merged = merge_results(base, extra)
        write_json(merged, Path(args.combine[0]))
        plot_results(merged, Path(args.combine[0]).with_suffix(".png"))
        print(args.combine[0])
        return 0
    if args.summarize:
        paths = sorted(Path(p) for p in glob.glob(str(out_dir / "experiment-designs-*.json")))
        if not paths:
            ap.error(f"no experiment-designs-*.json in {out_dir}")
        md = out_dir / "experiment-designs.md"
        old = md.read_text(encoding="utf-8") if md.is_file() else ""
        notes = old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0] if NOTES_BEGIN in old and NOTES_END in old else ""
        md.write_text(summarize(paths, notes), encoding="utf-8")
        print(out_dir / "experiment-designs.md")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if args.tokens is not None and args.steps is not None:
        ap.error("give --steps or --tokens, not both")
    if args.tokens is not None:
        if args.tokens < cfg.batch_size * cfg.seq_len:
            ap.error(f"--tokens must be at least one batch ({cfg.batch_size * cfg.seq_len})")
        cfg = dataclasses.replace(cfg, steps=args.tokens // (cfg.batch_size * cfg.seq_len))
    if args.steps is not None:
        if args.steps < 1:
            ap.error("--steps must be >= 1")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.eval_every is not None:
        if args.eval_every < 1:
            ap.error("--eval-every must be >= 1")
        cfg = dataclasses.replace(cfg, eval_every=args.eval_every)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    text = load_text(args.data)
    corpus = args.name or corpus_name(args.data)
    data_desc = {"embedded": "CPython's pydoc topics (the embedded corpus)"}.get(
        args.data, f"tiny-shakespeare ({Path(args.data).name})" if "shakespeare" in args.data else args.data)
    json_path = out_dir / f"experiment-designs-{corpus}.json"
    previous = json.loads(json_path.read_text(encoding="utf-8")) if args.merge and json_path.is_file() else None
    if previous is not None:  # fail now, not after the first model
        mine = {"schema": SCHEMA, "corpus": corpus, "config": asdict(cfg), "corpus_chars": len(text),
                "vocab_size": len(set(text))}
        bad = [k for k in MERGE_KEYS if previous.get(k) != mine[k]]
        if bad:
            raise ValueError(f"--merge: {json_path} was made with another {', '.join(bad)}; it cannot be merged")

    def done(r: dict[str, Any]) -> None:
        write_json(merge_results(previous, r) if previous is not None else r, json_path)
    say = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    result = run_experiment(cfg, text, corpus=corpus, data_desc=data_desc, seeds=args.seeds, device=args.device,
                            backend=args.backend, amp=args.amp, control_match=args.control_match,
                            models=args.models, on_model_done=done, progress=say)
    if previous is not None:
        result = merge_results(previous, result)
    png = plot_results(result, out_dir / f"experiment-designs-{corpus}.png")
    print(json_path)
    print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
