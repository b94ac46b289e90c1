"""The native CPU decode of the seed design (torch.ops.tape_kernels.decode_step_seed).

The same rules as tests/test_native_decode.py (whose helpers and tolerances this file reuses):
fp32 is judged against a float64 evaluation of the same model, its error within 2x PyTorch fp32's own
error on the same outputs plus a floor of 1e-6 (so an exceptionally accurate BLAS cannot fail it), and
within 1e-5 of the model's full causal forward on the tiny config (tests/test_model.py's bound);
weight-only int8 by the same rule against a float64 model holding q·s; W8A8 against the model's own
W8A8 path by the ratio bounds of the reference design. Thread count and batch do not change a result
(bitwise). The prophet's state, the moderator and the merger are fp32 in every weight mode (the
model's int8 path quantizes only the TapeHeadBlocks).
"""

from __future__ import annotations

import pytest
import torch
from test_native_decode import (
    CONFIGS,
    W8A8_MAX_RATIO,
    W8A8_MEAN_RATIO,
    _assert_like_torch_fp32,
    _float64_twin,
    _tokens,
)

from tape_kernels.charrnn import charrnn_ref
from tapetransformer import native_decode as nd
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer

pytestmark = pytest.mark.skipif(
    not (nd.native_available() and hasattr(torch.ops.tape_kernels, "decode_step_seed")),
    reason="tape_kernels._C without decode_step_seed",
)


def _seed_model(cfg: str, seed: int = 0) -> TapeTransformer:
    torch.manual_seed(seed)
    return TapeTransformer(**CONFIGS[cfg], dropout=0.0, design="seed", backend="eager").eval()


def _native_run(m: TapeTransformer, x: torch.Tensor, k: int,
                weights: str | None = None) -> tuple[torch.Tensor, nd.NativeDecoder]:
    """Native prefill of x[:, :k], then native steps over the rest -> (log-probs (B, S, V), decoder)."""
    with torch.no_grad():
        logp, dec = nd.prefill(m, x[:, :k], x.shape[1], weights=weights, native=True)
        outs = [logp] + [dec.step(x[:, t]) for t in range(k, x.shape[1])]
    return torch.cat(outs, dim=1), dec


@pytest.mark.parametrize("cfg, splits", [("tiny", (1, 5, 11)), ("odd40", (3,)), ("wide", (4,))])
def test_prefill_then_decode_equals_the_full_forward(cfg: str, splits: tuple[int, ...]) -> None:
    m = _seed_model(cfg, seed=1)
    x = _tokens(cfg, 2, CONFIGS[cfg]["seq_len"], seed=3)
    with torch.no_grad():
        full, _ = m(x)
        full64, _ = _float64_twin(m)(x)
    for k in splits:
        got, dec = _native_run(m, x, k)
        assert got.shape == full.shape and dec.length == x.shape[1]
        if cfg == "tiny":
            assert (got - full).abs().max() < 1e-5, f"split {k}"
        _assert_like_torch_fp32([got], [full], [full64])


def test_steps_continue_the_models_own_prefill_and_vice_versa() -> None:
    """The model's prefill and the native step share the cache: K/V and the prophet's state."""
    m = _seed_model("odd40", seed=2)
    x = _tokens("odd40", 3, 14, seed=4)
    with torch.no_grad():
        full, _ = m(x)
        full64, _ = _float64_twin(m)(x)
        cache = m.new_cache(3, 14)
        a, cache = m.prefill(x[:, :5], cache)
        dec = nd.NativeDecoder(m, cache)
        b = torch.cat([dec.step(x[:, t]) for t in range(5, 9)], dim=1)
        c, cache = m.prefill(x[:, 9:], cache)  # the model continues from the native steps
    _assert_like_torch_fp32([torch.cat([a, b, c], dim=1)], [full], [full64])


def test_prefill_rebuilds_the_prophet_state_as_the_eager_recurrence() -> None:
    m = _seed_model("wide", seed=3)
    x = _tokens("wide", 2, 9, seed=5)
    with torch.no_grad():
        _, dec = nd.prefill(m, x, 10, native=True)  # all by the native prefill
    with torch.no_grad():
        e = m.holistic_embed(x)
        _, want = charrnn_ref(e, m._prophet_weights())  # the model's eager Char-RNN (fp32)
        _, want64 = charrnn_ref(e.double(), [w.double() for w in m._prophet_weights()])
    got = dec.cache.rnn_state  # (layers, B, 1, Hd)
    assert got.shape == (2, 2, 1, m.prophet.hidden_size)
    _assert_like_torch_fp32(list(got), want, want64)
    assert got.abs().max() > 1e-3  # a real state, not zeros
    with torch.no_grad():  # and steps advance it as the model's step does
        cache = m.new_cache(2, 10)
        m.prefill(x, cache)
        dec.step(x[:, 0])
        m.prefill(x[:, :1], cache)
    torch.testing.assert_close(dec.cache.rnn_state, cache.rnn_state, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_the_models_own_decode(batch: int) -> None:
    m = _seed_model("tiny", seed=11)
    prompt = _tokens("tiny", batch, 4, seed=6)
    want = generate(m, prompt, 20, greedy=True, native=False)  # slides the causal window (seq_len 12)
    assert torch.equal(generate(m, prompt, 20, greedy=True), want)  # generate's default on a CPU: native
    assert torch.equal(generate(m, prompt, 20, greedy=True, native=True), want)


def test_generate_runs_natively_by_default_and_samples_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    gen_mod = importlib.import_module("tapetransformer.generate")
    made = []
    real = gen_mod.native_decoder
    monkeypatch.setattr(gen_mod, "native_decoder", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    m = _seed_model("odd24", seed=5)
    prompt = _tokens("odd24", 2, 3, seed=8)
    got = generate(m, prompt, 16, top_k=5, temperature=0.8, seed=9)
    assert made and made[0] is not None and made[0].seed
    # the model's decode with the eager sampler: the same Philox stream, so the same ids
    assert torch.equal(got, generate(m, prompt, 16, top_k=5, temperature=0.8, seed=9, native=False))
    assert torch.equal(generate(m, prompt, 16, seed=2), generate(m, prompt, 16, seed=2, native=False))


def test_weight_only_int8_like_torch_on_the_dequantized_model() -> None:
    m = _seed_model("odd40", seed=6)
    x = _tokens("odd40", 2, 14, seed=7)
    m.quantize_int8_(act_quant=False)
    got, _ = _native_run(m, x, 4, weights="w8")
    with torch.no_grad():
        model_int8, _ = m(x)  # the model's weight-only path
        twin = _float64_twin(m, dequantized=True)
        want64, _ = twin(x)
    _assert_like_torch_fp32([got], [model_int8], [want64])


def test_w8a8_close_to_the_models_w8a8_path() -> None:
    m = _seed_model("odd40", seed=8)
    x = _tokens("odd40", 3, 14, seed=9)
    with torch.no_grad():
        fp32, _ = m(x)
        m.quantize_int8_(act_quant=True)
        model_int8, _ = m(x)
    got, _ = _native_run(m, x, 5)  # follows the model: W8A8
    q_max, q_mean = (model_int8 - fp32).abs().max().item(), (model_int8 - fp32).abs().mean().item()
    assert q_max > 1e-4
    assert (got - model_int8).abs().max().item() <= W8A8_MAX_RATIO * q_max
    assert (got - model_int8).abs().mean().item() <= W8A8_MEAN_RATIO * q_mean


@pytest.mark.parametrize("weights", ["fp32", "w8a8"])
def test_threads_and_batch_do_not_change_a_result(weights: str) -> None:
    """Decode steps from one prefilled cache: bitwise the same with 1 or 2 threads and for each batch row
    alone (the prefill's GEMM paths depend on the row count, as in the reference design)."""
    m = _seed_model("wide", seed=9)
    x = _tokens("wide", 5, 10, seed=10)  # B = 5: past the kernels' 4-row blocks
    k = 4
    with torch.no_grad():
        _, base = nd.prefill(m, x[:, :k], x.shape[1], weights=weights, native=True)
    prev = torch.get_num_threads()

    def decode(threads: int, rows: slice) -> tuple[list, torch.Tensor, torch.Tensor]:
        torch.set_num_threads(threads)
        cache = m.new_cache(x[rows].shape[0], x.shape[1])
        cache.kv.copy_(base.kv[:, :, rows])
        cache.rnn_state.copy_(base.cache.rnn_state[:, rows])
        cache.length = k
        dec = nd.NativeDecoder(m, cache, weights=weights)
        with torch.no_grad():
            return [dec.step(x[rows, t]) for t in range(k, x.shape[1])], cache.kv, cache.rnn_state

    try:
        one, kv1, rnn1 = decode(1, slice(None))
        two, kv2, rnn2 = decode(2, slice(None))
        assert all(torch.equal(a, b) for a, b in zip(one, two))
        assert torch.equal(kv1, kv2) and torch.equal(rnn1, rnn2)
        for i in (0, 3):
            alone, kv_i, rnn_i = decode(2, slice(i, i + 1))
            assert all(torch.equal(a[i : i + 1], b) for a, b in zip(one, alone))
            assert torch.equal(kv1[:, :, i : i + 1], kv_i) and torch.equal(rnn1[:, i : i + 1], rnn_i)
        prefills = []
        for threads in (1, 2):  # the native prefill (the GEMM paths) does not depend on the threads
            torch.set_num_threads(threads)
            prefills.append(_native_run(m, x, k, weights=weights))
        assert torch.equal(prefills[0][0], prefills[1][0])
        assert torch.equal(prefills[0][1].cache.rnn_state, prefills[1][1].cache.rnn_state)
    finally:
        torch.set_num_threads(prev)


def test_every_isa_gives_the_same_results() -> None:
    """fp32 on each instruction set the CPU has: other summation orders only (the bound of the
    reference design's test)."""
    from tape_kernels import _C

    m = _seed_model("odd40", seed=13)
    x = _tokens("odd40", 2, 12, seed=2)
    best = _C.cpu_isa()
    base, _ = _native_run(m, x, 3)
    try:
        for isa in _C.cpu_isas():
            _C.set_cpu_isa(isa)
            got, _ = _native_run(m, x, 3)
            assert (got - base).abs().max().item() <= 2e-5, isa
    finally:
        _C.set_cpu_isa(best)


@pytest.mark.parametrize("where", ["prophet", "merge_projection", "critic"])
def test_nan_in_a_weight_stays_nan_and_generate_raises(where: str) -> None:
    m = _seed_model("tiny", seed=12)
    with torch.no_grad():
        if where == "prophet":
            m.prophet.cells_left[1].h2h.weight[3, 4] = float("nan")
        elif where == "merge_projection":
            m.merge_projection.weight[0, 0] = float("nan")
        else:
            m.residualheads[0].blocks_left[2].mlp.linear.weight[1, 1] = float("nan")
    x = _tokens("tiny", 1, 6, seed=1)
    got, _ = _native_run(m, x, 3)
    assert torch.isnan(got).all()
    with pytest.raises(ValueError, match="log-probabilities are not finite"):
        generate(m, x, 3, greedy=True)
    with pytest.raises(ValueError, match="log-probabilities are not finite"):
        generate(m, x, 3, top_k=3, seed=0)


def test_bad_input_errors() -> None:
    m = _seed_model("tiny")
    ref = TapeTransformer(**CONFIGS["tiny"], dropout=0.0, causal=True, backend="eager").eval()
    cache = m.new_cache(2, 12)
    with pytest.raises(ValueError, match="KVCache made by model.new_cache"):
        nd.NativeDecoder(m, cache.kv)  # a bare kv tensor has no prophet state
    assert nd.native_decoder(m, cache.kv) is None  # generate's probe: falls back instead
    dec = nd.NativeDecoder(m, cache)
    with pytest.raises(ValueError, match="out of range"):
        dec.step(torch.tensor([1, 13]))
    with pytest.raises(ValueError, match="shape"):
        dec.step(torch.tensor([1, 2, 3]))
    ops = torch.ops.tape_kernels
    tok = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="seed design: call decode_step_seed"):
        ops.decode_step(dec.plan, tok, cache.kv, 0)
    with pytest.raises(ValueError, match="needs a plan of the seed design"):
        rc = ref.new_cache(2, 12)
        ops.decode_step_seed(nd.build_plan(ref), tok, rc.kv, cache.rnn_state, 0)
    with pytest.raises(ValueError, match="rnn"):
        ops.decode_step_seed(dec.plan, tok, cache.kv, cache.rnn_state[:1], 0)
    with pytest.raises(ValueError, match="rnn"):
        ops.decode_step_seed(dec.plan, tok, cache.kv, cache.rnn_state.double(), 0)
    with pytest.raises(ValueError, match="seq_len"):
        ops.decode_step_seed(dec.plan, tok, m.new_cache(2, 14).kv, cache.rnn_state, 12)
    with pytest.raises(ValueError, match="tensors"):  # a plan missing the seed design's tensors
        torch.classes.tape_kernels.DecodePlan(dec.plan.__obj_flatten__()[0][1][:-1], dec.plan.__obj_flatten__()[1][1],
                                              dec.plan.__obj_flatten__()[2][1])


def test_opcheck_and_what_the_ops_write() -> None:
    """decode_step_seed: opcheck's fake-tensor and autograd-registration checks (its schema checks cannot
    run on a torchbind argument, see tests/test_native_decode.py::test_opcheck), and by hand: only kv's
    rows t0.. and rnn are written. sample_next: opcheck, and only the state's step advances."""
    import copy

    m = _seed_model("odd24", seed=4)
    x = _tokens("odd24", 2, 4, seed=3)
    with torch.no_grad():
        _, dec = nd.prefill(m, x, 8, native=True)
    kv, rnn = dec.cache.kv, dec.cache.rnn_state
    op = torch.ops.tape_kernels.decode_step_seed
    for t in (torch.tensor([3, 4]), torch.tensor([[3, 4, 5], [6, 7, 8]])):
        torch.library.opcheck(op, (dec.plan, t, kv.clone(), rnn.clone(), 4),
                              test_utils=("test_faketensor", "test_autograd_registration"))  # fmt: skip
    kv2, rnn2 = kv.clone(), rnn.clone()
    kv2[..., 4:, :] = float("nan")  # rows past t0 are never read
    before_kv, before_rnn = kv2.clone(), rnn2.clone()
    out = op(dec.plan, torch.tensor([3, 4]), kv2, rnn2, 4)
    assert torch.isfinite(out).all() and not torch.equal(rnn2, before_rnn)
    changed = (kv2 != before_kv) & ~(torch.isnan(kv2) & torch.isnan(before_kv))
    assert changed[..., 4, :].any() and not changed[..., :4, :].any() and not changed[..., 5:, :].any()
    assert copy.deepcopy(dec.plan).n_blocks() == dec.plan.n_blocks() == kv.shape[0]  # the seed config round-trips
    logp = torch.log_softmax(torch.randn(2, 9), -1)
    for state in (None, torch.tensor([5, 0])):
        torch.library.opcheck(torch.ops.tape_kernels.sample_next, (logp, state, 1.25, 3))
    state = torch.tensor([5, 7])
    torch.ops.tape_kernels.sample_next(logp, state, 1.0, 0)
    assert state.tolist() == [5, 8]
