"""The lean CPU decode step (tapetransformer.fastdecode) against the model's prefill, through generate(),
and the grouped int8 ops it uses. No timing here: speed is measured by benchmarks/test_bench_generate.py.

Tolerances: the lean step runs the same eager ops and the same int8 kernels as the model's prefill, so on
this machine its log-probs are bitwise equal (fp32, W8A8 and weight-only int8); the tests allow
1e-5 absolute, to rounding of a kernel choice, not a different computation. The grouped int8 ops
are compared bitwise with the single ops (each group runs the same kernel).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tape_kernels import int8 as i8
from tapetransformer import fastdecode
from tapetransformer.fastdecode import lean_decoder, lean_supported
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer

gen_mod = importlib.import_module("tapetransformer.generate")  # the module (the package exports the function)
HAS_GROUPED = fastdecode._grouped_ops_available()
needs_grouped = pytest.mark.skipif(not HAS_GROUPED, reason="tape_kernels._C without the grouped int8 ops")
ATOL = 1e-5

CONFIGS = {
    "tiny": dict(vocab_size=13, seq_len=12, embed_dim=32, num_heads=1),
    "small": dict(vocab_size=29, seq_len=20, embed_dim=64, num_heads=2),
}
# (int8, act_quant): fp32; W8A8 (what act_quant=None picks on CPU); weight-only.
MODES = [(False, None), (True, None), (True, False)]


def _model(cfg: str, causal: bool, seed: int = 0, **kw) -> TapeTransformer:
    torch.manual_seed(seed)
    kw.setdefault("backend", "eager")
    return TapeTransformer(**CONFIGS[cfg], dropout=0.0, causal=causal, **kw).eval()


def _needs(int8: bool) -> None:
    if int8 and not HAS_GROUPED:
        pytest.skip("tape_kernels._C without the grouped int8 ops")


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("int8, act_quant", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_matches_forward_eval(cfg: str, causal: bool, int8: bool, act_quant: bool | None,
                                        batch: int) -> None:
    _needs(int8)
    m = _model(cfg, causal, seed=batch)
    if int8:
        m.quantize_int8_(act_quant=act_quant)
    seq = CONFIGS[cfg]["seq_len"]
    prompt_len, steps = 3, seq - 3  # decode up to a full window (causal: the last position)
    x = torch.randint(0, CONFIGS[cfg]["vocab_size"], (batch, prompt_len + steps),
                      generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_cache = m.new_cache(batch, prompt_len + steps)
        got_cache = m.new_cache(batch, prompt_len + steps)
        lean = lean_decoder(m, got_cache)
        assert lean is not None
        want, want_cache = m.prefill(x[:, :prompt_len], want_cache)
        got, got_cache = m.prefill(x[:, :prompt_len], got_cache)  # prefill through the lean layout
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        for t in range(prompt_len, prompt_len + steps):
            want, want_cache = m.prefill(x[:, t : t + 1], want_cache)
            got, got_cache = lean.step(x[:, t])
            assert got.shape == want.shape == (batch, 1, CONFIGS[cfg]["vocab_size"])
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=f"step {t}")
        assert got_cache.length == want_cache.length == prompt_len + steps
        n = got_cache.length
        torch.testing.assert_close(got_cache.kv[..., :n, :], want_cache.kv[..., :n, :], rtol=0, atol=ATOL)


def test_lean_step_grows_a_full_cache() -> None:
    m = _model("tiny", causal=False)
    x = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, wc = m.prefill(x[:, :2], m.new_cache(2, 2))
        cache = m.new_cache(2, 2)  # full after the prefill: every step must grow it
        lean = lean_decoder(m, cache)
        got, cache = m.prefill(x[:, :2], cache)
        for t in range(2, 9):
            want, wc = m.prefill(x[:, t : t + 1], wc)
            got, cache = lean.step(x[:, t])
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        assert cache.capacity >= 9


def _generate_both(monkeypatch: pytest.MonkeyPatch, m: TapeTransformer, prompt: torch.Tensor, n: int,
                   **kw) -> tuple[torch.Tensor, torch.Tensor]:
    calls = []

    def spy(model: TapeTransformer, cache: object) -> fastdecode.LeanDecoder | None:
        dec = lean_decoder(model, cache)
        calls.append(dec is not None)
        return dec

    monkeypatch.setattr(gen_mod, "lean_decoder", spy)
    got = generate(m, prompt, n, **kw)
    assert calls == [True]
    monkeypatch.setattr(gen_mod, "lean_decoder", lambda model, cache: None)
    want = generate(m, prompt, n, **kw)
    return got, want


@pytest.mark.parametrize("int8, act_quant", MODES)
def test_generate_with_lean_step_equals_forward_eval_loop(monkeypatch: pytest.MonkeyPatch, int8: bool,
                                                          act_quant: bool | None) -> None:
    _needs(int8)
    m = _model("small", causal=False, seed=1)
    prompt = torch.randint(0, 29, (2, 6), generator=torch.Generator().manual_seed(2))
    got, want = _generate_both(monkeypatch, m, prompt, 15, greedy=True, int8=int8, act_quant=act_quant)
    assert torch.equal(got, want)
    got, want = _generate_both(monkeypatch, m, prompt, 15, top_k=5, seed=3, int8=int8, act_quant=act_quant)
    assert torch.equal(got, want)
    assert m.int8_mode is None and not m.training


@pytest.mark.parametrize("int8", [False, True])
def test_causal_generation_slides_the_window_with_the_lean_step(monkeypatch: pytest.MonkeyPatch, int8: bool) -> None:
    _needs(int8)
    m = _model("tiny", causal=True, seed=4)  # seq_len 12: 40 new tokens slide the window several times
    stats: dict = {}
    got, want = _generate_both(monkeypatch, m, torch.tensor([1, 2, 3]), 40, seed=0, top_k=5, int8=int8)
    assert torch.equal(got, want)
    generate(m, torch.tensor([1, 2, 3]), 40, greedy=True, int8=int8, stats=stats)
    assert stats["tokens"] == 40 and stats["ms_per_token"] > 0 and stats["prefill_ms"] > 0


def test_unsupported_models_fall_back() -> None:
    ok = _model("tiny", causal=False)
    assert lean_supported(ok)
    assert not lean_supported(_model("tiny", causal=False, skip_dead=False))  # the prophet advances too
    assert not lean_supported(_model("tiny", causal=False, backend="triton"))  # keeps its kernels
    assert not lean_supported(_model("tiny", causal=False).double())
    assert not lean_supported(_model("tiny", causal=False).train())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lean_supported(ok)
    assert lean_decoder(ok, ok.new_cache(1, 4, dtype=torch.float64)) is None
    # skip_dead=False still generates, through the model's prefill
    m = _model("tiny", causal=False, skip_dead=False)
    assert generate(m, torch.tensor([1, 2]), 3, greedy=True).shape == (1, 5)


# ------------------------------------------------------------------------------- grouped int8 ops


def _grouped_case(g: int, m: int, n: int, k: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, m, k, generator=gen)
    q = torch.randint(-127, 128, (g, n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(g, n, generator=gen)
    b = torch.randn(g, n, generator=gen)
    return x, q, s, b


@needs_grouped
@pytest.mark.parametrize("m, n, k", [(1, 37, 13), (3, 130, 67), (2, 64, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_ops_equal_the_single_ops_bitwise(m: int, n: int, k: int, with_bias: bool) -> None:
    ops = torch.ops.tape_kernels
    x, q, s, b = _grouped_case(2, m, n, k, seed=m + n + k)
    bias = b if with_bias else None
    packed, wsum = _pack_group(q)
    y8 = ops.w8a8_linear_grouped(x, packed, wsum, s, bias)
    y32 = ops.w8_linear_grouped(x, q, s, bias)
    for i in range(2):
        bi = None if bias is None else bias[i]
        assert torch.equal(y8[i], ops.w8a8_linear_packed(x[i], packed[i], wsum[i], s[i], bi))
        assert torch.equal(y32[i], ops.w8_linear(x[i], q[i], s[i], bi))
        assert torch.equal(y8[i], i8.int8_linear(x[i], q[i], s[i], bi, act_quant=True))
    # strided x rows (a view into a wider buffer) are read in place
    wide = torch.randn(2, m, k + 5)
    wide[..., :k] = x
    assert torch.equal(ops.w8a8_linear_grouped(wide[..., :k], packed, wsum, s, bias), y8)


def _pack_group(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, K) int8 -> the grouped W8A8 op's stacked (packed, wsum)."""
    packs = [torch.ops.tape_kernels.pack_int8_weight(q[i]) for i in range(q.shape[0])]
    return torch.stack([p for p, _ in packs]), torch.stack([w for _, w in packs])


@needs_grouped
def test_grouped_ops_check_inputs_with_value_errors() -> None:
    ops = torch.ops.tape_kernels
    x, q, s, b = _grouped_case(2, 1, 8, 16, seed=0)
    packed, wsum = _pack_group(q)
    with pytest.raises(ValueError, match="3-D"):
        ops.w8a8_linear_grouped(x[0], packed, wsum, s, b)
    with pytest.raises(ValueError, match="float32"):
        ops.w8_linear_grouped(x.double(), q, s, b)
    with pytest.raises(ValueError, match="packed"):
        ops.w8a8_linear_grouped(x, packed[:1], wsum, s, b)
    with pytest.raises(ValueError, match="wsum"):
        ops.w8a8_linear_grouped(x, packed, wsum[:, :8], s, b)
    with pytest.raises(ValueError, match="bias"):
        ops.w8a8_linear_grouped(x, packed, wsum, s, b[:, :4])
    with pytest.raises(ValueError, match="qweight"):
        ops.w8_linear_grouped(x, q[:, :, :8], s, b)
    with pytest.raises(ValueError, match="scale"):
        ops.w8_linear_grouped(x, q, s.t().contiguous(), b)
    with pytest.raises(ValueError, match="unit stride"):
        ops.w8_linear_grouped(torch.randn(2, 16, 3).transpose(1, 2), q, s, b)  # (2, 3, 16), K strided


@needs_grouped
def test_grouped_ops_opcheck() -> None:
    ops = torch.ops.tape_kernels
    x, q, s, b = _grouped_case(2, 3, 70, 29, seed=1)
    packed, wsum = _pack_group(q)
    for op, args in [
        (ops.w8a8_linear_grouped, (x, packed, wsum, s, b)),
        (ops.w8a8_linear_grouped, (x, packed, wsum, s, None)),
        (ops.w8_linear_grouped, (x, q, s, b)),
        (ops.w8_linear_grouped, (x, q, s, None)),
    ]:
        torch.library.opcheck(op, args)
