"""The accuracy rule of the per-op tests, FlashAttention style.

A kernel's error against a float64 oracle must stay within ``factor`` times PyTorch's own error in the
same dtype against that oracle (2× for outputs, 3× for gradients), computed on the same rounded inputs:

    err(got) ≤ factor · max(err(torch_same), floor) + atol + rtol · max|exact|

``floor`` keeps a case where PyTorch happens to be exact (e.g. near-constant sums) from demanding
exactness; ``atol`` / ``rtol`` are the additive allowances some ops state per dtype (a few ulps at the
output's scale). Each test file states its own values; this module only holds the rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0

Tensors = torch.Tensor | Sequence[torch.Tensor]


def max_err(got: Tensors, exact: Tensors) -> float:
    """Largest absolute difference, in float64, over a tensor or over matching lists of tensors."""
    if isinstance(got, torch.Tensor):
        got, exact = [got], [exact]
    errs = [(g.double() - e.double()).abs().max().item() for g, e in zip(got, exact, strict=True) if g.numel()]
    return max(errs, default=0.0)


def abs_max(t: Tensors) -> float:
    """Largest |value| over a tensor or a list of tensors (0 when empty)."""
    ts = [t] if isinstance(t, torch.Tensor) else list(t)
    return max((x.abs().max().item() for x in ts if x.numel()), default=0.0)


def assert_within_torch_error(
    got: Tensors,
    exact: Tensors,
    torch_same: Tensors,
    factor: float,
    *,
    floor: float = 0.0,
    atol: float = 0.0,
    rtol: float = 0.0,
    name: str = "",
) -> None:
    """Assert err(got) ≤ factor · max(err(torch_same), floor) + atol + rtol · max|exact| (errors vs ``exact``)."""
    err = max_err(got, exact)
    torch_err = max_err(torch_same, exact)
    bound = factor * max(torch_err, floor) + atol + (rtol * abs_max(exact) if rtol else 0.0)
    assert err <= bound, f"{name}: kernel err {err:.3e} > bound {bound:.3e} (PyTorch's own err {torch_err:.3e})"
