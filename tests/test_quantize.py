"""One int8 story: ``quantize_int8`` on the fused model and on the reference — forward, loss, generate,
backward — and how far int8 log-probs stray from fp32 on a (briefly) trained model.

KL bound: per-channel int8 weights (and W8A8's per-row activations) perturb each logit by roughly
|w|·2^-8 relative; measured on a 300-step model (seq 32, dim 32) the teacher-forced KL(fp32 ‖ int8)
was 2.3e-5 nats mean and 8.7e-5 max per position (W8A8), 8e-6 / 3e-5 (weight-only). The tests hold
the mean below 1e-3 and the worst position below 1e-2 nats: an order of magnitude of headroom, far
below what a wrong scale or a dropped bias gives (> 0.1).
"""

from __future__ import annotations

import pytest
import torch

from tapetransformer import TapeTransformer, generate, quantize_int8
from tapetransformer.reference import ReferenceTapeTransformer, nll_loss
from tapetransformer.sampling import sample_reference

CFG = dict(vocab_size=13, seq_len=16, embed_dim=32, num_heads=1, dropout=0.0)
KL_MEAN_MAX = 1e-3
KL_WORST_MAX = 1e-2


def _kl(p32: torch.Tensor, p8: torch.Tensor) -> torch.Tensor:
    """Per-position KL(fp32 ‖ int8) from log-probs (B, S, V) -> (B, S)."""
    return (p32.exp() * (p32 - p8)).sum(-1)


@pytest.fixture(scope="module")
def trained() -> TapeTransformer:
    """A causal fused model after a few Adam steps on a repeating pattern (weights away from init)."""
    torch.manual_seed(0)
    m = TapeTransformer(**CFG, causal=True, backend="eager")
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    pattern = torch.arange(17) % 13
    for _ in range(30):
        loss = m.loss(pattern[:16].expand(4, 16), pattern[1:17].expand(4, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("act_quant", [None, True, False], ids=["auto", "w8a8", "weight-only"])
def test_fused_quantized_forward_loss_backward_generate(trained: TapeTransformer, act_quant: bool | None) -> None:
    q = quantize_int8(trained, act_quant=act_quant)
    assert isinstance(q, TapeTransformer) and q is not trained and q.int8_mode == ("int8", act_quant)
    assert trained.int8_mode is None  # the input model is left as it was
    x = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(1))
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
