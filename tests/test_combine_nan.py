"""Non-finite values through every TapeHead combine path (mode 0 sigmoid-XOR, 1 pair softmax, 2 sum).

A NaN or +inf in one stream (left only, right only) must give NaN exactly where the eager reference
(``tapetransformer.reference.combine_heads``) gives NaN, and nowhere else: the eager pair softmax is
max-subtracted, so +inf there is NaN (inf − inf), where the sigmoid form σ(hl − hr)·hl + … would give
inf. Paths: the eager combines (reference, ``tapehead_combine_ref``, decode_block's ``decode_finish_ref``), the combine
kernel, the combine fused into ``grouped_mlp_add_layer_norm``'s LayerNorm epilogue, and decode_block's
``_pair_out_kernel`` (the LayerNorm + combine the next layer's first launch runs too). The kernel paths
get the non-finite value through one column of one side's LayerNorm weight, so that it reaches one
stream in one column (a non-finite input row would make its whole LayerNorm row NaN).
"""

from __future__ import annotations

import pytest
import torch

from tape_kernels import decode_block as db
from tape_kernels.combine import tapehead_combine, tapehead_combine_ref
from tape_kernels.fused_linear import grouped_mlp_add_layer_norm, grouped_mlp_add_layer_norm_ref
from tapetransformer.reference import combine_heads

MODES = (0, 1, 2)
BAD = (float("nan"), float("inf"))
M, D, COL = 3, 16, 5


def _streams(side: int, bad: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hl, hr = torch.randn(2, M, D, generator=gen).unbind(0)
    (hl if side == 0 else hr)[:, COL] = bad
    return hl, hr


def _same_nans(got: torch.Tensor, want: torch.Tensor) -> None:
    assert want.isnan().any(), "the reference has no NaN: the test would not test anything"
    where = f"NaN at {got.isnan().nonzero().tolist()}, want {want.isnan().nonzero().tolist()}"
    assert torch.equal(got.isnan(), want.isnan()), where


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_eager_and_kernel_combines(mode: int, side: int, bad: float) -> None:
    hl, hr = _streams(side, bad)
    want = combine_heads(hl, hr, mode)
    if not want.isnan().any():  # sigmoid-XOR and sum of +inf are finite / inf: nothing may turn NaN
        for got in (tapehead_combine_ref(hl, hr, mode), tapehead_combine(hl, hr, mode, backend="triton")):
            assert not got.isnan().any()
        return
    _same_nans(tapehead_combine_ref(hl, hr, mode), want)
    _same_nans(tapehead_combine(hl, hr, mode, backend="triton"), want)


def _ln_params(side: int, bad: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ws = [1.0 + 0.1 * torch.randn(D, generator=gen) for _ in range(2)]
    bs = [0.1 * torch.randn(D, generator=gen) for _ in range(2)]
    ws[side][COL] = bad
    return ws, bs


def _want(ys: torch.Tensor, mode: int) -> torch.Tensor:
    return combine_heads(ys[0], ys[1], mode)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_fused_layer_norm_combine(mode: int, side: int, bad: float) -> None:
    """The combine in ``_fl_fwd_kernel``'s LayerNorm epilogue."""
    gen = torch.Generator().manual_seed(2)
    f = 2 * D
    h = torch.randn(2, M, D, generator=gen)
    we = [torch.randn(f, D, generator=gen) / D**0.5 for _ in range(2)]
    be = [0.1 * torch.randn(f, generator=gen) for _ in range(2)]
    wl = [torch.randn(D, f, generator=gen) / f**0.5 for _ in range(2)]
    lw, lb = _ln_params(side, bad)
    want = _want(grouped_mlp_add_layer_norm_ref(h, we, be, wl, lw, lb), mode)
    got = grouped_mlp_add_layer_norm(h, we, be, wl, lw, lb, combine=mode, backend="triton")
    if want.isnan().any():
        _same_nans(got, want)
    else:
        assert not got.isnan().any()


def _block(ln_w: torch.Tensor, ln_b: torch.Tensor) -> db.BlockDecodeWeights:
    e = torch.empty(0)
    return db.BlockDecodeWeights(
        w_in=e, b_in=e, w_out=e, b_out=e, ln1_w=e, ln1_b=e, ln1_eps=1e-5, w_exp=e, b_exp=e, w_down=e,
        ln2_w=ln_w, ln2_b=ln_b, ln2_eps=1e-5, pos_emb=e, rope_freqs=e,
    )  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_decode_pair_input(mode: int, side: int, bad: float) -> None:
    """decode_block's ``_pair_input`` (LN_mlp of both sides + combine), through ``decode_finish``."""
    lw, lb = _ln_params(side, bad)
    sides = [_block(w, b) for w, b in zip(lw, lb)]
    ws = db.Workspace(2, M, D, 8 * D, torch.device("cpu"))
    ws.r.copy_(torch.randn(2, M, D, generator=torch.Generator().manual_seed(3)))
    got = db.decode_finish(ws, sides, mode, torch.empty(M, D))
    ys = torch.stack([torch.nn.functional.layer_norm(ws.r[i], (D,), lw[i], lb[i], 1e-5) for i in range(2)])
    want = _want(ys, mode)
    assert torch.equal(db.decode_finish_ref(ws.r, sides, mode, torch.float32).isnan(), want.isnan())
    if want.isnan().any():
        _same_nans(got, want)
    else:
        assert not got.isnan().any()
