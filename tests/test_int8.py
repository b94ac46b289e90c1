"""int8 linear: exact integer accumulation (W8A8), weight-only vs the fp64 dequantized math, every
CPU instruction-set path, the pure-PyTorch fallback, validation, opcheck, and the quantized model's
next-token distributions against fp32 on the golden input."""

from __future__ import annotations

import sys
import warnings

import _accuracy as acc
import numpy as np
import pytest
import torch
from torch import nn

import tape_kernels
from tape_kernels import int8 as i8

HAS_EXT = i8.extension_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="tape_kernels._C is not built")
ops = torch.ops.tape_kernels if HAS_EXT else None

# (N, K): K and N deliberately not multiples of 4, 8, 16 or the 64-channel tile.
SHAPES = [(37, 13), (130, 67), (64, 256), (200, 1000)]
MS = [1, 3, 17, 64]
EPS32 = torch.finfo(torch.float32).eps


def _isas() -> list[str]:
    return list(tape_kernels._C.cpu_isas()) if HAS_EXT else []


@pytest.fixture(params=_isas() or ["none"])
def isa(request: pytest.FixtureRequest):
    """Run a test once per CPU instruction set (VNNI, AVX2, scalar) the machine supports."""
    if request.param == "none":
        pytest.skip("tape_kernels._C is not built")
    C = tape_kernels._C
    before = C.cpu_isa()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(before)


def _weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)


def _i64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------ quantizers


def test_quantize_weight_roundtrip() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(45, 77, generator=gen) * torch.rand(45, 1, generator=gen) * 3
    w[3] = 0.0
    q, s = i8.quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (45,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.all(q[3] == 0) and s[3] == 0
    # Each row's largest magnitude maps to ±127, and rounding error is at most half a step.
    assert torch.all(q.abs().amax(1)[torch.arange(45) != 3] == 127)
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert torch.all(err <= s.double()[:, None] * (0.5 + 1e-5))


def test_quantize_weight_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="w"):
        i8.quantize_weight(torch.randn(4))
    with pytest.raises(ValueError, match="dtype"):
        i8.quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="nan"):
        i8.quantize_weight(torch.tensor([[1.0, float("nan")]]))


@needs_ext
@pytest.mark.parametrize("k", [1, 13, 67, 256])
def test_quantize_rows_matches_reference_bitwise(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(17, k, generator=gen) * torch.logspace(-3, 3, 17)[:, None]
    x[5] = 0.0
    # Exact ties at .5 after scaling exercise round-half-even.
    x[6, : min(k, 4)] = torch.tensor([127.0, 0.5, 1.5, -2.5])[: min(k, 4)]
    xq, xs = ops.quantize_rows(x)
    rq, rs = i8.quantize_rows_ref(x)
    assert torch.equal(xq, rq)
    assert torch.equal(xs, rs)


# -------------------------------------------------------------------------------- W8A8 integer GEMM


@needs_ext
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_int8_mm_bit_exact(isa: str, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    xq[0, :] = -128  # extreme row: the VNNI u8 shift and the AVX2 sign trick at their limits
    w = _weights(n, k, gen)
    w[0, :] = -127
    ref = _i64(xq) @ _i64(w).T
    out = ops.int8_mm(xq, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(_i64(out), ref)
    packed, wsum = ops.pack_int8_weight(w)
    np.testing.assert_array_equal(_i64(ops.int8_mm_packed(xq, packed, wsum, n)), ref)


@needs_ext
def test_int8_mm_strided_rows(isa: str) -> None:
    gen = torch.Generator().manual_seed(1)
    big = torch.randint(-128, 128, (5, 40), dtype=torch.int8, generator=gen)
    xq = big[:, 3:32]  # row stride 40, K = 29
    w = _weights(11, 29, gen)
    np.testing.assert_array_equal(_i64(ops.int8_mm(xq, w)), _i64(xq) @ _i64(w).T)


def _w8a8_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None):
    """fp64 epilogue over the exact int64 accumulation; returns (y, magnitude for the rounding bound)."""
    xq, xs = i8.quantize_rows_ref(x)
    acc = torch.from_numpy(_i64(xq) @ _i64(q).T).double()
    yscaled = acc * xs.double()[:, None] * s.double()[None, :]
    y = yscaled + (b.double() if b is not None else 0.0)
    return y, yscaled.abs() + (b.double().abs() if b is not None else 0.0)


@needs_ext
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_linear_matches_integer_reference(isa: str, m: int, n: int, k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(7 * m + n + k)
    x = torch.randn(m, k, generator=gen)
    q = _weights(n, k, gen)
    s = torch.rand(n, generator=gen) * 0.02
    b = torch.randn(n, generator=gen) if with_bias else None
    y = i8.int8_linear(x, q, s, b, act_quant=True)
    ref, mag = _w8a8_reference(x, q, s, b)
    # Only the fp32 epilogue rounds (int32 → fp32, two products, one add): a few ulps.
    assert torch.all((y.double() - ref).abs() <= 4 * EPS32 * mag + 1e-30)


# ------------------------------------------------------------------------------------ weight-only


def _weight_only_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None):
    """fp64 dequantized reference and the worst-case fp32 rounding bound for any summation order:
    |err| ≤ γ_K·Σ_k|x_k·q_nk|·s_n + a few ulps of |y| (scale and bias), γ_K = K·u/(1−K·u)."""
    k = x.shape[1]
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    if b is not None:
        ref = ref + b.double()
    u = EPS32 / 2
    gamma = k * u / (1 - k * u)
    absdot = (x.double().abs() @ q.double().abs().T) * s.double()[None, :]
    return ref, (gamma + 4 * u) * absdot + 4 * u * ref.abs() + 1e-30


@needs_ext
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_weight_only_within_rounding_of_dequantized_fp64(isa: str, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(3 * m + n + k)
    x = torch.randn(m, k, generator=gen)
    q = _weights(n, k, gen)
    s = torch.rand(n, generator=gen) * 0.02
    b = torch.randn(n, generator=gen)
    y = i8.int8_linear(x, q, s, b)
    ref, bound = _weight_only_bound(x, q, s, b)
    assert torch.all((y.double() - ref).abs() <= bound)
    # And no worse on average than PyTorch's own fp32 GEMM on the dequantized weight, give or take 3×;
    # PyTorch's error floored at a 16-lane blocked sum's (acc.blocked_dot_floor), as it depends on the BLAS.
    wq = q.float() * s[:, None]
    torch_err = (torch.nn.functional.linear(x, wq, b).double() - ref).abs().mean()
    floor = acc.blocked_dot_floor(x, wq).mean()
    assert (y.double() - ref).abs().mean() <= 3 * max(torch_err, floor) + 1e-7


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_cpu_keep_dtype(act_quant: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 67, generator=gen).to(dtype)
    q = _weights(37, 67, gen)
    s = torch.rand(37, generator=gen) * 0.02
    b = torch.randn(37, generator=gen).to(dtype)
    y = i8.int8_linear(x, q, s, b, act_quant)
    assert y.dtype == dtype and y.shape == (2, 5, 37)
    ref = i8.int8_linear_ref(x, q, s, b, act_quant)  # fp32 math, one rounding to dtype at the end
    tol = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)


def test_batched_leading_dims_and_empty() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 19, generator=gen)
    q = _weights(10, 19, gen)
    s = torch.rand(10, generator=gen)
    y = i8.int8_linear(x, q, s)
    assert y.shape == (2, 3, 4, 10)
    torch.testing.assert_close(y, i8.int8_linear(x.reshape(-1, 19), q, s).reshape(2, 3, 4, 10))
    assert i8.int8_linear(torch.randn(0, 19), q, s).shape == (0, 10)
    # A transposed (non-contiguous) x is fine: only its rows are read.
    xt = torch.randn(19, 6, generator=gen).t()
    torch.testing.assert_close(i8.int8_linear(xt, q, s), i8.int8_linear(xt.contiguous(), q, s))


# ------------------------------------------------------------------------------------- validation


def test_bad_input_raises_value_error() -> None:
    q = torch.zeros(8, 16, dtype=torch.int8)
    s = torch.ones(8)
    x = torch.randn(3, 16)
    cases = [
        (dict(x=x.long()), "x has dtype"),
        (dict(qweight=q.float()), "qweight has dtype"),
        (dict(qweight=q[0]), "qweight must have 2 dims"),
        (dict(x=torch.randn(3, 15)), "last dim must equal qweight's K=16"),
        (dict(scale=torch.ones(7)), "scale has shape"),
        (dict(scale=torch.ones(8, dtype=torch.float64)), "scale has dtype"),
        (dict(bias=torch.ones(9)), "bias has shape"),
        (dict(qweight=torch.zeros(16, 8, dtype=torch.int8).t()), "qweight must be contiguous along K"),
        (dict(bias=torch.ones(8, device="meta")), "one device"),
        (dict(x=[1.0]), "x must be a torch.Tensor"),
    ]
    for act_quant in (False, True):
        for override, msg in cases:
            args = dict(x=x, qweight=q, scale=s, bias=None) | override
            with pytest.raises(ValueError, match=msg):
                i8.int8_linear(args["x"], args["qweight"], args["scale"], args["bias"], act_quant)


@needs_ext
def test_ops_check_inputs_with_value_errors() -> None:
    q = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        ops.pack_int8_weight(torch.full((4, 4), -128, dtype=torch.int8))
    with pytest.raises(ValueError, match="K="):
        ops.int8_mm(torch.zeros(2, 15, dtype=torch.int8), q)
    with pytest.raises(ValueError, match="dtype"):
        ops.w8_linear(torch.zeros(2, 16, dtype=torch.float64), q, torch.ones(8), None)
    with pytest.raises(ValueError, match="packed"):
        ops.w8a8_linear_packed(torch.zeros(2, 16), torch.zeros(1, 3, 64, 4, dtype=torch.int8),
                               torch.zeros(64, dtype=torch.int32), torch.ones(8), None)
    with pytest.raises(ValueError, match="unit stride"):
        ops.int8_mm(torch.zeros(16, 2, dtype=torch.int8).t(), q)


# ------------------------------------------------------------------------------- fallback, opcheck


def test_fallback_without_extension_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(i8, "_ext", None)
    monkeypatch.setattr(i8, "_ext_state", "unloaded")
    monkeypatch.delattr(tape_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "tape_kernels._C", None)  # makes the import fail
    gen = torch.Generator().manual_seed(5)
    x, q, s = torch.randn(3, 21, generator=gen), _weights(9, 21, gen), torch.rand(9, generator=gen)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y0 = i8.int8_linear(x, q, s)
        y1 = i8.int8_linear(x, q, s, act_quant=True)
        layer = i8.Int8Linear.from_float(nn.Linear(21, 9))
        layer(x)
    hits = [w for w in rec if "tape_kernels._C" in str(w.message)]
    assert len(hits) == 1 and issubclass(hits[0].category, RuntimeWarning)
    assert not i8.extension_available()
    torch.testing.assert_close(y0, i8.int8_linear_ref(x, q, s))
    torch.testing.assert_close(y1, i8.int8_linear_ref(x, q, s, act_quant=True))
    ref, bound = _weight_only_bound(x, q, s, None)
    assert torch.all((y0.double() - ref).abs() <= bound)


def test_reference_w8a8_matches_integer_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    x, q, s, b = torch.randn(5, 300, generator=gen), _weights(70, 300, gen), torch.rand(70), torch.randn(70)
    ref, mag = _w8a8_reference(x, q, s, b)
    y_ref = i8.int8_linear_ref(x, q, s, b, act_quant=True)
    assert torch.all((y_ref.double() - ref).abs() <= 4 * EPS32 * mag + 1e-30)


@needs_ext
def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 29, generator=gen)
    q = _weights(70, 29, gen)
    s = torch.rand(70, generator=gen)
    b = torch.randn(70, generator=gen)
    xq, _ = ops.quantize_rows(x)
    packed, wsum = ops.pack_int8_weight(q)
    cases = [
        (ops.pack_int8_weight, (q,)),
        (ops.quantize_rows, (x,)),
        (ops.int8_mm, (xq, q)),
        (ops.int8_mm_packed, (xq, packed, wsum, 70)),
        (ops.w8_linear, (x, q, s, b)),
        (ops.w8_linear, (x, q, s, None)),
        (ops.w8a8_linear, (x, q, s, b)),
        (ops.w8a8_linear_packed, (x, packed, wsum, s, b)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("act_quant", [False, True])
def test_int8_linear_module(act_quant: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(45, 33)
    mod = i8.Int8Linear.from_float(lin, act_quant=act_quant)
    q, s = i8.quantize_weight(lin.weight)
    assert torch.equal(mod.qweight, q) and torch.equal(mod.scale, s)
    x = torch.randn(4, 45)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), i8.int8_linear_ref(x, q, s, lin.bias.detach(), act_quant))
        # The int8 error against the float layer is that of the weights (and activations) rounding.
        assert (mod(x) - lin(x)).abs().max() < 0.02
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "scale", "bias"}
    other = i8.Int8Linear(45, 33, act_quant=act_quant)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), mod(x))
    # An in-place write to qweight must not be hidden by the packed-weight cache.
    with torch.no_grad():
        mod.qweight.neg_()
        torch.testing.assert_close(mod(x), i8.int8_linear_ref(x, -q, s, lin.bias.detach(), act_quant))
    with pytest.raises(ValueError, match="nn.Linear"):
        i8.Int8Linear.from_float(nn.Conv1d(1, 1, 1))
    # Casting the module keeps the scales fp32 and exact.
    half = i8.Int8Linear.from_float(lin, act_quant=act_quant).half()
    assert half.scale.dtype == torch.float32 and torch.equal(half.scale, s) and half.bias.dtype == torch.float16
    with torch.no_grad():
        assert half(x.half()).dtype == torch.float16


def _dequantized_mha(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    out = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first).double()
    q, s = i8.quantize_weight(mha.in_proj_weight)
    qo, so = i8.quantize_weight(mha.out_proj.weight)
    with torch.no_grad():
        out.in_proj_weight.copy_(q.double() * s.double()[:, None])
        out.in_proj_bias.copy_(mha.in_proj_bias)
        out.out_proj.weight.copy_(qo.double() * so.double()[:, None])
        out.out_proj.bias.copy_(mha.out_proj.bias)
    return out.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_int8_mha_matches_dequantized_fp64(batch_first: bool) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(24, 4, batch_first=batch_first).eval()
    qmha = i8.Int8MultiheadAttention.from_float(mha)
    ref = _dequantized_mha(mha)
    shape = (lambda b, s: (b, s, 24)) if batch_first else (lambda b, s: (s, b, 24))
    x = torch.randn(*shape(2, 5))
    past = torch.randn(*shape(2, 3))
    kv = torch.cat([past, x], dim=1 if batch_first else 0)
    other = torch.randn(*shape(2, 8))
    with torch.no_grad():
        for q_in, k_in, v_in in [(x, x, x), (x, kv, kv), (x, kv, other)]:
            out, w = qmha(q_in, k_in, v_in)
            rout, rw = ref(q_in.double(), k_in.double(), v_in.double())
            torch.testing.assert_close(out.double(), rout, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w.double(), rw, atol=1e-6, rtol=1e-5)
            out2, w2 = qmha(q_in, k_in, v_in, need_weights=False)
            assert w2 is None
            torch.testing.assert_close(out2.double(), rout, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        qmha(x, x, x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="3-D"):
        qmha(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="dtype"):
        qmha(x.long(), x.long(), x.long())


# ------------------------------------------------------------------------------- quantized model


def _golden_model(golden: dict):
    from tapetransformer.reference import ReferenceTapeTransformer

    v, s, d, h = (int(c) for c in golden["config"])
    model = ReferenceTapeTransformer(v, s, embed_dim=d, num_heads=h, dropout=0.0)
    model.load_state_dict({k: t.float() for k, t in golden["state_dict"].items()})
    return model.eval()


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@pytest.mark.parametrize("act_quant", [False, True])
def test_quantized_model_next_token_kl(golden: dict, act_quant: bool) -> None:
    from tapetransformer.quantize import quantize_int8

    model = _golden_model(golden)
    qmodel = quantize_int8(model, act_quant=act_quant)
    # Exactly the inference-time layers became int8, and the input model was not modified.
    n_int8 = sum(isinstance(m, i8.Int8Linear) for m in qmodel.modules())
    n_mha = sum(isinstance(m, i8.Int8MultiheadAttention) for m in qmodel.modules())
    n_blocks = 2 * (2 + 4 * int(golden["config"][3]))
    n_rnn = 2 * 2 * 2  # prophet: 2 layers × (left, right) × (i2h, h2h)
    assert n_mha == n_blocks and n_int8 == 4 * n_blocks + n_rnn
    assert not any(isinstance(m, (i8.Int8Linear, i8.Int8MultiheadAttention)) for m in model.modules())
    assert isinstance(qmodel.prophet.cells_left[0].i2h, i8.Int8Linear)
    assert isinstance(qmodel.rnn_projection, nn.Linear)  # training only
    assert isinstance(qmodel.merge_projection, nn.Linear)  # never runs
    x = golden["x"]
    fed = golden["eval_fed_tokens"]
    kls = []
    with torch.no_grad():
        ref, _ = model(x)
        out, _ = qmodel(x)
        kls.append(_kl(ref, out))
        # Cached generation: the 4-token prompt, then one token per call.
        ref, rc = model(fed[:, :4])
        out, qc = qmodel(fed[:, :4])
        kls.append(_kl(ref, out))
        for t in range(4, fed.shape[1]):
            ref, rc = model(fed[:, t : t + 1], rc)
            out, qc = qmodel(fed[:, t : t + 1], qc)
            kls.append(_kl(ref, out))
    assert len(kls) >= 3
    assert float(np.mean(kls)) <= 1e-2, kls
    # Quantization changed something (the test could fail): int8 is not the float model.
    assert max(kls) > 0


def test_quantize_int8_rejects_models_without_blocks() -> None:
    from tapetransformer.quantize import quantize_int8

    with pytest.raises(ValueError, match="TapeHeadBlock"):
        quantize_int8(nn.Sequential(nn.Linear(3, 3)))


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n,k", [(37, 13), (130, 67), (256, 2048), (2048, 256)])
def test_cuda_int8_paths(m: int, n: int, k: int) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(m + n + k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    q = _weights(n, k, gen)
    np.testing.assert_array_equal(_i64(ops.int8_mm(xq.to(dev), q.to(dev)).cpu()), _i64(xq) @ _i64(q).T)
    s = torch.rand(n, generator=gen) * 0.02
    b = torch.randn(n, generator=gen)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(m, k, generator=gen).to(dtype)
        qx, qs = ops.quantize_rows(x.to(dev))
        rq, rs = i8.quantize_rows_ref(x)
        assert torch.equal(qx.cpu(), rq) and torch.equal(qs.cpu(), rs)
        for act_quant in (False, True):
            y = i8.int8_linear(x.to(dev), q.to(dev), s.to(dev), b.to(dev, dtype), act_quant)
            assert y.dtype == dtype
            ref = i8.int8_linear_ref(x.float(), q, s, b.to(dtype).float(), act_quant)
            tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            torch.testing.assert_close(y.float().cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_ext
def test_cuda_opcheck() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 40, generator=gen).to(dev, torch.float16)
    q = _weights(70, 40, gen).to(dev)
    s = torch.rand(70, generator=gen).to(dev)
    b = torch.randn(70, generator=gen).to(dev, torch.float16)
    xq, _ = ops.quantize_rows(x)
    for op, args in [
        (ops.quantize_rows, (x,)),
        (ops.int8_mm, (xq, q)),
        (ops.w8_linear, (x, q, s, b)),
        (ops.w8a8_linear, (x, q, s, b)),
        (ops.w8_linear, (torch.randn(20, 40, device=dev), q, s, None)),  # M > 16: dequantize + cuBLAS
    ]:
        torch.library.opcheck(op, args)


def test_auto_mode_picks_w8a8_on_cpu() -> None:
    gen = torch.Generator().manual_seed(4)
    x, q, s = torch.randn(2, 3, 40, generator=gen), _weights(24, 40, gen), torch.rand(24, generator=gen)
    assert i8.resolve_act_quant(x) is True
    torch.testing.assert_close(i8.int8_linear(x, q, s, act_quant=None), i8.int8_linear(x, q, s, act_quant=True),
                               atol=0, rtol=0)
    if torch.cuda.is_available():
        assert i8.resolve_act_quant(torch.zeros(16, 8, device="cuda")) is False
        assert i8.resolve_act_quant(torch.zeros(17, 8, device="cuda")) is True
