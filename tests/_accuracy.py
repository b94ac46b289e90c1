"""The accuracy rule of the per-op tests, FlashAttention style.

A kernel's error against a float64 oracle must stay within ``factor`` times PyTorch's own error in the
same dtype against that oracle (2× for outputs, 3× for gradients), computed on the same rounded inputs:

    err(got) ≤ factor · max(err(torch_same), floor) + atol + rtol · max|exact|

``floor`` keeps a case where PyTorch happens to be exact (e.g. near-constant sums) from demanding
exactness; ``atol`` / ``rtol`` are the additive allowances some ops state per dtype (a few ulps at the
output's scale). Each test file states its own values; this module only holds the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


# ------------------------------------------------------------------------------ dot products, on any BLAS
#
# PyTorch's own fp32 GEMM error depends on the vendor's BLAS (MKL on Intel blocks its sums more finely
# than OpenBLAS on AMD), so a bound on a matmul-based op is never "factor × PyTorch's error" alone: it is
# the a-priori bound below, or PyTorch's error floored at the blocked-sum level (``blocked_dot_floor``).

U32 = 2.0**-24  # fp32 unit roundoff


def blocked_depth(k: int, lanes: int = 16) -> int:
    """Additions a product passes through in a sum blocked into ``lanes`` partial sums added pairwise,
    plus one for a bias: what the project's CPU dot products do (16 lanes on the portable path, more on
    AVX2 / AVX-512, which only makes the depth smaller)."""
    return -(-k // lanes) + max(lanes - 1, 1).bit_length() + 1


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the worst-case relative error of n roundings."""
    return n * u / (1 - n * u)


def dot_apriori_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, depth: int) -> torch.Tensor:
    """Element-wise worst case of fp32 ``x @ w.T + b`` summed ``depth`` deep: γ_depth·(|x|·|w|ᵀ + |b|),
    in float64. Holds whatever the summation order within that depth, so on any BLAS and any ISA."""
    absdot = x.double().abs() @ w.double().abs().T
    if b is not None:
        absdot = absdot + b.double().abs()
    return gamma(depth) * absdot


def blocked_dot_floor(x: torch.Tensor, w: torch.Tensor, lanes: int = 16) -> torch.Tensor:
    """The typical (random-walk) rounding error of fp32 ``x @ w.T`` summed in ``lanes`` blocked partial
    sums, element-wise: u·√(k/lanes)·‖x_i ⊙ w_j‖₂ (the partial sums grow like √j·rms(x·w), each addition
    rounds them). A floor for PyTorch's own error: a BLAS that blocks more finely (MKL) does better, and a
    bound on its error alone would demand more than this project's blocked sums promise."""
    k = x.shape[-1]
    return U32 * (k / lanes) ** 0.5 * ((x.double() ** 2) @ (w.double() ** 2).T).sqrt()


# ------------------------------------------------------------------------------------------ non-finite values

NONFINITE = (float("nan"), float("inf"), float("-inf"))
NONFINITE_IDS = ("nan", "+inf", "-inf")


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, name: str = "", exact: bool = True) -> None:
    """Non-finite values sit at exactly the same positions in ``got`` (a kernel) as in ``want`` (the eager
    path): they neither vanish (a silent wrong answer) nor appear.

    ``exact``: NaN, +inf and -inf each at the same positions. Without it (inputs holding ±inf), an
    indeterminate form may come out NaN on one side and ±inf on the other, as it does between two
    algebraically equal formulas (PyTorch's CPU and CUDA LayerNorm backward differ so), but an
    infinity on both sides must have the same sign.
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    classes = [("non-finite", lambda t: ~torch.isfinite(t))]
    if exact:
        classes += [("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)]
    else:
        both_inf = torch.isinf(got) & torch.isinf(want)
        classes += [("+inf/-inf", lambda t: both_inf & (t > 0))]
    for label, is_cls in classes:
        g, w = is_cls(got), is_cls(want)
        if not torch.equal(g, w):
            where = (g != w).nonzero()[0].tolist()
            raise AssertionError(
                f"{name}: {label} at {int(g.sum())} positions, eager at {int(w.sum())}; first difference at {where} "
                f"(kernel {got[tuple(where)].item()}, eager {want[tuple(where)].item()})"
            )


def outputs_and_grads(
    fn: Callable[..., Tensors], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """fn's outputs and the gradients of Σ out·cotangent w.r.t. each floating input (None where unused)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    wrt = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(outs, wrt, [c.to(o.dtype) for o, c in zip(outs, cotangents)], allow_unused=True))
    return [o.detach() for o in outs], [next(grads) if t.requires_grad else None for t in leaves]


def assert_nonfinite_like_eager(
    kernel: Callable[..., Tensors],
    eager: Callable[..., Tensors],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    names: Sequence[str],
    exact: bool = True,
) -> None:
    """Forward and backward of ``kernel`` put NaN/±inf where ``eager`` does, for every output and every
    input gradient (``names``: the inputs'); ``exact`` as in :func:`assert_same_nonfinite`."""
    k_out, k_grads = outputs_and_grads(kernel, inputs, cotangents)
    e_out, e_grads = outputs_and_grads(eager, inputs, cotangents)
    if exact:  # the NaN cases: the check must have something to find (an infinity may map to finite values)
        assert any(torch.isnan(t).any() for t in e_out + e_grads if t is not None), "the case has no NaN"
    for i, (k, e) in enumerate(zip(k_out, e_out, strict=True)):
        assert_same_nonfinite(k, e, f"output {i}", exact)
    for name, k, e in zip(names, k_grads, e_grads, strict=True):
        if e is None or k is None:  # no gradient on one side: the other has none or exact zeros
            assert all(t is None or int(torch.count_nonzero(t)) == 0 for t in (k, e)), f"d{name}"
            continue
        assert_same_nonfinite(k, e, f"d{name}", exact)
