"""Student-t unembedding + log_softmax and the fused NLL: Triton kernels vs the eager reference and fp64.

The op computes in fp32 whatever the input dtype, so for fp16/bf16 inputs the oracle is the
reference evaluated on the same (rounded) inputs: in fp64 for the truth and in fp32 for "what
PyTorch's own error is" (kernel error vs fp64 ≤ 2× that for outputs, ≤ 3× for gradients).
"""

from __future__ import annotations

import math

import _accuracy as acc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tape_kernels.unembedding import (
    DEFAULT_DF,
    StudentTUnembedding,
    _launch_bwd,
    _launch_fwd,
    student_t_nll,
    student_t_nll_ref,
    student_t_unembedding,
    student_t_unembedding_ref,
)

# Direct comparison against the fp32 eager reference on the same inputs. atol is relative to the
# largest |logit| (the rounding of d2 = |h|² − 2h·U + |U|² scales with it), rtol plain.
TOL = dict.fromkeys((torch.float32, torch.float16, torch.bfloat16), (2e-6, 1e-5))
# Rounding of a gradient to its dtype: an error floor of half an ulp at the gradient's scale.
ULP = {torch.float32: 6e-8, torch.float16: 4.9e-4, torch.bfloat16: 3.9e-3}
CPU_DTYPES = list(TOL)
# (leading dims, D, V): odd D (not a multiple of the 32-wide D tile), V below/at/above one
# 128-wide tile (V=129: a second tile with one live column), V=300: three tiles, 2-D h.
CASES = [
    ((2, 5), 32, 37),
    ((1, 9), 256, 65),
    ((13,), 45, 129),
    ((33,), 20, 300),
    ((3, 1), 7, 1),
]


def _inputs(lead, d, v, dtype, seed=0, h_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g, dtype=torch.float64) * h_scale
    u = torch.randn(d, v, generator=g, dtype=torch.float64)
    return h.to(dtype), u.to(dtype)


def _ref(h, u, df=DEFAULT_DF):
    """The reference on h of any rank (it broadcasts as (B, S, D))."""
    lead, d = h.shape[:-1], h.shape[-1]
    return student_t_unembedding_ref(h.reshape(1, -1, d), u, df).reshape(*lead, u.shape[1])


def _grads(fn, h, u, g):
    h = h.detach().clone().requires_grad_()
    u = u.detach().clone().requires_grad_()
    out = fn(h, u)
    dh, du = torch.autograd.grad(out, (h, u), g)
    return out.detach(), dh, du


def _kernel(h, u):
    return student_t_unembedding(h, u, backend="triton")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_forward_backward_vs_ref_and_fp64(case, dtype):
    lead, d, v = case
    h, u = _inputs(lead, d, v, dtype)
    g = torch.randn(*lead, v, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, dh, du = _grads(_kernel, h, u, g.float())
    ref, dh_ref, du_ref = _grads(_ref, h.float(), u.float(), g.float())
    ex, dh_ex, du_ex = _grads(_ref, h.double(), u.double(), g)
    assert out.dtype == torch.float32 and out.shape == (*lead, v)
    assert dh.dtype == dtype and du.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol * (1 + ref.abs().max().item()), rtol=rtol)
    acc.assert_within_torch_error(out, ex, ref, acc.OUT_FACTOR, atol=1e-6, name="logp")
    for name, k, r, e in (("dh", dh, dh_ref, dh_ex), ("dU", du, du_ref, du_ex)):
        acc.assert_within_torch_error(k, e, r, acc.GRAD_FACTOR, atol=1e-6, rtol=ULP[dtype], name=name)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_huge_logits_need_max_subtraction(dtype):
    # |h| ~ 3·sqrt(256): logits of about −900 with gaps of hundreds between columns. Without the
    # max-subtraction exp(logit) underflows to 0 and the log-softmax is −inf/NaN.
    h, u = _inputs((4, 8), 256, 65, dtype, seed=2, h_scale=3.0)
    ex = _ref(h.double(), u.double())
    logits = -0.5 * (DEFAULT_DF + 256) * torch.log1p(
        ((h.double()[..., None] - u.double()) ** 2).sum(-2).clamp(min=1e-12) / DEFAULT_DF
    )
    assert logits.abs().max() > 500
    out = _kernel(h, u)
    assert torch.isfinite(out).all()
    ref = _ref(h.float(), u.float())
    acc.assert_within_torch_error(out, ex, ref, acc.OUT_FACTOR, atol=1e-6, name="logp")
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4, 8), atol=1e-5, rtol=0)


def test_golden_vectors(golden):
    h = golden["unembed_h"].float()
    u = golden["state_dict"]["unembedding"].float()
    out = _kernel(h, u)
    torch.testing.assert_close(out.double(), golden["unembed_out"], atol=2e-5, rtol=2e-5)


def test_clamp_has_zero_gradient():
    # h equal to column 3 of U with small dyadic entries: |h|², h·U, |U|² are exact in fp32,
    # so d2 = 0 exactly and max(d2, 1e-12) must pass no gradient to d2 for that column.
    g = torch.Generator().manual_seed(3)
    u = torch.randint(-4, 5, (16, 9), generator=g).float() / 4
    h = torch.stack([u[:, 3], u[:, 5] + 0.25, u[:, 0]])
    _, lse = _launch_fwd(h, u, DEFAULT_DF, None)
    gout = torch.randn(3, 9, generator=g)
    dd2, dsum = _launch_bwd(h, u, lse, DEFAULT_DF, g=gout)
    assert dd2[0, 3] == 0 and dd2[2, 0] == 0
    assert (dd2[1] != 0).all()
    torch.testing.assert_close(dsum, dd2.sum(1), atol=1e-6, rtol=1e-6)
    out, dh, du = _grads(_kernel, h, u, gout)
    _, dh_ex, du_ex = _grads(_ref, h.double(), u.double(), gout.double())
    torch.testing.assert_close(dh.double(), dh_ex, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du.double(), du_ex, atol=1e-5, rtol=1e-5)


def test_log_probs_with_v1_and_empty_rows():
    h, u = _inputs((4,), 8, 1, torch.float32)
    h.requires_grad_()
    out = _kernel(h, u)
    assert torch.equal(out, torch.zeros(4, 1))
    (out.sum()).backward()
    assert torch.equal(h.grad, torch.zeros(4, 8))
    e = torch.empty(0, 8, requires_grad=True)
    out = _kernel(e, torch.randn(8, 5))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert e.grad.shape == (0, 8)


def test_autocast_and_mixed_dtypes_compute_in_fp32():
    h, u = _inputs((2, 6), 64, 40, torch.float32, seed=4)
    plain = _kernel(h, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _kernel(h, u)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)  # autocast does not reach inside
    hh = h.half().requires_grad_()
    uu = u.clone().requires_grad_()
    mixed = _kernel(hh, uu)
    assert torch.equal(mixed, _kernel(h.half().float(), u))
    mixed.sum().backward()
    assert hh.grad.dtype == torch.float16 and uu.grad.dtype == torch.float32


def test_non_contiguous_inputs():
    h, u = _inputs((40,), 24, 50, torch.float32, seed=5)
    h_t = h.t().contiguous().t()  # (40, 24) with strides (1, 40)
    u_t = u.t().contiguous().t()  # (24, 50) with strides (1, 24)
    assert not h_t.is_contiguous() and not u_t.is_contiguous()
    g = torch.randn(40, 50)
    a = _grads(_kernel, h_t, u_t, g)
    b = _grads(_kernel, h, u, g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    h, u = _inputs((70,), 48, 150, torch.float32, seed=6)
    g = torch.randn(70, 150)
    a = _grads(_kernel, h, u, g)
    b = _grads(_kernel, h, u, g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_eager_paths_and_module():
    h, u = _inputs((2, 3), 16, 11, torch.float32, seed=7)
    assert torch.equal(student_t_unembedding(h, u, backend="eager"), student_t_unembedding_ref(h, u))
    h64, u64 = h.double(), u.double()
    out64 = student_t_unembedding(h64, u64)
    assert out64.dtype == torch.float64 and torch.equal(out64, student_t_unembedding_ref(h64, u64))
    # 2-D h through the eager path keeps its rank.
    assert student_t_unembedding(h[0], u, backend="eager").shape == (3, 11)
    m = StudentTUnembedding(df=3.5)
    assert "df=3.5" in repr(m)
    torch.testing.assert_close(m(h, u), student_t_unembedding_ref(h, u, 3.5), atol=1e-5, rtol=1e-5)
    y = torch.randint(0, 11, (2, 3))
    torch.testing.assert_close(m.nll(h, u, y), student_t_nll_ref(h, u, y, "mean", 3.5), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ fused NLL


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_nll_vs_ref_and_fp64(case, reduction):
    lead, d, v = case
    h, u = _inputs(lead, d, v, torch.float32, seed=8)
    y = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(9))

    def run(fn, hh, uu):
        hh = hh.detach().clone().requires_grad_()
        uu = uu.detach().clone().requires_grad_()
        loss = fn(hh, uu)
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
        return (loss.detach(), *torch.autograd.grad((loss * w).sum(), (hh, uu)))

    def ref(hh, uu):
        return student_t_nll_ref(hh.reshape(1, -1, d), uu, y.reshape(1, -1), reduction).reshape(
            lead if reduction == "none" else ()
        )

    got = run(lambda a, b: student_t_nll(a, b, y, reduction, backend="triton"), h, u)
    r32 = run(ref, h, u)
    r64 = run(ref, h.double(), u.double())
    assert got[0].shape == r32[0].shape and got[0].dtype == torch.float32
    for name, k, r, e in zip(("loss", "dh", "dU"), got, r32, r64):
        acc.assert_within_torch_error(k, e, r, acc.GRAD_FACTOR, atol=1e-6, rtol=1e-6, name=name)


def test_nll_matches_unembedding_and_int32_targets():
    h, u = _inputs((3, 7), 40, 90, torch.float32, seed=10)
    y = torch.randint(0, 90, (3, 7), generator=torch.Generator().manual_seed(11))
    logp = _kernel(h, u)
    via_logp = -logp.gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(student_t_nll(h, u, y, "none", backend="triton"), via_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        student_t_nll(h, u, y.int(), backend="triton"), student_t_nll(h, u, y, backend="triton"), atol=0, rtol=0
    )


def test_nll_half_inputs_grads_in_input_dtype():
    h, u = _inputs((5, 4), 32, 37, torch.float16, seed=12)
    y = torch.randint(0, 37, (5, 4), generator=torch.Generator().manual_seed(13))
    hh, uu = h.clone().requires_grad_(), u.clone().requires_grad_()
    loss = student_t_nll(hh, uu, y, backend="triton")
    assert loss.dtype == torch.float32
    loss.backward()
    assert hh.grad.dtype == torch.float16 and uu.grad.dtype == torch.float16
    h32, u32 = h.float().requires_grad_(), u.float().requires_grad_()
    student_t_nll_ref(h32, u32, y).backward()
    torch.testing.assert_close(hh.grad.float(), h32.grad, atol=1e-3 * h32.grad.abs().max().item(), rtol=1e-3)
    torch.testing.assert_close(uu.grad.float(), u32.grad, atol=1e-3 * u32.grad.abs().max().item(), rtol=1e-3)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_value_error():
    h, u = torch.zeros(2, 3, 8), torch.zeros(8, 5)
    with pytest.raises(ValueError, match=r"expected \(8, V\)"):
        student_t_unembedding(h, torch.zeros(7, 5))
    with pytest.raises(ValueError, match="unembedding must have 2 dims"):
        student_t_unembedding(h, torch.zeros(8))
    with pytest.raises(ValueError, match="dtype"):
        student_t_unembedding(h.long(), u)
    with pytest.raises(ValueError, match="df"):
        student_t_unembedding(h, u, df=0.0)
    with pytest.raises(ValueError, match="df"):
        student_t_unembedding(h, u, df=float("nan"))
    with pytest.raises(ValueError, match="V must be > 0"):
        student_t_unembedding(h, torch.zeros(8, 0))
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        student_t_nll(h, u, y, reduction="avg")
    with pytest.raises(ValueError, match="targets has shape"):
        student_t_nll(h, u, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has dtype"):
        student_t_nll(h, u, y.float())
    bad = y.clone()
    bad[1, 2] = 5
    with pytest.raises(ValueError, match=r"id 5 outside \[0, 5\)"):
        student_t_nll(h, u, bad, backend="triton")
    bad[1, 2] = -3
    with pytest.raises(ValueError, match="id -3"):
        student_t_nll(h, u, bad)


# ------------------------------------------------------------------ CUDA (native 16-bit MMA path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v", [65, 300])
def test_cuda_vs_fp64(dtype, v):
    h, u = (t.cuda() for t in _inputs((16, 128), 256, v, dtype, seed=14))
    g = torch.randn(16, 128, v, device="cuda")
    out, dh, du = _grads(_kernel, h, u, g)
    ref, dh_ref, du_ref = _grads(_ref, h.float(), u.float(), g)
    ex, dh_ex, du_ex = _grads(_ref, h.double(), u.double(), g.double())
    acc.assert_within_torch_error(out, ex, ref, acc.OUT_FACTOR, atol=1e-6, name="logp")
    for k, r, e in ((dh, dh_ref, dh_ex), (du, du_ref, du_ex)):
        acc.assert_within_torch_error(k, e, r, acc.GRAD_FACTOR, atol=1e-6, rtol=ULP[dtype])
    y = torch.randint(0, v, (16, 128), device="cuda")
    # Per-row losses against the same 2x rule. (A single mean is no test of it: PyTorch's error on
    # one fp32 scalar of ~30 can fall far below its ulp, 1.9e-6, by luck.) The mean is then within
    # the worst row error plus the rounding of one fp32 mean.
    rows = student_t_nll(h, u, y, "none")
    rows_ex = student_t_nll_ref(h.double(), u.double(), y, "none")
    rows_32 = student_t_nll_ref(h.float(), u.float(), y, "none")
    row_err = acc.max_err(rows, rows_ex)
    acc.assert_within_torch_error(rows, rows_ex, rows_32, acc.OUT_FACTOR, atol=1e-6, name="nll rows")
    nll, nll_ex = student_t_nll(h, u, y), rows_ex.mean()
    assert abs(nll.item() - nll_ex.item()) <= row_err + 2 * torch.finfo(torch.float32).eps * abs(nll_ex.item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_stays_fp32(dtype):
    h, u = (t.cuda() for t in _inputs((4, 128), 256, 65, torch.float32, seed=15))
    plain = _kernel(h, u)
    with torch.autocast("cuda", dtype=dtype):
        auto = _kernel(h, u)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)


def test_backward_inside_autocast_stays_fp32():
    h, u = _inputs((3, 5), 64, 40, torch.float32, seed=16)
    g = torch.randn(3, 5, 40)
    _, dh, du = _grads(_kernel, h, u, g)
    hh, uu = h.clone().requires_grad_(), u.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _kernel(hh, uu)
        dh_ac, du_ac = torch.autograd.grad(out, (hh, uu), g)
    assert torch.equal(dh_ac, dh) and torch.equal(du_ac, du)


def test_cpu_without_interpreter_takes_the_eager_path(monkeypatch):
    h, u = _inputs((2, 3), 16, 11, torch.float32, seed=17)
    y = torch.randint(0, 11, (2, 3))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(student_t_unembedding(h, u), student_t_unembedding_ref(h, u))
    assert torch.equal(student_t_nll(h, u, y), student_t_nll_ref(h, u, y))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        student_t_unembedding(h, u, backend="triton")


def test_aot_specs_cover_every_launch_config():
    from tape_kernels.unembedding import _block_v, aot_specs

    specs = aot_specs()
    fwd = {(s.constexprs["BLOCK_V"], s.constexprs["SINGLE"]) for s in specs if "fwd" in s.name}
    bwd = {s.constexprs["BLOCK_V"] for s in specs if "bwd" in s.name}
    for v in range(1, 1000):
        bv, single = _block_v(v)
        assert (bv, single) in fwd and bv in bwd, v
    assert {s.signature["H"] for s in specs} == {"*fp32", "*fp16", "*bf16"}


def test_nll_unchecked_bad_target_cannot_fault():
    # With the check off, an out-of-range id matches no column: loss = log-sum-exp, no fault.
    h, u = _inputs((4,), 16, 9, torch.float32, seed=18)
    y = torch.tensor([0, 9, 3, 100])
    loss = student_t_nll(h, u, y, "none", backend="triton", check_targets=False)
    lse = torch.logsumexp(-0.5 * (DEFAULT_DF + 16) * torch.log1p(
        ((h[:, :, None] - u[None]) ** 2).sum(1) / DEFAULT_DF), dim=-1)
    torch.testing.assert_close(loss[[1, 3]], lse[[1, 3]], atol=1e-5, rtol=1e-5)
    good = student_t_nll(h[[0, 2]], u, y[[0, 2]], "none", backend="triton")
    torch.testing.assert_close(loss[[0, 2]], good, atol=0, rtol=0)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(n=st.integers(1, 70), d=st.integers(1, 80), v=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_property_random_shapes_fp32(n, d, v, seed):
    h, u = _inputs((n,), d, v, torch.float32, seed=seed)
    g = torch.randn(n, v, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out, dh, du = _grads(_kernel, h, u, g.float())
    ref, dh_ref, du_ref = _grads(_ref, h, u, g.float())
    ex, dh_ex, du_ex = _grads(_ref, h.double(), u.double(), g)
    acc.assert_within_torch_error(out, ex, ref, acc.OUT_FACTOR, atol=1e-6, name="logp")
    for k, r, e in ((dh, dh_ref, dh_ex), (du, du_ref, du_ex)):
        acc.assert_within_torch_error(k, e, r, acc.GRAD_FACTOR, atol=1e-6, rtol=1e-6)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed + 2))
    nll = student_t_nll(h, u, y, backend="triton")
    nll_ex = student_t_nll_ref(h.double()[None], u.double(), y[None])
    nll_32 = student_t_nll_ref(h[None], u, y[None])
    assert abs(nll.item() - nll_ex.item()) <= 2 * abs(nll_32.item() - nll_ex.item()) + 1e-6 * (1 + nll_ex.abs().item())


@pytest.mark.parametrize("value", acc.NONFINITE, ids=acc.NONFINITE_IDS)
@pytest.mark.parametrize("where", ["hidden_states", "unembedding"])
@pytest.mark.parametrize("op", ["logp", "nll"])
@pytest.mark.parametrize("v", [37, 150], ids=["V37", "V150"])  # one vocab tile / online log-sum-exp over tiles
def test_nonfinite_propagate_like_eager(v: int, op: str, where: str, value: float) -> None:
    """NaN / ±inf in a hidden state or an unembedding entry: log-probs (or per-row NLL) and both
    gradients non-finite exactly where the eager reference's are."""
    h, u = _inputs((2, 5), 24, v, torch.float32, seed=19)
    (h if where == "hidden_states" else u).view(-1)[[3, 50]] = value
    y = torch.randint(0, v, (2, 5), generator=torch.Generator().manual_seed(20))
    if op == "logp":
        kernel, eager, g = _kernel, _ref, torch.randn(2, 5, v, generator=torch.Generator().manual_seed(21))
    else:
        def kernel(a, b):
            return student_t_nll(a, b, y, "none", backend="triton")

        def eager(a, b):
            return student_t_nll_ref(a.reshape(1, -1, 24), b, y.reshape(1, -1), "none").reshape(2, 5)

        g = torch.rand(2, 5, generator=torch.Generator().manual_seed(21)) + 0.5
    names = ["hidden_states", "unembedding"]
    acc.assert_nonfinite_like_eager(kernel, eager, [h, u], [g], names, exact=math.isnan(value))
