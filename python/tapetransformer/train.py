"""Training loop: tqdm progress (loss, tokens/s), periodic validation, atomic checkpoints, resume."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tapetransformer.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from tapetransformer.data import CharDataset, CharVocab, load_text
from tapetransformer.model import TapeTransformer
from tapetransformer.reference import Wolf, nll_loss


@dataclass
class TrainConfig:
    data: str | None = None  # None/"embedded", "shakespeare", or a text file
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adam"  # "adam" | "wolf"
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    out: str = "runs/tapetransformer.ckpt"
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # kernels: "auto" (Triton on CUDA), "triton", "eager"
    log_csv: str | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=0))
    progress: bool = True


def build_model(mcfg: ModelConfig, backend: str = "auto") -> TapeTransformer:
    return TapeTransformer(mcfg.vocab_size, seq_len=mcfg.seq_len, embed_dim=mcfg.embed_dim,
                           num_heads=mcfg.num_heads, dropout=mcfg.dropout, causal=mcfg.causal, backend=backend)


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "wolf":
        return Wolf(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'wolf', got {name!r}")


@torch.no_grad()
def evaluate(model: TapeTransformer, ds: CharDataset, cfg: TrainConfig, gen: torch.Generator) -> float:
    """Mean validation NLL over ``cfg.eval_batches`` random full windows.

    Eval mode without a cache computes the same log-probs as training mode (prev_emb, the only
    input that differs, never reaches an output), minus dropout.
    """
    split = "val" if len(ds.val) >= cfg.model.seq_len + 2 else "train"
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = ds.get_batch(split, cfg.batch_size, cfg.model.seq_len, gen)
        logp, _ = model(x.to(cfg.device))
        losses.append(nll_loss(logp, y.to(cfg.device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(), "data": gen.get_state()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the reference model; returns {"step", "train_loss", "val_loss", "checkpoint", "vocab"}."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    text = load_text(cfg.data)
    start_step = 0
    ckpt = None
    if cfg.resume and Path(cfg.out).is_file():
        ckpt = load_checkpoint(cfg.out)
        vocab = CharVocab(ckpt["vocab"]) if ckpt["vocab"] else CharVocab.from_text(text)
        mcfg = ModelConfig.from_dict(ckpt["config"])
    else:
        vocab = CharVocab.from_text(text)
        mcfg = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab.size})
    cfg.model = mcfg
    ds = CharDataset(text, vocab)
    model = build_model(mcfg, cfg.backend).to(cfg.device)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        if ckpt["optimizer"] is not None:
            opt.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        if ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"]["torch"])
            gen.set_state(ckpt["rng"]["data"])
            eval_gen.set_state(ckpt["rng"]["eval"])

    log_rows: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * mcfg.seq_len
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not cfg.progress,
               desc="train", dynamic_ncols=True)
    loss_val = math.nan
    val_loss = math.nan
    t_last = time.perf_counter()
    model.train()
    for step in bar:
        x, y = ds.get_batch("train", cfg.batch_size, mcfg.seq_len, gen)
        x, y = x.to(cfg.device), y.to(cfg.device)
        loss = model.loss(x, y)  # fused Student-t NLL; runs only the modules the loss depends on
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_val = loss.item()
        now = time.perf_counter()
        tok_s = tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        row: dict[str, Any] = {"step": step + 1, "loss": loss_val, "tokens_per_s": tok_s}
        done = step + 1
        if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            val_loss = evaluate(model, ds, cfg, eval_gen)
            row["val_loss"] = val_loss
            rng = {**rng_state(gen), "eval": eval_gen.get_state()}
            save_checkpoint(cfg.out, model=model, config=mcfg, vocab=vocab.chars, optimizer=opt, step=done, rng=rng,
                            extra={"optimizer_name": cfg.optimizer, "val_loss": val_loss})
        log_rows.append(row)
        bar.set_postfix(loss=f"{loss_val:.4f}", val=f"{val_loss:.4f}", tok_s=f"{tok_s:,.0f}")
    bar.close()
    if cfg.log_csv:
        Path(cfg.log_csv).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.log_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "tokens_per_s", "val_loss"])
            w.writeheader()
            w.writerows(log_rows)
    return {"step": cfg.steps, "train_loss": loss_val, "val_loss": val_loss, "checkpoint": cfg.out,
            "vocab": vocab, "model": model, "log": log_rows}
