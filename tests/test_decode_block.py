"""The fused one-token decode kernels (tape_kernels.decode_block) against their eager references.

Each launch is checked on its own (inputs given, outputs and cache writes compared) and a layer pair
end to end, for B = 1 (broadcast GEMVs), 3 (a padded batch tile) and 16 (``tl.dot``), fp32 / fp16 /
int8 weights, every input kind (token embedding with and without RoPE, a given row, the previous
pair's LayerNorm + combine). Oracle: the same dataflow in float64. fp32: max error ≤ 2e-5 relative
to the output's scale. fp16: the kernel's error (vs float64) within 2× PyTorch's own fp16 error of
the same eager dataflow (+ a small floor where that error is near zero). bf16 runs only on a GPU
(the interpreter's bf16 ``tl.dot`` is wrong; the broadcast form is still exercised there at B = 1).
"""

from __future__ import annotations

import pytest
import torch

from tape_kernels import decode_block as db
from tape_kernels.int8 import quantize_weight

H = 4


def make_block(d: int, seq: int, gen: torch.Generator, dtype: torch.dtype, int8: bool) -> db.BlockDecodeWeights:
    f = 8 * d

    def mat(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.randn(n, k, generator=gen) / k**0.5
        if int8:
            q, s = quantize_weight(w)
            return q, s
        return w.to(dtype), None

    def vec(n: int, scale: float = 0.1, base: float = 0.0) -> torch.Tensor:
        return (base + scale * torch.randn(n, generator=gen)).to(dtype)

    w_in, s_in = mat(3 * d, d)
    w_out, s_out = mat(d, d)
    w_exp, s_exp = mat(f, d)
    w_down, s_down = mat(d, f)
    from tapetransformer.reference import rope_frequencies, sinusoidal_positions

    return db.BlockDecodeWeights(
        w_in=w_in, b_in=vec(3 * d), w_out=w_out, b_out=vec(d), ln1_w=vec(d, 0.2, 1.0), ln1_b=vec(d), ln1_eps=1e-5,
        w_exp=w_exp, b_exp=vec(f), w_down=w_down, ln2_w=vec(d, 0.2, 1.0), ln2_b=vec(d), ln2_eps=1e-5,
        pos_emb=sinusoidal_positions(seq, d)[0].to(dtype), rope_freqs=rope_frequencies(d).to(dtype),
        s_in=s_in, s_out=s_out, s_exp=s_exp, s_down=s_down,
    )  # fmt: skip


def as64(w: db.BlockDecodeWeights) -> db.BlockDecodeWeights:
    """The same block with float64 tensors (int8 weights stay int8, the refs dequantize them)."""
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and not k.startswith("s_")
              else v) for k, v in w.__dict__.items()}  # fmt: skip
    return db.BlockDecodeWeights(**kw)


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def check(got: torch.Tensor, want64: torch.Tensor, torch_lp: torch.Tensor | None, dtype: torch.dtype,
          what: str) -> None:
    e = err(got, want64)
    if dtype == torch.float32:
        assert e < 2e-5, f"{what}: {e:.2e}"
    else:
        e_torch = err(torch_lp, want64)
        assert e <= 2 * e_torch + 2e-3, f"{what}: kernel {e:.2e} vs torch {e_torch:.2e}"


CASES = [(1, torch.float32, False), (3, torch.float32, False), (16, torch.float32, False),
         (1, torch.float16, False), (16, torch.float16, False), (1, torch.float32, True), (16, torch.float32, True),
         (1, torch.bfloat16, False)]  # fmt: skip


@pytest.fixture(params=[True, False], ids=["compact", "gpu-tiles"])
def tiling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both tilings through the interpreter: the compact one it uses by default and the GPU's."""
    monkeypatch.setattr(db, "COMPACT_WHEN_INTERPRETING", request.param)
    return request.param


@pytest.mark.parametrize("b, dtype, int8", CASES, ids=[f"B{b}-{str(d)[6:]}{'-int8' if i else ''}" for b, d, i in CASES])
@pytest.mark.parametrize("kind, causal", [(db.EMBED, True), (db.EMBED, False), (db.PLAIN, False), (db.PAIR, True)],
                         ids=["embed-rope", "embed-ref", "plain", "pair"])
def test_layer_launches_match_references(b: int, dtype: torch.dtype, int8: bool, kind: int, causal: bool,
                                         tiling: bool) -> None:
    d, seq, pos = 32, 12, 6
    gen = torch.Generator().manual_seed(b * 7 + kind)
    sides = [make_block(d, seq, gen, dtype, int8) for _ in range(2)]
    prev = tuple(make_block(d, seq, gen, dtype, int8) for _ in range(2))
    x_in = torch.randn(b, d, generator=gen).to(dtype)
    r_prev = torch.randn(2, b, d, generator=gen)  # fp32 workspace rows of the previous layer
    kv = torch.randn(5, 2, b, H, seq, d // H, generator=gen).to(dtype)
    kv[:, :, :, :, pos + 1 :] = float("nan")  # rows past the length are never read
    inp = db.DecodeInput(kind, x=None if kind == db.PAIR else x_in, prev=prev if kind == db.PAIR else (), combine=1)
    inp64 = db.DecodeInput(kind, x=None if kind == db.PAIR else x_in.double(),
                           prev=tuple(as64(p) for p in prev) if kind == db.PAIR else (), combine=1)  # fmt: skip
    s64 = [as64(s) for s in sides]
    ws = db.Workspace(2, b, d, 8 * d, torch.device("cpu"))
    ws.r.copy_(r_prev)
    kv_k = kv.clone()
    db.decode_layer(inp, sides, kv_k, 2, torch.tensor([pos]), ws, causal, H)

    kv64 = kv.double()
    x64, o64 = db.attn_ref(inp64, r_prev.double(), s64, kv64, 2, pos, causal, H, torch.float64)
    kv_lp = kv.clone()
    x_lp, o_lp = db.attn_ref(inp, r_prev.to(dtype), sides, kv_lp, 2, pos, causal, H, dtype)
    check(ws.x, x64, x_lp, dtype, "x")
    check(ws.o, o64, o_lp, dtype, "attention")
    check(kv_k[2:4, :, :, :, pos], kv64[2:4, :, :, :, pos], kv_lp[2:4, :, :, :, pos], dtype, "K/V row")
    assert torch.equal(torch.cat([kv_k[:2], kv_k[4:]]).nan_to_num(7.0), torch.cat([kv[:2], kv[4:]]).nan_to_num(7.0))
    other_rows = [t for t in range(seq) if t != pos]
    assert torch.equal(kv_k[2:4, :, :, :, other_rows].nan_to_num(7.0), kv[2:4, :, :, :, other_rows].nan_to_num(7.0))

    # Launches 2 and 3 from the kernel's own launch-1 outputs, so each is judged on its own.
    h64, a64 = db.mlp_in_ref(ws.o.double(), ws.x.double(), s64, torch.float64)
    h_lp, a_lp = db.mlp_in_ref(ws.o.to(dtype), ws.x.to(dtype), sides, dtype)
    check(ws.h, h64, h_lp, dtype, "LN_attn")
    check(ws.a, a64, a_lp, dtype, "activation")
    r64 = db.mlp_out_ref(ws.a.double(), ws.h.double(), s64, torch.float64)
    r_lp = db.mlp_out_ref(ws.a.to(dtype), ws.h.to(dtype), sides, dtype)
    check(ws.r, r64, r_lp, dtype, "down + residual")

    out = torch.empty(b, d, dtype=dtype)
    db.decode_finish(ws, sides, 0, out)
    check(out, db.decode_finish_ref(ws.r.double(), s64, 0, torch.float64),
          db.decode_finish_ref(ws.r.to(dtype), sides, 0, dtype), dtype, "LN_mlp + combine")  # fmt: skip


def test_single_block_and_long_cache(tiling: bool) -> None:
    """One block (grid side dim 1, no combine) over a cache longer than one key step, B = 2."""
    d, seq, pos, b = 64, 200, 150, 2
    gen = torch.Generator().manual_seed(3)
    blk = make_block(d, seq, gen, torch.float32, False)
    kv = torch.randn(1, 2, b, H, seq, d // H, generator=gen)
    x = torch.randn(b, d, generator=gen)
    ws = db.Workspace(1, b, d, 8 * d, torch.device("cpu"))
    kv_k = kv.clone()
    db.decode_layer(db.DecodeInput(db.EMBED, x=x), [blk], kv_k, 0, torch.tensor([pos]), ws, True, H)
    out = db.decode_finish(ws, [blk], 0, torch.empty(b, d))
    kv64 = kv.double()
    b64 = as64(blk)
    x64, o64 = db.attn_ref(db.DecodeInput(db.EMBED, x=x.double()), None, [b64], kv64, 0, pos, True, H, torch.float64)
    h64, a64 = db.mlp_in_ref(o64, x64, [b64], torch.float64)
    r64 = db.mlp_out_ref(a64, h64, [b64], torch.float64)
    want = db.decode_finish_ref(r64, [b64], 0, torch.float64)
    assert err(out, want) < 2e-5
    assert err(kv_k[..., pos, :], kv64[..., pos, :]) < 2e-6


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_cuda_layer_matches_reference(b: int, dtype: torch.dtype, int8: bool) -> None:
    """Compiled kernels at the notebook's D = 256 (F = 2048, dh = 64) against float64."""
    dev = torch.device("cuda")
    d, seq, pos = 256, 128, 70
    gen = torch.Generator().manual_seed(b)
    sides = [make_block(d, seq, gen, dtype, int8) for _ in range(2)]
    prev = tuple(make_block(d, seq, gen, dtype, int8) for _ in range(2))
    r_prev = torch.randn(2, b, d, generator=gen)
    kv = torch.randn(2, 2, b, H, seq, d // H, generator=gen).to(dtype)

    def on(w: db.BlockDecodeWeights) -> db.BlockDecodeWeights:
        moved = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in w.__dict__.items()}
        return db.BlockDecodeWeights(**moved)

    inp = db.DecodeInput(db.PAIR, prev=tuple(on(p) for p in prev), combine=1)
    ws = db.Workspace(2, b, d, 8 * d, dev)
    ws.r.copy_(r_prev)
    kv_d = kv.to(dev)
    db.decode_layer(inp, [on(s) for s in sides], kv_d, 0, torch.tensor([pos], device=dev), ws, True, H)
    out = db.decode_finish(ws, [on(s) for s in sides], 1, torch.empty(b, d, device=dev, dtype=dtype))
    s64 = [as64(s) for s in sides]
    inp64 = db.DecodeInput(db.PAIR, prev=tuple(as64(p) for p in prev), combine=1)
    kv64 = kv.double()
    x64, o64 = db.attn_ref(inp64, r_prev.double(), s64, kv64, 0, pos, True, H, torch.float64)
    h64, a64 = db.mlp_in_ref(o64, x64, s64, torch.float64)
    want = db.decode_finish_ref(db.mlp_out_ref(a64, h64, s64, torch.float64), s64, 1, torch.float64)
    kv_lp = kv.clone()
    inp_lp = db.DecodeInput(db.PAIR, prev=prev, combine=1)
    x_lp, o_lp = db.attn_ref(inp_lp, r_prev.to(dtype), sides, kv_lp, 0, pos, True, H, dtype)
    h_lp, a_lp = db.mlp_in_ref(o_lp, x_lp, sides, dtype)
    torch_lp = db.decode_finish_ref(db.mlp_out_ref(a_lp, h_lp, sides, dtype), sides, 1, dtype)
    check(out.cpu(), want, torch_lp, dtype, f"layer B={b}")


# ------------------------------------------------------------------------------------ the model


def _tiny(causal: bool) -> tuple:
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(2)
    kw = dict(seq_len=12, embed_dim=32, num_heads=1, dropout=0.0, causal=causal)
    m = TapeTransformer(13, backend="triton", **kw).eval()
    m64 = TapeTransformer(13, backend="eager", **kw).double().eval()
    m64.load_state_dict(m.state_dict())
    return m, m64


@pytest.mark.parametrize(
    ("b", "causal"),
    [(1, False), (4, False), (1, True), (4, True), (16, True)],  # B = 16: the tl.dot batch tile, once
    ids=["reference-1", "reference-4", "causal-1", "causal-4", "causal-16"],
)
def test_model_decode_step_in_batches(b: int, causal: bool) -> None:
    """The model's static step through the fused kernels at B = 1, 4, 16 against float64: within
    twice the error of the per-op static step (``opts.decode = "ops"``); the same K/V rows."""
    m, m64 = _tiny(causal)
    x = torch.randint(0, 13, (b, 8), generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        _, c_fused = m.prefill(x[:, :3], m.new_cache(b, 12))
        _, c_ops = m.prefill(x[:, :3], m.new_cache(b, 12))
        _, c64 = m64.prefill(x[:, :3], m64.new_cache(b, 12))
        for t in range(3, 5):
            got = m.decode_step(x[:, t : t + 1], torch.tensor([t]), c_fused)
            m.opts.decode = "ops"
            try:
                ops = m.decode_step(x[:, t : t + 1], torch.tensor([t]), c_ops)
            finally:
                m.opts.decode = "block"
            want, c64 = m64.prefill(x[:, t : t + 1], c64)
            e_fused, e_ops = err(got, want), err(ops, want)
            assert got.shape == (b, 1, 13) and e_fused <= 2 * e_ops + 1e-6, (t, e_fused, e_ops)
        kv64 = c64.kv[..., :5, :]
        assert err(c_fused.kv[..., :5, :], kv64) <= 2 * err(c_ops.kv[..., :5, :], kv64) + 1e-7


def test_model_int8_decode_step_matches_the_int8_ops_path() -> None:
    """int8 weights (weight-only both ways): the fused step and the per-op step agree to fp32 rounding."""
    m, _ = _tiny(True)
    x = torch.randint(0, 13, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), m.int8_weights(act_quant=False):
        _, c1 = m.prefill(x[:, :6], m.new_cache(4, 12))
        _, c2 = m.prefill(x[:, :6], m.new_cache(4, 12))
        got = m.decode_step(x[:, 6:], torch.tensor([6]), c1)
        m.opts.decode = "ops"
        try:
            want = m.decode_step(x[:, 6:], torch.tensor([6]), c2)
        finally:
            m.opts.decode = "block"
    assert err(got, want) < 2e-5


def test_batched_greedy_generation_equals_the_ops_path() -> None:
    """generate() on the fused static step (CPU, interpreter) and on the per-op path: same tokens."""
    from tapetransformer.generate import generate

    m, _ = _tiny(True)
    prompt = torch.randint(0, 13, (4, 3), generator=torch.Generator().manual_seed(4))
    got = generate(m, prompt, 6, greedy=True)
    m.opts.decode = "ops"
    try:
        want = generate(m, prompt, 6, greedy=True)
    finally:
        m.opts.decode = "block"
    assert torch.equal(got, want)


@pytest.mark.parametrize("first", [True, False], ids=["embedding", "prev_h"])
def test_block_decode_step_matches_the_ops_path(first: bool) -> None:
    """One block's own static step (one side: four launches) against its per-op step."""
    m, _ = _tiny(True)
    blk = m.residualheads[-1].blocks_right[2]
    gen = torch.Generator().manual_seed(8)
    c1 = m.new_cache(3, 12)
    c1.kv.copy_(torch.randn(c1.kv.shape, generator=gen))
    c2 = m.new_cache(3, 12)
    c2.kv.copy_(c1.kv)
    tok = torch.randn(3, 1, 32, generator=gen)
    prev = None if first else torch.randn(3, 2, 32, generator=gen)
    pos = torch.tensor([7])
    with torch.no_grad():
        got = blk.decode_step(tok, prev, c1.block(1, 2, 1), pos, (pos + 1).int())
        m.opts.decode = "ops"
        try:
            want = blk.decode_step(tok, prev, c2.block(1, 2, 1), pos, (pos + 1).int())
        finally:
            m.opts.decode = "block"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(c1.kv, c2.kv, atol=2e-6, rtol=2e-5)
