"""The native CPU decode step (torch.ops.tape_kernels.decode_step, tapetransformer.native_decode).

Prefill through the fused model (model.prefill writes the same KVCache the native step reads) or
natively (NativeDecoder.extend), then decode natively; compared with the fused model's own decode
(model.prefill, with fp32 or int8 weights), generate(), the reference's cached loop and the full causal forward.
No timing here (benchmarks/native_decode_bench.py).

Tolerances, and why:
* fp32: the native step computes the same math with other summation orders (its own GEMV,
  attention, LayerNorm, activation), so it is judged as PyTorch is: against a float64 evaluation
  of the same model, its error must stay within 2x PyTorch fp32's own error on the same steps
  (measured ratio 0.8-1.2) — plus the absolute 1e-5 of tests/test_model.py where the brief
  fixes it (causal prefill + decode vs the full causal forward, tiny configs).
* weight-only int8: fp32 math on the dequantized weights, so the same rule against a float64
  model holding q·s.
* W8A8: native and the model's own int8 decode quantize each linear's input rows with the same rule, but their fp32
  inputs differ by rounding; a value within a few ulp of a rounding boundary then lands on the
  neighbouring integer, which moves that product by one activation quantum — the kind of error
  W8A8 makes on every element (up to half a quantum). So |native - model int8| is bounded by the
  int8 error itself (|model int8 - fp32|) and is a small fraction of it on average. Measured over
  3 configs x 6 seeds x both semantics: max ratio 0.31, mean ratio 0.07; tested: max <= 0.5x,
  mean <= 0.15x. The integer products themselves are exact (int32) on every ISA.
* Thread count and batch size do not change any result (bitwise): each output row, attention head
  and batch row is computed by the same code whoever computes it.
"""

from __future__ import annotations

import copy

import _accuracy as acc
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tapetransformer import native_decode as nd
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer
from tapetransformer.sampling import sample_reference

pytestmark = pytest.mark.skipif(not nd.native_available(), reason="tape_kernels._C without decode_step")

CONFIGS = {
    "tiny": dict(vocab_size=13, seq_len=12, embed_dim=32, num_heads=1),
    "odd40": dict(vocab_size=37, seq_len=14, embed_dim=40, num_heads=2),
    "odd24": dict(vocab_size=37, seq_len=10, embed_dim=24, num_heads=1),
    "wide": dict(vocab_size=29, seq_len=10, embed_dim=64, num_heads=2),
}
FP32_FACTOR = 2.0  # native error vs float64 <= 2x PyTorch fp32's (+ FP32_FLOOR for near-exact steps)
FP32_FLOOR = 1e-6
W8A8_MAX_RATIO, W8A8_MEAN_RATIO = 0.5, 0.15


def _isas() -> list[str]:
    from tape_kernels import _C

    return list(_C.cpu_isas())


def _model(cfg: str, causal: bool = False, seed: int = 0, **kw) -> TapeTransformer:
    torch.manual_seed(seed)
    kw.setdefault("backend", "eager")
    return TapeTransformer(**CONFIGS[cfg], dropout=0.0, causal=causal, **kw).eval()


def _tokens(cfg: str, batch: int, n: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, CONFIGS[cfg]["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def _native_steps(m: TapeTransformer, x: torch.Tensor, k: int, weights: str | None = None,
                  native_prefill: bool = False) -> tuple[list, nd.NativeDecoder]:
    """Prefill x[:, :k] (by default through the fused model, so that a step starts from the model's
    own cache), then feed x[:, k:] natively: ([prefill logp, step logps...], decoder)."""
    with torch.no_grad():
        logp, dec = nd.prefill(m, x[:, :k], x.shape[1], weights=weights, native=native_prefill)
        outs = [logp]
        for t in range(k, x.shape[1]):
            outs.append(dec.step(x[:, t]))
    return outs, dec


def _eval_steps(m: TapeTransformer, x: torch.Tensor, k: int) -> tuple[list, object]:
    """The same through the model's own cached decode."""
    with torch.no_grad():
        logp, cache = m(x[:, :k], past_kv=m.new_cache(x.shape[0], x.shape[1]))
        outs = [logp]
        for t in range(k, x.shape[1]):
            logp, cache = m.prefill(x[:, t : t + 1], cache)
            outs.append(logp)
    return outs, cache


def _float64_twin(m: TapeTransformer, dequantized: bool = False) -> TapeTransformer:
    """m in float64; ``dequantized``: every int8 weight replaced by q·s (the weight-only model's exact math)."""
    twin = copy.deepcopy(m)
    if dequantized:
        with torch.no_grad():
            for blk, tblk in zip(m.fused_blocks(), twin.fused_blocks()):
                mha, tmha = blk.attention, tblk.attention
                for (q, s), w in zip(blk.int8, (tmha.in_proj_weight, tmha.out_proj.weight, tblk.mlp.expand.weight,
                                                tblk.mlp.linear.weight)):  # fmt: skip
                    w.copy_(q.double() * s.double()[:, None])
                assert mha is not tmha
    twin.dequantize_()
    return twin.double()


def _assert_like_torch_fp32(native: list, torch32: list, oracle: list) -> None:
    for i, (a, b, o) in enumerate(zip(native, torch32, oracle)):
        ours = (a.double() - o).abs().max().item()
        theirs = (b.double() - o).abs().max().item()
        assert ours <= FP32_FACTOR * theirs + FP32_FLOOR, f"step {i}: native {ours:.3g} vs torch fp32 {theirs:.3g}"


# ------------------------------------------------------------------------------------------ fp32


@pytest.mark.parametrize("cfg", ["tiny", "odd40", "odd24", "wide"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_steps_match_the_model_like_torch(cfg: str, causal: bool, batch: int) -> None:
    m = _model(cfg, causal, seed=batch)
    x = _tokens(cfg, batch, CONFIGS[cfg]["seq_len"])
    k = 3
    native, dec = _native_steps(m, x, k)
    torch32, cache = _eval_steps(m, x, k)
    oracle, _ = _eval_steps(_float64_twin(m), x, k)
    assert all(a.shape == b.shape for a, b in zip(native, torch32))
    assert native[-1].shape == (batch, 1, CONFIGS[cfg]["vocab_size"]) and native[-1].dtype == torch.float32
    _assert_like_torch_fp32(native[1:], torch32[1:], oracle[1:])
    # the K/V rows it wrote are the model's (projections: fp32 rounding of the same products)
    assert dec.length == cache.length == x.shape[1]
    torch.testing.assert_close(dec.kv[..., : dec.length, :], cache.kv[..., : dec.length, :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native_prefill", [False, True], ids=["fused-prefill", "native-prefill"])
@pytest.mark.parametrize("cfg, splits", [("tiny", (1, 4, 7, 11)), ("odd40", (2, 9)), ("odd24", (5,))])
def test_causal_prefill_then_native_decode_equals_full_forward(cfg: str, splits: tuple[int, ...],
                                                               native_prefill: bool) -> None:
    """Within 1e-5 of the full causal forward on the tiny model (tests/test_model.py's bound for the
    model's own cached decode); on every config as close to the float64 full forward as the fp32
    full forward is (two fp32 evaluations each ~6e-6 off at D = 40 can differ by more than 1e-5)."""
    m = _model(cfg, causal=True)
    x = _tokens(cfg, 2, CONFIGS[cfg]["seq_len"], seed=1)
    with torch.no_grad():
        full, _ = m(x)
        full64, _ = _float64_twin(m)(x)
    for k in splits:
        outs, _ = _native_steps(m, x, k, native_prefill=native_prefill)
        got = torch.cat(outs, dim=1)
        if cfg == "tiny":
            assert (got - full).abs().max() < 1e-5, f"split {k}"
        _assert_like_torch_fp32([got], [full], [full64])


def _native_greedy(m: TapeTransformer, prompt: torch.Tensor, n: int, weights: str | None = None,
                   native_prefill: bool = True) -> torch.Tensor:
    with torch.no_grad():
        logp, dec = nd.prefill(m, prompt, prompt.shape[1] + n, weights=weights, native=native_prefill)
        out = [prompt]
        for i in range(n):
            nxt = logp[:, -1].argmax(-1)
            out.append(nxt[:, None])
            if i + 1 < n:
                logp = dec.step(nxt)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", ["tiny", "odd40"])
def test_greedy_tokens_equal_generate(cfg: str, batch: int) -> None:
    m = _model(cfg, seed=11)
    prompt = _tokens(cfg, batch, 4, seed=5)
    n = 12
    want = generate(m, prompt, n, greedy=True, native=False)  # the model's own decode
    assert torch.equal(_native_greedy(m, prompt, n), want)
    assert torch.equal(_native_greedy(m, prompt, n, native_prefill=False), want)
    assert torch.equal(generate(m, prompt, n, greedy=True), want)  # generate's default on a CPU: native


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "w8a8"])
def test_generate_decodes_natively_and_slides_the_causal_window(int8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    gen_mod = importlib.import_module("tapetransformer.generate")  # the module, not the function the package exports
    m = _model("tiny", causal=True, seed=4)  # seq_len 12: 30 new tokens slide the window several times
    made = []
    real = gen_mod.native_decoder
    monkeypatch.setattr(gen_mod, "native_decoder", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    got = generate(m, torch.tensor([1, 2, 3]), 30, top_k=5, seed=0, int8=int8)
    assert made and made[0] is not None and made[0].weights == ("w8a8" if int8 else "fp32")
    want = generate(m, torch.tensor([1, 2, 3]), 30, top_k=5, seed=0, int8=int8, native=False)
    if not int8:  # fp32: the same tokens; W8A8's rounding may pick another token at a near tie
        assert torch.equal(got, want)
    assert got.shape == (1, 33) and int(got.max()) < 13
    with pytest.raises(ValueError, match="native=True"):  # the prophet's dead state: not covered natively
        generate(TapeTransformer(**CONFIGS["tiny"], skip_dead=False, backend="eager").eval(), torch.tensor([1]), 2,
                 native=True)
    with pytest.raises(ValueError, match="native"):
        generate(m, torch.tensor([1]), 2, native="yes")


def test_greedy_tokens_equal_the_reference_loop_on_the_golden_model(golden: dict) -> None:
    from tapetransformer import reference as ref

    vocab, seq_len, dim, heads = golden["config"].tolist()
    plain = ref.ReferenceTapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0)
    plain.load_state_dict(golden["state_dict"], strict=True)
    fused = TapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0, backend="eager")
    fused.load_state_dict(golden["state_dict"], strict=True)
    fused.eval()
    prompt = golden["x"][:2, :5]
    want, _ = sample_reference(plain, prompt, 11, greedy=True)
    assert torch.equal(generate(fused, prompt, 11, greedy=True), want)
    assert torch.equal(_native_greedy(fused, prompt, 11), want)
    assert torch.equal(_native_greedy(fused, prompt, 11, native_prefill=False), want)


@pytest.mark.parametrize("cfg", ["tiny", "odd40", "wide"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("batch", [1, 3])
def test_native_prefill_and_chunks_match_the_model_like_torch(cfg: str, causal: bool, batch: int) -> None:
    """extend(S tokens) is the model's call on S tokens: a prefill, then a second chunk onto the cache
    (reference semantics: positions restart at 0 and every new row sees every row), then steps."""
    m = _model(cfg, causal, seed=batch + 5)
    seq = CONFIGS[cfg]["seq_len"]
    x = _tokens(cfg, batch, seq, seed=6)
    cuts = [(0, 4), (4, seq - 2), (seq - 2, seq - 1), (seq - 1, seq)]  # prefill, chunk, 2 steps

    def run(model: TapeTransformer) -> list:
        outs, cache = [], model.new_cache(batch, seq)
        with torch.no_grad():
            for a, b in cuts:
                logp, cache = model(x[:, a:b], past_kv=cache)
                outs.append(logp)
        return outs

    dec = nd.NativeDecoder(m, nd.new_kv(m, batch, seq))
    with torch.no_grad():
        native = [dec.extend(x[:, a:b]) for a, b in cuts]
    assert dec.length == seq and [t.shape[1] for t in native] == [b - a for a, b in cuts]
    _assert_like_torch_fp32(native, run(m), run(_float64_twin(m)))


@pytest.mark.parametrize("cfg", ["tiny", "odd40"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
def test_native_w8a8_prefill_close_to_the_fused_prefill(cfg: str, causal: bool) -> None:
    m = _model(cfg, causal, seed=8)
    x = _tokens(cfg, 3, CONFIGS[cfg]["seq_len"], seed=9)
    with torch.no_grad():
        fp32, _ = m(x)
        m.quantize_int8_(act_quant=True)
        fused, _ = m(x)
        native, _ = nd.prefill(m, x, x.shape[1], native=True)
    q_max, q_mean = (fused - fp32).abs().max().item(), (fused - fp32).abs().mean().item()
    assert q_max > 1e-4
    assert (native - fused).abs().max().item() <= W8A8_MAX_RATIO * q_max
    assert (native - fused).abs().mean().item() <= W8A8_MEAN_RATIO * q_mean


@pytest.mark.parametrize("weights", ["fp32", "w8a8", "w8"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
def test_nan_stays_nan(weights: str, causal: bool) -> None:
    m = _model("tiny", causal)
    with torch.no_grad():
        m.holistic_embed.weight[5] = float("nan")
    x = torch.tensor([[1, 2, 3, 5, 4]])
    for native_prefill in (False, True):
        outs, _ = _native_steps(m, x, 3, weights=weights, native_prefill=native_prefill)
        assert torch.isfinite(outs[0]).all() and torch.isnan(outs[1]).all()  # token 5 -> NaN
        assert torch.isnan(outs[2]).all()  # and its K/V poison every later step, as in PyTorch
    with torch.no_grad():  # a prompt holding it: NaN exactly where the model's prefill puts NaN
        native, _ = nd.prefill(m, x, 5, weights=weights, native=True)
        if weights != "fp32":
            m.quantize_int8_(act_quant=weights == "w8a8")
        model, _ = m.prefill(x)
    assert torch.isnan(native[:, 3:]).all() and torch.isnan(model[:, 3:]).all()
    if causal:  # rows before the NaN token do not see it (the model's eager prefill leaks it backwards:
        assert torch.isfinite(native[:, :3]).all()  # its masked probabilities are 0, and 0·NaN = NaN)
    else:
        assert torch.isnan(native).all() and torch.isnan(model).all()  # every row sees every row


# ------------------------------------------------------------------------------------------ int8


def _model_int8_steps(m: TapeTransformer, x: torch.Tensor, k: int) -> list:
    """The model's own int8 decode (op by op), one token per prefill call after k prompt tokens."""
    with torch.no_grad():
        logp, cache = m.prefill(x[:, :k], m.new_cache(x.shape[0], x.shape[1]))
        outs = [logp]
        for t in range(k, x.shape[1]):
            outs.append(m.prefill(x[:, t : t + 1], cache, check=False)[0])
    return outs


@pytest.mark.parametrize("cfg", ["tiny", "odd40", "odd24"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("batch", [1, 3])
def test_w8a8_close_to_the_models_int8_decode(cfg: str, causal: bool, batch: int) -> None:
    m = _model(cfg, causal, seed=batch + 1)
    x = _tokens(cfg, batch, CONFIGS[cfg]["seq_len"], seed=3)
    k = 3
    fp32, _ = _eval_steps(m, x, k)
    m.quantize_int8_(act_quant=True)
    model8 = _model_int8_steps(m, x, k)
    native, _ = _native_steps(m, x, k)
    assert native[0] is not None and torch.equal(native[0], model8[0])  # the same prefill
    d_max = max((a - b).abs().max().item() for a, b in zip(native[1:], model8[1:]))
    d_mean = sum((a - b).abs().mean().item() for a, b in zip(native[1:], model8[1:]))
    q_max = max((a - b).abs().max().item() for a, b in zip(model8[1:], fp32[1:]))
    q_mean = sum((a - b).abs().mean().item() for a, b in zip(model8[1:], fp32[1:]))
    assert q_max > 1e-4  # int8 really ran
    assert d_max <= W8A8_MAX_RATIO * q_max, (d_max, q_max)
    assert d_mean <= W8A8_MEAN_RATIO * q_mean, (d_mean, q_mean)


@pytest.mark.parametrize("cfg", ["tiny", "odd40"])
@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("batch", [1, 3])
def test_weight_only_int8_like_torch_on_dequantized_weights(cfg: str, causal: bool, batch: int) -> None:
    m = _model(cfg, causal, seed=batch + 2)
    m.quantize_int8_(act_quant=False)
    x = _tokens(cfg, batch, CONFIGS[cfg]["seq_len"], seed=4)
    k = 3
    native, _ = _native_steps(m, x, k)
    assert nd.NativeDecoder(m, nd.new_kv(m, batch, 4)).weights == "w8"
    model8 = _model_int8_steps(m, x, k)
    oracle, _ = _eval_steps(_float64_twin(m, dequantized=True), x, k)
    _assert_like_torch_fp32(native[1:], model8[1:], oracle[1:])


def test_weights_follow_the_model_or_the_argument() -> None:
    m = _model("tiny")
    kv = nd.new_kv(m, 1, 4)
    assert nd.NativeDecoder(m, kv).weights == "fp32"
    m.quantize_int8_()  # act_quant=None: W8A8 on CPU
    assert nd.NativeDecoder(m, kv).weights == "w8a8"
    assert nd.NativeDecoder(m, kv, weights="fp32").weights == "fp32"
    m.dequantize_()
    # int8 without quantize_int8_: int8_weights quantizes the float weights with the same rule
    x = _tokens("tiny", 1, 8)
    with torch.no_grad():
        _, a = nd.prefill(m, x[:, :3], 8, weights="w8a8")
        m.quantize_int8_(act_quant=True)
        b = nd.NativeDecoder(m, a.kv.clone(), a.length)
        for t in range(3, 8):
            assert torch.equal(a.step(x[:, t]), b.step(x[:, t]))
    with pytest.raises(ValueError, match="weights"):
        nd.NativeDecoder(m, kv, weights="int4")


def test_the_default_prefill_is_the_measured_faster_one() -> None:
    from tape_kernels import _C

    m = _model("tiny")
    x = _tokens("tiny", 1, 5)
    best = _C.cpu_isa()
    try:
        for isa in _isas():
            _C.set_cpu_isa(isa)
            assert nd.native_prefill_faster("w8a8") and nd.native_prefill_faster("w8")
            assert nd.native_prefill_faster("fp32") == (isa == "avx512_vnni")
            with torch.no_grad():
                logp, dec = nd.prefill(m, x, 8)  # either way: the same contract
            assert logp.shape == (1, 5, 13) and dec.length == 5 and dec.capacity == 8
    finally:
        _C.set_cpu_isa(best)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TapeTransformer:
    from tapetransformer.model import ModelConfig
    from tapetransformer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("native") / "run.ckpt"
    cfg = TrainConfig(data=None, steps=300, batch_size=8, lr=3e-3, eval_every=1000, eval_batches=1, out=str(out),
                      seed=0, model=ModelConfig(vocab_size=0, seq_len=32, embed_dim=32, num_heads=1, causal=False),
                      progress=False, backend="eager", compile="off")  # fmt: skip
    return train(cfg)["model"].eval()


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["w8a8", "w8"])
def test_int8_greedy_tokens_equal_fp32_on_a_trained_model(trained: TapeTransformer, weights: str) -> None:
    """300 Adam steps on the embedded corpus (train loss ~2.2): int8 picks fp32's greedy tokens
    (measured: the same 40 tokens), and its next-token distributions stay within KL 1e-2."""
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 3, 20, 4, 9, 30]])
    n = 40
    want = _native_greedy(trained, prompt, n, weights="fp32")
    assert torch.equal(want, generate(trained, prompt, n, greedy=True))
    assert torch.equal(_native_greedy(trained, prompt, n, weights=weights), want)
    p32, _ = _native_steps(trained, want, prompt.shape[1], weights="fp32")
    p8, _ = _native_steps(trained, want, prompt.shape[1], weights=weights)
    for a, b in zip(p32[1:], p8[1:]):
        kl = (a.exp() * (a - b)).sum(-1).max().item()
        assert kl < 1e-2


# ------------------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("weights", ["fp32", "w8a8", "w8"])
def test_results_do_not_depend_on_threads_or_batch(weights: str) -> None:
    m = _model("wide", seed=3)
    x = _tokens("wide", 5, 10)  # B = 5: past the kernels' 4-row blocks
    k = 3
    with torch.no_grad():
        _, base = nd.prefill(m, x[:, :k], x.shape[1], weights=weights, native=True)  # one prefill: torch's GEMMs may
    prev = torch.get_num_threads()  # split work by thread count, the native step must not

    def decode(threads: int, rows: slice) -> tuple[list, torch.Tensor]:
        torch.set_num_threads(threads)
        dec = nd.NativeDecoder(m, base.kv[:, :, rows].clone(), k, weights=weights)
        return [dec.step(x[rows, t]) for t in range(k, x.shape[1])], dec.kv

    try:
        prefills = []
        for threads in (1, 2):  # the native prefill (S > 1: the GEMM paths) too
            torch.set_num_threads(threads)
            with torch.no_grad():
                prefills.append(nd.prefill(m, x[:, :k], x.shape[1], weights=weights, native=True))
        assert torch.equal(prefills[0][0], prefills[1][0])
        assert torch.equal(prefills[0][1].kv[..., :k, :], prefills[1][1].kv[..., :k, :])  # rows past k: unset
        one, kv1 = decode(1, slice(None))
        two, kv2 = decode(2, slice(None))
        assert torch.get_num_threads() == 2  # the step leaves the thread setting alone
        for a, b in zip(one, two):
            assert torch.equal(a, b)
        assert torch.equal(kv1, kv2)
        for i in range(5):  # each batch row alone gives the same bits
            alone, kv_i = decode(2, slice(i, i + 1))
            for a, b in zip(one, alone):
                assert torch.equal(a[i : i + 1], b)
            assert torch.equal(kv1[:, :, i : i + 1], kv_i)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("weights", ["fp32", "w8a8", "w8"])
def test_every_isa_gives_the_same_results(weights: str) -> None:
    from tape_kernels import _C

    m = _model("odd40", seed=9)
    x = _tokens("odd40", 2, 12)
    best = _C.cpu_isa()
    base, _ = _native_steps(m, x, 3, weights=weights, native_prefill=True)
    m.quantize_int8_(act_quant=True)
    model8 = _model_int8_steps(m, x, 3)
    m.dequantize_()
    fp32, _ = _eval_steps(m, x, 3)
    q_max = max((a - b).abs().max().item() for a, b in zip(model8[1:], fp32[1:]))
    try:
        for isa in _isas():
            _C.set_cpu_isa(isa)
            got, _ = _native_steps(m, x, 3, weights=weights, native_prefill=True)
            d = max((a - b).abs().max().item() for a, b in zip(got, base))
            # fp32 / weight-only: rounding of other summation orders; W8A8: plus activation-rounding flips
            bound = 2e-5 if weights != "w8a8" else W8A8_MAX_RATIO * q_max
            assert d <= bound, (isa, d)
    finally:
        _C.set_cpu_isa(best)
    assert _C.cpu_isa() == best


def test_fp32_pieces_match_torch_on_every_isa() -> None:
    from tape_kernels import _C
    from tape_kernels.activation import reference_activation_ref

    ops = torch.ops.tape_kernels
    gen = torch.Generator().manual_seed(0)
    best = _C.cpu_isa()
    try:
        for isa in _isas():
            _C.set_cpu_isa(isa)
            for m, n, k in [(1, 37, 13), (3, 70, 256), (4, 9, 2048), (5, 64, 40), (2, 3, 7)]:
                x = torch.randn(m, k, generator=gen)
                w = torch.randn(n, k, generator=gen)
                b = torch.randn(n, generator=gen)
                want = torch.nn.functional.linear(x.double(), w.double(), b.double())
                # A-priori, element-wise: every ISA's sums are blocked at least 16 wide (acc.blocked_depth),
                # so the bound holds on any machine; PyTorch's own error (its BLAS's blocking) is not used.
                ours = (ops.decode_linear_f32(x, w, b).double() - want).abs()
                bound = acc.dot_apriori_bound(x, w, b, acc.blocked_depth(k))
                assert torch.all(ours <= bound), (isa, m, n, k, float((ours / bound).max()))
                # And as accurate as PyTorch's GEMM, whose error is floored at a 16-lane blocked sum's typical
                # error (MKL blocks more finely than that and OpenBLAS does not: the floor keeps it BLAS-free).
                theirs = (torch.nn.functional.linear(x, w, b).double() - want).abs().max()
                floor = acc.blocked_dot_floor(x, w).max()
                assert ours.max() <= 2 * max(theirs, floor) + 1e-6, (isa, m, n, k, float(ours.max()), float(theirs))
                torch.testing.assert_close(ops.decode_linear_f32(x, w, None), x @ w.t(), rtol=1e-5, atol=1e-5)
            z = torch.cat([torch.linspace(-30, 30, 2001), torch.randn(999, generator=gen) * 3,
                           torch.tensor([0.0, -0.0])])  # fmt: skip
            want = reference_activation_ref(z.double())
            theirs = (reference_activation_ref(z).double() - want).abs().max()
            ours = (ops.decode_activation(z, None).double() - want).abs().max()
            assert ours <= 2 * theirs + 1e-7, (isa, ours, theirs)
            bias = torch.randn(z.shape[0], generator=gen)
            torch.testing.assert_close(ops.decode_activation(z, bias), reference_activation_ref(z + bias),
                                       rtol=1e-5, atol=2e-7)  # fmt: skip
            assert torch.isnan(ops.decode_activation(torch.tensor([float("nan"), 1.0]), None)[0])
    finally:
        _C.set_cpu_isa(best)


# ------------------------------------------------------------------------------------------ API, bad input


def test_bad_input_raises_value_errors_naming_it() -> None:
    m = _model("tiny")
    kv = nd.new_kv(m, 2, 6).kv
    dec = nd.NativeDecoder(m, kv, 0)
    tok = torch.tensor([1, 2])
    for bad, match in [
        ([1, 2], "tok must be a torch.Tensor"),
        (tok.int(), "tok must have dtype int64"),
        (tok.float(), "tok must have dtype int64"),
        (tok[:1], r"tok must have shape \(2,\)"),
        (tok[None], r"tok must have shape \(2,\)"),
        (tok.to("meta"), "tok must be on the CPU"),
        (torch.tensor([1, 13]), r"token id 13 out of range \[0, 13\)"),
        (torch.tensor([-1, 2]), r"token id -1 out of range"),
    ]:
        with pytest.raises(ValueError, match=match):
            dec.step(bad)
    assert dec.length == 0  # a rejected step changes nothing
    for bad, match in [
        (kv.double(), "kv must be a float32 CPU tensor"),
        (kv.to("meta"), "kv must be a float32 CPU tensor"),
        (kv[:5], "kv must have shape"),
        (kv[:, :, :, :, :, :4], "kv must have shape"),
        (kv[..., 0], "kv must have shape"),
        (kv.transpose(4, 5).contiguous().transpose(4, 5), "kv must be contiguous"),
        ("kv", "kv must be a KVCache or a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            nd.NativeDecoder(m, bad)
    with pytest.raises(ValueError, match="length"):
        nd.NativeDecoder(m, kv, 7)
    # the op itself checks what the wrapper does not (a caller may call it directly)
    op = torch.ops.tape_kernels.decode_step
    with pytest.raises(ValueError, match="kv must have shape"):
        op(dec.plan, tok, nd.new_kv(m, 3, 6).kv, 0)
    with pytest.raises(ValueError, match="kv must have dtype float32"):
        op(dec.plan, tok, kv.double(), 0)
    with pytest.raises(ValueError, match="t0=6 with 1 new token"):
        op(dec.plan, tok, kv, 6)
    with pytest.raises(ValueError, match="tok must have dtype int64"):
        op(dec.plan, tok.int(), kv, 0)


def test_full_cache_and_causal_window_raise() -> None:
    m = _model("tiny")
    dec = nd.NativeDecoder(m, nd.new_kv(m, 1, 2), 0)
    dec.step(torch.tensor([1]))
    dec.step(torch.tensor([2]))
    with pytest.raises(ValueError, match="full"):
        dec.step(torch.tensor([3]))
    c = _model("tiny", causal=True)
    dec = nd.NativeDecoder(c, nd.new_kv(c, 1, 20), 12)  # seq_len 12: position 12 does not exist
    with pytest.raises(ValueError, match="seq_len"):
        dec.step(torch.tensor([3]))
    dec.length = 11
    assert dec.step(torch.tensor([3])).shape == (1, 1, 13)


def test_unsupported_models_fall_back() -> None:
    ok = _model("tiny")
    kv = nd.new_kv(ok, 1, 4)
    assert nd.native_supported(ok) and nd.native_decoder(ok, kv) is not None
    assert nd.native_decoder(_model("tiny", skip_dead=False), kv) is None  # the prophet advances too
    assert nd.native_decoder(_model("tiny").double(), kv) is None
    assert nd.native_decoder(_model("tiny").train(), kv) is None
    assert nd.native_decoder(ok, kv.kv.double()) is None
    assert nd.native_decoder(_model("tiny", True, design="seed"), kv) is None  # the prophet feeds the critics
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nd.native_decoder(ok, kv) is None
    with pytest.raises(ValueError, match="NativeDecoder needs"):
        nd.NativeDecoder(_model("tiny").train(), kv)


def test_missing_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model("tiny")
    monkeypatch.setattr(nd, "native_available", lambda: False)
    assert not nd.native_supported(m)
    assert nd.native_decoder(m, nd.new_kv(m, 1, 4)) is None


def test_the_model_and_the_native_step_continue_each_others_cache() -> None:
    """The decoder borrows the model's KVCache: model.prefill, native steps, model.prefill again, and a
    grown cache (ensure) — the same results as the model alone, and the cache's length kept in step."""
    m = _model("odd40", causal=True, seed=2)
    x = _tokens("odd40", 2, 14)
    want, _ = _eval_steps(m, x, 4)  # the model alone: prefill 4, then one token at a time
    with torch.no_grad():
        logp, cache = m.prefill(x[:, :4], m.new_cache(2, 6))
        got = [logp]
        dec = nd.NativeDecoder(m, cache)
        assert dec.length == 4 and dec.kv is cache.kv
        for t in range(4, 6):
            got.append(dec.step(x[:, t]))
        assert cache.length == 6
        for t in range(6, 9):  # the model continues the native step's rows (and grows the cache)
            logp, cache = m.prefill(x[:, t : t + 1], cache)
            got.append(logp)
        assert cache.capacity > 6 and dec.kv is not cache.kv
        for t in range(9, 12):  # the decoder follows the grown tensor and the model's length
            got.append(dec.step(x[:, t]))
        assert cache.length == dec.length == 12 == cache.capacity
        with pytest.raises(ValueError, match="capacity"):  # the decoder does not grow a cache ...
            dec.extend(x[:, 12:14])
        cache.ensure(2)  # ... its owner does
        got += dec.extend(x[:, 12:14]).split(1, dim=1)  # a chunk of 2 = 2 causal steps
    assert len(got) == len(want) == 11
    oracle, _ = _eval_steps(_float64_twin(m), x, 4)
    _assert_like_torch_fp32(got, want, oracle)


class _CountDispatches(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_a_greedy_step_is_at_most_five_dispatches() -> None:
    m = _model("tiny")
    x = _tokens("tiny", 1, 3)
    with torch.no_grad():
        logp, dec = nd.prefill(m, x, 12)
        tok = logp[:, -1].argmax(-1)
        with _CountDispatches() as counter:
            for _ in range(5):
                logp = dec.step(tok)
                tok = logp.argmax(-1).view(-1)
    per_token = len(counter.ops) / 5
    assert per_token <= 5, counter.ops
    assert sum(op is torch.ops.tape_kernels.decode_step.default for op in counter.ops) == 5


def test_opcheck() -> None:
    """decode_step takes a torchbind plan: opcheck's fake-tensor and autograd-registration checks run;
    its schema and AOT-dispatch checks cannot in torch 2.13 (they call len() / == on every argument,
    which a ScriptObject does not implement), so the schema's promises are checked by hand: only
    kv's row t0 is written, nothing else is, and the output is a fresh tensor."""
    m = _model("odd24", causal=True)
    x = _tokens("odd24", 2, 4)
    with torch.no_grad():
        _, dec = nd.prefill(m, x, 8)
    tok = torch.tensor([3, 4])
    op = torch.ops.tape_kernels.decode_step
    for t in (tok, torch.tensor([[3, 4, 5], [6, 7, 8]])):  # a step and a 3-token chunk
        torch.library.opcheck(op, (dec.plan, t, dec.kv.clone(), 4),
                              test_utils=("test_faketensor", "test_autograd_registration"))  # fmt: skip
    kv = dec.kv.clone()
    kv[..., 4:, :] = float("nan")  # rows past t0 are never read
    before_kv, before_tok = kv.clone(), tok.clone()
    flat = dict(dec.plan.__obj_flatten__())["tensors"]
    before_plan = [t.clone() for t in flat]
    out = op(dec.plan, tok, kv, 4)
    assert torch.isfinite(out).all()
    assert torch.equal(tok, before_tok) and all(torch.equal(a, b) for a, b in zip(flat, before_plan))
    changed = (kv != before_kv) & ~(torch.isnan(kv) & torch.isnan(before_kv))
    assert changed[..., 4, :].any() and not changed[..., :4, :].any() and not changed[..., 5:, :].any()
    assert out.untyped_storage().data_ptr() not in (kv.untyped_storage().data_ptr(), tok.untyped_storage().data_ptr())
    ops = torch.ops.tape_kernels
    gen = torch.Generator().manual_seed(0)
    xx, w, b = torch.randn(3, 40, generator=gen), torch.randn(9, 40, generator=gen), torch.randn(9, generator=gen)
    for args in [(xx, w, b), (xx, w, None)]:
        torch.library.opcheck(ops.decode_linear_f32, args)
    for args in [(torch.randn(2, 9, generator=gen), None), (torch.randn(2, 9, generator=gen), b)]:
        torch.library.opcheck(ops.decode_activation, args)


def test_plan_pickles() -> None:
    m = _model("tiny")
    dec = nd.NativeDecoder(m, nd.new_kv(m, 1, 4))
    again = copy.deepcopy(dec.plan)
    assert again.vocab() == 13 and again.n_blocks() == 12



def test_without_the_extension_generation_runs_the_python_path_with_one_warning() -> None:
    """A process whose tape_kernels._C cannot load: fp32 and int8 generation still run (the model's own
    decode, the int8 ops' PyTorch fallback) and say so once."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tape_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
from tapetransformer import TapeTransformer, generate
torch.manual_seed(0)
m = TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=1, dropout=0.0, causal=True, backend="eager").eval()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = generate(m, torch.tensor([1, 2, 3]), 20, greedy=True)
    b = generate(m, torch.tensor([1, 2, 3]), 20, greedy=True, int8=True)
n = sum("tape_kernels._C is not available" in str(x.message) for x in w)
print("OK", tuple(a.shape), tuple(b.shape), n)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK (1, 23) (1, 23) 1" in out.stdout, out.stdout + out.stderr[-2000:]
