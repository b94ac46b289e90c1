"""CPU training under torch.compile: no graph breaks on the hot path, the same parameters as the eager
step to fp32 rounding, and resume / accumulation / the memory planner / DDP working with it.

Tolerance: Inductor fuses and reorders the fp32 arithmetic, so gradients differ from the eager run's by
float rounding. The comparison uses SGD, whose update is proportional to the gradient: under Adam a
gradient that is pure rounding noise (the attention's key bias, to which softmax is invariant) is
normalised to a full-size step whose sign is the noise's, so Adam runs agree only to ~lr. Held to 1e-4
(rtol 1e-4), far below one step's update. The compiles are cached by Inductor, so the later tests here
reuse the first one's work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _dist import ddp_worker, free_port

from tapetransformer import TapeTransformer
from tapetransformer.model import ModelConfig
from tapetransformer.train import TrainConfig, train

MODEL = ModelConfig(vocab_size=0, seq_len=8, embed_dim=16, num_heads=2, dropout=0.0, causal=True)
RTOL = ATOL = 1e-4


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    return p


def cfg_for(out: Path, corpus: Path, steps: int, **kw) -> TrainConfig:
    base = dict(data=str(corpus), steps=steps, batch_size=4, lr=1e-2, eval_every=2, eval_batches=1, out=str(out),
                seed=3, model=MODEL, progress=False, backend="eager", log_dir=None)
    base.update(kw)
    return TrainConfig(**base)


def _close(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


@pytest.mark.parametrize("design", ["reference", "seed"])
def test_training_loss_has_no_graph_breaks(design: str) -> None:
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=8, embed_dim=16, num_heads=2, dropout=0.0, design=design, causal=True,
                        backend="eager")
    x = torch.randint(0, 13, (2, 8))
    explained = torch._dynamo.explain(lambda a, b: m.loss(a, b, check=False))(x, x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_steps_equal_eager_steps_and_resume_and_accumulate(tmp_path: Path, corpus: Path) -> None:
    # a constant rate: the resume below extends the target, which a cosine schedule's horizon follows
    sgd = dict(optimizer="sgd", lr=0.5, lr_schedule="constant", warmup_steps=0)
    eager = train(cfg_for(tmp_path / "e.ckpt", corpus, 4, compile="off", **sgd))
    torch._dynamo.utils.counters.clear()
    comp = train(cfg_for(tmp_path / "c.ckpt", corpus, 4, compile="on", **sgd))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # Dynamo captured the step
    assert comp["model"] is not eager["model"]
    assert comp["compiled"] and not eager["compiled"]  # the step really was compiled (not an eager fallback)
    _close(comp["model"].state_dict(), eager["model"].state_dict())
    moved = sum(not torch.equal(v, TapeTransformer(comp["vocab"].size, seq_len=8, embed_dim=16,
                                                   num_heads=2).state_dict()[k])
                for k, v in comp["model"].state_dict().items())
    assert moved > 10  # training changed the model, so the comparison means something
    # first and steady step times are logged
    rows = comp["log"]
    assert rows[0]["step_s"] > 0 and all(r["step_s"] > 0 for r in rows)
    # resume a compiled run: the same as running it straight
    train(cfg_for(tmp_path / "r.ckpt", corpus, 2, compile="on", **sgd))
    resumed = train(cfg_for(tmp_path / "r.ckpt", corpus, 4, compile="on", resume=True, **sgd))
    assert resumed["compiled"]
    _close(resumed["model"].state_dict(), comp["model"].state_dict())
    # accumulation (2 micro-batches of 2) and the memory planner, compiled
    acc = train(cfg_for(tmp_path / "a.ckpt", corpus, 4, compile="on", micro_batch=2, **sgd))
    assert acc["compiled"]
    _close(acc["model"].state_dict(), eager["model"].state_dict())
    planned = train(cfg_for(tmp_path / "p.ckpt", corpus, 2, compile="on", memory_budget_gb=4.0, **sgd))
    assert planned["plan"].micro_batch >= 1 and planned["compiled"]


def test_auto_compiles_only_a_run_long_enough_to_pay_it_back(tmp_path: Path, corpus: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tapetransformer.train import config

    short = train(cfg_for(tmp_path / "s.ckpt", corpus, 8, compile="auto"))
    assert not short["compiled"]
    # any saving pays back a free compile (warm or cold: earlier tests may have left this step cached);
    # auto decides after steps 2 to 6, so a run needs a 7th step
    monkeypatch.setattr(config, "COMPILE_AUTO_COST_S", 0.0)
    monkeypatch.setattr(config, "COMPILE_AUTO_WARM_COST_S", 0.0)
    assert not train(cfg_for(tmp_path / "t.ckpt", corpus, 6, compile="auto"))["compiled"]
    long = train(cfg_for(tmp_path / "l.ckpt", corpus, 7, compile="auto"))
    assert long["compiled"]


def test_auto_counts_a_warm_inductor_cache(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step leaves a marker beside Inductor's cache; ``auto`` then weighs the warm start."""
    from tapetransformer.train import compilecache, config

    monkeypatch.setattr(compilecache, "inductor_cache_dir", lambda: tmp_path / "inductor")
    monkeypatch.setattr(config, "COMPILE_AUTO_COST_S", 1e9)  # a cold compile never pays back
    monkeypatch.setattr(config, "COMPILE_AUTO_WARM_COST_S", 0.0)
    cold = train(cfg_for(tmp_path / "a.ckpt", corpus, 7, compile="auto"))
    assert not cold["compiled"]
    assert train(cfg_for(tmp_path / "b.ckpt", corpus, 3, compile="on"))["compiled"]  # leaves the marker
    assert list((tmp_path / "inductor").rglob("*.json"))
    warm = train(cfg_for(tmp_path / "c.ckpt", corpus, 7, compile="auto"))
    assert warm["compiled"]
    other = train(cfg_for(tmp_path / "d.ckpt", corpus, 7, compile="auto", batch_size=2))  # another shape
    assert not other["compiled"]


def test_step_signature_tells_shapes_and_models_apart() -> None:
    from tapetransformer.train.compilecache import step_signature

    def model(**kw):
        torch.manual_seed(0)
        return TapeTransformer(13, **{**dict(seq_len=8, embed_dim=16, num_heads=2, causal=True), **kw})

    base = step_signature(model(), 4, 8, None, False)
    assert base == step_signature(model(), 4, 8, None, False)  # weights' values do not matter
    assert len({base, step_signature(model(), 2, 8, None, False), step_signature(model(), 4, 8, torch.bfloat16, False),
                step_signature(model(), 4, 8, None, True), step_signature(model(num_heads=3), 4, 8, None, False),
                step_signature(model(causal=False), 4, 8, None, False),
                step_signature(model(dropout=0.0), 4, 8, None, False)}) == 7


def test_ddp_with_compile_matches_single_process(tmp_path: Path, corpus: Path) -> None:
    kw = dict(optimizer="sgd", lr=0.5, eval_every=0)
    single = train(cfg_for(tmp_path / "single.ckpt", corpus, 3, compile="off", **kw))
    ddp_cfg = cfg_for(tmp_path / "ddp.ckpt", corpus, 3, compile="on", **kw)
    mp.spawn(ddp_worker, args=(2, free_port(), ddp_cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k, v in single["model"].state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, rtol=RTOL, atol=ATOL, msg=k)


# Graph nodes that make AOTAutograd bypass its cache: with one in the loss graph every warm start
# retraces the joint forward-backward graph (~6 s at the notebook size on a 2-core CPU).
_UNCACHEABLE = ("autograd_function_apply", "_enter_autocast", "_exit_autocast")


@pytest.mark.parametrize("design", ["reference", "seed"])
@pytest.mark.parametrize("link", [True, False])
def test_training_loss_graph_is_cacheable(design: str, link: bool) -> None:
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=8, embed_dim=16, num_heads=2, dropout=0.0, design=design, causal=True,
                        backend="eager")
    x = torch.randint(0, 13, (2, 8))
    targets = _graph_targets(lambda a, b: m.loss(a, b, check=False, link=link), x, x)
    assert targets and not [t for t in targets if t in _UNCACHEABLE]


def _graph_targets(fn, *args) -> list[str]:
    """Names of the call_function targets of the one graph Dynamo captures from fn(*args)."""
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1
    return [getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes if n.op == "call_function"]


def test_uncacheable_nodes_are_detected() -> None:
    """The control for the test above: on this torch the node names it looks for are what an
    autograd.Function and an autocast region become."""
    from tapetransformer.model import _ZeroGradLink

    w = torch.nn.Parameter(torch.ones(3))

    def fn(x):
        with torch.autocast("cpu", enabled=False):
            y = x * 2
        return _ZeroGradLink.apply(y.sum(), w)

    found = set(_graph_targets(fn, torch.ones(3))) & set(_UNCACHEABLE)
    assert "autograd_function_apply" in found and found & {"_enter_autocast", "_exit_autocast"}


# aot_eager checks the traced graph itself; Inductor (what compile="on" uses) adds its fused, reordered
# code, whose rounding the RTOL above allows for.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_stepper_links_dead_parameters_with_zero_gradients(backend: str) -> None:
    """The compiled step applies the zero-gradient link outside the compiled region: every parameter
    the eager step gives a gradient gets one, the dead ones exactly zero, the others equal to rounding."""
    from tapetransformer.train import MemoryPlan, Stepper, make_optimizer

    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = TapeTransformer(13, seq_len=8, embed_dim=16, num_heads=3, dropout=0.0, causal=True, backend="eager")
        st = Stepper(m, make_optimizer("sgd", m.parameters(), 0.1), MemoryPlan(4, 1, False, None, 0))
        if compiled:
            st.compile(backend=backend)
            assert st.compiled and not st.loss_net.link
        x = torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(1))
        st.accumulate(x, x.roll(1, dims=1))
        grads.append({k: p.grad for k, p in m.named_parameters()})
    eager, comp = grads
    dead = [k for k in eager if k.startswith(("prophet.", "rnn_projection.", "residualheads.0.", "residualheads.1."))]
    assert dead
    for k, g in eager.items():
        assert (g is None) == (comp[k] is None), k
        if g is not None:
            torch.testing.assert_close(comp[k], g, rtol=RTOL, atol=ATOL, msg=k)
    for k in dead:
        assert comp[k] is not None and not comp[k].any(), k


def test_compiled_link_keeps_dead_nan_out_of_the_loss() -> None:
    """Under compile the link is a sum over empty slices: NaN or inf in a dead parameter (which the
    reference's loss never reads) must not reach the loss, and its gradient is exactly zero."""
    torch.manual_seed(0)
    m = TapeTransformer(13, seq_len=8, embed_dim=16, num_heads=2, dropout=0.0, causal=True, backend="eager")
    with torch.no_grad():
        m.prophet.cells_left[0].i2h.weight[0, 0] = float("nan")
        m.rnn_projection.weight[0, 0] = float("inf")
    x = torch.randint(0, 13, (2, 8))
    eager = m.loss(x, x, check=False)
    torch._dynamo.reset()
    comp = torch.compile(lambda a, b: m.loss(a, b, check=False), backend="aot_eager", fullgraph=True)(x, x)
    assert torch.isfinite(comp)
    torch.testing.assert_close(comp, eager, rtol=RTOL, atol=ATOL)
    comp.backward()
    assert not m.prophet.cells_left[0].i2h.weight.grad.any() and not m.rnn_projection.weight.grad.any()
