"""Multi-tensor Wolf: the notebook's sign-agreement optimizer as a handful of ``torch._foreach`` ops.

The eager :class:`tapetransformer.reference.Wolf` launches ~8 kernels per parameter tensor; the
notebook-size model has ~300 tensors, so its step is launch-bound on a GPU. Here every arithmetic
stage is one multi-tensor launch over all parameters of a (device, dtype) group (CUDA's fused
foreach kernels; on CPU the same ops loop per tensor). The update, with c = 1/e::

    u = m·(1−c) + g·c
    m ← m·(1−c) + u·c
    p ← p − lr·u   where sign(u)·sign(g) > 0

Every product and sum is rounded in the same order as the eager oracle (no alpha-fused
``add(a, b, alpha)``, which may use an FMA), so on CPU the two agree bit for bit. The state is
stored under the eager optimizer's key (``"p"``), so checkpoints move between the two.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from tapetransformer.reference import WOLF_C, Wolf

__all__ = ["FusedWolf"]


class FusedWolf(Wolf):
    """Drop-in for :class:`tapetransformer.reference.Wolf` (same arguments, state and results),
    stepping with multi-tensor ``torch._foreach`` kernels, one launch set per device and dtype.

    Parameters whose ``grad`` is None are skipped, as in the eager optimizer. Sparse gradients
    are not supported (``ValueError``).
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = 1.0 - WOLF_C
        for group in self.param_groups:
            # foreach kernels need one device and dtype per launch
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedWolf does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._step_bucket(params, group["lr"], keep)
        return loss

    def _step_bucket(self, params: list[torch.Tensor], lr: float, keep: float) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        ms = [s["p"] for s in states]
        # u = m*keep + g*c, each product rounded before the sum (as in the oracle)
        u = torch._foreach_mul(ms, keep)
        torch._foreach_add_(u, torch._foreach_mul(grads, WOLF_C))
        # m <- m*keep + u*c, in place: the state tensors are updated without new allocations
        torch._foreach_mul_(ms, keep)
        torch._foreach_add_(ms, torch._foreach_mul(u, WOLF_C))
        # sign(u)*sign(g) is in {-1, 0, 1}; clamped at 0 it is the 0/1 agreement mask
        agree = torch._foreach_mul(torch._foreach_sign(u), torch._foreach_sign(grads))
        torch._foreach_clamp_min_(agree, 0.0)
        # p - (lr*u)*1 == p - lr*u and p - (lr*u)*0 == p exactly, so this equals the oracle's where()
        # for finite updates
        step = torch._foreach_mul(u, lr)
        torch._foreach_mul_(step, agree)
        torch._foreach_sub_(params, step)
        for s in states:
            s["step"] = s.get("step", 0) + 1
