"""The seed design in the CUDA graphs (issue 27 item 3): the decode token's graph holds the prophet's
Char-RNN step, the merges and the critics; the training step's graph holds the Char-RNN forward and
backward (the persistent kernel where it fits, else the per-step kernels).

A graph replay runs the same kernels as the step launched one by one, so both must agree to fp32
rounding (the kernels are deterministic: in practice exactly), and a replay must not wait on the host
(``torch.cuda.set_sync_debug_mode("error")``). The decode checks compare every replay's log-probs and
the prophet's state with an eager step on a copy of the cache: a prophet state left out of the graph
(or not advanced in place) shows from the second token on. All CUDA-only (marker ``gpu``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from tape_kernels import charrnn as cr
from tapetransformer.generate import _GraphedDecodeStep, clear_decode_graphs, generate
from tapetransformer.model import TapeTransformer
from tapetransformer.train import MemoryPlan, Stepper, make_optimizer
from tapetransformer.train.cudagraph import GraphedStepper, graph_unsupported

pytestmark = pytest.mark.gpu

FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # the same kernels on the same data: rounding at most
CFG = {"vocab_size": 13, "seq_len": 32, "embed_dim": 32, "num_heads": 2}


def _seed_model() -> TapeTransformer:
    torch.manual_seed(0)
    return TapeTransformer(**CFG, dropout=0.0, backend="triton", design="seed").cuda()


@contextlib.contextmanager
def _no_host_sync() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _clone_cache(cache):  # noqa: ANN001, ANN202
    """A copy of a KVCache's contents (K/V and the prophet's state) in a fresh cache of the same shape."""
    twin = cache.__class__.__new__(cache.__class__)
    twin.__dict__.update(cache.__dict__)
    twin.kv = cache.kv.clone()
    twin.rnn = [h.clone() for h in cache.rnn]
    return twin


@pytest.mark.parametrize("persistent", ["1", "0"], ids=["persistent", "per-step"])
def test_seed_decode_graph_replays_equal_eager_steps(persistent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPE_KERNELS_CHARRNN_PERSISTENT", persistent)
    m = _seed_model().eval()
    hd = m.prophet.hidden_size
    assert cr._layout(hd, torch.device("cuda"), None)[2] == (persistent == "1")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, CFG["vocab_size"], (2, 5), generator=g).cuda()
    with torch.no_grad():
        m.prepare_decode()
        _, cache = m.prefill(prompt, m.new_cache(2, CFG["seq_len"]))
        assert cache.rnn is not None and float(cache.rnn[0].abs().sum()) > 0  # the prophet ran in the prefill
        eager_cache = _clone_cache(cache)
        graph = _GraphedDecodeStep(m, cache, 2)
        tok = prompt[:, -1:]
        for i in range(6):
            position = cache.length
            with _no_host_sync():
                got = graph(tok, position).clone()
            pos = torch.full((1,), position, dtype=torch.long, device="cuda")
            want = m.decode_step(tok, pos, eager_cache)
            torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL, msg=f"token {i}")
            for layer, (a, b) in enumerate(zip(cache.rnn, eager_cache.rnn)):
                msg = f"token {i}, prophet layer {layer}"
                torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_ATOL, msg=msg)
            cache.length += 1
            eager_cache.length += 1
            tok = want[:, -1].argmax(-1, keepdim=True)


def test_seed_generate_graph_equals_eager_across_window_slides() -> None:
    """generate() on CUDA captures the seed design's token (stats say so) and gives the tokens the eager
    static step gives, also past seq_len, where the window slides and the prefill rewrites the cache
    (and the prophet's state) under the captured graph."""
    m = _seed_model()
    prompt = torch.randint(0, CFG["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2)).cuda()
    n = CFG["seq_len"] + 12
    stats: dict = {}
    graphed = generate(m, prompt, n, greedy=True, cuda_graph=True, stats=stats)
    assert stats["cuda_graph"] is True
    eager = generate(m, prompt, n, greedy=True, cuda_graph=False)
    assert torch.equal(graphed, eager)
    sampled = [generate(m, prompt, n, temperature=0.9, top_k=5, seed=3, cuda_graph=cg) for cg in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    clear_decode_graphs(m)


def _batches(n: int, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, CFG["vocab_size"], (b, CFG["seq_len"] + 1), generator=g).cuda()
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


@pytest.mark.parametrize("persistent", ["1", "0"], ids=["persistent", "per-step"])
def test_seed_graphed_training_steps_equal_eager_steps(persistent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole seed-design step (critics, Char-RNN forward and BPTT backward, merges, moderator, Adam) as
    one replay equals the step launched op by op, with either Char-RNN layout inside the graph."""
    monkeypatch.setenv("TAPE_KERNELS_CHARRNN_PERSISTENT", persistent)
    plan = MemoryPlan(4, 1, False, None, 0)
    steppers = []
    for cls in (Stepper, GraphedStepper):
        m = _seed_model()
        opt = make_optimizer("adam", m.parameters(), 1e-3, capturable=True)
        steppers.append(cls(m, opt, plan, device="cuda", grad_clip=1.0))
    eager, graphed = steppers
    assert graph_unsupported(graphed, world=1) is None
    for i, (x, y) in enumerate(_batches(4)):
        le, _ = eager.step(x, y)
        with _no_host_sync() if i > 0 else contextlib.nullcontext():  # the first step captures
            lg, _ = graphed.step(x, y)
        torch.testing.assert_close(lg, le, rtol=FP32_RTOL, atol=FP32_ATOL, msg=f"step {i}")
    for (n, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=FP32_RTOL, atol=FP32_ATOL, msg=n)
    # the prophet trained inside the graph: its weights moved
    fresh = _seed_model()
    assert not torch.equal(graphed.model.prophet.cells_left[0].h2h.weight, fresh.prophet.cells_left[0].h2h.weight)
