"""The fused model on a CUDA device (compiled kernels): the golden vectors in fp32, autocast fp16/bf16
judged against PyTorch's own error in the same dtype, and the generation engine."""

from __future__ import annotations

import pytest
import torch

from tapetransformer import reference as ref
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer
from tapetransformer.reference import nll_loss
from tapetransformer.sampling import sample_reference

pytestmark = pytest.mark.gpu

DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def models(golden: dict) -> tuple[ref.ReferenceTapeTransformer, TapeTransformer]:
    vocab, seq_len, dim, heads = golden["config"].tolist()
    plain = ref.ReferenceTapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0)
    fused = TapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0, backend="triton")
    plain.load_state_dict(golden["state_dict"], strict=True)
    fused.load_state_dict(golden["state_dict"], strict=True)
    return plain.to(DEV).float(), fused.to(DEV).float()


def test_cuda_fp32_golden(golden: dict) -> None:
    _, fused = models(golden)
    x, y = golden["x"].to(DEV), golden["y"].to(DEV)
    logp, ent, aw = fused.train()(x)
    assert rel(logp, golden["train_logp"]) < 2e-5
    assert rel(ent, golden["train_entropy"]) < 2e-5
    assert rel(aw, golden["train_attn_weights"]) < 2e-5
    nll_loss(logp, y).backward()
    params = dict(fused.named_parameters())
    assert sorted(n for n, p in params.items() if p.grad is None) == sorted(golden["grads_nll_none"])
    for name, g_ref in golden["grads_nll"].items():
        g = params[name].grad
        assert g is not None, name
        if torch.count_nonzero(g_ref) == 0:
            assert torch.count_nonzero(g) == 0, name
        else:
            assert rel(g, g_ref) < 2e-4, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_error_within_pytorch_error(golden: dict, dtype: torch.dtype) -> None:
    """Under autocast, the fused model's error against float64 is at most 2x (outputs) / 3x (grads)
    the eager reference's own error under the same autocast (FlashAttention's criterion)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    plain, fused = models(golden)
    x, y = golden["x"].to(DEV), golden["y"].to(DEV)
    exact = ref.ReferenceTapeTransformer(*golden["config"].tolist()[:2], embed_dim=int(golden["config"][2]),
                                num_heads=int(golden["config"][3]), dropout=0.0).double()
    exact.load_state_dict(golden["state_dict"], strict=True)
    exact = exact.to(DEV).train()

    def run(m: torch.nn.Module, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.train().zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            logp, _, _ = m(x)
            loss = nll_loss(logp.float(), y)
        loss.backward()
        grads = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
        return logp.double(), grads

    logp64, g64 = run(exact, False)
    logp_e, g_e = run(plain, True)
    logp_f, g_f = run(fused, True)
    # Same gradient pattern as the reference (None where it has None, a tensor everywhere else).
    assert sorted(g_f) == sorted(g_e) == sorted(g64)
    # No finiteness escape hatch: at this size autocast stays finite on both sides, and if the eager
    # reference ever overflowed the comparison would be meaningless, so that fails too.
    for what, t in (("fused logp", logp_f), ("eager logp", logp_e)):
        assert torch.isfinite(t).all(), what
    err_e = (logp_e - logp64).abs().max().item()
    err_f = (logp_f - logp64).abs().max().item()
    assert err_f <= 2 * err_e + 1e-5, f"fused {err_f:.3e} vs eager {err_e:.3e}"
    for name, g in g64.items():
        assert torch.isfinite(g_e[name]).all() and torch.isfinite(g_f[name]).all(), name
        ee = (g_e[name] - g).abs().max().item()
        ef = (g_f[name] - g).abs().max().item()
        if torch.count_nonzero(g) == 0:
            # Zero in float64 (the dead paths: prophet, rnn_projection, critics 0..n-2 for the NLL):
            # the fused model must give zero too, or stay within 3x the eager reference's own error there
            # (no absolute slack: exact zeros stay exact zeros).
            assert ef <= 3 * ee, f"{name}: float64 gradient is zero, fused max |g| {ef:.3e} vs eager {ee:.3e}"
        else:
            assert ef <= 3 * ee + 1e-6, f"{name}: fused {ef:.3e} vs eager {ee:.3e}"


def test_cuda_greedy_generation_matches_reference(golden: dict) -> None:
    plain, fused = models(golden)
    prompt = golden["x"][:2, :5].to(DEV)
    want, _ = sample_reference(plain, prompt, 12, greedy=True)
    got = generate(fused, prompt, 12, greedy=True)
    assert torch.equal(got, want)


# Decode log-probs of the half / int8 model against the fp32 one, teacher-forced on the same tokens.
# Each decode step rounds its activations to the dtype (unit roundoff u = 2^-11 fp16, 2^-8 bf16; int8
# per-channel weights perturb each product by up to 2^-8 of the channel's largest weight) and the
# log-probs carry that error at the scale of the logits: held to 16·u·max(1, max|logp|). Measured with
# the same golden model on the CPU's eager path (no GPU run yet): 4.0e-3 fp16, 4.3e-2 bf16, 1.8e-2
# fp16 + int8, against bounds of 4.2e-2 / 0.33 / 0.33; a decode fed the previous token instead of the
# current one is 0.69 off.
DECODE_U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
INT8_U = 2.0**-8


def _decode_logps(m: TapeTransformer, x: torch.Tensor, int8: bool, prefill: int = 3) -> torch.Tensor:
    """Log-probs (B, S - prefill, V) of the decode steps after a prefill, teacher-forced on x (fp32)."""
    out = []
    with torch.no_grad(), m.int8_weights(enabled=int8):
        _, kv = m(x[:, :prefill], past_kv=m.new_cache(x.shape[0], x.shape[1]))
        for t in range(prefill, x.shape[1]):
            lp, kv = m(x[:, t : t + 1], past_kv=kv)
            out.append(lp.float())
    return torch.cat(out, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_half_and_int8_generation_follow_fp32(golden: dict, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    _, fused = models(golden)
    x = golden["x"][:2].to(DEV)
    want = _decode_logps(fused.eval(), x, int8=False)
    scale = max(1.0, float(want.abs().max()))
    m = fused.to(dtype).eval()
    for int8, u in ((False, DECODE_U[dtype]), (True, max(DECODE_U[dtype], INT8_U))):
        got = _decode_logps(m, x, int8=int8)
        assert torch.isfinite(got).all(), (dtype, int8)
        err = float((got - want).abs().max())
        assert err <= 16 * u * scale, f"{dtype} int8={int8}: decode log-probs {err:.3e} from fp32's"
        assert not torch.equal(got, want)  # the half / int8 path really ran
    # generation itself runs in the dtype and with int8 weights, and its timing is reported
    stats: dict = {}
    out = generate(m, golden["x"][:1, :4].to(DEV), 20, top_k=5, seed=0, stats=stats)
    assert out.shape == (1, 24) and stats["ms_per_token"] > 0
    out8 = generate(m, golden["x"][:1, :4].to(DEV), 20, greedy=True, int8=True)
    assert out8.shape == (1, 24)


@pytest.mark.parametrize("causal", [False, True], ids=["reference", "causal"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_cuda_graph_decode_equals_eager_decode(golden: dict, causal: bool, int8: bool) -> None:
    """The captured decode step replays the eager decode: same greedy tokens, also across the causal
    window slide (seq_len 16 here, so 40 new tokens slide twice)."""
    vocab, seq_len, dim, heads = golden["config"].tolist()
    torch.manual_seed(0)
    m = TapeTransformer(vocab, seq_len=seq_len, embed_dim=dim, num_heads=heads, dropout=0.0, causal=causal,
                        backend="triton").to(DEV).eval()  # fmt: skip
    if not causal:
        m.load_state_dict(golden["state_dict"], strict=True)
    prompt = golden["x"][:2, :5].to(DEV)
    new = 40 if causal else 12
    st_g: dict = {}
    st_e: dict = {}
    g = generate(m, prompt, new, greedy=True, int8=int8, cuda_graph=True, stats=st_g)
    e = generate(m, prompt, new, greedy=True, int8=int8, cuda_graph=False, stats=st_e)
    assert st_g["cuda_graph"] and not st_e["cuda_graph"] and st_g["capture_ms"] > 0
    assert torch.equal(g, e)


def test_cuda_graph_step_logprobs_match_dynamic_decode(golden: dict) -> None:
    _, fused = models(golden)
    m = fused.eval()
    x = golden["x"][:2].to(DEV)
    with torch.no_grad():
        _, dyn = m(x[:, :3], past_kv=m.new_cache(2, x.shape[1]))
        _, sta = m(x[:, :3], past_kv=m.new_cache(2, x.shape[1]))
        from tapetransformer.generate import _GraphedDecodeStep

        step = _GraphedDecodeStep(m, sta, 2)
        for t in range(3, x.shape[1]):
            want, dyn = m(x[:, t : t + 1], past_kv=dyn)
            got = step(x[:, t : t + 1], t)
            assert rel(got, want) < 1e-5, t


def test_cuda_graph_is_reused_across_calls_and_follows_the_weights(golden: dict) -> None:
    """A second generate() replays the first call's graph (no capture) with the same tokens; after an
    in-place weight update the replay uses the new weights (equal to the eager decode); a
    re-quantization or a .data swap captures again."""
    from tapetransformer.generate import clear_decode_graphs

    _, fused = models(golden)
    m = fused.eval()
    prompt = golden["x"][:2, :5].to(DEV)
    for int8 in (False, True):
        clear_decode_graphs(m)
        st1: dict = {}
        st2: dict = {}
        a = generate(m, prompt, 12, greedy=True, int8=int8, stats=st1)
        b = generate(m, golden["x"][:2, :7].to(DEV), 9, greedy=True, int8=int8, stats=st2)
        assert st1["cuda_graph"] and not st1["graph_reused"] and st1["capture_ms"] > 0
        assert st2["graph_reused"] and st2["capture_ms"] == 0.0  # capacity 64 serves both
        assert torch.equal(a, generate(m, prompt, 12, greedy=True, int8=int8, cuda_graph=False))
        assert torch.equal(b, generate(m, golden["x"][:2, :7].to(DEV), 9, greedy=True, int8=int8, cuda_graph=False))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        st3: dict = {}
        c = generate(m, prompt, 12, greedy=True, int8=int8, stats=st3)
        assert st3["graph_reused"] == (not int8)  # int8: the weights were re-quantized, so a new capture
        assert torch.equal(c, generate(m, prompt, 12, greedy=True, int8=int8, cuda_graph=False))
    w = m.codahead.blocks_left[0].mlp.expand.weight
    w.data = w.data.clone()
    st4: dict = {}
    generate(m, prompt, 12, greedy=True, stats=st4)
    assert not st4["graph_reused"]
    clear_decode_graphs(m)
