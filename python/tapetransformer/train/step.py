"""One optimisation step: the model, optimizer and precision it runs with (:func:`build_model`,
:func:`make_optimizer`, :func:`pick_amp`, :func:`enable_recompute`) and the :class:`Stepper`, which
splits a batch into micro-batches (size-weighted losses, DDP gradient sync on the last only) under
autocast and a GradScaler, clips gradients and steps the optimizer."""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tapetransformer.model import ModelConfig, TapeTransformer
from tapetransformer.optim import FusedWolf
from tapetransformer.reference import Wolf, check_tokens, nll_loss
from tapetransformer.train.compilecache import mark_warm, step_signature
from tapetransformer.train.config import AMP_MODES, OPTIMIZERS, MemoryPlan, check_model_config

__all__ = ["LossNet", "Stepper", "build_model", "enable_recompute", "make_optimizer", "pick_amp"]


def build_model(mcfg: ModelConfig, backend: str = "auto") -> TapeTransformer:
    """The fused model a checkpoint's config describes (``vocab_size`` must be known by now)."""
    check_model_config(mcfg, prefix="")
    if mcfg.vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1 to build a model, got {mcfg.vocab_size}")
    return TapeTransformer(mcfg.vocab_size, seq_len=mcfg.seq_len, embed_dim=mcfg.embed_dim,
                           num_heads=mcfg.num_heads, dropout=mcfg.dropout, causal=mcfg.causal, backend=backend,
                           design=mcfg.design)


def make_optimizer(name: str, params: Any, lr: float, *, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: Adam keeps its step count on the device and runs fused (one launch), so its
    step can live in a CUDA graph.

    Adam runs fused (one pass over each parameter's p, grad, m, v) wherever torch has the kernel, instead
    of the per-parameter loop's several passes and a dispatch per tensor."""
    if name == "adam":
        params = list(params)
        if capturable:
            return torch.optim.Adam(params, lr=lr, capturable=True, fused=True)
        fused = bool(params) and all(isinstance(p, torch.Tensor) and p.device.type in ("cpu", "cuda")
                                     and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=lr, fused=fused or None)
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
# the step


def _prefetch_cpu_isa_probe() -> None:
    """Start Inductor's CPU vector-ISA probe in a background thread.

    On every start (cache or no cache) Inductor checks each SIMD ISA the CPU reports by loading a probe
    library in a child process, and waits on those children on the first step's critical path.
    Started when compilation is requested, it runs while Dynamo traces the loss, so the first step
    finds the answer cached (``functools.cache`` in Inductor). The probe is Inductor's own, so the result
    is the one it would compute; if the hook moved in another torch version, nothing is prefetched."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:
        return

    def probe() -> None:
        with contextlib.suppress(Exception):  # the first step repeats the probe and reports its own errors
            valid_vec_isa_list()

    threading.Thread(target=probe, name="inductor-isa-probe", daemon=True).start()


class LossNet(nn.Module):
    """forward(x, y, aux) -> (mean NLL, attention weights (B, S) or None): the unit DDP wraps.

    Without ``aux`` the fused ``model.loss`` (only the modules the loss depends on); with ``aux``
    the full training forward, whose attention weights feed the visualization (returned detached:
    they are not part of the loss, so DDP must not wait for gradients through them).
    """

    def __init__(self, model: nn.Module, check: bool = True) -> None:
        super().__init__()
        self.model = model
        # False: the caller validated the batch (a compiled or graph-captured step must not read the
        # token range back from the device).
        self.check = check
        # False: the caller links the dead parameters' zero gradients itself (TapeTransformer.link_dead),
        # outside the compiled region.
        self.link = True

    def forward(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        if aux:
            if isinstance(self.model, TapeTransformer):
                logp, _, attn = self.model(x, need_aux=True)
            else:
                logp, _, attn = self.model(x)
            return nll_loss(logp, y), attn.detach()
        if isinstance(self.model, TapeTransformer):
            return self.model.loss(x, y, check=self.check, link=self.link), None
        if hasattr(self.model, "loss"):
            return self.model.loss(x, y), None
        return nll_loss(self.model(x)[0], y), None


class Stepper:
    """One optimisation step over a batch: micro-batches (size-weighted losses, DDP gradient sync
    on the last only), autocast, GradScaler, gradient clipping, optimizer step.

    :meth:`compile` puts the loss path (forward and backward) under ``torch.compile``; the batch's
    token checks then run here, outside the compiled region, and the visualization's aux forward
    stays eager. :class:`GraphedStepper` captures the whole step in a CUDA graph.
    """

    #: Whether :meth:`step` leaves its loss on the device unread (the loop reads losses in batches).
    deferred = False

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
        self.loss_net = LossNet(model)
        self.net: nn.Module = self.loss_net
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the reference's never-used modules (embed_ln, merger, ...) get no gradient at all
            self.net = DDP(self.net, device_ids=ids, find_unused_parameters=True)
        self.hot: nn.Module = self.net  # what the loss-only path calls: the net, or its compiled form
        self._marked: str | None = None  # the step signature last recorded as compiled in Inductor's cache
        self._signature: tuple[Any, str] | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def compiled(self) -> bool:
        return self.hot is not self.net

    def compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile the loss path from the next step on (Inductor; its caches make a second run start
        fast). The compile itself happens on the first call, so that step's time includes it.
        ``backend``: ``torch.compile``'s (tests use ``"aot_eager"``: the same graphs, no code generation);
        ``mode``: ``torch.compile``'s (the GPU benchmark compares its modes)."""
        if self.compiled:
            return
        self.loss_net.check = False  # validated in step(), outside the compiled region
        if self.net is self.loss_net and isinstance(self.model, TapeTransformer):
            # The dead parameters' zero-gradient link runs eagerly after the compiled loss: tracing the
            # walk over their modules was half of Dynamo's work on every start, cache or no cache.
            # (Under DDP the link stays inside, where DDP's forward sees the parameters used.)
            self.loss_net.link = False
        if self.device.type == "cpu":
            _prefetch_cpu_isa_probe()
        self.hot = torch.compile(self.net, backend=backend, mode=mode)

    def compile_signature(self) -> str:
        """The compiled step's signature for :mod:`~tapetransformer.train.compilecache` (whether Inductor's
        cache holds it: ``--compile auto`` then counts a warm start, not a cold compile)."""
        key = (self.plan.micro_batch, self.amp_dtype)
        if self._signature is None or self._signature[0] != key:  # hashing every parameter's shape: once
            sig = step_signature(self.model, self.plan.micro_batch, int(getattr(self.model, "seq_len", 0)),
                                 self.amp_dtype, self.net is not self.loss_net)
            self._signature = (key, sig)
        return self._signature[1]

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
                    aux_now = aux and i == 0
                    if aux_now:
                        loss, attn = self.net(xc, yc, True)
                    else:
                        loss, attn = self.hot(xc, yc)
                        if not self.loss_net.link:
                            loss = self.model.link_dead(loss)
                # mean over the micro-batch × its share of the batch = the batch mean's gradient
                weighted = loss.float() * (xc.shape[0] / n)
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            total += weighted.detach()
            if attn is not None:
                first_attn = attn
        return total, first_attn

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if isinstance(self.model, TapeTransformer) and not self.loss_net.check:
            check_tokens(x, self.model.vocab_size, self.model.seq_len)
            check_tokens(y, self.model.vocab_size, self.model.seq_len, name="targets")
            if y.shape != x.shape:
                raise ValueError(f"targets shape {tuple(y.shape)} != tokens shape {tuple(x.shape)}")

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (the schedule's)."""
        for g in self.opt.param_groups:
            g["lr"] = float(lr)

    def apply_gradients(self) -> None:
        """Unscale (GradScaler), clip, and step the optimizer: no host synchronisation with a fused or
        capturable optimizer, so a CUDA graph can hold it."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def step(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        self._check_batch(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss, attn = self.accumulate(x, y, aux)
        self.apply_gradients()
        if self.compiled:
            sig = self.compile_signature()
            if sig != self._marked:  # the first compiled step of this shape is done: Inductor cached it
                mark_warm(sig)
                self._marked = sig
        return loss, attn

    def shrink(self) -> bool:
        """After an out-of-memory error: halve the micro-batch (at 1, turn recomputation on)."""
        p = self.plan
        if p.micro_batch > 1:
            mb = p.micro_batch // 2
            self.plan = replace(p, micro_batch=mb, accum_steps=math.ceil(p.micro_batch * p.accum_steps / mb))
            return True
        if not p.recompute and isinstance(self.model, TapeTransformer):
            enable_recompute(self.model)
            self.plan = replace(p, recompute=True)
            return True
        return False
