"""One-token decode of TapeHead blocks in three launches per layer (a left/right pair at once).

The static decode step of a ``TapeHeadBlock`` (inference, one new token per sequence, the position on
the device) is, for the block's input x (B, D)::

    q, k, v = x·W_inᵀ + b_in               (3D, D) GEMV; k, v written to the cache at row ``pos``
    o       = softmax(q·Kᵀ/√dh)·V          per attention head over cache rows 0 .. pos
    h       = LN_attn(x + o·W_outᵀ + b_out)
    a       = act(h·W_expᵀ + b_exp)         (8D, D) GEMV, the bounded ReferenceActivation
    y       = LN_mlp(h + a·W_downᵀ)         (D, 8D) GEMV

and a TapeHead combines its left and right blocks' outputs after every layer. The ops path runs
that as ~11 launches a block. Here a layer's two blocks run in the same three launches (grid dim 0 is
the side), so one layer of a TapeHead costs three launches and one block 1.5:

1. ``_attn_kernel`` (grid: side × attention head × batch tile): the block input — the token embedding
   plus its positional row (RoPE at ``pos`` in causal mode), the previous layer's output given as a
   tensor, or the previous layer's pre-LayerNorm rows ``LN_mlp`` + combine of its *pair* (the combine
   folded into this launch) — then the head's q/k/v rows of the in-projection, the K/V write at the
   device-side position and the attention over the cache (the filled length is ``pos + 1``, read on
   the device, so one CUDA-graph capture serves every position).
2. ``_mlp_in_kernel`` (grid: side × expand tile × batch tile): out-projection + bias + residual +
   LN_attn (every program computes the whole D-row it needs: the out-projection is D² weights, read
   once from DRAM and from L2 by the other programs of the side) + its tile of the expand GEMV +
   bias + activation.
3. ``_mlp_out_kernel`` (grid: side × output tile × batch tile): the down GEMV + residual, written as
   pre-LayerNorm rows; ``LN_mlp`` and the combine run in the next layer's first launch, or in
   ``_pair_out_kernel`` after a head's last layer (one launch per head).

Intermediates between launches are fp32 rows in a small workspace (B·(5D + 8D) floats a side); only
the K/V cache rows are stored in the model's dtype. Every GEMV accumulates in fp32. Weights are fp32,
fp16, bf16 (the activations' dtype) or int8 with one fp32 scale per output channel (weight-only,
W8A16: ``y = (x·qᵀ)·s + b``, the dequantization folded into the epilogue).

GEMV tiles: for B = 1 each product is a broadcast multiply and a row reduction in fp32 registers
(``[BB, BN, BK]`` tiles of ≤ 8192 elements); for B ≥ 16 rows (a batch tile of 16) ``tl.dot``, except
the fp32 in-projection (broadcast tiles: see ``tiles``). The
weights are the whole memory traffic at decode size — per layer pair at the notebook size (D = 256,
B = 1): in-projection 2·3D·D, out-projection 2·D², expand 2·8D·D and down 2·8D·D elements, i.e.
2.6 M weights (2.6 MB in int8); the cache adds 2·2·pos·D elements, the workspace a few KB.

Eager references (``*_ref``) of every launch are the test oracle; ``decode_layer`` and
``decode_finish`` run a layer pair / finish a head. Inference only: no autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tape_kernels._dispatch import interpreting, triton_available
from tape_kernels._utils import KERNEL_DTYPES, LOG2E, TRITON_TYPE, dot_precision, next_pow2, rtne_bf16
from tape_kernels.activation import reference_activation_ref
from tape_kernels.combine import tapehead_combine_ref

__all__ = [
    "BlockDecodeWeights",
    "DecodeInput",
    "Workspace",
    "attn_ref",
    "decode_finish",
    "decode_finish_ref",
    "decode_layer",
    "decode_supported",
    "mlp_in_ref",
    "mlp_out_ref",
]

# Largest embedding dim the register tiles serve (the row of a LayerNorm lives in one program).
MAX_D = 1024
# Elements of one broadcast-product tile [BB, BN, BK]: 32 fp32 registers a thread at 8 warps.
_TILE = 8192
# Under TRITON_INTERPRET=1 use the compact tiles (see ``tiles``); tests set it False to run the
# GPU tiling through the interpreter.
COMPACT_WHEN_INTERPRETING = True
# Input kinds of a layer's first launch.
EMBED, PLAIN, PAIR = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Host-side description of a block's weights and a layer's input
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDecodeWeights:
    """What one TapeHeadBlock's decode step reads. ``s_*`` are the per-channel fp32 scales of int8
    weights (None: float weights in the activations' dtype). Shapes: w_in (3D, D), w_out (D, D),
    w_exp (F, D), w_down (D, F), biases and LayerNorm parameters 1-D; pos_emb (seq_len, D),
    rope_freqs (D/2,)."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln1_eps: float
    w_exp: torch.Tensor
    b_exp: torch.Tensor
    w_down: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    ln2_eps: float
    pos_emb: torch.Tensor
    rope_freqs: torch.Tensor
    s_in: torch.Tensor | None = None
    s_out: torch.Tensor | None = None
    s_exp: torch.Tensor | None = None
    s_down: torch.Tensor | None = None

    @property
    def int8(self) -> bool:
        return self.s_in is not None


@dataclass(frozen=True)
class DecodeInput:
    """The input of a layer: ``kind`` EMBED (``x`` = token embeddings (B, D); each block adds its
    positional row, RoPE-rotated in causal mode), PLAIN (``x`` = the previous output (B, D)) or PAIR
    (the previous layer's pre-LayerNorm rows in the workspace, normalised with ``prev``'s ``ln2`` and
    combined with ``combine`` when ``prev`` holds two blocks)."""

    kind: int
    x: torch.Tensor | None = None
    prev: tuple[BlockDecodeWeights, ...] = ()
    combine: int = 2


class Workspace:
    """fp32 rows passed between the launches of a layer, for ``ns`` blocks side by side."""

    def __init__(self, ns: int, b: int, d: int, f: int, device: torch.device) -> None:
        self.ns, self.b, self.d, self.f = ns, b, d, f
        n = ns * b * d
        buf = torch.empty(5 * n + ns * b * f, device=device, dtype=torch.float32)
        self.x, self.q, self.o, self.h, self.r = (buf[i * n : (i + 1) * n].view(ns, b, d) for i in range(5))
        self.a = buf[5 * n :].view(ns, b, f)


# --------------------------------------------------------------------------------------------------
# Eager references (the test oracle): the same dataflow in plain PyTorch, in the inputs' dtype
# --------------------------------------------------------------------------------------------------


def _w(w: torch.Tensor, s: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A weight in ``dtype``: int8 dequantized as ``q·s`` (``int8_linear_ref``'s weight-only math)."""
    return w.to(dtype) if s is None else (w.float() * s.float()[:, None]).to(dtype)


def input_ref(inp: DecodeInput, r: torch.Tensor | None, blk: BlockDecodeWeights, pos: int, causal: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """The block input x (B, D) in ``dtype``; ``r`` the previous layer's pre-LN rows (PAIR)."""
    if inp.kind == PLAIN:
        return inp.x.to(dtype)
    if inp.kind == EMBED:
        x = inp.x.to(dtype) + blk.pos_emb[pos if causal else 0].to(dtype)
        if causal:
            theta = torch.tensor(float(pos), dtype=dtype) * blk.rope_freqs.to(dtype)
            c, s = theta.cos(), theta.sin()
            out = torch.empty_like(x)
            out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
            out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
            x = out
        return x
    ys = [F.layer_norm(r[i].to(dtype), r.shape[-1:], p.ln2_w.to(dtype), p.ln2_b.to(dtype), p.ln2_eps)
          for i, p in enumerate(inp.prev)]  # fmt: skip
    return ys[0] if len(ys) == 1 else tapehead_combine_ref(ys[0], ys[1], inp.combine)


def attn_ref(inp: DecodeInput, r: torch.Tensor | None, sides: Sequence[BlockDecodeWeights], kv: torch.Tensor,
             blk0: int, pos: int, causal: bool, num_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1: -> (x (NS, B, D), o (NS, B, D)) in ``dtype``; writes k, v at row ``pos`` of the cache
    blocks ``blk0 + side`` of ``kv`` (n_blocks, 2, B, H, capacity, dh)."""
    xs, os_ = [], []
    for side, w in enumerate(sides):
        x = input_ref(inp, r, w, pos, causal, dtype)
        b, d = x.shape
        dh = d // num_heads
        qkv = F.linear(x, _w(w.w_in, w.s_in, dtype), w.b_in.to(dtype))
        q, k, v = qkv.view(b, 3, num_heads, dh).unbind(1)  # (B, H, dh)
        kv[blk0 + side, 0, :, :, pos] = k.to(kv.dtype)
        kv[blk0 + side, 1, :, :, pos] = v.to(kv.dtype)
        keys = kv[blk0 + side, 0, :, :, : pos + 1].to(dtype)  # (B, H, T, dh)
        vals = kv[blk0 + side, 1, :, :, : pos + 1].to(dtype)
        p = torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) / math.sqrt(dh), dim=-1)
        os_.append(torch.einsum("bht,bhtd->bhd", p, vals).reshape(b, d))
        xs.append(x)
    return torch.stack(xs), torch.stack(os_)


def mlp_in_ref(o: torch.Tensor, x: torch.Tensor, sides: Sequence[BlockDecodeWeights],
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 2: o, x (NS, B, D) -> (h (NS, B, D), a (NS, B, F))."""
    hs, as_ = [], []
    for side, w in enumerate(sides):
        y = F.linear(o[side].to(dtype), _w(w.w_out, w.s_out, dtype), w.b_out.to(dtype))
        h = F.layer_norm(x[side].to(dtype) + y, y.shape[-1:], w.ln1_w.to(dtype), w.ln1_b.to(dtype), w.ln1_eps)
        z = F.linear(h, _w(w.w_exp, w.s_exp, dtype)) + w.b_exp.to(dtype)
        hs.append(h)
        as_.append(reference_activation_ref(z))
    return torch.stack(hs), torch.stack(as_)


def mlp_out_ref(a: torch.Tensor, h: torch.Tensor, sides: Sequence[BlockDecodeWeights], dtype: torch.dtype) -> torch.Tensor:
    """Launch 3: a (NS, B, F), h (NS, B, D) -> pre-LayerNorm rows h + a·W_downᵀ (NS, B, D)."""
    return torch.stack([h[i].to(dtype) + F.linear(a[i].to(dtype), _w(w.w_down, w.s_down, dtype))
                        for i, w in enumerate(sides)])  # fmt: skip


def decode_finish_ref(r: torch.Tensor, sides: Sequence[BlockDecodeWeights], combine: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """A head's output (B, D) from its last layer's pre-LN rows r (NS, B, D)."""
    return input_ref(DecodeInput(PAIR, prev=tuple(sides), combine=combine), r, sides[0], 0, False, dtype)


# The Triton kernels live in tape_kernels._decode_block_kernels.
if triton_available():
    import triton.language as tl

    from tape_kernels._decode_block_kernels import _attn_kernel, _mlp_in_kernel, _mlp_out_kernel, _pair_out_kernel


# --------------------------------------------------------------------------------------------------
# Tiles and launchers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    bb: int  # batch rows a program
    use_dot: bool  # launches 2 and 3
    dot1: bool  # launch 1's in-projection
    bd: int  # next_pow2(D)
    bdh: int  # head dim tile
    bn1: int  # in-projection rows a step (launch 1)
    bt: int  # cache rows a step (launch 1)
    bk2: int  # out-projection K step (launch 2)
    bn2: int  # expand rows a step (launch 2)
    f_per_prog: int  # expand rows a program (launch 2)
    bn3: int  # output channels a program (launch 3)
    bk3: int  # down-projection K step (launch 3)
    warps: int


def tiles(b: int, d: int, dh: int, f: int, dtype: torch.dtype, compact: bool | None = None) -> _Tiles:
    """Tile sizes for batch b, embedding dim d, head dim dh, expand width f.

    ``compact`` (default: under the interpreter, see ``COMPACT_WHEN_INTERPRETING``): the fewest
    programs and loop steps (one program per side in launches 2 and 3, whole-row tiles): the
    interpreter pays per program and per device-function call, not per element. The GPU tiles keep
    each broadcast product within ``_TILE`` elements (registers) and spread a side over many SMs."""
    if compact is None:
        compact = COMPACT_WHEN_INTERPRETING and interpreting()
    bb = 1 if b == 1 else min(16, next_pow2(b))
    # tl.dot wants ≥ 16 rows; the interpreter's bf16 dot is wrong, so it keeps the broadcast form there.
    use_dot = bb >= 16 and not (dtype == torch.bfloat16 and interpreting())
    bd = max(16, next_pow2(d)) if use_dot else next_pow2(d)
    bdh = max(16, next_pow2(dh)) if use_dot else next_pow2(dh)
    budget = _TILE * 64 if compact else _TILE

    def fit(*fixed: int, lo: int = 1, hi: int = 1 << 30) -> int:
        # The largest power of two with prod(fixed)·n ≤ budget, within [lo, hi].
        n = budget
        for v in fixed:
            n //= v
        return max(lo, min(hi, next_pow2(n + 1) // 2 if n >= 1 else 1))

    dot1 = use_dot
    if use_dot and not compact:
        # Chosen from ptxas on sm_86 (benchmarks/results/kernels-sm_86.md) to keep every B = 16 config
        # free of register spills. An fp32 IEEE tl.dot lowers to FMAs with each thread holding whole
        # K rows of both operands: at K = D = 256 launch 1 spilled 5.3 KB, so there the in-projection
        # is the broadcast product in [16, BN, D] tiles of ≤ _TILE elements; 16-bit dots use the tensor
        # cores, 16 weight rows a step.
        dot1 = dtype != torch.float32
        bn1 = 16 if dot1 else fit(bb, bd, hi=bdh)
        bk2, bn2 = (32, 32) if dot1 else (16, 16)
        bk3, bn3 = 64, 16
    elif use_dot:
        bn1, bk2, bn2, bk3, bn3 = bdh, bd, min(next_pow2(f), 256), min(next_pow2(f), 256), bd
    else:
        bn1 = fit(bb, bd, hi=bdh)
        bk2 = fit(bb, bd, hi=bd)
        bn2 = fit(bb, bd, hi=next_pow2(f)) if compact else bn1
        bn3 = bd if compact else min(16, next_pow2(d))
        bk3 = fit(bb, bn3, hi=next_pow2(f))
    # B = 16 holds [16, BT, dh] key and value tiles and their products at once: half the budget.
    bt = fit(bb, bdh, 2 if (use_dot and not compact) else 1, hi=64)
    # Expand rows a program: as many as the out-projection has weights (D² ≈ f_per_prog·D), so the
    # redundant out-projection at most doubles launch 2's L2 traffic while the side spreads over
    # f/D programs.
    f_per_prog = f if compact else max(bn2, next_pow2(d))
    f_per_prog = _cdiv(f_per_prog, bn2) * bn2
    warps = 8 if bd >= 256 or bb >= 16 else 4
    return _Tiles(bb, use_dot, dot1, bd, bdh, bn1, bt, bk2, bn2, f_per_prog, bn3, bk3, warps)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tl_dtype(dtype: torch.dtype):  # noqa: ANN202
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def decode_supported(sides: Sequence[BlockDecodeWeights], kv: torch.Tensor, num_heads: int) -> bool:
    """Whether the fused decode kernels serve these blocks and this cache (else the ops path runs)."""
    w0 = sides[0]
    d = w0.w_in.shape[1]
    dt = kv.dtype
    if dt not in KERNEL_DTYPES or d > MAX_D or d % num_heads:
        return False
    if kv.stride(-1) != 1 or kv.shape[-1] * num_heads != d:
        return False
    for w in sides:
        if w.int8 != w0.int8:
            return False
        mats = (w.w_in, w.w_out, w.w_exp, w.w_down)
        if any(m.device != kv.device or not m.is_contiguous() for m in mats):
            return False
        if not w.int8 and any(m.dtype != dt for m in mats):
            return False
        if w.int8 and any(m.dtype != torch.int8 for m in mats):
            return False
        vecs = (w.b_in, w.b_out, w.ln1_w, w.ln1_b, w.b_exp, w.ln2_w, w.ln2_b, w.rope_freqs)
        if any(v.device != kv.device or v.stride(-1) != 1 for v in vecs) or w.pos_emb.stride(-1) != 1:
            return False
    return True


def _scale(w: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return w if w is not None else like  # never read when the weights are float


def decode_layer(inp: DecodeInput, sides: Sequence[BlockDecodeWeights], kv: torch.Tensor, blk0: int,
                 pos: torch.Tensor, ws: Workspace, causal: bool, num_heads: int) -> None:
    """One layer of ``len(sides)`` (1 or 2) blocks for one new token: three launches. The blocks'
    K/V go to cache blocks ``blk0 + side`` of ``kv`` at row ``pos`` ((1,) int64 on the device); their
    pre-LayerNorm outputs to ``ws.r``. A PAIR input reads the previous layer's ``ws.r``."""
    ns = len(sides)
    l_, r_ = sides[0], sides[-1]
    b, d = ws.b, ws.d
    f = l_.w_exp.shape[0]
    dh = d // num_heads
    dt = kv.dtype
    t = tiles(b, d, dh, f, dt)
    nbt = _cdiv(b, t.bb)
    prec = dot_precision(dt)
    i8 = l_.int8
    if inp.kind == PAIR:
        p0, p1 = inp.prev[0], inp.prev[-1]
        xin, sxb = ws.r, 0
        ns_prev = len(inp.prev)
        g0, be0, g1, be1, e0, e1 = p0.ln2_w, p0.ln2_b, p1.ln2_w, p1.ln2_b, p0.ln2_eps, p1.ln2_eps
    else:
        xin = inp.x
        sxb = xin.stride(0)
        ns_prev = 1
        g0 = be0 = g1 = be1 = l_.ln2_w  # not read
        e0 = e1 = 0.0
    _attn_kernel[(ns, num_heads, nbt)](
        xin, sxb, ws.r, g0, be0, g1, be1, e0, e1,
        l_.pos_emb, r_.pos_emb, l_.pos_emb.stride(0), l_.rope_freqs, r_.rope_freqs, pos,
        l_.w_in, r_.w_in, _scale(l_.s_in, l_.b_in), _scale(r_.s_in, r_.b_in), l_.b_in, r_.b_in,
        kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), kv.stride(4), blk0,
        ws.x, ws.q, ws.o,
        b, d, dh, num_heads, LOG2E / math.sqrt(dh),
        IN_MODE=inp.kind, CAUSAL=causal, NS_PREV=ns_prev, COMBINE=inp.combine, IS_INT8=i8,
        BB=t.bb, BD=t.bd, BDH=t.bdh, BN=t.bn1, BT=t.bt, USE_DOT=t.dot1, PREC=prec, RTNE_BF16=rtne_bf16(dt),
        num_warps=t.warps,
    )  # fmt: skip
    ddt = _tl_dtype(dt)
    _mlp_in_kernel[(ns, _cdiv(f, t.f_per_prog), nbt)](
        ws.o, ws.x, ws.h, ws.a,
        l_.w_out, r_.w_out, _scale(l_.s_out, l_.b_out), _scale(r_.s_out, r_.b_out), l_.b_out, r_.b_out,
        l_.ln1_w, r_.ln1_w, l_.ln1_b, r_.ln1_b, l_.ln1_eps, r_.ln1_eps,
        l_.w_exp, r_.w_exp, _scale(l_.s_exp, l_.b_exp), _scale(r_.s_exp, r_.b_exp), l_.b_exp, r_.b_exp,
        b, d, f, t.f_per_prog,
        IS_INT8=i8, BB=t.bb, BD=t.bd, BK=t.bk2, BN=t.bn2, USE_DOT=t.use_dot, PREC=prec, DDT=ddt,
        num_warps=t.warps,
    )  # fmt: skip
    _mlp_out_kernel[(ns, _cdiv(d, t.bn3), nbt)](
        ws.a, ws.h, ws.r, l_.w_down, r_.w_down, _scale(l_.s_down, l_.b_out), _scale(r_.s_down, r_.b_out),
        b, d, f,
        IS_INT8=i8, BB=t.bb, BN=t.bn3, BK=t.bk3, USE_DOT=t.use_dot, PREC=prec, DDT=ddt,
        num_warps=4,
    )  # fmt: skip


def decode_finish(ws: Workspace, sides: Sequence[BlockDecodeWeights], combine: int, out: torch.Tensor) -> torch.Tensor:
    """LN_mlp (+ combine of a pair) of the last layer's ``ws.r`` into ``out`` (B, D): one launch."""
    b, d = ws.b, ws.d
    bb = 1 if b == 1 else min(16, next_pow2(b))
    p0, p1 = sides[0], sides[-1]
    _pair_out_kernel[(_cdiv(b, bb),)](
        ws.r, p0.ln2_w, p0.ln2_b, p1.ln2_w, p1.ln2_b, p0.ln2_eps, p1.ln2_eps, out, out.stride(0), b, d,
        NS_PREV=len(sides), COMBINE=combine, BB=bb, BD=next_pow2(d), RTNE_BF16=rtne_bf16(out.dtype),
        num_warps=8 if d >= 256 else 4,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# --------------------------------------------------------------------------------------------------


def aot_specs() -> list:
    """The notebook's shapes (D = 256, dh = 64, F = 2048) at B = 1 (broadcast GEMVs) and B = 16
    (``tl.dot``), for fp32/fp16/bf16 activations with float and int8 weights, every input mode."""
    if not triton_available():
        return []
    from tape_kernels._aot import AotSpec, signature

    specs = []
    d, dh, f = 256, 64, 2048
    f32 = torch.float32
    # The sizes B, D, DH, NH, F are UPPERCASE scalars; the float scalars are not annotated.
    scalars = {**dict.fromkeys(("B", "D", "DH", "NH", "F"), "i32"),
               **dict.fromkeys(("eps0", "eps1", "qk_scale2"), "fp32")}  # fmt: skip

    def spec(name: str, kernel, dtype: torch.dtype, ptrs: dict, consts: dict, warps: int) -> AotSpec:  # noqa: ANN001
        return AotSpec(name, kernel, signature(kernel, dtype, ptrs, scalars), consts, warps, 1)

    for dtype in KERNEL_DTYPES:
        ddt = _tl_dtype(dtype)
        for i8 in (False, True):
            wt = torch.int8 if i8 else dtype
            sc = f32 if i8 else dtype
            for b in (1, 16):
                t = tiles(b, d, dh, f, dtype, compact=False)
                prec = dot_precision(dtype)
                tag = f"{TRITON_TYPE[dtype]},{'int8' if i8 else 'float'},B{b}"
                for mode, causal, ns_prev in ((EMBED, True, 1), (EMBED, False, 1), (PLAIN, False, 1), (PAIR, True, 2)):
                    consts = {"IN_MODE": mode, "CAUSAL": causal, "NS_PREV": ns_prev, "COMBINE": 1, "IS_INT8": i8,
                              "BB": t.bb, "BD": t.bd, "BDH": t.bdh, "BN": t.bn1, "BT": t.bt, "USE_DOT": t.dot1,
                              "PREC": prec, "RTNE_BF16": False}  # fmt: skip
                    ptrs = {"R": f32, "POS": torch.int64, "W0": wt, "W1": wt, "S0": sc, "S1": sc, "X": f32, "Q": f32,
                            "O": f32}  # fmt: skip
                    specs.append(spec(f"_attn_kernel[{tag},mode{mode},{'causal' if causal else 'ref'}]",
                                      _attn_kernel, dtype, ptrs, consts, t.warps))  # fmt: skip
                consts = {"IS_INT8": i8, "BB": t.bb, "BD": t.bd, "BK": t.bk2, "BN": t.bn2, "USE_DOT": t.use_dot,
                          "PREC": prec, "DDT": ddt}  # fmt: skip
                ptrs = {"O": f32, "X": f32, "HB": f32, "A": f32, "WO0": wt, "WO1": wt, "SO0": sc, "SO1": sc,
                        "WE0": wt, "WE1": wt, "SE0": sc, "SE1": sc}  # fmt: skip
                specs.append(spec(f"_mlp_in_kernel[{tag}]", _mlp_in_kernel, dtype, ptrs, consts, t.warps))
                consts = {"IS_INT8": i8, "BB": t.bb, "BN": t.bn3, "BK": t.bk3, "USE_DOT": t.use_dot, "PREC": prec,
                          "DDT": ddt}  # fmt: skip
                ptrs = {"A": f32, "HB": f32, "R": f32, "WD0": wt, "WD1": wt, "SD0": sc, "SD1": sc}
                specs.append(spec(f"_mlp_out_kernel[{tag}]", _mlp_out_kernel, dtype, ptrs, consts, 4))
        for b in (1, 16):
            bb = 1 if b == 1 else 16
            consts = {"NS_PREV": 2, "COMBINE": 0, "BB": bb, "BD": d, "RTNE_BF16": False}
            specs.append(spec(f"_pair_out_kernel[{TRITON_TYPE[dtype]},B{b}]", _pair_out_kernel, dtype, {"R": f32},
                              consts, 8))  # fmt: skip
    return specs
