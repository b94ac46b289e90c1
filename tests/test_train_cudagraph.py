"""The whole training step in one CUDA graph (``tapetransformer.train.cudagraph.GraphedStepper``).

Graphed and launch-by-launch steps run the same kernels on the same data, so they must give the same
parameters to fp32 rounding; a replay must never wait on the host (``set_sync_debug_mode("error")``
turns any synchronisation into an error); and ``tapetransformer train`` on CUDA uses the graph by
default. All CUDA-only (marker ``gpu``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tapetransformer.checkpoint import ModelConfig
from tapetransformer.model import TapeTransformer
from tapetransformer.train import MemoryPlan, Stepper, TrainConfig, make_optimizer, train
from tapetransformer.train.cudagraph import GraphedStepper, graph_unsupported

pytestmark = pytest.mark.gpu

# fp32, same kernels, same batch: the replay differs from the eager step at most by rounding (the
# kernels are deterministic, so in practice not at all).
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6
# Under autocast the two runs still execute the same kernels; the bound is the autocast dtype's own
# rounding of the loss, and for the parameters 2·lr: Adam turns a gradient that is pure rounding noise
# (the key bias: softmax ignores a per-query constant) into a ±lr step, whose sign rounding decides.
AMP_LOSS_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
LR = 1e-3


def _model(backend: str) -> TapeTransformer:
    torch.manual_seed(0)
    return TapeTransformer(13, seq_len=16, embed_dim=32, num_heads=2, dropout=0.0, backend=backend).cuda()


def _batches(n: int, b: int = 8, s: int = 16, vocab: int = 13) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, vocab, (b, s + 1), generator=g).cuda()
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def _pair(backend: str, opt: str, amp: torch.dtype | None) -> tuple[Stepper, GraphedStepper]:
    plan = MemoryPlan(8, 1, False, None, 0)
    out = []
    for cls in (Stepper, GraphedStepper):
        m = _model(backend)
        scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
        o = make_optimizer(opt, m.parameters(), LR, capturable=True)
        out.append(cls(m, o, plan, device="cuda", amp_dtype=amp, scaler=scaler, grad_clip=1.0))
    assert graph_unsupported(out[1], world=1) is None
    return out[0], out[1]


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("opt", ["adam", "wolf"])
def test_graphed_steps_equal_eager_steps_fp32(backend: str, opt: str) -> None:
    eager, graphed = _pair(backend, opt, None)
    for i, (x, y) in enumerate(_batches(5)):
        le, _ = eager.step(x, y)
        lg, _ = graphed.step(x, y)
        torch.testing.assert_close(lg, le, rtol=FP32_RTOL, atol=FP32_ATOL, msg=f"step {i}")
    for (n, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=FP32_RTOL, atol=FP32_ATOL, msg=n)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_graphed_steps_follow_eager_steps_under_autocast(amp: torch.dtype) -> None:
    if amp is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    eager, graphed = _pair("triton", "adam", amp)
    init = {n: p.detach().clone() for n, p in graphed.model.named_parameters()}
    steps = 4
    for i, (x, y) in enumerate(_batches(steps)):
        le, _ = eager.step(x, y)
        lg, _ = graphed.step(x, y)
        torch.testing.assert_close(lg, le, rtol=AMP_LOSS_RTOL[amp], atol=1e-5, msg=f"step {i}")
    # Against the initial parameters: the graphed run must really have stepped. An element-wise bound
    # alone cannot tell: 4 Adam steps move a parameter by at most ~4·lr, less than the 2·lr-per-step
    # worst case that the noise-gradient elements may differ by. So the graphed run's total update must
    # equal the eager run's in the 1-norm to 10 %: all elements but the few noise-gradient ones (the key
    # biases, ~1 % of the parameters) agree to the autocast rounding, while a run that skipped its
    # updates misses 100 % (none taken) or 25 % (one of the 4) of it.
    moved_e = sum(float((a.detach() - init[n]).abs().sum()) for n, a in eager.model.named_parameters())
    diff = sum(float((b.detach() - a.detach()).abs().sum())
               for (n, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()))  # fmt: skip
    assert moved_e >= LR, "the eager run did not train, so the comparison means nothing"
    assert diff <= 0.1 * moved_e, f"graphed update differs from eager by {diff:.3e} (eager moved {moved_e:.3e})"
    for (n, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        # the dead parameters (zero gradients) stay put in both runs; every other one moves in both
        assert torch.equal(b, init[n]) == torch.equal(a, init[n]), f"{n}: moved in one run only"
        torch.testing.assert_close(b, a, rtol=0, atol=2 * LR * steps, msg=n)
    if amp is torch.float16:  # the GradScaler's state lives in the graph and moves as the eager one does
        assert graphed.scaler.get_scale() == eager.scaler.get_scale()


def test_graph_replay_never_synchronises_with_the_host() -> None:
    _, graphed = _pair("triton", "adam", torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    batches = _batches(4)
    graphed.step(*batches[0])  # capture (warm-up steps and the capture may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [graphed.step(x, y)[0] for x, y in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(losses)).all()


def test_train_uses_the_graph_on_cuda_by_default(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    model = ModelConfig(vocab_size=0, seq_len=16, embed_dim=32, num_heads=2, dropout=0.0)
    # SGD: the plain run's Adam would not be the capturable one, and Adam turns rounding-level gradient
    # differences into lr-sized steps (see AMP_LOSS_RTOL); SGD keeps them at rounding level.
    base = dict(data=str(corpus), steps=6, batch_size=4, lr=1e-2, eval_every=3, eval_batches=1, seed=3, optimizer="sgd",
                model=model, progress=False, device="cuda", backend="auto", amp="off")  # fmt: skip
    graphed = train(TrainConfig(out=str(tmp_path / "g.ckpt"), **base))
    plain = train(TrainConfig(out=str(tmp_path / "e.ckpt"), cuda_graph=False, **base))
    assert graphed["cuda_graph"] is True and plain["cuda_graph"] is False
    for (n, a), b in zip(plain["model"].named_parameters(), graphed["model"].parameters()):
        torch.testing.assert_close(b, a, rtol=FP32_RTOL, atol=FP32_ATOL, msg=n)
