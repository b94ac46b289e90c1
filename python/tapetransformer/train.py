"""Training loop for an 8 GB card (and for a CPU, slower).

* mixed precision: bf16 autocast where the GPU supports it, else fp16 with a ``GradScaler``; the
  Student-t unembedding/NLL and the attention statistics run in fp32 inside the fused ops;
* a memory budget: :func:`plan_memory` picks micro-batch × gradient accumulation (and activation
  recomputation per TapeHead block when even one sample does not fit) from an analytic estimate
  (:func:`estimate_memory`); on CUDA the budget is also the allocator's per-process memory fraction,
  and an out-of-memory step is retried with half the micro-batch;
* ``torchrun``: DistributedDataParallel (NCCL on GPUs, gloo on CPU); every rank draws the same global
  batch and trains on its slice, so N ranks reproduce single-process training on the whole batch;
* checkpoints (atomic) with model, optimizer, scaler, RNG states, data-sampler position, vocabulary
  and config; ``resume`` continues bit for bit on CPU; ``init_from`` fine-tunes a notebook state_dict;
* tqdm progress (loss, tokens/s, peak memory), periodic validation, CSV/JSON logs, a loss-curve
  PNG and the attention "framebuffer" frames/GIF (:mod:`tapetransformer.viz`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from tapetransformer.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from tapetransformer.data import CharDataset, CharVocab, load_text
from tapetransformer.model import TapeTransformer
from tapetransformer.optim import FusedWolf
from tapetransformer.reference import Wolf, nll_loss

GIB = 1 << 30
MIB = 1 << 20
OPTIMIZERS = ("adam", "wolf", "wolf-eager", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig:
    data: str | None = None  # None/"embedded", "shakespeare", or a text file
    steps: int = 200
    batch_size: int = 8  # the global batch (summed over DDP ranks and accumulation micro-batches)
    lr: float = 3e-3
    optimizer: str = "adam"  # "adam" | "wolf" (multi-tensor) | "wolf-eager" (the reference's) | "sgd"
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
    amp: str = "auto"  # "auto": bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU
    memory_budget_gb: float | None = None
    micro_batch: int | None = None  # overrides the planner
    recompute: bool | None = None  # None: the planner decides
    init_from: str | None = None  # a checkpoint or a bare notebook state_dict to fine-tune
    log_dir: str | None = None  # log.csv, log.json, loss.png
    viz: str | None = None  # directory for attention frames (PNG) and train.gif
    viz_every: int = 50
    viz_rows: int = 4


# ---------------------------------------------------------------------------------------------
# model, optimizer, precision


def build_model(mcfg: ModelConfig, backend: str = "auto") -> TapeTransformer:
    return TapeTransformer(mcfg.vocab_size, seq_len=mcfg.seq_len, embed_dim=mcfg.embed_dim,
                           num_heads=mcfg.num_heads, dropout=mcfg.dropout, causal=mcfg.causal, backend=backend)


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "wolf":
        return FusedWolf(params, lr=lr)
    if name == "wolf-eager":
        return Wolf(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def pick_amp(amp: str, device: str | torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for ``amp`` on ``device``."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    dev = torch.device(device)
    if amp == "off":
        return None, False
    if dev.type != "cuda":
        if amp == "auto":
            return None, False  # CPU autocast is slower than fp32 for this model
        if amp == "bf16":
            return torch.bfloat16, False
        raise ValueError("fp16 mixed precision needs a CUDA device (use --amp bf16 or off on CPU)")
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def enable_recompute(model: TapeTransformer) -> None:
    """Activation recomputation around every TapeHead block: only each block's inputs are kept;
    its internals are recomputed in the backward pass (dropout RNG state is replayed)."""
    if not isinstance(model, TapeTransformer):
        raise ValueError("activation recomputation needs the fused tapetransformer.TapeTransformer")
    model.recompute = True


# ---------------------------------------------------------------------------------------------
# memory budget


@dataclass
class MemoryEstimate:
    """Bytes: ``fixed`` (weights, gradients, optimizer state, autocast weight copies, DDP buckets),
    activations kept for backward per sample without (``per_sample``) and with recomputation."""

    fixed: int
    per_sample: int
    per_sample_recompute: int


@dataclass
class MemoryPlan:
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


# Values autograd keeps per token and TapeHead block, in units of D, measured with
# measure_activation_bytes (fp32, dropout 0): the Triton kernels keep ~25·D (x, qkv, attention output
# and statistics, residual+LayerNorm outputs, the 8D MLP pre-activation and activation); the eager
# backend ~84·D (every elementwise op of the activation keeps its 8D input) plus the (H, S)
# attention probabilities; with recomputation ~3·D of block inputs/outputs remain.
FUSED_D_PER_TOKEN_BLOCK = 26
EAGER_D_PER_TOKEN_BLOCK = 86
RECOMPUTE_D_PER_TOKEN_BLOCK = 3
BACKWARD_SAFETY = 1.5  # gradient buffers of the largest saved tensors live next to them in backward


def estimate_memory(
    mcfg: ModelConfig, n_params: int, *, optimizer: str = "adam", amp: bool = False, need_aux: bool = False,
    fused: bool = True, ddp: bool = False, per_block_token_bytes: float | None = None,
) -> MemoryEstimate:
    """Memory model of a training step (deliberately on the high side).

    ``loss()`` runs the coda (4 blocks) and the last critic (8 blocks); ``need_aux`` runs all critics.
    Per token and block, ``per_block_token_bytes`` (measured, see :func:`calibrate_memory`) or the
    constants above (``fused``: Triton kernels; else the eager backend, whose attention also keeps
    its (H, S) probabilities). Autocast halves the GEMM outputs only (LayerNorm and the statistics
    stay fp32): ×0.75. The fused NLL keeps no (S, V) log-probs; the aux path keeps ~4 fp32 (S, V)
    tensors. Recomputation keeps ~3·D per token and block plus one block's internals at a time.
    ``fixed``: weights and gradients (fp32), optimizer state, autocast's bf16/fp16 weight copies and
    DDP's gradient buckets.
    """
    d, s, v = mcfg.embed_dim, mcfg.seq_len, mcfg.vocab_size
    scale = 0.75 if amp else 1.0
    blocks = 4 + 8 * (mcfg.num_heads if need_aux else 1)
    attn_heads = 4  # TapeHeadBlock's attention heads
    if per_block_token_bytes is None:
        per_block_tok = 4 * scale * (FUSED_D_PER_TOKEN_BLOCK * d if fused else EAGER_D_PER_TOKEN_BLOCK * d)
        per_block_tok += 0 if fused else 3 * attn_heads * s * 4
    else:
        per_block_tok = per_block_token_bytes
    unembed_tok = (4 * v * 4) if need_aux else (2 * v * 4)
    boundary_tok = RECOMPUTE_D_PER_TOKEN_BLOCK * d * 4
    per_sample = int(BACKWARD_SAFETY * s * (blocks * per_block_tok + unembed_tok))
    per_sample_rc = int(BACKWARD_SAFETY * s * (blocks * boundary_tok + per_block_tok + unembed_tok))
    state = {"adam": 2, "wolf": 1, "wolf-eager": 2, "sgd": 0}.get(optimizer, 2)  # eager Wolf: m and its new copy
    fixed = n_params * 4 * (2 + state) + (n_params * 2 if amp else 0) + (n_params * 4 if ddp else 0)
    return MemoryEstimate(fixed=fixed, per_sample=per_sample, per_sample_recompute=per_sample_rc)


def measure_activation_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, aux: bool = False, amp_dtype: torch.dtype | None = None,
) -> int:
    """Bytes autograd saves for the backward of one training forward on (x, y): every saved tensor's
    storage, counted once, parameters excluded. Works on any device (CPU included); RNG states are
    restored afterwards, so a probe does not change the training run."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and st.nbytes() > 0:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    devices = [x.device] if x.device.type == "cuda" else []
    ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        _LossNet(model)(x, y, aux)
    return sum(seen.values())


def calibrate_memory(
    model: nn.Module, mcfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, n_params: int, *, optimizer: str = "adam",
    amp_dtype: torch.dtype | None = None, need_aux: bool = False, ddp: bool = False,
) -> MemoryEstimate:
    """:func:`estimate_memory` with the per-token-and-block bytes measured on this model, backend and
    device: saved bytes of a 2-sample forward minus those of a 1-sample forward (the difference
    removes per-call constants such as autocast's weight copies). ``x``, ``y``: (≥ 2, S)."""
    m1 = measure_activation_bytes(model, x[:1], y[:1], aux=need_aux, amp_dtype=amp_dtype)
    m2 = measure_activation_bytes(model, x[:2], y[:2], aux=need_aux, amp_dtype=amp_dtype)
    per_sample = m2 - m1 if m2 > m1 else m2 / 2
    blocks = 4 + 8 * (mcfg.num_heads if need_aux else 1)
    unembed_tok = (4 * mcfg.vocab_size * 4) if need_aux else (2 * mcfg.vocab_size * 4)
    per_block_tok = max(per_sample / x.shape[1] - unembed_tok, 0.0) / blocks
    return estimate_memory(mcfg, n_params, optimizer=optimizer, amp=amp_dtype is not None, need_aux=need_aux,
                           ddp=ddp, per_block_token_bytes=per_block_tok)


def plan_memory(
    batch_size: int, est: MemoryEstimate, budget_bytes: int | None, *, margin: float = 0.8,
    micro_batch: int | None = None, recompute: bool | None = None,
) -> MemoryPlan:
    """Largest micro-batch whose estimated peak fits ``margin × budget``; recomputation only when a
    single sample does not fit without it. ``micro_batch``/``recompute`` force a choice.

    Micro-batches are ``micro_batch`` samples each (the last may be smaller); their losses are
    weighted by size, so accumulation computes the gradient of the full batch's mean loss.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def peak(mb: int, rc: bool) -> int:
        return est.fixed + mb * (est.per_sample_recompute if rc else est.per_sample)

    def make(mb: int, rc: bool) -> MemoryPlan:
        mb = max(1, min(mb, batch_size))
        return MemoryPlan(mb, math.ceil(batch_size / mb), rc, budget_bytes, peak(mb, rc))

    if micro_batch is not None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        return make(micro_batch, bool(recompute))
    if budget_bytes is None:
        return make(batch_size, bool(recompute))
    usable = margin * budget_bytes - est.fixed
    options = (False, True) if recompute is None else (bool(recompute),)
    for rc in options:
        per = est.per_sample_recompute if rc else est.per_sample
        mb = int(usable // per) if usable > 0 else 0
        if mb >= 1:
            return make(mb, rc)
    raise ValueError(
        f"a training step does not fit a {budget_bytes / GIB:.2f} GiB budget even with micro-batch 1"
        f"{'' if recompute is False else ' and recomputation'} (estimated {peak(1, True) / GIB:.2f} GiB); "
        "use a smaller model or a larger budget")


def set_memory_budget(budget_bytes: int, device: torch.device) -> float:
    """Cap this process's CUDA caching allocator at ``budget_bytes``; returns the fraction."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    frac = min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(frac, idx)
    return frac


# ---------------------------------------------------------------------------------------------
# the step


class _LossNet(nn.Module):
    """forward(x, y, aux) -> (mean NLL, attention weights (B, S) or None): the unit DDP wraps.

    Without ``aux`` the fused ``model.loss`` (only the modules the loss depends on); with ``aux``
    the full training forward, whose attention weights feed the visualization (returned detached:
    they are not part of the loss, so DDP must not wait for gradients through them).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        if aux:
            if isinstance(self.model, TapeTransformer):
                logp, _, attn = self.model(x, need_aux=True)
            else:
                logp, _, attn = self.model(x)
            return nll_loss(logp, y), attn.detach()
        if hasattr(self.model, "loss"):
            return self.model.loss(x, y), None
        return nll_loss(self.model(x)[0], y), None


class Stepper:
    """One optimisation step over a batch: micro-batches (size-weighted losses, DDP gradient sync
    on the last only), autocast, GradScaler, gradient clipping, optimizer step."""

    def __init__(
        self, model: nn.Module, opt: torch.optim.Optimizer, plan: MemoryPlan, *, device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
        ddp: bool = False,
    ) -> None:
        self.model = model
        self.opt = opt
        self.plan = plan
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self.grad_clip = grad_clip
        self.net: nn.Module = _LossNet(model)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the reference's never-used modules (embed_ln, merger, ...) get no gradient at all
            self.net = DDP(self.net, device_ids=ids, find_unused_parameters=True)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        """Backward of the batch's mean loss into ``.grad`` (not zeroed first); returns the detached
        loss and, with ``aux``, the attention weights of the first micro-batch."""
        n = x.shape[0]
        xs, ys = x.split(self.plan.micro_batch), y.split(self.plan.micro_batch)
        total = torch.zeros((), device=x.device)
        first_attn = None
        for i, (xc, yc) in enumerate(zip(xs, ys)):
            last = i == len(xs) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self.autocast():
                    loss, attn = self.net(xc, yc, aux and i == 0)
                # mean over the micro-batch × its share of the batch = the batch mean's gradient
                weighted = loss.float() * (xc.shape[0] / n)
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            total += weighted.detach()
            if attn is not None:
                first_attn = attn
        return total, first_attn

    def step(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        self.opt.zero_grad(set_to_none=True)
        loss, attn = self.accumulate(x, y, aux)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss, attn

    def shrink(self) -> bool:
        """After an out-of-memory error: halve the micro-batch (at 1, turn recomputation on)."""
        p = self.plan
        if p.micro_batch > 1:
            mb = p.micro_batch // 2
            self.plan = MemoryPlan(mb, math.ceil(p.micro_batch * p.accum_steps / mb), p.recompute, p.budget_bytes,
                                   p.estimated_peak_bytes)
            return True
        if not p.recompute and isinstance(self.model, TapeTransformer):
            enable_recompute(self.model)
            self.plan = MemoryPlan(p.micro_batch, p.accum_steps, True, p.budget_bytes, p.estimated_peak_bytes)
            return True
        return False


# ---------------------------------------------------------------------------------------------
# evaluation, RNG, distributed


@torch.no_grad()
def evaluate(model: TapeTransformer, ds: CharDataset, cfg: TrainConfig, gen: torch.Generator,
             amp_dtype: torch.dtype | None = None) -> float:
    """Mean validation NLL over ``cfg.eval_batches`` random full windows.

    Eval mode without a cache computes the same log-probs as training mode (prev_emb, the only
    input that differs, never reaches an output), minus dropout.
    """
    split = "val" if len(ds.val) >= cfg.model.seq_len + 2 else "train"
    was_training = model.training
    model.eval()
    losses = []
    dev = torch.device(cfg.device)
    for _ in range(cfg.eval_batches):
        x, y = ds.get_batch(split, cfg.batch_size, cfg.model.seq_len, gen)
        ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            logp, _ = model(x.to(dev))
        losses.append(nll_loss(logp.float(), y.to(dev)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def rng_state(gen: torch.Generator, eval_gen: torch.Generator | None = None) -> dict[str, Any]:
    """torch's CPU (and CUDA) generators, the data sampler's and the validation sampler's states."""
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if eval_gen is not None:
        st["eval"] = eval_gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any], gen: torch.Generator, eval_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    if "eval" in st:
        eval_gen.set_state(st["eval"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _dist_setup(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group) from torchrun's env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _rank_device(device: str, world: int) -> str:
    dev = torch.device(device)
    if world > 1 and dev.type == "cuda" and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
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


# ---------------------------------------------------------------------------------------------
# the loop


def _load_start(cfg: TrainConfig, text: str) -> tuple[dict | None, dict | None, CharVocab, ModelConfig]:
    """(resume checkpoint, init checkpoint, vocab, model config)."""
    if cfg.resume and Path(cfg.out).is_file():
        ckpt = load_checkpoint(cfg.out)
        vocab = CharVocab(ckpt["vocab"]) if ckpt["vocab"] else CharVocab.from_text(text)
        return ckpt, None, vocab, ModelConfig.from_dict(ckpt["config"])
    vocab = CharVocab.from_text(text)
    if cfg.init_from:
        init = load_checkpoint(cfg.init_from)
        if init["vocab"]:
            vocab = CharVocab(init["vocab"])
            missing = set(text) - set(vocab.chars)
            if missing:
                raise ValueError(f"corpus has {len(missing)} character(s) not in the checkpoint's vocabulary")
        c = init["config"]
        if vocab.size != c["vocab_size"]:
            raise ValueError(f"the corpus has {vocab.size} distinct characters but the checkpoint to fine-tune "
                             f"expects {c['vocab_size']}")
        mcfg = ModelConfig.from_dict({**c, "dropout": cfg.model.dropout, "causal": cfg.model.causal})
        return None, init, vocab, mcfg
    return None, None, vocab, ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab.size})


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns {"step", "train_loss", "val_loss", "checkpoint", "vocab", "model", "log", "plan",
    "peak_mem_mb"}. Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; rank 0 writes files."""
    rank, world, own_group = _dist_setup(cfg.device)
    cleanup: list[Any] = []
    try:
        return _train(cfg, rank, world, cleanup)
    finally:
        for fn in reversed(cleanup):
            fn()
        if own_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, cleanup: list[Any]) -> dict[str, Any]:
    cfg.device = _rank_device(cfg.device, world)
    device = torch.device(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} DDP ranks")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    text = load_text(cfg.data)
    ckpt, init, vocab, mcfg = _load_start(cfg, text)
    cfg.model = mcfg
    ds = CharDataset(text, vocab)
    model = build_model(mcfg, cfg.backend)
    if init is not None:
        model.load_state_dict(init["model"], strict=True)  # casts a float64 notebook state_dict to fp32
    model.to(device)

    amp_dtype, need_scaler = pick_amp(cfg.amp, device)
    n_params = sum(p.numel() for p in model.parameters())
    budget = int(cfg.memory_budget_gb * GIB) if cfg.memory_budget_gb else None
    local_batch = cfg.batch_size // world
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
    plan = plan_memory(local_batch, est, budget, micro_batch=cfg.micro_batch, recompute=cfg.recompute)
    frac = None
    if budget is not None and device.type == "cuda":
        torch.cuda.empty_cache()
        frac = set_memory_budget(budget, device)
        # the cap is process-wide: lift it when training ends (tests, notebooks call train() repeatedly)
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cleanup.append(lambda: torch.cuda.set_per_process_memory_fraction(1.0, idx))
    if plan.recompute:
        enable_recompute(model)

    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=True) if need_scaler else None
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        if ckpt["optimizer"] is not None:
            opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["extra"].get("scaler"):
            scaler.load_state_dict(ckpt["extra"]["scaler"])
        start_step = int(ckpt["step"])
        if ckpt["rng"]:
            set_rng_state(ckpt["rng"], gen, eval_gen)
    stepper = Stepper(model, opt, plan, device=device, amp_dtype=amp_dtype, scaler=scaler,
                      grad_clip=cfg.grad_clip, ddp=world > 1)

    main_rank = rank == 0
    viz = None
    if cfg.viz and main_rank:
        from tapetransformer.viz import FrameWriter

        viz = FrameWriter(cfg.viz, vocab.chars)
    if main_rank and cfg.progress:
        amp_name = "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "") + (
            " + GradScaler" if scaler else "")
        extra = f", memory fraction {frac:.4f}" if frac is not None else ""
        tqdm.write(f"train: {n_params / 1e6:.2f}M parameters on {device} x{world}, {amp_name}, {cfg.optimizer}; "
                   f"{plan.describe()}{extra}", file=sys.stderr)

    log_rows: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * mcfg.seq_len
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not (cfg.progress and main_rank), desc="train", dynamic_ncols=True, file=sys.stderr)
    loss_val = math.nan
    val_loss = math.nan
    peak_mb = math.nan
    model.train()
    for step in bar:
        done = step + 1
        x, y = ds.get_batch("train", cfg.batch_size, mcfg.seq_len, gen)  # same global batch on every rank
        x = x[rank * local_batch:(rank + 1) * local_batch].to(device)
        y = y[rank * local_batch:(rank + 1) * local_batch].to(device)
        # every rank runs the same (aux) graph on frame steps; rank 0 draws
        want_frame = bool(cfg.viz) and cfg.viz_every > 0 and (done % cfg.viz_every == 0 or done == cfg.steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        while True:
            try:
                loss, attn = stepper.step(x, y, aux=want_frame)
                break
            except torch.OutOfMemoryError:
                if device.type != "cuda" or world > 1 or not stepper.shrink():
                    raise
                torch.cuda.empty_cache()
                if main_rank:
                    tqdm.write(f"out of memory: retrying with {stepper.plan.describe()}", file=sys.stderr)
        loss_val = loss.item()  # synchronises, so the step's time is complete
        dt = time.perf_counter() - t0
        tok_s = tokens_per_step / max(dt, 1e-9)
        peak_mb, mem_kind = _peak_mem_mb(device)
        row: dict[str, Any] = {"step": done, "loss": loss_val, "tokens_per_s": tok_s, "peak_mem_mb": peak_mb}
        if viz is not None:
            viz.observe(done, loss_val)
            if want_frame and attn is not None:  # attention of the first micro-batch's rows
                r = min(cfg.viz_rows, attn.shape[0])
                viz.frame(done, x[:r].cpu(), attn[:r].float().cpu())
        eval_now = cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps)
        if eval_now and main_rank:
            val_loss = evaluate(model, ds, cfg, eval_gen)  # fp32: rare, and the reference's precision
            row["val_loss"] = val_loss
        elif eval_now:
            # other ranks advance the validation sampler too, so a resumed run is the same everywhere
            for _ in range(cfg.eval_batches):
                ds.get_batch("val" if len(ds.val) >= mcfg.seq_len + 2 else "train", cfg.batch_size, mcfg.seq_len,
                             eval_gen)
        if main_rank and (eval_now or done == cfg.steps):  # checkpoints at validations and at the end
            extra = {"optimizer_name": cfg.optimizer, "val_loss": val_loss, "plan": asdict(plan),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "world_size": world, "amp": cfg.amp}
            save_checkpoint(cfg.out, model=model, config=mcfg, vocab=vocab.chars, optimizer=opt, step=done,
                            rng=rng_state(gen, eval_gen), extra=extra)
        log_rows.append(row)
        bar.set_postfix(loss=f"{loss_val:.4f}", val=f"{val_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                        mem=f"{peak_mb:,.0f}MB" + ("" if mem_kind == "cuda" else " rss"))
    bar.close()
    if viz is not None:
        viz.close()
    if main_rank:
        _write_logs(cfg, log_rows, plan, n_params, world)
    return {"step": cfg.steps, "train_loss": loss_val, "val_loss": val_loss, "checkpoint": cfg.out,
            "vocab": vocab, "model": model, "log": log_rows, "plan": plan, "peak_mem_mb": peak_mb}


def _write_logs(cfg: TrainConfig, rows: list[dict[str, Any]], plan: MemoryPlan, n_params: int, world: int) -> None:
    fields = ["step", "loss", "tokens_per_s", "peak_mem_mb", "val_loss"]
    csv_paths = [Path(cfg.log_csv)] if cfg.log_csv else []
    if cfg.log_dir:
        csv_paths.append(Path(cfg.log_dir) / "log.csv")
    for path in csv_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    if not cfg.log_dir:
        return
    d = Path(cfg.log_dir)
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "model": cfg.model.to_dict(), "parameters": n_params, "world_size": world, "plan": asdict(plan),
        "log": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                for r in rows],
    }
    (d / "log.json").write_text(json.dumps(summary, indent=1))
    try:
        from tapetransformer.viz import plot_loss_curve
    except ImportError:  # Pillow is the optional "viz" extra
        tqdm.write("loss curve skipped: pip install pillow", file=sys.stderr)
        return
    plot_loss_curve(rows, d / "loss.png")
