"""Residual + LayerNorm: Triton kernel vs F.layer_norm(x + residual) and fp64."""

from __future__ import annotations

import math

import _accuracy as acc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tape_kernels.layernorm import AddLayerNorm, add_layer_norm, add_layer_norm_ref

# Direct comparison against the eager reference in the same dtype.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# Absolute error floor for the "≤ k× torch's error vs fp64" checks (a few ulps at the output scale).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = list(TOL)
SHAPES = [(1, 7), (5, 3, 37), (17, 128), (3, 1000), (2, 4096)]


def _inputs(shape, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, r, w, b, dy)]


def _run(fn, x, r, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


def _kernel(x, r, w, b):
    return add_layer_norm(x, r, w, b, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_vs_ref_and_fp64(shape, dtype):
    x, r, w, b, dy = _inputs(shape, dtype)
    y, grads = _run(_kernel, x, r, w, b, dy)
    y_ref, grads_ref = _run(add_layer_norm_ref, x, r, w, b, dy)
    y64, grads64 = _run(add_layer_norm_ref, *(t.double() for t in (x, r, w, b, dy)))
    assert y.dtype == dtype and y.shape == x.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    acc.assert_within_torch_error(y, y64, y_ref, acc.OUT_FACTOR, atol=FLOOR[dtype], name="y")
    # dweight sums dy·x̂ over all rows, so its absolute scale grows like sqrt(rows).
    rows = x.numel() // x.shape[-1]
    for name, k, ref, exact in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref, grads64):
        assert k.dtype == dtype, name
        scale = rows**0.5 if name in ("dweight", "dbias") else 1.0
        torch.testing.assert_close(k, ref, atol=atol * scale, rtol=rtol, msg=name)
        acc.assert_within_torch_error(k, exact, ref, acc.GRAD_FACTOR, atol=FLOOR[dtype] * scale, name=name)


def test_large_mean_rows_keep_precision():
    # Rows with |mean| >> std: a one-pass E[z²] − E[z]² variance would lose most digits in fp32.
    x, r, w, b, dy = _inputs((6, 256), torch.float32, seed=1, offset=3000.0)
    y, grads = _run(_kernel, x, r, w, b, dy)
    y64, grads64 = _run(add_layer_norm_ref, *(t.double() for t in (x, r, w, b, dy)))
    y_ref, grads_ref = _run(add_layer_norm_ref, x, r, w, b, dy)
    acc.assert_within_torch_error(y, y64, y_ref, acc.OUT_FACTOR, atol=1e-6, name="y")
    for k, ref, exact in zip(grads, grads_ref, grads64):
        acc.assert_within_torch_error(k, exact, ref, acc.GRAD_FACTOR, atol=1e-6)


@pytest.mark.parametrize("rows", [9, 50])
def test_backward_is_deterministic_across_partials(rows):
    # 9 rows -> programs of 2 rows (the last one short); 50 rows -> 8 programs of 7.
    x, r, w, b, dy = _inputs((rows, 96), torch.float32, seed=2)
    _, g1 = _run(_kernel, x, r, w, b, dy)
    _, g2 = _run(_kernel, x, r, w, b, dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    _, g64 = _run(add_layer_norm_ref, *(t.double() for t in (x, r, w, b, dy)))
    torch.testing.assert_close(g1[2].double(), g64[2], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g1[3].double(), g64[3], atol=2e-5, rtol=1e-5)


def test_mixed_dtypes_promote_and_autocast_dtype_matches_layer_norm():
    x, r, w, b, _ = _inputs((4, 5, 48), torch.float32, seed=3)
    out = add_layer_norm(x.half(), r, w, b, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, add_layer_norm_ref(x.half().float(), r, w, b), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = add_layer_norm(x.bfloat16(), r.bfloat16(), w, b, backend="triton")
        ref_ac = nn.functional.layer_norm(x.bfloat16() + r.bfloat16(), (48,), w, b)
    assert out_ac.dtype == ref_ac.dtype  # what nn.LayerNorm gives under autocast on this device
    torch.testing.assert_close(out_ac, ref_ac, atol=3e-2, rtol=3e-2)


def test_module_is_a_drop_in_for_layernorm_state_dict():
    torch.manual_seed(0)
    ln = nn.LayerNorm(40)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    m = AddLayerNorm(40)
    m.load_state_dict(ln.state_dict(), strict=True)
    assert set(m.state_dict()) == {"weight", "bias"}
    x, r = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(m(x, r), ln(x + r), atol=1e-5, rtol=1e-5)
    assert "eps=1e-05" in repr(m)


def test_eager_paths():
    x, r, w, b, _ = _inputs((3, 16), torch.float32, seed=4)
    assert torch.equal(add_layer_norm(x, r, w, b, backend="eager"), add_layer_norm_ref(x, r, w, b))
    x64, r64, w64, b64 = (t.double() for t in (x, r, w, b))
    assert torch.equal(add_layer_norm(x64, r64, w64, b64), add_layer_norm_ref(x64, r64, w64, b64))
    # D above the kernel's 4096 falls back to eager rather than failing.
    xb, rb, wb, bb, _ = _inputs((2, 4097), torch.float32, seed=5)
    torch.testing.assert_close(add_layer_norm(xb, rb, wb, bb), add_layer_norm_ref(xb, rb, wb, bb))


def test_empty_rows():
    x, r, w, b, _ = _inputs((0, 16), torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    y = add_layer_norm(x, r, w, b, backend="triton")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


def test_bad_input_raises_value_error():
    x = torch.zeros(3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="residual has shape"):
        add_layer_norm(x, torch.zeros(3, 7), w, b)
    with pytest.raises(ValueError, match="weight has shape"):
        add_layer_norm(x, x, torch.ones(7), b)
    with pytest.raises(ValueError, match="bias has shape"):
        add_layer_norm(x, x, w, torch.zeros(8, 1))
    with pytest.raises(ValueError, match="dtype"):
        add_layer_norm(x.long(), x.long(), w, b)
    with pytest.raises(ValueError, match="at least 1 dim"):
        add_layer_norm(torch.tensor(1.0), torch.tensor(1.0), w, b)
    with pytest.raises(ValueError, match="backend"):
        add_layer_norm(x, x, w, b, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_gives_fp32_like_layer_norm(dtype):
    x, r, w, b, _ = _inputs((64, 256), torch.float32, seed=6)
    x, r, w, b = (t.cuda() for t in (x, r, w, b))
    with torch.autocast("cuda", dtype=dtype):
        out = add_layer_norm(x.to(dtype), r.to(dtype), w, b)
        ref = nn.functional.layer_norm(x.to(dtype) + r.to(dtype), (256,), w, b)
    assert out.dtype == ref.dtype == torch.float32
    # The kernel does not round x + residual to the low-precision dtype first: compare to fp64.
    exact = add_layer_norm_ref(*(t.to(dtype).double() for t in (x, r)), w.double(), b.double())
    acc.assert_within_torch_error(out, exact, ref, acc.OUT_FACTOR, atol=1e-6, name="y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_ref(dtype):
    x, r, w, b, dy = (t.cuda() for t in _inputs((2048, 256), dtype, seed=7))
    y, grads = _run(_kernel, x, r, w, b, dy)
    y_ref, grads_ref = _run(add_layer_norm_ref, x, r, w, b, dy)
    y64, grads64 = _run(add_layer_norm_ref, *(t.double() for t in (x, r, w, b, dy)))
    acc.assert_within_torch_error(y, y64, y_ref, acc.OUT_FACTOR, atol=FLOOR[dtype], name="y")
    for k, ref, exact in zip(grads, grads_ref, grads64):
        acc.assert_within_torch_error(k, exact, ref, acc.GRAD_FACTOR, atol=FLOOR[dtype] * 2048**0.5)


def test_cpu_without_interpreter_takes_the_eager_path(monkeypatch):
    x, r, w, b, _ = _inputs((3, 16), torch.float32, seed=8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(add_layer_norm(x, r, w, b), add_layer_norm_ref(x, r, w, b))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        add_layer_norm(x, r, w, b, backend="triton")


def test_aot_specs_cover_every_launch_config():
    from tape_kernels.layernorm import MAX_D, _block_d, aot_specs

    specs = aot_specs()
    for kind in ("fwd", "bwd"):
        have = {(s.constexprs["BLOCK_D"], s.signature["X"]) for s in specs if f"_{kind}_" in s.name}
        for d in range(1, MAX_D + 1):
            for dt in ("*fp32", "*fp16", "*bf16"):
                assert (_block_d(d), dt) in have, (kind, d, dt)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), d=st.integers(1, 600), seed=st.integers(0, 2**16))
def test_property_random_shapes_fp32(rows, d, seed):
    x, r, w, b, dy = _inputs((rows, d), torch.float32, seed=seed)
    y, grads = _run(_kernel, x, r, w, b, dy)
    y_ref, grads_ref = _run(add_layer_norm_ref, x, r, w, b, dy)
    y64, grads64 = _run(add_layer_norm_ref, *(t.double() for t in (x, r, w, b, dy)))
    acc.assert_within_torch_error(y, y64, y_ref, acc.OUT_FACTOR, atol=FLOOR[torch.float32], name="y")
    for k, ref, exact in zip(grads, grads_ref, grads64):
        acc.assert_within_torch_error(k, exact, ref, acc.GRAD_FACTOR, atol=FLOOR[torch.float32] * rows**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("value", acc.NONFINITE, ids=acc.NONFINITE_IDS)
@pytest.mark.parametrize("where", ["x", "residual", "weight", "bias"])
def test_nonfinite_propagate_like_eager(where: str, value: float, dtype: torch.dtype) -> None:
    """NaN / ±inf in an activation or a parameter: y, dx, dresidual, dweight, dbias non-finite exactly
    where F.layer_norm(x + residual)'s are."""
    x, r, w, b, dy = _inputs((5, 3, 24), dtype, seed=9)
    t = {"x": x, "residual": r, "weight": w, "bias": b}[where]
    t.view(-1)[[7, 40 % t.numel()]] = value
    names = ["x", "residual", "weight", "bias"]
    acc.assert_nonfinite_like_eager(_kernel, add_layer_norm_ref, [x, r, w, b], [dy], names, exact=math.isnan(value))
