"""TapeHead combines (sigmoid-XOR, pair softmax, sum): Triton kernel vs eager reference and fp64."""

from __future__ import annotations

import math

import _accuracy as acc
import pytest
import torch

from tape_kernels.combine import TapeHeadCombine, tapehead_combine, tapehead_combine_ref

# Direct comparison against the eager reference in the same dtype.
TOL = {
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Error floor below which "2x torch's error" is not meaningful (half an ulp near 1 in that dtype).
FLOOR = {torch.float32: 6e-8, torch.float16: 4.9e-4, torch.bfloat16: 3.9e-3}
DTYPES = list(TOL)
SHAPES = [(1,), (7, 33), (2, 5, 129), (1031,)]


def _inputs(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hl = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    hr = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return hl, hr


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_ref_and_fp64(mode, dtype, shape):
    hl, hr = _inputs(shape, dtype)
    out = tapehead_combine(hl, hr, mode, backend="triton")
    assert out.dtype == dtype and out.shape == hl.shape
    ref = tapehead_combine_ref(hl, hr, mode)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    exact = tapehead_combine_ref(hl.double(), hr.double(), mode)
    acc.assert_within_torch_error(out, exact, ref, acc.OUT_FACTOR, atol=FLOOR[dtype], name="h")


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_ref_and_fp64(mode, dtype):
    hl, hr = _inputs((3, 7, 41), dtype, seed=1)
    g = _inputs((3, 7, 41), dtype, seed=2, scale=1.0)[0]

    def grads(fn, a, b, gg):
        a = a.detach().requires_grad_()
        b = b.detach().requires_grad_()
        return torch.autograd.grad(fn(a, b), (a, b), gg)

    got = grads(lambda a, b: tapehead_combine(a, b, mode, backend="triton"), hl, hr, g)
    ref = grads(lambda a, b: tapehead_combine_ref(a, b, mode), hl, hr, g)
    exact = grads(lambda a, b: tapehead_combine_ref(a, b, mode), hl.double(), hr.double(), g.double())
    atol, rtol = TOL[dtype]
    for k, r, e in zip(got, ref, exact):
        assert k.dtype == dtype
        torch.testing.assert_close(k, r, atol=atol, rtol=rtol)
        acc.assert_within_torch_error(k, e, r, acc.GRAD_FACTOR, atol=FLOOR[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow inside the interpreter, masked by tl.where
def test_pair_softmax_is_stable_at_extreme_values():
    hl = torch.tensor([1e4, -1e4, 3e4, 0.0, -3e38, 3e38])
    hr = torch.tensor([-1e4, 1e4, 3e4, 1e-30, 3e38, -3e38])
    hl.requires_grad_()
    hr.requires_grad_()
    out = tapehead_combine(hl, hr, 1, backend="triton")
    # The pair softmax picks the larger input when the gap is huge.
    torch.testing.assert_close(out.detach(), torch.maximum(hl, hr).detach(), atol=1e-6, rtol=1e-6)
    dl, dr = torch.autograd.grad(out.sum(), (hl, hr))
    assert torch.isfinite(dl).all() and torch.isfinite(dr).all()
    # Away from the tie, the gradient goes wholly to the winner; at a tie it splits (1/2 + δ·s(1−s) = 1/2).
    torch.testing.assert_close(dl, torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0]))
    torch.testing.assert_close(dr, torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0, 0.0]))


@pytest.mark.parametrize("mode", [0, 1])
def test_non_contiguous_inputs(mode):
    hl, hr = _inputs((33, 17), torch.float32, seed=3)
    a, b = hl.t(), hr.t()
    assert not a.is_contiguous()
    out = tapehead_combine(a, b, mode, backend="triton")
    torch.testing.assert_close(out, tapehead_combine_ref(a, b, mode), atol=2e-6, rtol=2e-6)


def test_empty_input():
    e = torch.empty(0, 4)
    assert tapehead_combine(e, e, 0, backend="triton").shape == (0, 4)


def test_module_and_eager_dispatch():
    hl, hr = _inputs((4, 9), torch.float32, seed=4)
    m = TapeHeadCombine(1)
    assert "mode=1" in repr(m)
    torch.testing.assert_close(m(hl, hr), tapehead_combine_ref(hl, hr, 1), atol=2e-6, rtol=2e-6)
    # backend="eager" and fp64 take the reference itself, bit for bit.
    assert torch.equal(tapehead_combine(hl, hr, 0, backend="eager"), tapehead_combine_ref(hl, hr, 0))
    a, b = hl.double(), hr.double()
    assert torch.equal(tapehead_combine(a, b, 1), tapehead_combine_ref(a, b, 1))


def test_bad_input_raises_value_error():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="mode"):
        tapehead_combine(x, x, 3)
    with pytest.raises(ValueError, match="mode"):
        TapeHeadCombine(True)
    with pytest.raises(ValueError, match="same shape"):
        tapehead_combine(x, torch.zeros(4, 3), 0)
    with pytest.raises(ValueError, match="dtype"):
        tapehead_combine(x, x.half(), 0)
    with pytest.raises(ValueError, match="dtype"):
        tapehead_combine(x.long(), x.long(), 0)
    with pytest.raises(ValueError, match="torch.Tensor"):
        tapehead_combine(x, [1.0], 0)


def test_cpu_without_interpreter_takes_the_eager_path(monkeypatch):
    hl, hr = _inputs((4, 9), torch.float32, seed=5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for mode in (0, 1, 2):
        assert torch.equal(tapehead_combine(hl, hr, mode), tapehead_combine_ref(hl, hr, mode))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        tapehead_combine(hl, hr, 0, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("value", acc.NONFINITE, ids=acc.NONFINITE_IDS)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_nonfinite_propagate_like_eager(mode: int, value: float, dtype: torch.dtype) -> None:
    """NaN / ±inf in hl, in hr, and in both at one place: h, dhl, dhr non-finite exactly where the
    eager combine's are."""
    hl, hr = _inputs((4, 33), dtype, seed=6)
    g = _inputs((4, 33), dtype, seed=7, scale=1.0)[0]
    hl[0, 3] = value
    hr[1, 8] = value
    hl[2, 20] = hr[2, 20] = value
    hl[3, 1], hr[3, 1] = value, -value  # opposite infinities
    acc.assert_nonfinite_like_eager(lambda a, b: tapehead_combine(a, b, mode, backend="triton"),
                                lambda a, b: tapehead_combine_ref(a, b, mode), [hl, hr], [g], ["hl", "hr"],
                                exact=math.isnan(value))  # fmt: skip
