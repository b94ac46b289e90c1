"""int8 linear with inf and NaN inputs: every mode (weight-only, W8A8, auto), every CPU instruction
set, the pure-PyTorch reference and the CUDA kernels put NaN, +inf and -inf exactly where the float
path ``F.linear(x, q·s, b)`` puts them (W8A8 used to turn a NaN row into the bias).

Non-finite values enter through the activations, the per-channel scales (NaN, ±inf, and a finite
scale so large that q·s overflows) and the bias; float weights holding inf/NaN cannot be quantized
and are refused. Overflow of sums of finite terms depends on the summation order in PyTorch itself,
so the inputs here keep every finite term far from the fp32 range.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tape_kernels
from tape_kernels import int8 as i8

HAS_EXT = i8.extension_available()
NAN, INF = float("nan"), float("inf")
N, K = 70, 29  # N spans two 64-channel tiles; K is not a multiple of 4
HUGE_SCALE = 3e37  # finite, but 127 · s overflows fp32


def _isas() -> list[str]:
    return list(tape_kernels._C.cpu_isas()) if HAS_EXT else []


@pytest.fixture(params=_isas() or ["none"])
def isa(request: pytest.FixtureRequest):
    if request.param == "none":
        pytest.skip("tape_kernels._C is not built")
    before = tape_kernels._C.cpu_isa()
    tape_kernels._C.set_cpu_isa(request.param)
    yield request.param
    tape_kernels._C.set_cpu_isa(before)


def _inputs(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    q[q == 0] = 1
    q[:5, 3] = 0  # a zero weight meets an inf activation: inf · 0 = NaN in the float path
    s = torch.rand(N, generator=g) * 0.02 + 1e-3
    b = torch.randn(N, generator=g)
    return x, q, s, b


def _case(name: str, m: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Named inputs; each puts non-finite values into one operand."""
    x, q, s, b = _inputs(m)
    if name == "x_nan":
        x[1, 4] = NAN
    elif name == "x_nan_row":  # the example: a row of NaNs must not come back as the bias
        x[2] = NAN
    elif name == "x_pos_inf":
        x[0, 3] = INF  # column 3 meets zero weights in channels 0..4
        x[4, 7] = INF
    elif name == "x_neg_inf":
        x[3, 10] = -INF
    elif name == "x_mixed_inf":  # +inf and -inf terms in one sum: NaN where their signs differ
        x[1, 5], x[1, 6] = INF, -INF
        x[5, 8], x[5, 9] = NAN, INF
    elif name == "scale_nan":
        s[7] = NAN
    elif name == "scale_inf":
        s[8], s[9] = INF, -INF
    elif name == "scale_huge":  # q·s overflows to ±inf: sums of ±inf terms, NaN at the zero weight
        q[10] = torch.where(torch.arange(K) % 3 == 0, 127, -127).to(torch.int8)
        q[11] = 127
        q[11, 3] = 0
        s[10] = s[11] = HUGE_SCALE
        s[65] = -HUGE_SCALE
        q[65] = -127
    elif name == "scale_inf_x_inf":
        s[8] = INF
        x[0, 3] = INF
    elif name == "bias":
        b[1], b[2], b[3] = NAN, INF, -INF
        x[0, 0] = -INF  # -inf + +inf bias meet in row 0
    else:
        raise AssertionError(name)
    return x, q, s, b


CASES = ["x_nan", "x_nan_row", "x_pos_inf", "x_neg_inf", "x_mixed_inf", "scale_nan", "scale_inf", "scale_huge",
         "scale_inf_x_inf", "bias"]


def float_path(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear on the dequantized weight, in fp32, rounded once to x's dtype (as the int8 ops do)."""
    y = F.linear(x.float(), q.float() * s.float()[:, None], None if b is None else b.float())
    return y.to(x.dtype)


def pattern(y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y.isnan(), y.isposinf(), y.isneginf()])


def assert_same_nonfinite(y: torch.Tensor, want: torch.Tensor) -> None:
    assert y.shape == want.shape and y.dtype == want.dtype
    got, exp = pattern(y), pattern(want)
    assert exp.any(), "the case must produce non-finite outputs"
    if not torch.equal(got, exp):
        kinds = ["nan", "+inf", "-inf"]
        diffs = [(kinds[k], r, c) for k, r, c in (got != exp).nonzero().tolist()][:8]
        raise AssertionError(f"non-finite pattern differs from F.linear at (kind, row, col) {diffs}")


def _bias(b: torch.Tensor, dtype: torch.dtype, with_bias: bool) -> torch.Tensor | None:
    return b.to(dtype) if with_bias else None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act_quant", [False, True, None])
def test_cpu_kernels_match_float_path(isa: str, case: str, act_quant: bool | None) -> None:
    x, q, s, b = _case(case)
    y = i8.int8_linear(x, q, s, b, act_quant)
    want = float_path(x, q, s, b)
    assert_same_nonfinite(y, want)
    # The outputs recomputed in float are the float path's values, not just its pattern.
    fin = torch.isfinite(want)
    ref = i8.int8_linear_ref(x, q, s, b, bool(act_quant) if act_quant is not None else True)
    assert torch.isfinite(y[fin]).all() and torch.isfinite(ref[fin]).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_and_cpu_ops_match_float_path(case: str, act_quant: bool, dtype: torch.dtype,
                                                with_bias: bool) -> None:
    x, q, s, b = _case(case)
    x = x.to(dtype)
    bias = _bias(b, dtype, with_bias or case == "bias")
    want = float_path(x, q, s, bias)
    assert_same_nonfinite(i8.int8_linear_ref(x, q, s, bias, act_quant), want)
    if HAS_EXT:
        assert_same_nonfinite(i8.int8_linear(x, q, s, bias, act_quant), want)


@pytest.mark.skipif(not HAS_EXT, reason="tape_kernels._C is not built")
def test_float_path_outputs_equal_the_reference() -> None:
    """The recomputed outputs are F.linear's values up to fp32 summation order (finite ones) and the
    untouched outputs stay the W8A8 kernel's own, bit for bit."""
    x, q, s, b = _case("x_pos_inf")
    s[8] = INF
    y = i8.int8_linear(x, q, s, b, act_quant=True)
    want = float_path(x, q, s, b)
    special = torch.zeros_like(want, dtype=torch.bool)
    special[[0, 4]] = True
    special[:, 8] = True
    fin = torch.isfinite(want) & special
    torch.testing.assert_close(y[fin], want[fin], rtol=1e-5, atol=1e-6)
    clean_x, clean_s = x.clone(), s.clone()
    clean_x[0, 3] = clean_x[4, 7] = 0.0
    clean_s[8] = 0.01
    clean = i8.int8_linear(clean_x, q, clean_s, b, act_quant=True)
    assert torch.equal(y[~special], clean[~special])


@pytest.mark.skipif(not HAS_EXT, reason="tape_kernels._C is not built")
def test_quantize_rows_marks_nonfinite_rows() -> None:
    x = torch.randn(4, 9)
    x[1, 2] = NAN
    x[2, 0] = INF
    x[3, 1], x[3, 2] = -INF, NAN
    xq, xs = torch.ops.tape_kernels.quantize_rows(x)
    rq, rs = i8.quantize_rows_ref(x)
    assert torch.equal(xq, rq)
    torch.testing.assert_close(xs, rs, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(xs[0]) and xs[1].isnan() and xs[2].isposinf() and xs[3].isnan()
    assert (xq[1:] == 0).all()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_float_weights_are_refused(bad: float) -> None:
    w = torch.randn(6, 5)
    w[2, 1] = bad
    with pytest.raises(ValueError, match="w holds inf or nan"):
        i8.quantize_weight(w)
    lin = nn.Linear(5, 6)
    with torch.no_grad():
        lin.weight[0, 0] = bad
    with pytest.raises(ValueError, match="inf or nan"):
        i8.Int8Linear.from_float(lin)


@pytest.mark.parametrize("act_quant", [False, True, None])
def test_int8_modules_keep_nan(act_quant: bool | None) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    layer = i8.Int8Linear.from_float(lin, act_quant)
    x = torch.randn(2, 3, K)
    x[1, 2] = NAN
    y = layer(x)
    assert y[1, 2].isnan().all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, :2]).all()
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    qmha = i8.Int8MultiheadAttention.from_float(mha, act_quant)
    h = torch.randn(2, 5, 16)
    h[0, 1, 3] = NAN
    out, _ = qmha(h, h, h)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()  # attention spreads NaN over its sequence


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("m", [3, 40])  # the W8A16 GEMV (M ≤ 16) and the W8A8 dp4a GEMM / cuBLAS path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_float_path(case: str, act_quant: bool, m: int, dtype: torch.dtype) -> None:
    x, q, s, b = _case(case, m=m)
    x, b = x.to(dtype), b.to(dtype)
    want = float_path(x, q, s, b)
    y = i8.int8_linear(x.cuda(), q.cuda(), s.cuda(), b.cuda(), act_quant).cpu()
    assert_same_nonfinite(y, want)
