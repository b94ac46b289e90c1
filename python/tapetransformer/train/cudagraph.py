"""The whole training step in one CUDA graph: forward, backward, gradient clipping, the GradScaler and
the optimizer, captured once and replayed.

At the notebook's size a step is hundreds of small kernels whose launch cost exceeds their math; a
replay launches them all at once from the device. What this needs, and where it comes from:

* static inputs: each step copies its batch into the graph's ``static_x``/``static_y``;
* no host synchronisation inside the step: the batch's token checks are skipped in the graph (its
  ids come from the run's own sampler, in range by construction), the optimizer keeps its step count
  on the device (``Adam(capturable=True, fused=True)``; ``FusedWolf`` has no host reads), gradient
  clipping and the GradScaler (found-inf and scale update) stay on the device; the loss stays on the
  device and the loop reads it back every few steps (``TrainConfig.sync_every``);
* gradients allocated by the captured backward (``.grad`` is None at capture), so replays overwrite
  them instead of accumulating.

Warm-up iterations before the capture (autotuning, Triton compiles, lazily created optimizer state)
would change the run, so parameters, optimizer state, GradScaler state and the RNG are restored
after them: the first replay is the run's first real step, and graphed and eager runs agree to fp32
rounding. Steps that draw attention frames (``--viz``) run eagerly between replays.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tapetransformer.model import TapeTransformer
from tapetransformer.optim import FusedWolf
from tapetransformer.train.step import Stepper

__all__ = ["GraphedStepper", "graph_unsupported"]

WARMUP_STEPS = 3


def graph_unsupported(stepper: Stepper, *, world: int) -> str | None:
    """Why ``stepper``'s step cannot be captured, or None when it can."""
    if stepper.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {stepper.device}"
    if world > 1:
        return "DistributedDataParallel's gradient hooks are not captured here"
    if not isinstance(stepper.model, TapeTransformer):
        return "only the fused TapeTransformer's step is captured"
    if stepper.plan.recompute or stepper.model.recompute:
        return "activation recomputation saves RNG states on the host"
    opt = stepper.opt
    if isinstance(opt, torch.optim.Adam):
        if not opt.defaults.get("capturable"):
            return "Adam needs capturable=True (make_optimizer(..., capturable=True))"
    elif isinstance(opt, FusedWolf):
        if stepper.scaler is not None:
            return "the GradScaler's skipped steps need an optimizer that checks found-inf on the device (adam)"
    elif isinstance(opt, torch.optim.SGD):
        if stepper.scaler is not None:
            return "the GradScaler's skipped steps need an optimizer that checks found-inf on the device (adam)"
    else:
        return f"{type(opt).__name__} rebinds its state tensors every step (use adam or wolf)"
    return None


class GraphedStepper(Stepper):
    """A :class:`Stepper` whose loss-only step is one CUDA-graph replay (captured on the first step
    and again if the batch shape changes). ``step`` returns the loss as a device tensor."""

    deferred = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_net.check = False  # no host read inside the graph; the sampler's ids are in range
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.capture_ms: float | None = None
        # The learning rate as a device tensor: a float would be baked into the captured optimizer
        # step, and the schedule (set_lr) would silently stop changing it.
        for g in self.opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)

    def set_lr(self, lr: float) -> None:
        """Written in place into the device tensor the captured step reads (no host synchronisation)."""
        for g in self.opt.param_groups:
            g["lr"].fill_(lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, Any]:
        if aux:  # the visualization's full forward has other outputs: run it eagerly
            return super().step(x, y, aux)
        if self.graph is None or self.static_x.shape != x.shape:
            self._capture(x, y)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        if isinstance(self.opt, FusedWolf):  # its host-side step counters are not in the graph
            for st in self.opt.state.values():
                st["step"] = st.get("step", 0) + 1
        return self.static_loss.clone(), None  # the next replay overwrites static_loss

    # ------------------------------------------------------------------ capture

    def _state_tensors(self) -> list[torch.Tensor]:
        """Everything a step writes besides gradients: parameters, optimizer state, GradScaler state."""
        out = [p for p in self.params]
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        if self.scaler is not None:
            out += [t for t in (self.scaler._scale, self.scaler._growth_tracker) if t is not None]
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dev = self.device
        if self.scaler is not None and self.scaler._scale is None:
            self.scaler._lazy_init_scale_growth_tracker(dev)
        before = {id(t): t.detach().clone() for t in self._state_tensors()}
        counters = {id(st): st.get("step") for st in self.opt.state.values() if not torch.is_tensor(st.get("step"))}
        rng = torch.cuda.get_rng_state(dev)
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.opt.zero_grad(set_to_none=True)
                self.accumulate(self.static_x, self.static_y)
                self.apply_gradients()
        torch.cuda.current_stream(dev).wait_stream(side)
        # Undo the warm-up: saved values back in place; state the warm-up created starts as it
        # would have (zeros: Adam's moments and step count, the GradScaler's growth tracker).
        with torch.no_grad():
            for t in self._state_tensors():
                saved = before.get(id(t))
                if saved is not None:
                    t.copy_(saved)
                else:
                    t.zero_()
        torch.cuda.set_rng_state(rng, dev)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, _ = self.accumulate(self.static_x, self.static_y)
            self.apply_gradients()
        for st in self.opt.state.values():  # host-side step counters (FusedWolf) as before the warm-up
            if id(st) in counters:
                if counters[id(st)] is None:
                    st.pop("step", None)
                else:
                    st["step"] = counters[id(st)]
        self.static_loss = loss
        torch.cuda.synchronize(dev)
        self.capture_ms = (time.perf_counter() - t0) * 1e3
