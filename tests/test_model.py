"""The fused TapeTransformer against the golden vectors, the reference module, and its own causal cache."""

from __future__ import annotations

import pytest
import torch

from tapetransformer import reference as ref
from tapetransformer.generate import generate
from tapetransformer.model import KVCache, TapeTransformer
from tapetransformer.reference import nll_loss
from tapetransformer.sampling import sample_reference

# fp32 through the Triton kernels (interpreter) vs the float64 golden vectors.
FP32_OUT_RTOL = 2e-5
FP32_GRAD_RTOL = 2e-4
# float64 eager: the same dataflow as the reference, so agreement is to rounding.
F64_OUT_RTOL = 1e-9
F64_GRAD_RTOL = 1e-5  # the golden gradients are stored as float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def fused_from_golden(golden: dict, dtype: torch.dtype, **kw) -> TapeTransformer:
    vocab, seq_len, dim, heads = golden["config"].tolist()
    m = TapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0, **kw).to(dtype)
    m.load_state_dict(golden["state_dict"], strict=True)
    return m


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def check_grads(got: dict, want: dict, want_none: list[str], rtol: float) -> None:
    assert sorted(n for n, g in got.items() if g is None) == sorted(want_none)
    for name, g_ref in want.items():
        g = got[name]
        assert g is not None, name
        if torch.count_nonzero(g_ref) == 0:
            assert torch.count_nonzero(g) == 0, f"{name}: the reference gradient is exactly zero"
        else:
            assert rel(g, g_ref) < rtol, f"{name}: {rel(g, g_ref):.2e}"


def mixed(out: tuple, golden: dict) -> torch.Tensor:
    logp, entropy, aw = out
    return nll_loss(logp, golden["y"]) + 0.01 * entropy + (aw * golden["attn_weight_probe"]).sum()


def test_state_dict_loads_both_ways(golden: dict) -> None:
    vocab, seq_len, dim, heads = golden["config"].tolist()
    fused = TapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads)
    plain = ref.ReferenceTapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads)
    assert list(fused.state_dict()) == list(plain.state_dict()) == list(golden["state_dict"])
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)


def test_eager_float64_matches_golden(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float64, backend="eager").train()
    out = m(golden["x"])
    assert rel(out[0], golden["train_logp"]) < F64_OUT_RTOL
    assert rel(out[1], golden["train_entropy"]) < F64_OUT_RTOL
    assert rel(out[2], golden["train_attn_weights"]) < F64_OUT_RTOL
    nll_loss(out[0], golden["y"]).backward(retain_graph=True)
    check_grads(grads(m), golden["grads_nll"], golden["grads_nll_none"], F64_GRAD_RTOL)
    m.zero_grad(set_to_none=True)
    mixed(out, golden).backward()
    check_grads(grads(m), golden["grads_mixed"], golden["grads_nll_none"], F64_GRAD_RTOL)


@pytest.fixture(scope="module")
def triton_fp32_run(golden: dict) -> tuple[TapeTransformer, tuple]:
    m = fused_from_golden(golden, torch.float32, backend="triton").train()
    out = m(golden["x"])
    nll_loss(out[0], golden["y"]).backward()
    return m, out


def test_triton_fp32_outputs_match_golden(triton_fp32_run: tuple, golden: dict) -> None:
    _, (logp, entropy, aw) = triton_fp32_run
    assert logp.dtype == torch.float32
    assert rel(logp, golden["train_logp"]) < FP32_OUT_RTOL
    assert rel(entropy, golden["train_entropy"]) < FP32_OUT_RTOL
    assert rel(aw, golden["train_attn_weights"]) < FP32_OUT_RTOL


def test_triton_fp32_gradients_match_golden(triton_fp32_run: tuple, golden: dict) -> None:
    m, _ = triton_fp32_run
    check_grads(grads(m), golden["grads_nll"], golden["grads_nll_none"], FP32_GRAD_RTOL)


def test_triton_fp32_eval_matches_golden(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float32, backend="triton").eval()
    fed = golden["eval_fed_tokens"]
    with torch.no_grad():
        full, _ = m(golden["x"])
        logp, cache = m(fed[:, :4])
        outs = [logp]
        for t in range(4, 9):
            logp, cache = m(fed[:, t : t + 1], past_kv=cache)
            outs.append(logp)
    assert rel(full, golden["eval_full_logp"]) < FP32_OUT_RTOL
    for ours, want in zip(outs, golden["eval_step_logp"]):
        assert rel(ours, want) < FP32_OUT_RTOL


def test_eager_eval_cached_steps_match_golden(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float64, backend="eager").eval()
    fed = golden["eval_fed_tokens"]
    with torch.no_grad():
        logp, cache = m(fed[:, :4])
        outs = [logp]
        for t in range(4, 9):
            logp, cache = m(fed[:, t : t + 1], past_kv=cache)
            outs.append(logp)
    for ours, want in zip(outs, golden["eval_step_logp"]):
        assert rel(ours, want) < F64_OUT_RTOL
    assert isinstance(cache, KVCache) and cache.length == 9


def test_need_aux_false_skips_critics_but_keeps_the_gradient_pattern(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float64, backend="eager").train()
    logp, ent, aw = m(golden["x"], need_aux=False)
    assert ent is None and aw is None
    assert rel(logp, golden["train_logp"]) < F64_OUT_RTOL
    nll_loss(logp, golden["y"]).backward()
    check_grads(grads(m), golden["grads_nll"], golden["grads_nll_none"], F64_GRAD_RTOL)


def test_skip_dead_false_runs_everything_with_the_same_results(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float64, backend="eager", skip_dead=False).train()
    out = m(golden["x"])
    assert rel(out[0], golden["train_logp"]) < F64_OUT_RTOL
    mixed(out, golden).backward()
    check_grads(grads(m), golden["grads_mixed"], golden["grads_nll_none"], F64_GRAD_RTOL)
    m.eval()
    with torch.no_grad():
        _, cache = m(golden["x"][:, :4])
    assert cache.rnn is not None and len(cache.rnn) == 2


def test_fused_nll_loss_matches_forward(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float64, backend="eager").train()
    loss = m.loss(golden["x"], golden["y"])
    assert rel(loss, golden["loss"]) < F64_OUT_RTOL
    loss.backward()
    check_grads(grads(m), golden["grads_nll"], golden["grads_nll_none"], F64_GRAD_RTOL)


def tiny_causal(backend: str, seed: int = 0) -> TapeTransformer:
    torch.manual_seed(seed)
    return TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=1, dropout=0.0, causal=True, backend=backend).eval()


@pytest.mark.parametrize("backend, splits", [("eager", (1, 4, 7, 11)), ("triton", (5,))])
def test_causal_prefill_then_decode_equals_full_forward(backend: str, splits: tuple[int, ...]) -> None:
    m = tiny_causal(backend)
    x = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = m(x)
        for k in splits:
            logp, cache = m(x[:, :k])
            steps = [logp]
            for t in range(k, x.shape[1]):
                logp, cache = m(x[:, t : t + 1], past_kv=cache)
                steps.append(logp)
            got = torch.cat(steps, dim=1)
            assert (got - full).abs().max() < 1e-5, f"split {k}"


def test_causal_training_forward_equals_causal_eval() -> None:
    m = tiny_causal("triton")
    x = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ev, _ = m(x)
        m.train()
        tr, _, _ = m(x)
    assert (ev - tr).abs().max() < 1e-5


def test_causal_is_causal() -> None:
    m = tiny_causal("eager")
    x = torch.randint(0, 13, (1, 10), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 13
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(y)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_greedy_generation_reproduces_the_reference_loop(golden: dict, backend: str) -> None:
    vocab, seq_len, dim, heads = golden["config"].tolist()
    plain = ref.ReferenceTapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0)
    plain.load_state_dict(golden["state_dict"], strict=True)
    fused = fused_from_golden(golden, torch.float32, backend=backend)
    prompt = golden["x"][:2, :5]
    want, _ = sample_reference(plain, prompt, 12, greedy=True)
    got = generate(fused, prompt, 12, greedy=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_static_decode_step_equals_cached_decode(backend: str, causal: bool) -> None:
    """The CUDA-graph step (device-side position, index_copy_ cache write, decode over the whole
    capacity with a device length) equals the dynamic cached decode, token by token, and leaves
    the same K/V in the cache; rows past the length are NaN and must be ignored.

    With the Triton backend the step runs the fused decode kernels (tape_kernels.decode_block), whose
    GEMVs sum in another order than the dynamic path's ops: their K/V rows are judged against a
    float64 model, within twice the dynamic fp32 path's own error (both are ~1e-6 of |kv| ≈ 3 here)."""
    torch.manual_seed(5)
    m = TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=2, dropout=0.0, causal=causal,
                        backend=backend).eval()  # fmt: skip
    m64 = TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=2, dropout=0.0, causal=causal,
                          backend="eager").double().eval()  # fmt: skip
    m64.load_state_dict(m.state_dict())
    x = torch.randint(0, 13, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, dyn = m(x[:, :4], past_kv=m.new_cache(2, 12))
        _, sta = m(x[:, :4], past_kv=m.new_cache(2, 12))
        _, d64 = m64(x[:, :4], past_kv=m64.new_cache(2, 12))
        sta.kv[:, :, :, :, 4:] = float("nan")
        for t in range(4, 10):
            want, dyn = m(x[:, t : t + 1], past_kv=dyn)
            _, d64 = m64(x[:, t : t + 1], past_kv=d64)
            got = m.decode_step(x[:, t : t + 1], torch.tensor([t]), sta)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if backend == "eager":  # the same ops in the same order
            torch.testing.assert_close(dyn.kv[:, :, :, :, :10], sta.kv[:, :, :, :, :10], atol=1e-6, rtol=1e-6)
        else:
            exact = d64.kv[:, :, :, :, :10]
            e_dyn = float((dyn.kv[:, :, :, :, :10].double() - exact).abs().max())
            e_sta = float((sta.kv[:, :, :, :, :10].double() - exact).abs().max())
            assert e_sta <= 2 * e_dyn + 1e-7, (e_sta, e_dyn)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(m, x[:1, :3], 2, cuda_graph=True)


def test_causal_generation_slides_past_seq_len() -> None:
    m = tiny_causal("eager")
    stats: dict = {}
    out = generate(m, torch.tensor([1, 2, 3]), 30, seed=0, top_k=5, stats=stats)
    assert out.shape == (1, 33)
    assert int(out.min()) >= 0 and int(out.max()) < 13
    assert stats["tokens"] == 30 and stats["ms_per_token"] > 0


def test_int8_generation_stays_close_to_fp32(golden: dict) -> None:
    m = fused_from_golden(golden, torch.float32, backend="eager").eval()
    x = golden["x"]
    with torch.no_grad():
        p32, _ = m(x)
        m.quantize_int8_()
        p8, _ = m(x)
        m.dequantize_()
    kl = (p32.exp() * (p32 - p8)).sum(-1).mean()
    assert 0 < kl < 1e-2
    out = generate(m, x[:1, :4], 6, int8=True, greedy=True)
    assert out.shape == (1, 10) and m.int8_mode is None  # int8 copies are dropped afterwards


def test_int8_weights_are_reused_until_a_weight_changes() -> None:
    """generate(int8=True) quantizes once; an optimizer step, load_state_dict, a .data swap or
    dequantize_() make the next call quantize again, so stale int8 weights are never used."""
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=1, dropout=0.0, backend="eager")
    prompt = torch.tensor([[1, 2, 3]])
    generate(m, prompt, 2, int8=True, greedy=True)
    first = [blk.quantized_cached() for blk in m.fused_blocks()]
    assert all(q is not None for q in first) and m.int8_up_to_date()
    generate(m, prompt, 2, int8=True, greedy=True)
    assert all(blk.quantized_cached() is q for blk, q in zip(m.fused_blocks(), first))  # reused, not re-quantized
    w = m.codahead.blocks_left[0].mlp.expand.weight
    with torch.no_grad():
        w.add_(1.0)  # what an optimizer step does
    assert not m.int8_up_to_date()
    generate(m, prompt, 2, int8=True, greedy=True)
    assert m.codahead.blocks_left[0].quantized_cached() is not first[0] and m.int8_up_to_date()
    m.load_state_dict(m.state_dict())
    assert not m.int8_up_to_date()
    m.quantize_int8_()
    w.data = w.data.clone()
    assert not m.int8_up_to_date()
    m.dequantize_()
    assert m.int8_mode is None and all(blk.quantized_cached() is None for blk in m.fused_blocks())
    assert not m.int8_up_to_date()


def test_graph_reuse_bookkeeping() -> None:
    """What decides whether generate() may replay an earlier call's CUDA graph (the replay itself
    is a GPU test): capacity buckets, and a weight fingerprint that in-place updates keep and
    moves, .data swaps and re-quantization change."""
    from tapetransformer.generate import _graph_capacity, _graph_key, _weights_fingerprint

    assert [_graph_capacity(n) for n in (1, 37, 64, 65, 129)] == [64, 64, 64, 128, 256]
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=12, embed_dim=32, num_heads=1, dropout=0.0, backend="eager").eval()
    f0 = _weights_fingerprint(m)
    with torch.no_grad():
        m.unembedding.add_(1.0)
    assert _weights_fingerprint(m) == f0
    m.quantize_int8_()
    f1 = _weights_fingerprint(m)
    assert f1 != f0
    k1 = _graph_key(m, 1, 64, torch.device("cpu"))
    with torch.no_grad():
        m.codahead.blocks_left[0].mlp.expand.weight.add_(1.0)
    m.quantize_int8_()  # stale: re-quantized into new tensors
    assert _weights_fingerprint(m) != f1
    assert _graph_key(m, 1, 64, torch.device("cpu")) == k1
    m.dequantize_()
    assert _graph_key(m, 1, 64, torch.device("cpu")) != k1
    w = m.codahead.blocks_left[0].mlp.expand.weight
    f2 = _weights_fingerprint(m)
    w.data = w.data.clone()
    assert _weights_fingerprint(m) != f2


def test_bad_inputs() -> None:
    m = tiny_causal("eager")
    with pytest.raises(ValueError, match="KVCache"):
        m(torch.tensor([[1, 2]]), past_kv=[None])
    _, cache = m(torch.tensor([[1] * 12]))
    with pytest.raises(ValueError, match="sequence too long"):
        m(torch.tensor([[1]]), past_kv=cache)
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[13]]))
    m.train()
    with pytest.raises(ValueError, match="eval mode"):
        m(torch.tensor([[1, 2]]), past_kv=cache)
    with pytest.raises(ValueError, match="prompt"):
        generate(m, torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="backend"):
        TapeTransformer(13, backend="cuda")


def test_eval_under_cpu_autocast_runs_with_an_fp32_cache() -> None:
    m = tiny_causal("eager")
    x = torch.randint(0, 13, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, _ = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, cache = m(x[:, :3])
            got2, _ = m(x[:, 3:], past_kv=cache)
    assert cache.kv.dtype == torch.float32
    # bf16 projections through 12 blocks: measured 0.009-0.019 over five seeds
    assert (torch.cat([got, got2], 1).float() - want).abs().max() < 0.05
