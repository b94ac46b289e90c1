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
    sgd = dict(optimizer="sgd", lr=0.5)
    eager = train(cfg_for(tmp_path / "e.ckpt", corpus, 4, compile="off", **sgd))
    comp = train(cfg_for(tmp_path / "c.ckpt", corpus, 4, compile="on", **sgd))
    assert comp["model"] is not eager["model"]
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
    _close(resumed["model"].state_dict(), comp["model"].state_dict())
    # accumulation (2 micro-batches of 2) and the memory planner, compiled
    acc = train(cfg_for(tmp_path / "a.ckpt", corpus, 4, compile="on", micro_batch=2, **sgd))
    _close(acc["model"].state_dict(), eager["model"].state_dict())
    planned = train(cfg_for(tmp_path / "p.ckpt", corpus, 2, compile="on", memory_budget_gb=4.0, **sgd))
    assert planned["plan"].micro_batch >= 1


def test_auto_compiles_only_a_run_long_enough_to_pay_it_back(tmp_path: Path, corpus: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tapetransformer.train import loop

    short = train(cfg_for(tmp_path / "s.ckpt", corpus, 3, compile="auto"))
    assert not short["compiled"]
    monkeypatch.setattr(loop, "COMPILE_AUTO_COST_S", 0.0)  # any saving pays back a free compile
    long = train(cfg_for(tmp_path / "l.ckpt", corpus, 4, compile="auto"))
    assert long["compiled"]


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
