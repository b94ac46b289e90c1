"""The learning-rate schedule of a training run: linear warm-up, then cosine decay to a floor.

Why a warm-up (benchmarks/results/training-diagnosis.md): Adam's first updates are sign steps of size
``lr`` on every weight. The first gradients of a fresh model are dominated by fitting the unigram, a
direction that is the same at every position, so at a full learning rate one step adds to every
Linear of the post-LayerNorm TapeHead stacks a rank-one component along it; the LayerNorms then
renormalise the position-dependent part of the hidden state away (5x in one step, ~1000x in twenty at
lr 3e-3), every position emits the same vector — the unigram — and the run cannot recover. Ramping
the rate up while Adam's moment estimates form avoids the collapse.

The schedule is a pure function of the step (and of the run's settings, which the checkpoint
stores), so a resumed run continues it exactly: step ``t`` of a run of ``total`` steps always gets
the same rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "LRSchedule", "default_warmup"]

SCHEDULES = ("cosine", "constant")
# The default warm-up: WARMUP_FRACTION of the run, at most WARMUP_MAX steps (see default_warmup).
WARMUP_FRACTION = 0.05
WARMUP_MAX = 100


def default_warmup(total: int) -> int:
    """Warm-up steps when none are given: 5 % of the run, at most 100, at least 1."""
    return max(1, min(WARMUP_MAX, round(WARMUP_FRACTION * total)))


@dataclass(frozen=True)
class LRSchedule:
    """``rate(step)``: the learning rate of optimizer step ``step`` (1-based: the step that makes
    ``step`` steps done) of a run of ``total`` steps.

    ``cosine``: ``peak · step / warmup`` up to ``warmup``, then ``peak · (r + (1 − r)·(1 + cos(π·f))/2)``
    with ``f`` the fraction of the post-warm-up steps done and ``r = min_ratio``; ``constant``: the
    same warm-up, then ``peak``."""

    peak: float
    total: int
    warmup: int
    min_ratio: float = 0.1
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if not (math.isfinite(self.peak) and self.peak >= 0):
            raise ValueError(f"peak learning rate must be a finite number >= 0, got {self.peak}")
        if self.total < 1 or self.warmup < 0:
            raise ValueError(f"need total >= 1 and warmup >= 0, got total {self.total}, warmup {self.warmup}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def rate(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        if step <= self.warmup:
            return self.peak * step / self.warmup
        if self.kind == "constant":
            return self.peak
        span = self.total - self.warmup
        f = min(1.0, (step - self.warmup) / span) if span > 0 else 1.0
        r = self.min_ratio
        return self.peak * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * f)))
