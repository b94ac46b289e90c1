"""The memory planner: an analytic (or measured) estimate of a training step's peak memory, and the
micro-batch × gradient-accumulation (× activation recomputation) plan that fits a budget.

:func:`estimate_memory` models weights, gradients, optimizer state and the activations autograd
keeps; :func:`calibrate_memory` replaces the per-token constants by what this model, backend and
device really save (:func:`measure_activation_bytes`); :func:`plan_memory` picks the largest
micro-batch that fits ``margin × budget``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from tapetransformer.model import ModelConfig
from tapetransformer.train.config import GIB, MIB, MemoryPlan
from tapetransformer.train.step import LossNet


@dataclass
class MemoryEstimate:
    """Bytes: ``fixed`` (weights, gradients, optimizer state, autocast weight copies, DDP buckets),
    activations kept for backward per sample without (``per_sample``) and with recomputation."""

    fixed: int
    per_sample: int
    per_sample_recompute: int


# Values autograd keeps per token and TapeHead block, in units of D, measured with
# measure_activation_bytes (fp32, dropout 0): the Triton kernels keep ~15.5·D (the layer pair's shared
# input, qkv, attention output and statistics, the LayerNorms' x̂ and the first one's output, the 8D
# MLP pre-activation: the activation is recomputed from it, never stored); the eager backend ~84·D
# (every elementwise op of the activation keeps its 8D input) plus the (H, S) attention
# probabilities; with recomputation ~3·D of block inputs/outputs remain.
FUSED_D_PER_TOKEN_BLOCK = 16
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
        LossNet(model)(x, y, aux)
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
        f"a training step does not fit a {_size(budget_bytes)} budget even with micro-batch 1"
        f"{'' if recompute is False else ' and recomputation'} (estimated {_size(peak(1, True))}); "
        "use a smaller model or a larger budget")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / MIB:.2f} MiB"


# check_fits refuses a configuration only when half its estimate exceeds the memory available: the
# estimate errs high (BACKWARD_SAFETY, the eager constants), so runs that would fit are never refused;
# what it catches are sizes that cannot fit by far (e.g. --embed-dim 100000, --batch-size 100000000),
# which would otherwise fail inside the allocator with a traceback, or thrash the machine.
FIT_MARGIN = 2.0


def count_parameters(mcfg: ModelConfig, backend: str = "auto") -> int:
    """Parameters of the model ``mcfg`` describes, counted on the meta device (nothing is allocated)."""
    from tapetransformer.train.step import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(mcfg, backend).parameters())


def available_bytes(device: torch.device) -> int | None:
    """Memory a run can still take: free CUDA memory, or the host's MemAvailable (Linux; else the free
    physical pages). None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def step_bytes(est: MemoryEstimate, batch: int, seq_len: int, *, micro_batch: int | None = None,
               recompute: bool = False) -> tuple[int, int, int]:
    """(fixed, activations, batch data) of one training step: weights, gradients and optimizer state;
    activations of ``micro_batch`` (default: the whole ``batch``) samples; and the batch's int64 ids
    and targets, which are drawn whole (16 bytes per token)."""
    mb = batch if micro_batch is None else min(micro_batch, batch)
    act = mb * (est.per_sample_recompute if recompute else est.per_sample)
    return est.fixed, act, 16 * batch * seq_len


def check_fits(est: MemoryEstimate, batch: int, seq_len: int, device: torch.device, *,
               micro_batch: int | None = None, recompute: bool = False,
               available: int | None = None) -> tuple[int, int, int] | None:
    """None when the step fits (or the memory available is unknown), else its (fixed, activations,
    data) bytes: when ``estimate / FIT_MARGIN`` exceeds ``available`` (default :func:`available_bytes`)."""
    parts = step_bytes(est, batch, seq_len, micro_batch=micro_batch, recompute=recompute)
    avail = available_bytes(device) if available is None else available
    if avail is None or sum(parts) / FIT_MARGIN <= avail:
        return None
    return parts


def describe_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB)):
        if n >= 0.1 * size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def set_memory_budget(budget_bytes: int, device: torch.device) -> float:
    """Cap this process's CUDA caching allocator at ``budget_bytes``; returns the fraction."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    frac = min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(frac, idx)
    return frac
