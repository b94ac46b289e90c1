"""One int8 story: ``quantize_int8`` on the fused model and on the reference — forward, loss, generate,
backward — and how far int8 log-probs stray from fp32 on a model that has learned something.

The model (``trained``, built once per module) is trained for 150 Adam steps on text from a small
grammar (seq 16, dim 32) and scored on held-out sentences of the same grammar; the fixture checks that
it learned (held-out loss far below the uniform one), so the int8 weights are away from their init.

KL bound: per-channel int8 weights (and W8A8's per-row activations) perturb each logit by roughly
|w|·2^-8 relative. Measured on this model and held-out text (torch 2.13, CPU), the teacher-forced
KL(fp32 ‖ int8) was 9.4e-5 nats mean and 1.8e-3 worst position (W8A8), 3.5e-5 / 7.8e-4 (weight-only).
The tests hold the mean below 1e-3 and the worst position below 1e-2 nats: 5-10x of headroom, far
below what a wrong scale gives (the negative control, ``test_a_wrong_scale_breaks_the_bound``: every
scale 10 % off gave 4.3e-2 / 0.47, each channel its neighbour's scale 0.15 / 2.6).
"""

from __future__ import annotations

import math

import pytest
import torch

from tapetransformer import TapeTransformer, generate, quantize_int8
from tapetransformer.reference import ReferenceTapeTransformer, nll_loss
from tapetransformer.sampling import sample_reference

CFG = dict(vocab_size=13, seq_len=16, embed_dim=32, num_heads=1, dropout=0.0)
KL_MEAN_MAX = 1e-3
KL_WORST_MAX = 1e-2
STEPS = 150


def _kl(p32: torch.Tensor, p8: torch.Tensor) -> torch.Tensor:
    """Per-position KL(fp32 ‖ int8) from log-probs (B, S, V) -> (B, S)."""
    return (p32.exp() * (p32 - p8)).sum(-1)


def _grammar_text(seed: int, sentences: int) -> str:
    """Sentences of a small grammar: word spellings and the word order are learnable, the choices not."""
    subj = ["the cat", "a dog", "my friend", "the bird", "one man"]
    verb = ["sees", "likes", "eats", "finds", "wants"]
    obj = ["the fish", "a ball", "some bread", "the tree", "an egg"]
    g = torch.Generator().manual_seed(seed)
    pick = lambda words: words[int(torch.randint(len(words), (1,), generator=g))]
    return "".join(f"{pick(subj)} {pick(verb)} {pick(obj)}. " for _ in range(sentences))


def _encode(text: str, chars: str) -> torch.Tensor:
    return torch.tensor([chars.index(c) for c in text])


def _windows(ids: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    at = torch.randint(0, ids.numel() - 17, (n,), generator=gen)
    seq = torch.stack([ids[i : i + 17] for i in at.tolist()])
    return seq[:, :-1], seq[:, 1:]


@pytest.fixture(scope="module")
def corpus() -> dict:
    train_text, held_out = _grammar_text(0, 400), _grammar_text(1, 40)
    chars = "".join(sorted(set(train_text)))
    assert set(held_out) <= set(chars)
    return {"chars": chars, "train": _encode(train_text, chars), "held_out": _encode(held_out, chars)}


@pytest.fixture(scope="module")
def trained(corpus: dict) -> TapeTransformer:
    """A causal fused model trained on the grammar's text until it has learned it (checked on held-out
    text: the loss far below the uniform log V)."""
    torch.manual_seed(0)
    vocab = len(corpus["chars"])
    m = TapeTransformer(**{**CFG, "vocab_size": vocab}, causal=True, backend="eager")
    opt = torch.optim.Adam(m.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        loss = m.loss(*_windows(corpus["train"], 16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        held = float(m.loss(*_windows(corpus["held_out"], 32, torch.Generator().manual_seed(3))))
    # uniform: log V = 3.04 nats; the text's character frequencies alone: ~2.8; measured after 150 steps
    # (2-core CPU, torch 2.13): 0.5
    assert held < 0.5 * math.log(vocab), f"held-out loss {held:.3f} nats: the model did not learn the text"
    return m


@pytest.fixture(scope="module")
def held_out(corpus: dict) -> torch.Tensor:
    """Held-out windows (text the model never trained on) to score the int8 model on."""
    return _windows(corpus["held_out"], 8, torch.Generator().manual_seed(4))[0]


@pytest.mark.parametrize("act_quant", [None, True, False], ids=["auto", "w8a8", "weight-only"])
def test_fused_quantized_forward_loss_backward_generate(trained: TapeTransformer, held_out: torch.Tensor,
                                                        act_quant: bool | None) -> None:  # fmt: skip
    q = quantize_int8(trained, act_quant=act_quant)
    assert isinstance(q, TapeTransformer) and q is not trained and q.int8_mode == ("int8", act_quant)
    assert trained.int8_mode is None  # the input model is left as it was
    x = held_out
    with torch.no_grad():
        p32, _ = trained(x)
        p8, _ = q(x)
    kl = _kl(p32, p8)
    assert not torch.equal(p32, p8)  # int8 weights are really used
    assert kl.mean() < KL_MEAN_MAX and kl.max() < KL_WORST_MAX, (float(kl.mean()), float(kl.max()))
    # loss and backward run on the float weights: the same gradients as the float model
    q.train()
    trained.train()
    try:
        q.zero_grad()
        trained.zero_grad()
        q.loss(x, x).backward()
        trained.loss(x, x).backward()
        for (n, a), b in zip(q.named_parameters(), trained.parameters()):
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad), n
    finally:
        trained.eval()
        trained.zero_grad()
    q.eval()
    out = generate(q, x[:1, :4], 8, greedy=True)
    assert out.shape == (1, 12) and q.int8_mode == ("int8", act_quant)  # generate keeps the model's int8


def test_reference_quantized_forward_and_generate() -> None:
    torch.manual_seed(0)
    r = ReferenceTapeTransformer(**CFG)
    q = quantize_int8(r)
    x = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p32, _ = r.eval()(x)
        p8, _ = q(x)
    kl = _kl(p32, p8)
    assert kl.mean() < KL_MEAN_MAX and kl.max() < KL_WORST_MAX
    tokens, _ = sample_reference(q, x[:1, :4], 6, greedy=True)
    assert tokens.shape == (1, 10)


def _dequantized_twin(q: ReferenceTapeTransformer, r: ReferenceTapeTransformer) -> ReferenceTapeTransformer:
    """A float copy of ``r`` whose Linears carry the weights ``q`` runs (q·s): weight-only int8's exact twin."""
    import copy

    from tape_kernels.int8 import Int8Linear, Int8MultiheadAttention

    twin = copy.deepcopy(r)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, m in twin.named_modules():
            qm = qmods.get(name)
            if isinstance(qm, Int8MultiheadAttention):
                m.in_proj_weight.copy_(qm.in_proj.qweight.float() * qm.in_proj.scale[:, None])
                m.out_proj.weight.copy_(qm.out_proj.qweight.float() * qm.out_proj.scale[:, None])
            elif isinstance(qm, Int8Linear):
                m.weight.copy_(qm.qweight.float() * qm.scale[:, None])
    return twin


@pytest.mark.parametrize("act_quant", [False, True], ids=["weight-only", "w8a8"])
def test_reference_quantized_backward(act_quant: bool) -> None:
    """Gradients reach everything upstream of the int8 Linears: dx = dy·(q·s), the exact derivative of the
    weight-only map (W8A8: its activation rounding passes the gradient straight through)."""
    torch.manual_seed(0)
    r = ReferenceTapeTransformer(**CFG)
    q = quantize_int8(r, act_quant=act_quant).train()
    twin = _dequantized_twin(quantize_int8(r, act_quant=False), r).train()
    x = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(3))
    for m in (q, twin):
        logp, _, _ = m(x)
        nll_loss(logp, x).backward()
    got, want = q.holistic_embed.weight.grad, twin.holistic_embed.weight.grad
    assert got is not None and want.abs().max() > 0
    err = float((got - want).abs().max() / want.abs().max())
    # weight-only: the same map, fp32 sums in another order; W8A8: forward activations move by the
    # per-row rounding (~1/254 relative), and the gradient with them
    assert err < (1e-4 if not act_quant else 5e-2), err


def test_quantize_int8_rejects_what_it_cannot_quantize() -> None:
    with pytest.raises(ValueError, match="nn.Module"):
        quantize_int8("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="act_quant"):
        quantize_int8(TapeTransformer(**CFG), act_quant="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("wrong", ["10%-off", "next-channel"])
def test_a_wrong_scale_breaks_the_bound(trained: TapeTransformer, held_out: torch.Tensor, wrong: str) -> None:
    """The negative control of the KL bound: the same int8 weights with a wrong scale (every scale 10 %
    off, or each channel given its neighbour's) must exceed it, or the bound could not catch one."""
    q = quantize_int8(trained, act_quant=False)
    for blk in q.fused_blocks():
        bad = []
        for qweight, scale in blk.int8:
            bad.append((qweight, scale * 1.1 if wrong == "10%-off" else scale.roll(1)))
        blk.int8 = type(blk.int8)(*bad)
    with torch.no_grad():
        kl = _kl(trained(held_out)[0], q(held_out)[0])
    assert kl.mean() > KL_MEAN_MAX and kl.max() > KL_WORST_MAX, (float(kl.mean()), float(kl.max()))
