"""Sampling on the device (tape_kernels.sampling, tapetransformer.sampling.pick_next).

The draws must follow softmax(logp / T) (restricted to the top k): a chi-square goodness-of-fit test
at significance α = 0.001 on fixed seeds (so the outcome is fixed: it cannot flake), with a power
check (the same draws reject a wrong distribution). The Triton kernel (interpreted), the eager
replica and the C++ draw of the native CPU decode (``torch.ops.tape_kernels.sample_next``) draw the
same ids, and Philox matches Triton's ``tl.philox`` bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tape_kernels import sampling as ks
from tapetransformer.sampling import DeviceRNG, pick_next

ALPHA = 1e-3


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (cells with expectation ≥ 5 kept
    apart, the rest pooled) -> p-value (upper tail of chi2 with cells − 1 dof)."""
    n = counts.sum().double()
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum().view(1)])
    exp = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _native_available() -> bool:
    from tape_kernels.int8 import extension_available

    return extension_available() and hasattr(torch.ops.tape_kernels, "sample_next")


IMPLS = ["eager", pytest.param("native", marks=pytest.mark.skipif(not _native_available(),
                                                                  reason="tape_kernels._C without sample_next"))]


def draws(scores: torch.Tensor, seed: int, steps: int, threshold: torch.Tensor | None = None,
          kernel: bool = False, top_k: int | None = None, impl: str = "eager") -> torch.Tensor:
    """``impl="native"``: the C++ draw (torch.ops.tape_kernels.sample_next at temperature 1, its own
    top-k threshold from ``top_k``)."""
    state = ks.new_state(seed)
    out = []
    for _ in range(steps):
        if kernel:
            out.append(ks.sample(scores, state, threshold, backend="triton"))
        elif impl == "native":
            out.append(torch.ops.tape_kernels.sample_next(scores, state, 1.0, top_k or 0))
        else:
            out.append(ks.sample_ref(scores, state, threshold))
    return torch.cat(out)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -5.0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_frequencies_match_the_softmax(temperature: float, impl: str) -> None:
    logp = torch.log_softmax(LOGITS, -1)
    scores = (logp / temperature).expand(4000, -1).contiguous()  # 4000 rows a draw: independent counters
    got = draws(scores, seed=11, steps=25, impl=impl)  # 100k draws
    counts = torch.bincount(got, minlength=10)
    p = torch.softmax(logp / temperature, -1)
    assert chi2_pvalue(counts, p) > ALPHA
    # power: the same draws reject the untempered (or a flattened) distribution
    wrong = torch.softmax(logp, -1) if temperature != 1.0 else torch.softmax(logp * 0.9, -1)
    assert chi2_pvalue(counts, wrong) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_frequencies_and_support(impl: str) -> None:
    logp = torch.log_softmax(LOGITS, -1)
    scores = (logp / 0.8).expand(4000, -1).contiguous()
    thr = torch.topk(scores, 4, dim=-1).values[:, -1:]
    got = draws(scores, seed=5, steps=20, threshold=thr, top_k=4, impl=impl)
    counts = torch.bincount(got, minlength=10)
    assert counts[4:].sum() == 0  # never outside the top 4
    p = torch.softmax(scores[0, :4], -1)
    assert chi2_pvalue(counts[:4], p) > ALPHA


def test_kernel_frequencies_match_the_softmax() -> None:
    """The interpreted Triton kernel itself, on fewer draws (65 ids, the model's vocabulary)."""
    logits = torch.randn(65, generator=torch.Generator().manual_seed(3)) * 1.5
    logp = torch.log_softmax(logits, -1)
    scores = logp.expand(250, -1).contiguous()
    got = draws(scores, seed=9, steps=8, kernel=True)  # 2000 draws
    assert chi2_pvalue(torch.bincount(got, minlength=65), torch.softmax(logp, -1)) > ALPHA


@pytest.mark.parametrize("top_k", [None, 3])
def test_kernel_and_eager_replica_draw_the_same_ids(top_k: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=gen) * 3  # 300 ids: three vocabulary tiles in the kernel
    thr = None if top_k is None else torch.topk(scores, top_k, dim=-1).values[:, -1:]
    s1, s2 = ks.new_state(2**40 + 17), ks.new_state(2**40 + 17)
    a = torch.stack([ks.sample(scores, s1, thr, backend="triton") for _ in range(12)])
    b = torch.stack([ks.sample(scores, s2, thr, backend="eager") for _ in range(12)])
    assert torch.equal(a, b)
    assert torch.equal(s1, s2) and s1.tolist() == [2**40 + 17, 12]
    assert len({tuple(r.tolist()) for r in a}) > 1  # the state advanced: steps differ


def test_philox_matches_triton() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def words(OUT, STATE, N: tl.constexpr):
        seed = tl.load(STATE)
        step = tl.load(STATE + 1)
        c2 = (step & 0xFFFFFFFF).to(tl.uint32)
        c3 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
        i = tl.arange(0, N)
        zero = tl.zeros((N,), tl.uint32)
        a, b, c, d = tl.philox(seed, i.to(tl.uint32), zero + 7, zero + c2, zero + c3)
        tl.store(OUT + i, a.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + N + i, b.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + 2 * N + i, c.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + 3 * N + i, d.to(tl.int64) & 0xFFFFFFFF)

    seed, c2, c3 = 0x1234_5678_9ABC_DEF, 0xFFFF_FFF0, 3
    out = torch.empty(4 * 16, dtype=torch.int64)
    words[(1,)](out, torch.tensor([seed, c3 << 32 | c2]), N=16)
    i = torch.arange(16, dtype=torch.int64)
    ref = ks.philox_ref(torch.tensor(seed), i, i * 0 + 7, i * 0 + c2, i * 0 + c3)
    assert torch.equal(out.view(4, 16), torch.stack(ref))


def test_pick_next_seeds_and_greedy() -> None:
    logp = torch.log_softmax(torch.randn(3, 65, generator=torch.Generator().manual_seed(1)), -1)
    assert torch.equal(pick_next(logp, greedy=True), logp.argmax(-1))
    a = [pick_next(logp, top_k=10, generator=DeviceRNG(42)) for _ in range(2)]
    assert torch.equal(a[0], a[1])  # a seed fixes the draw
    rng = DeviceRNG(42)
    seq = torch.stack([pick_next(logp, generator=rng) for _ in range(30)])
    assert len({tuple(r.tolist()) for r in seq}) > 1  # one generator advances
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(pick_next(logp, generator=g1), pick_next(logp, generator=g2))  # a host generator seeds it
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"top_k": 0}, {"top_k": 2.5}):
        with pytest.raises(ValueError, match="temperature|top_k"):
            pick_next(logp, **bad)
    with pytest.raises(ValueError, match="seed"):
        DeviceRNG(-1)


def test_generate_samples_reproducibly() -> None:
    from tapetransformer.generate import generate
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=6, embed_dim=16, num_heads=1, dropout=0.0, causal=True, backend="triton")
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = generate(m, prompt, 5, top_k=5, temperature=0.9, seed=123)  # slides the window once
    b = generate(m, prompt, 5, top_k=5, temperature=0.9, seed=123)
    c = generate(m, prompt, 5, top_k=5, temperature=0.9, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="seed"):
        generate(m, prompt, 2, seed=-3)


@pytest.mark.gpu
def test_cuda_draws_equal_the_cpu_replica_and_the_graph_draws_the_same() -> None:
    """On CUDA: the kernel draws what the CPU replica draws from the same scores, and a sampled
    generation captured in a CUDA graph (the draw inside the graph) equals the eager one."""
    from tapetransformer.generate import generate
    from tapetransformer.model import TapeTransformer

    scores = torch.randn(4, 65, generator=torch.Generator().manual_seed(0)) * 2
    thr = torch.topk(scores, 7, dim=-1).values[:, -1:]
    s_gpu, s_cpu = ks.new_state(5, "cuda"), ks.new_state(5)
    a = torch.stack([ks.sample(scores.cuda(), s_gpu, thr.cuda()) for _ in range(50)]).cpu()
    b = torch.stack([ks.sample_ref(scores, s_cpu, thr) for _ in range(50)])
    assert torch.equal(a, b)
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=16, embed_dim=32, num_heads=1, dropout=0.0, causal=True).cuda().eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    for kw in ({"top_k": 5, "temperature": 0.7}, {"temperature": 1.3}):
        g = generate(m, prompt, 40, seed=11, cuda_graph=True, **kw)  # slides the window twice
        e = generate(m, prompt, 40, seed=11, cuda_graph=False, **kw)
        assert torch.equal(g, e)


@pytest.mark.skipif(not _native_available(), reason="tape_kernels._C without sample_next")
@pytest.mark.parametrize("top_k", [None, 1, 3, 500])
def test_native_draws_equal_the_eager_replica_token_for_token(top_k: int | None) -> None:
    """The C++ Philox stream and race: the same ids as sample_ref for the same state, step after step,
    at a step past 2^32 (the counter's high word) and from log-probs scaled by fp32(1/T) as pick_next
    scales them; ties at the k-th score are kept by both."""
    gen = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(torch.randn(5, 300, generator=gen) * 3, -1)
    logp[2, 10:20] = logp[2, 5]  # a tie across the k-th largest
    for temperature in (1.0, 0.7):
        scores = logp.float() * (1.0 / temperature)
        thr = None if top_k is None else torch.topk(scores, min(top_k, 300), dim=-1).values[:, -1:]
        for seed, step in ((0, 0), (2**62 + 5, 2**32 - 3)):
            s_eager, s_native = torch.tensor([seed, step]), torch.tensor([seed, step])
            a = torch.stack([ks.sample_ref(scores, s_eager, thr) for _ in range(40)])
            b = torch.stack([torch.ops.tape_kernels.sample_next(logp, s_native, 1.0 / temperature, top_k or 0)
                             for _ in range(40)])  # fmt: skip
            assert torch.equal(a, b)
            assert torch.equal(s_eager, s_native) and s_native[1] == step + 40
    assert torch.equal(torch.ops.tape_kernels.sample_next(logp, None, 0.0, 0), logp.argmax(-1))  # greedy


@pytest.mark.skipif(not _native_available(), reason="tape_kernels._C without sample_next")
def test_native_pick_raises_on_non_finite_log_probs_and_bad_input() -> None:
    from tapetransformer.native_decode import native_pick

    logp = torch.log_softmax(torch.randn(3, 65, generator=torch.Generator().manual_seed(2)), -1)
    logp[1, 7] = float("nan")
    ids = torch.ops.tape_kernels.sample_next(logp, None, 0.0, 0)
    assert ids.tolist()[1] == -1 and min(ids.tolist()[0], ids.tolist()[2]) >= 0  # flagged, never a token
    for kw in ({"greedy": True}, {"state": ks.new_state(1), "top_k": 5}):
        with pytest.raises(ValueError, match=r"non-finite log-probs .*\[1\]"):
            native_pick(logp, **kw)
    logp[1, 7] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        native_pick(logp, greedy=True)
    with pytest.raises(ValueError, match="state"):
        torch.ops.tape_kernels.sample_next(logp, torch.zeros(3, dtype=torch.int64), 1.0, 0)
    with pytest.raises(ValueError, match="inv_temp"):
        torch.ops.tape_kernels.sample_next(logp, ks.new_state(0), float("nan"), 0)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.tape_kernels.sample_next(logp.double(), None, 0.0, 0)
