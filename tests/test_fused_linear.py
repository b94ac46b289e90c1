"""Grouped Linear ops with fused epilogues (tape_kernels.fused_linear) and the pair embedding
(tape_kernels.rope): Triton kernels (interpreted) against their eager references and float64.

Accuracy rule (the package's, FlashAttention style): the kernel's error against float64, on the same
rounded inputs, is at most 2× (outputs) / 3× (gradients) PyTorch's own error in the same dtype,
plus a floor of a few ulps of the result's scale (a case where PyTorch happens to be nearly exact
must not demand exactness). bf16 runs only on a GPU (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import pytest
import torch

from tape_kernels.fused_linear import (
    grouped_linear,
    grouped_linear_add_layer_norm,
    grouped_linear_add_layer_norm_ref,
    grouped_linear_ref,
    grouped_mlp_add_layer_norm,
    grouped_mlp_add_layer_norm_ref,
)
from tape_kernels.rope import rope_embed, rope_embed_ref

OUT_FACTOR, GRAD_FACTOR = 2.0, 3.0
# Floors relative to max|exact|: four ulps of the dtype.
FLOOR = {torch.float32: 4 * 2.0**-23, torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _within(got: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, factor: float, dtype, name: str) -> None:
    assert got.shape == exact.shape, name
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = factor * max(_max_err(same, exact), FLOOR[dtype] * scale)
    err = _max_err(got, exact)
    assert err <= bound, f"{name}: kernel err {err:.3e} > {bound:.3e} (PyTorch's own {_max_err(same, exact):.3e})"


def _flat(args: list) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _cast(args: list, dtype: torch.dtype, n_diff: int | None = None) -> list:
    """Fresh tensors of ``dtype`` with the same structure; those in the first ``n_diff`` arguments (all by
    default) are leaves requiring grad."""

    def one(t, grad: bool):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(DEV, dtype)
        return t.requires_grad_() if grad else t

    n = len(args) if n_diff is None else n_diff
    return [[one(t, i < n) for t in a] if isinstance(a, (list, tuple)) else one(a, i < n) for i, a in enumerate(args)]


def _run(fn, args: list, dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = fn(*args)
    leaves = [t for t in _flat(args) if t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return y.detach(), list(grads)


def check_op(kernel, ref, args64: list, dtype: torch.dtype, names: list[str] | None = None,
             n_diff: int | None = None) -> None:  # fmt: skip
    """Kernel in ``dtype`` vs the eager reference in ``dtype`` and in float64 (same rounded inputs);
    gradients of the first ``n_diff`` arguments (all by default)."""
    lo = _cast(args64, dtype, n_diff)
    exact_in = _cast(lo, torch.float64, n_diff)
    y64 = ref(*exact_in)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(DEV)
    y_k, g_k = _run(kernel, lo, dy)
    y_t, g_t = _run(ref, _cast(lo, dtype, n_diff), dy)
    y_x, g_x = _run(ref, exact_in, dy)
    assert y_k.dtype == y_t.dtype, (y_k.dtype, y_t.dtype)
    _within(y_k, y_t, y_x, OUT_FACTOR, dtype, "output")
    names = names or [f"grad[{i}]" for i in range(len(g_k))]
    for name, a, b, c in zip(names, g_k, g_t, g_x):
        assert a.dtype == b.dtype, name
        _within(a, b, c, GRAD_FACTOR, dtype, name)


def _t(*shape, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def linear_args(g: int, m: int, k: int, n: int, shared: bool, bias: bool = True, seed: int = 0) -> list:
    x = _t(m, k, seed=seed) if shared else _t(g, m, k, seed=seed)
    ws = [_t(n, k, seed=seed + 1 + i, scale=k**-0.5) for i in range(g)]
    bs = [_t(n, seed=seed + 5 + i) if bias else None for i in range(g)]
    return [x, ws, bs]


def ln_params(g: int, n: int, seed: int) -> tuple[list, list]:
    return ([_t(n, seed=seed + i, scale=0.3, offset=1.0) for i in range(g)],
            [_t(n, seed=seed + 10 + i, scale=0.3) for i in range(g)])  # fmt: skip


# ----------------------------------------------------------------------------------------- grouped_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g, shared", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("m, k, n", [(37, 24, 40), (5, 72, 17)])
def test_grouped_linear(dtype, g, shared, m, k, n) -> None:
    args = linear_args(g, m, k, n, shared)
    check_op(lambda x, w, b: grouped_linear(x, w, b, backend="triton"), grouped_linear_ref, args, dtype)


def test_grouped_linear_without_bias_and_return_input() -> None:
    """The input view: its gradient (a second consumer's) is added inside the backward kernel."""
    x, ws, bs = linear_args(2, 19, 24, 36, shared=True, bias=False)

    def kernel(x, ws, r):
        y, xv = grouped_linear(x, ws, [None, None], return_input=True, backend="triton")
        return y.sum(0) + (xv * r).sum(-1, keepdim=True)

    def ref(x, ws, r):
        return grouped_linear_ref(x, ws, [None, None]).sum(0) + (x * r).sum(-1, keepdim=True)

    check_op(kernel, ref, [x, ws, _t(19, 24, seed=9)], torch.float32)
    per_group = linear_args(2, 19, 24, 36, shared=False)[0]
    xk = per_group.float().requires_grad_()
    y, xv = grouped_linear(xk, [w.float() for w in ws], [None, None], return_input=True, backend="triton")
    assert xv.shape == xk.shape and torch.equal(xv, xk)
    (y.sum() + (xv * 3.0).sum()).backward()
    xr = per_group.float().requires_grad_()
    (grouped_linear_ref(xr, [w.float() for w in ws], [None, None]).sum() + (xr * 3.0).sum()).backward()
    torch.testing.assert_close(xk.grad, xr.grad, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------- linear + residual + LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g, shared", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("m, k, n", [(37, 24, 40), (6, 40, 256)])
def test_grouped_linear_add_layer_norm(dtype, g, shared, m, k, n) -> None:
    x, ws, bs = linear_args(g, m, k, n, shared=False)
    r = _t(m, n, seed=3) if shared else _t(g, m, n, seed=3)
    lw, lb = ln_params(g, n, seed=20)
    names = ["x", "residual"] + [f"W[{i}]" for i in range(g)] + [f"b[{i}]" for i in range(g)] + \
        [f"ln_w[{i}]" for i in range(g)] + [f"ln_b[{i}]" for i in range(g)]  # fmt: skip
    check_op(lambda *a: grouped_linear_add_layer_norm(*a, backend="triton"), grouped_linear_add_layer_norm_ref,
             [x, r, ws, bs, lw, lb], dtype, names)  # fmt: skip


def test_layer_norm_epilogue_keeps_precision_for_large_means() -> None:
    # Rows with |mean| >> std: a one-pass E[z²] − E[z]² variance would lose most digits in fp32.
    x, ws, bs = linear_args(2, 9, 16, 48, shared=True)
    r = _t(9, 48, seed=4, offset=3000.0)
    lw, lb = ln_params(2, 48, seed=30)
    check_op(lambda *a: grouped_linear_add_layer_norm(*a, backend="triton"), grouped_linear_add_layer_norm_ref,
             [x, r, ws, bs, lw, lb], torch.float32)  # fmt: skip


# ------------------------------------------------------------------------------- MLP + LayerNorm + combine


def mlp_args(g: int, m: int, d: int, f: int, seed: int = 0) -> list:
    h = _t(g, m, d, seed=seed)
    we = [_t(f, d, seed=seed + 1 + i, scale=d**-0.5) for i in range(g)]
    be = [_t(f, seed=seed + 5 + i, scale=0.5) for i in range(g)]
    wl = [_t(d, f, seed=seed + 8 + i, scale=f**-0.5) for i in range(g)]
    lw, lb = ln_params(g, d, seed=seed + 40)
    return [h, we, be, wl, lw, lb]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine", [None, 0, 1, 2])
def test_grouped_mlp_add_layer_norm(dtype, combine) -> None:
    g = 2
    args = mlp_args(g, 37, 40, 72)
    names = ["h"] + [f"{p}[{i}]" for p in ("W_e", "b_e", "W_l", "ln_w", "ln_b") for i in range(g)]
    check_op(lambda *a: grouped_mlp_add_layer_norm(*a, combine=combine, backend="triton"),
             lambda *a: grouped_mlp_add_layer_norm_ref(*a, combine=combine), args, dtype, names)  # fmt: skip


def test_grouped_mlp_one_group_notebook_width() -> None:
    """D = 256 (the notebook's width: one 256-column LayerNorm tile), F = 8·D."""
    check_op(lambda *a: grouped_mlp_add_layer_norm(*a, backend="triton"), grouped_mlp_add_layer_norm_ref,
             mlp_args(1, 20, 256, 2048), torch.float32)  # fmt: skip


def test_backward_is_deterministic() -> None:
    args = _cast(mlp_args(2, 45, 32, 64), torch.float32)

    def grads() -> list[torch.Tensor]:
        y = grouped_mlp_add_layer_norm(*args, combine=1, backend="triton")
        return list(torch.autograd.grad(y, _flat(args), torch.ones_like(y)))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_autocast_fp16_matches_eager_autocast() -> None:
    """Under autocast the kernels round the GEMM operands to fp16 (fp32 weights read in place) and give
    each output the dtype eager autocast gives it; the error stays within PyTorch's own."""
    dt = torch.float16
    x, ws, bs = _cast(linear_args(2, 21, 32, 48, shared=True), torch.float32)
    lw, lb = _cast(list(ln_params(2, 48, seed=50)), torch.float32)
    wo = _cast([[_t(48, 48, seed=70 + i, scale=48**-0.5) for i in range(2)]], torch.float32)[0]
    mlp = _cast(mlp_args(2, 21, 48, 64), torch.float32)
    with torch.autocast(DEV, dtype=dt):
        y = grouped_linear(x, ws, bs, backend="triton")
        y_ref = grouped_linear_ref(x, ws, bs)
        z = grouped_linear_add_layer_norm(y, x.new_zeros(21, 48), wo, bs, lw, lb, backend="triton")
        z_ref = grouped_linear_add_layer_norm_ref(y, x.new_zeros(21, 48), wo, bs, lw, lb)
        m = grouped_mlp_add_layer_norm(*mlp, combine=0, backend="triton")
        m_ref = grouped_mlp_add_layer_norm_ref(*mlp, combine=0)
    assert y.dtype == y_ref.dtype == dt
    assert z.dtype == z_ref.dtype and m.dtype == m_ref.dtype
    exact = grouped_linear_ref(x.double(), [w.double() for w in ws], [b.double() for b in bs])
    _within(y, y_ref, exact, OUT_FACTOR, dt, "autocast grouped_linear")
    with torch.autocast(DEV, enabled=False):
        m64 = grouped_mlp_add_layer_norm_ref(*_cast(mlp, torch.float64), combine=0)
    _within(m, m_ref, m64, OUT_FACTOR, dt, "autocast mlp")
    m.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in _flat(mlp))


def test_nan_stays_nan() -> None:
    x, ws, bs = _cast(linear_args(2, 8, 16, 24, shared=True), torch.float32)
    x = x.detach().clone()
    x[3, 5] = float("nan")
    y = grouped_linear(x, ws, bs, backend="triton")
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, [0, 1, 2, 4]]).all()
    lw, lb = _cast(list(ln_params(2, 24, seed=1)), torch.float32)
    z = grouped_linear_add_layer_norm(x, torch.zeros(8, 24), [w[:, :16] for w in ws], bs, lw, lb, backend="triton")
    assert torch.isnan(z[:, 3]).all() and torch.isfinite(z[:, 4]).all()


def test_eager_backend_and_float64_take_the_reference() -> None:
    args = linear_args(2, 7, 8, 12, shared=True)
    torch.testing.assert_close(grouped_linear(*args, backend="auto"), grouped_linear_ref(*args), rtol=0, atol=0)
    torch.testing.assert_close(grouped_linear(*_cast(args, torch.float32), backend="eager"),
                               grouped_linear_ref(*_cast(args, torch.float32)), rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        grouped_linear(*args, backend="triton")


def test_bad_inputs_raise_value_errors() -> None:
    x, ws, bs = _cast(linear_args(2, 7, 8, 12, shared=True), torch.float32)
    with pytest.raises(ValueError, match="weights must hold 1 to 2"):
        grouped_linear(x, ws * 2, bs * 2)
    with pytest.raises(ValueError, match="biases has 1 entries"):
        grouped_linear(x, ws, bs[:1])
    with pytest.raises(ValueError, match="biases: give a tensor for every group"):
        grouped_linear(x, ws, [bs[0], None])
    with pytest.raises(ValueError, match=r"weights\[1\] has shape"):
        grouped_linear(x, [ws[0], ws[1][:, :4]], bs)
    with pytest.raises(ValueError, match="x has last dim"):
        grouped_linear(x[:, :5], ws, bs)
    with pytest.raises(ValueError, match="x has 3 groups"):
        grouped_linear(torch.zeros(3, 7, 8), ws, bs)
    with pytest.raises(ValueError, match="list or tuple"):
        grouped_linear(x, ws[0], bs)
    lw, lb = _cast(list(ln_params(2, 12, seed=1)), torch.float32)
    with pytest.raises(ValueError, match="residual has 6 rows"):
        grouped_linear_add_layer_norm(x, torch.zeros(6, 12), ws, bs, lw, lb)
    with pytest.raises(ValueError, match=r"ln_weights\[0\] has shape"):
        grouped_linear_add_layer_norm(x, torch.zeros(7, 12), ws, bs, [lw[0][:3], lw[1]], lb)
    h, we, be, wl, mw, mb = _cast(mlp_args(1, 5, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="combine needs 2 groups"):
        grouped_mlp_add_layer_norm(h, we, be, wl, mw, mb, combine=0)
    with pytest.raises(ValueError, match="combine must be None or one of"):
        grouped_mlp_add_layer_norm(h, we, be, wl, mw, mb, combine=True)
    with pytest.raises(ValueError, match=r"linear_weights\[0\] has shape"):
        grouped_mlp_add_layer_norm(h, we, be, [wl[0][:, :3]], mw, mb)


# ------------------------------------------------------------------------------------------------ rope


def rope_args(g: int, b: int = 3, s: int = 7, d: int = 20, seq: int = 9) -> list:
    from tapetransformer.reference import rope_frequencies, sinusoidal_positions

    tok = _t(b, s, d, seed=1)
    pos = [sinusoidal_positions(seq, d).double() * (1.0 + 0.5 * i) for i in range(g)]
    freqs = [rope_frequencies(d).double() * (1.0 + 0.3 * i) for i in range(g)]
    return [tok, pos, freqs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("rotate", [True, False])
def test_rope_embed(dtype, g, rotate) -> None:
    args = rope_args(g)
    check_op(lambda t, p, f: rope_embed(t, p, f, rotate, backend="triton"),
             lambda t, p, f: rope_embed_ref(t, p, f, rotate), args, dtype, ["tok"], n_diff=1)  # fmt: skip


def test_rope_embed_ref_is_the_blocks_embedding() -> None:
    from tapetransformer.reference import apply_rope

    tok, pos, freqs = rope_args(2)
    want = torch.stack([apply_rope(tok + p[:, :7], f) for p, f in zip(pos, freqs)])
    torch.testing.assert_close(rope_embed_ref(tok, pos, freqs), want, rtol=0, atol=0)


def test_rope_embed_bad_inputs() -> None:
    tok, pos, freqs = _cast(rope_args(2), torch.float32)
    with pytest.raises(ValueError, match="even embedding dim"):
        rope_embed(tok[..., :5], pos, freqs)
    with pytest.raises(ValueError, match=r"pos_embs\[0\] has shape"):
        rope_embed(tok, [pos[0][:, :3], pos[1]], freqs)
    with pytest.raises(ValueError, match="same number"):
        rope_embed(tok, pos, freqs[:1])
    with pytest.raises(ValueError, match=r"freqs\[1\] has shape"):
        rope_embed(tok, pos, [freqs[0], freqs[1][:3]])


# ------------------------------------------------------------------------------ the model's pair path


def _tiny_model(causal: bool = False, dropout: float = 0.0, seed: int = 0):
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(seed)
    return TapeTransformer(17, seq_len=12, embed_dim=32, num_heads=2, dropout=dropout, causal=causal,
                           backend="triton").train()  # fmt: skip


def _loss_and_grads(model, x, y, aux: bool) -> tuple[torch.Tensor, dict]:
    from tapetransformer.reference import nll_loss

    model.zero_grad(set_to_none=True)
    if aux:
        logp, ent, aw = model(x)
        loss = nll_loss(logp, y) + 0.01 * ent + aw.square().sum()
    else:
        loss = model.loss(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("causal, aux", [(False, False), (True, False), (False, True)])
def test_model_pair_path_equals_per_block_path(monkeypatch, causal: bool, aux: bool) -> None:
    """Training on the Triton path runs each layer's two blocks as a pair; the per-block Triton path
    (FusedTapeHeadBlock.forward and a combine) computes the same loss and gradients, the same gradient
    pattern (exact zeros for the dead parameters, None nowhere else)."""
    from tapetransformer.blocks import FusedTapeHead

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 17, (2, 7), generator=g)  # S < seq_len: the pair path's ragged rows
    y = torch.randint(0, 17, (2, 7), generator=g)
    calls = []
    real = FusedTapeHead.pair_forward

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(FusedTapeHead, "pair_forward", counted)
    loss_p, grads_p = _loss_and_grads(_tiny_model(causal), x, y, aux)
    assert len(calls) == (2 + 4 * (2 if aux else 1))  # coda 2 layers, critics 4 (all of them with aux)
    monkeypatch.setattr(FusedTapeHead, "pair_ok", lambda *a: False)
    loss_b, grads_b = _loss_and_grads(_tiny_model(causal), x, y, aux)
    torch.testing.assert_close(loss_p, loss_b, rtol=1e-5, atol=1e-6)
    assert [n for n, gr in grads_p.items() if gr is None] == [n for n, gr in grads_b.items() if gr is None]
    for name, gb in grads_b.items():
        if gb is None:
            continue
        gp = grads_p[name]
        if torch.count_nonzero(gb) == 0:
            assert torch.count_nonzero(gp) == 0, name
        else:  # relative to the largest entry, as the golden-vector tests judge fp32 gradients (2e-4)
            assert _max_err(gp, gb) <= 2e-4 * gb.abs().max().item(), name


def test_model_pair_path_only_where_it_applies() -> None:
    m = _tiny_model(dropout=0.1)
    head = m.codahead
    tok = torch.zeros(1, 4, 32)
    assert not head.pair_ok(head.blocks_left[0], head.blocks_right[0], tok, None)  # dropout in training
    m.eval()
    assert head.pair_ok(head.blocks_left[0], head.blocks_right[0], tok, None)
    assert not head.pair_ok(head.blocks_left[0], head.blocks_right[0], torch.zeros(1, 13, 32), None)  # > seq_len
    m.backend = "eager"
    assert not head.pair_ok(head.blocks_left[0], head.blocks_right[0], tok, None)
