"""The seed README's design (``design="seed"``) against its eager oracle ``reference.seed_forward``.

Tolerances: float64 eager runs the same equations in another order (fused combine, NLL), so it agrees
to rounding (1e-10 relative); fp32 through the Triton kernels (interpreter) against the float64 oracle
is held to 2e-5 (outputs) and 2e-4 (gradients) relative to the largest magnitude, as the reference
design's golden tests are; cached decode against the full causal forward to 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from tapetransformer import TapeTransformer, generate
from tapetransformer.reference import ReferenceTapeTransformer, nll_loss, seed_forward

CFG = dict(vocab_size=13, seq_len=10, embed_dim=16, num_heads=2, dropout=0.0)
UNUSED = {"norm_gate", "embed_ln.weight", "embed_ln.bias"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _pair(dtype: torch.dtype, backend: str, seed: int = 0) -> tuple[ReferenceTapeTransformer, TapeTransformer]:
    torch.manual_seed(seed)
    oracle = ReferenceTapeTransformer(**CFG).double().train()
    fused = TapeTransformer(**CFG, design="seed", backend=backend).to(dtype).train()
    fused.load_state_dict(oracle.state_dict(), strict=True)
    return oracle, fused


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (3, 10), generator=g), torch.randint(0, 13, (3, 10), generator=g)


def _check(fused: TapeTransformer, oracle: ReferenceTapeTransformer, out_tol: float, grad_tol: float) -> None:
    x, y = _data()
    want = seed_forward(oracle, x)
    got = fused(x)
    for g, w in zip(got, want):
        assert rel(g, w) < out_tol, rel(g, w)
    nll_loss(want[0], y).backward()
    nll_loss(got[0], y).backward()
    grads = dict(oracle.named_parameters())
    for name, p in fused.named_parameters():
        if name in UNUSED:
            assert p.grad is None and grads[name].grad is None, name
            continue
        assert p.grad is not None and grads[name].grad is not None, name
        assert rel(p.grad, grads[name].grad) < grad_tol, (name, rel(p.grad, grads[name].grad))


def test_reference_checkpoint_loads_into_the_seed_design() -> None:
    ref = ReferenceTapeTransformer(**CFG)
    seed = TapeTransformer(**CFG, design="seed")
    assert list(seed.state_dict()) == list(ref.state_dict())
    seed.load_state_dict(ref.state_dict(), strict=True)
    assert seed.causal and seed.design == "seed"


def test_eager_float64_equals_the_oracle() -> None:
    oracle, fused = _pair(torch.float64, "eager")
    _check(fused, oracle, 1e-10, 1e-9)


def test_triton_fp32_equals_the_oracle() -> None:
    oracle, fused = _pair(torch.float32, "triton", seed=3)
    _check(fused, oracle, 2e-5, 2e-4)


def test_every_parameter_but_two_learns_from_the_nll() -> None:
    _, fused = _pair(torch.float64, "eager", seed=4)
    x, y = _data(5)
    fused.loss(x, y).backward()
    for name, p in fused.named_parameters():
        if name in UNUSED:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name} gets no gradient"
    assert any(n.startswith("prophet.") for n, _ in fused.named_parameters())


def test_loss_equals_the_nll_of_forward() -> None:
    _, fused = _pair(torch.float64, "eager", seed=6)
    x, y = _data(7)
    want = nll_loss(fused(x)[0], y)
    got = fused.loss(x, y)
    assert abs(float(got.detach() - want.detach())) < 1e-12
    logp, ent, aw = fused(x, need_aux=False)
    assert ent is None and aw is None and torch.equal(logp, fused(x)[0])


@pytest.mark.parametrize("backend, splits", [("eager", (1, 4, 9)), ("triton", (4,))])
def test_prefill_then_decode_with_the_prophet_in_the_cache_equals_the_full_forward(
    backend: str, splits: tuple[int, ...]
) -> None:
    _, m = _pair(torch.float32, backend, seed=8)
    m.eval()
    x, _ = _data(9)
    if backend == "triton":  # the interpreter runs the Char-RNN kernels step by step: fewer tokens, fewer rows
        x = x[:2, :6]
    with torch.no_grad():
        full, _ = m(x)
        for k in splits:
            logp, cache = m(x[:, :k])
            assert cache.rnn is not None and len(cache.rnn) == m.prophet.num_layers
            outs = [logp]
            for t in range(k, x.shape[1]):
                logp, cache = m(x[:, t : t + 1], past_kv=cache)
                outs.append(logp)
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5, msg=f"split {k}")
        # the static (CUDA-graph) step advances the prophet's state in place
        cache = m.new_cache(x.shape[0], x.shape[1])
        logp, cache = m.prefill(x[:, :2], cache)
        state = [h.data_ptr() for h in cache.rnn]
        outs = [logp]
        for t in range(2, x.shape[1]):
            outs.append(m.decode_step(x[:, t : t + 1], torch.tensor([t]), cache))
            cache.length += 1
        assert [h.data_ptr() for h in cache.rnn] == state
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_generation_slides_the_window_and_rebuilds_the_recurrent_state() -> None:
    _, m = _pair(torch.float32, "eager", seed=10)
    m.eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = generate(m, prompt, 20, greedy=True)  # seq_len 10: the window slides twice
    assert out.shape == (1, 24)
    # Greedy by hand: a window that fills re-prefills its last seq_len // 2 tokens from a zero state.
    toks = prompt[0].tolist()
    ctx = list(toks)
    with torch.no_grad():
        for _ in range(20):
            if len(ctx) > m.seq_len:
                ctx = ctx[-(m.seq_len // 2) :]
            logp, _ = m(torch.tensor([ctx]))
            nxt = int(logp[0, -1].argmax())
            toks.append(nxt)
            ctx.append(nxt)
    assert out[0].tolist() == toks


def test_bad_design_arguments() -> None:
    with pytest.raises(ValueError, match="design"):
        TapeTransformer(**CFG, design="moderated")
    with pytest.raises(ValueError, match="causal"):
        TapeTransformer(**CFG, design="seed", causal=False)
    m = TapeTransformer(**CFG, design="seed")
    with pytest.raises(ValueError, match="causal"):
        m.causal = False


def test_cli_trains_generates_and_demos_the_seed_design(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from tapetransformer import cli
    from tapetransformer.checkpoint import load_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 20)
    ck = tmp_path / "seed.ckpt"
    common = ["--data", str(corpus), "--batch-size", "2", "--seq-len", "8", "--embed-dim", "16", "--num-heads", "2",
              "--backend", "eager"]
    rc = cli.main(["train", *common, "--steps", "2", "--eval-every", "2", "--design", "seed", "--out", str(ck)])
    assert rc == 0 and load_checkpoint(ck)["config"]["design"] == "seed"
    capsys.readouterr()
    rc = cli.main(["generate", str(ck), "--prompt", "to", "--max-new-tokens", "12", "--greedy", "--backend", "eager"])
    out = capsys.readouterr()
    assert rc == 0 and len(out.out.rstrip("\n")) == 14  # the window (8) slides with the prophet's state
    rc = cli.main(["train", *common, "--steps", "2", "--design", "seed", "--reference-semantics",
                   "--out", str(tmp_path / "x.ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and "--design" in err and "causal" in err and not (tmp_path / "x.ckpt").exists()
    rc = cli.main(["train", *common, "--steps", "4", "--resume", "--design", "reference", "--out", str(ck)])
    assert rc == 2 and "--design" in capsys.readouterr().err
    rc = cli.main(["demo", *common, "--steps", "2", "--design", "seed", "--max-new-tokens", "4",
                   "--out", str(tmp_path / "demo.ckpt")])  # its default prompt "The " is not in this corpus
    assert rc == 2 and "--prompt" in capsys.readouterr().err and not (tmp_path / "demo.ckpt").exists()
    rc = cli.main(["demo", *common, "--steps", "2", "--design", "seed", "--max-new-tokens", "4", "--prompt", "to",
                   "--out", str(tmp_path / "demo.ckpt")])
    assert rc == 0 and load_checkpoint(tmp_path / "demo.ckpt")["config"]["design"] == "seed"
