"""Kernel launches per decode token on the CUDA code path, counted on the CPU (issue 16: ≤ 40).

Under ``TRITON_INTERPRET=1`` the model's static ``decode_step`` with ``backend="triton"`` takes the
code path it takes on CUDA (no branch of it depends on the device type), so its launches can be
counted here: every Triton kernel launch (the interpreter's ``run``), and every ATen op that launches
a device kernel, seen through a ``TorchDispatchMode`` — views, allocations and metadata ops launch
nothing and are not counted; ops inside a Triton launch (the interpreter's own copies) are not
either. The model is the notebook's (vocab 65, seq_len 128, embed_dim 256, 4 critics: 12 live
blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tapetransformer.model import TapeTransformer

LIMIT = 40

# ATen ops that only make a view or an allocation, or read metadata: no device kernel.
_FREE = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "detach", "alias", "split",
    "split_with_sizes", "unbind", "unfold", "lift_fresh", "_reshape_alias", "view_as", "reshape",
}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts ATen ops that launch a kernel and Triton launches (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: list[str] = []
        self.triton: list[str] = []
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if not self._inside_triton and not func.is_view and name not in _FREE:
            self.aten.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCounter]:
    from triton.runtime.interpreter import InterpretedFunction

    counter = LaunchCounter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kwargs.get("warmup"):
            return run(self, *args, **kwargs)
        counter.triton.append(self.__name__)
        counter._inside_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter._inside_triton -= 1

    InterpretedFunction.run = counted
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.run = run


@pytest.fixture(scope="module")
def notebook_model() -> TapeTransformer:
    torch.manual_seed(0)
    return TapeTransformer(65, seq_len=128, embed_dim=256, num_heads=4, dropout=0.0, backend="triton").eval()


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_decode_step_launches_at_most_40(notebook_model: TapeTransformer, int8: bool) -> None:
    m = notebook_model
    x = torch.randint(0, 65, (1, 6), generator=torch.Generator().manual_seed(1))
    with m.int8_weights(enabled=int8, act_quant=False), torch.no_grad():
        _, cache = m.prefill(x[:, :5], m.new_cache(1, 16))
        _, dyn = m.prefill(x[:, :5], m.new_cache(1, 16))
        with count_launches() as c:
            got = m.decode_step(x[:, 5:6], torch.tensor([5]), cache)
        want, _ = m.prefill(x[:, 5:6], dyn, check=False)
    print(f"\n{'int8' if int8 else 'fp32'}: {c.total} launches ({len(c.triton)} Triton, {len(c.aten)} ATen: "
          f"{sorted(set(c.aten))})")  # fmt: skip
    # The fused decode kernels: coda 2 layers × 3 + 1, last critic 4 layers × 3 + 1 (today the rest
    # is the unembedding kernel and three ATen ops: embedding, pos + 1, its int32 cast: 24 in all).
    ours = [k for k in c.triton if k in ("_attn_kernel", "_mlp_in_kernel", "_mlp_out_kernel", "_pair_out_kernel")]
    assert len(ours) == 20, c.triton
    assert c.total <= LIMIT, (c.triton, c.aten)
    # ... and the step computes the decode: within twice the fp32 ops path's own error (vs float64;
    # the Student-t logits are ~1e3 at D = 256, so log-probs carry ~1e-5 of fp32 rounding either way)
    # and, with int8 weights, within the same quantization noise as the ops path.
    if not int8:
        m64 = TapeTransformer(65, seq_len=128, embed_dim=256, num_heads=4, dropout=0.0, backend="eager")
        m64 = m64.double().eval()
        m64.load_state_dict(m.state_dict())
        with torch.no_grad():
            exact = m64(x)[0][:, 5:6]
        e_fused, e_ops = float((got.double() - exact).abs().max()), float((want.double() - exact).abs().max())
        assert e_fused <= 2 * e_ops + 1e-6, (e_fused, e_ops)
    else:
        assert float((got.exp() * (got - want)).sum(-1).abs().max()) < 1e-3


def test_ops_mode_is_the_per_op_path(notebook_model: TapeTransformer) -> None:
    """The per-op path stays reachable (``opts.decode = "ops"``) and launches what the issue counted."""
    m = notebook_model
    x = torch.randint(0, 65, (1, 6), generator=torch.Generator().manual_seed(1))
    m.opts.decode = "ops"
    try:
        with torch.no_grad():
            _, cache = m.prefill(x[:, :5], m.new_cache(1, 16))
            with count_launches() as c:
                m.decode_step(x[:, 5:6], torch.tensor([5]), cache)
    finally:
        m.opts.decode = "block"
    print(f"\nops path: {c.total} launches ({len(c.triton)} Triton, {len(c.aten)} ATen)")
    assert c.total > 100


def test_sampled_step_launches() -> None:
    """The device draw adds a handful of launches and no host read: temperature division, top-k
    threshold and one sampling kernel."""
    from tapetransformer.sampling import DeviceRNG, pick_next

    logp = torch.log_softmax(torch.randn(2, 65), -1)
    rng = DeviceRNG(0)
    with count_launches() as c:
        pick_next(logp, temperature=0.8, top_k=5, generator=rng)
    assert len(c.triton) == 1 and c.total <= 4, (c.triton, c.aten)
    assert "_local_scalar_dense" not in c.aten  # no .item() (a host sync on CUDA)
