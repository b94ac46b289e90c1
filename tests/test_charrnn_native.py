"""The Char-RNN's CPU training recurrence in the C++ extension (``charrnn_forward`` / ``charrnn_backward``,
run by ``charrnn(backend="auto")`` on a CPU without the Triton interpreter) against the eager loop.

The error budget is test_charrnn.py's (FlashAttention style: ≤ 2× / 3× PyTorch's own fp32 error
against float64, with a floor of a few ulps), on the same cases.
"""

from __future__ import annotations

import math

import _accuracy as acc
import pytest
import torch
from test_charrnn import CASES, _check_against_fp64, _inputs, _model, check_nonfinite_like_eager

from tape_kernels.charrnn import charrnn, charrnn_ref, native_runnable
from tape_kernels.int8 import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="tape_kernels._C is not built")


@pytest.fixture
def cpu_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CPU user runs: no Triton interpreter, so ``backend="auto"`` takes the native recurrence."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _native(e, w, h):  # noqa: ANN001, ANN202
    assert native_runnable(e, w)
    return charrnn(e, w, h, backend="auto")


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_D{}_H{}_L{}".format(*c))
def test_fp32_forward_and_gradients(case, with_h0: bool, cpu_user: None) -> None:  # noqa: ANN001
    b, s, d, hd, layers = case
    model = _model(d, hd, layers)
    emb, h0 = _inputs(b, s, d, hd, layers, with_h0)
    _check_against_fp64(model, emb, h0, torch.float32, fused=_native)


def test_notebook_width_over_many_steps(cpu_user: None) -> None:
    """Hd 512 (the notebook's prophet, 32 thread grains), B 5 (a 4-row GEMM block and a remainder), 24
    steps: the error stays within the budget as the recurrence compounds it."""
    model = _model(16, 512, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.div_(3.0 * math.sqrt(512 / 40))  # keep |z| in the activation's working range at this width
    emb, h0 = _inputs(5, 24, 16, 512, 2, True)
    _check_against_fp64(model, emb, h0, torch.float32, fused=_native)


def test_threads_do_not_change_the_bits(cpu_user: None) -> None:
    """Each thread owns whole 16-unit grains and every dot product has one summation order, so the
    thread count changes no bit of the outputs or the gradients."""
    model = _model(12, 70, 2)
    emb, h0 = _inputs(6, 9, 12, 70, 2, True)
    weights = [w.detach() for w in model.flat_weights()]
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            e = emb.clone().requires_grad_(True)
            w = [x.clone().requires_grad_(True) for x in weights]
            out, hs = charrnn(e, w, h0)
            (out.square().sum() + sum(h.sum() for h in hs)).backward()
            results.append([out, *hs, e.grad, *[x.grad for x in w]])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dispatch(cpu_user: None) -> None:
    """fp32 CPU runs native; float64 and ``backend="eager"`` run the eager loop itself (bit for bit)."""
    model = _model(8, 20, 2)
    emb, _ = _inputs(2, 3, 8, 20, 2, False)
    w = [x.detach() for x in model.flat_weights()]
    assert native_runnable(emb, w)
    eager = charrnn(emb, w, backend="eager")[0]
    assert torch.equal(eager, charrnn_ref(emb, w)[0])
    assert not torch.equal(charrnn(emb, w)[0], eager)  # a different code path (the polynomial activation)
    e64, w64 = emb.double(), [x.double() for x in w]
    assert not native_runnable(e64, w64)
    assert torch.equal(charrnn(e64, w64)[0], charrnn_ref(e64, w64)[0])


@pytest.mark.parametrize("value", acc.NONFINITE, ids=acc.NONFINITE_IDS)
@pytest.mark.parametrize("where", ["emb", "h0", "W_hR"])
def test_nonfinite_propagate_like_eager(where: str, value: float, cpu_user: None) -> None:
    """NaN / ±inf in the input, the state or a recurrent weight: non-finite exactly where the eager loop's are."""
    check_nonfinite_like_eager(_native, where, value)


def test_opcheck() -> None:
    g = torch.Generator().manual_seed(0)
    b, s, hd = 3, 5, 20
    p = torch.randn(b, s, 2 * hd, generator=g)
    wh = torch.randn(2 * hd, hd, generator=g) * 0.2
    h0 = torch.randn(b, hd, generator=g)
    ops = torch.ops.tape_kernels
    torch.library.opcheck(ops.charrnn_forward, (p, wh, h0))
    _, z = ops.charrnn_forward(p, wh, h0)
    torch.library.opcheck(ops.charrnn_backward, (torch.randn(b, s, hd, generator=g), torch.randn(b, hd, generator=g),
                                                 z, wh))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda p, wh, h0: (p.double(), wh, h0), "p must have dtype float32"),
        (lambda p, wh, h0: (p, wh[:, :-1].contiguous(), h0), "do not fit"),
        (lambda p, wh, h0: (p.transpose(0, 1), wh, h0), "p must be contiguous"),
        (lambda p, wh, h0: (p, wh, h0[:1]), "do not fit"),
    ],
    ids=["dtype", "shape", "strides", "batch"],
)
def test_bad_input_raises_value_error(args, message: str) -> None:  # noqa: ANN001
    p, wh, h0 = torch.zeros(2, 3, 8), torch.zeros(8, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=message):
        torch.ops.tape_kernels.charrnn_forward(*args(p, wh, h0))
