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
from tape_kernels._utils import dot_precision, rtne_bf16
from tape_kernels.activation import reference_activation_ref

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

LOG2E = 1.4426950408889634
# Largest embedding dim the register tiles serve (the row of a LayerNorm lives in one program).
MAX_D = 1024
# Elements of one broadcast-product tile [BB, BN, BK]: 32 fp32 registers a thread at 8 warps.
_TILE = 8192
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def _combine_ref(hl: torch.Tensor, hr: torch.Tensor, mode: int) -> torch.Tensor:
    if mode == 0:
        a, b = torch.sigmoid(hl), torch.sigmoid(hr)
        return (a + b) * 0.5 - a * b
    if mode == 1:
        s = torch.sigmoid(hl - hr)
        return s * hl + (1 - s) * hr
    return hl + hr


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
    return ys[0] if len(ys) == 1 else _combine_ref(ys[0], ys[1], inp.combine)


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


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math
    from tape_kernels._utils import cast_out as _cast
    from tape_kernels._utils import pick as _pick
    from tape_kernels.activation import act_fwd as _act_fwd

    @triton.jit
    def _mm(x, w, DDT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
        """x [BB, BK] fp32 times wᵀ, w [BN, BK] (float or int8 as loaded) -> [BB, BN] fp32.

        B = 1..8: broadcast product and row sums in fp32 (a GEMV: no MMA shape to fill). B ≥ 16:
        ``tl.dot`` in the activations' dtype DDT (int8 values are exact in fp16/bf16/fp32), fp32
        accumulation."""
        if USE_DOT:
            wd = w.to(DDT)
            if DDT == tl.float32:
                return tl.dot(x, tl.trans(wd), input_precision=PREC)
            else:
                return tl.dot(x.to(DDT), tl.trans(wd))
        else:
            return tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def _layer_norm(z, G, BETA, cols, cmask, D, eps):
        """LayerNorm of fp32 rows z [BB, BD] (masked columns 0), two-pass variance, as add_layer_norm."""
        mean = tl.sum(z, axis=1) / D
        zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
        var = tl.sum(zc * zc, axis=1) / D
        rstd = _math.div(1.0, _math.sqrt(var + eps))
        g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(BETA + cols, mask=cmask, other=0.0).to(tl.float32)
        return zc * rstd[:, None] * g[None, :] + b[None, :]

    @triton.jit
    def _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D,
                    NS_PREV: tl.constexpr, COMBINE: tl.constexpr):  # fmt: skip
        """LN_mlp of the previous layer's pre-LN rows R (NS_PREV, B, D), combined when it is a pair:
        0 sigmoid-XOR, 1 pair softmax (σ(hl − hr) form), 2 sum."""
        m2 = bmask[:, None] & cmask[None, :]
        rows = offs_b.to(tl.int64)[:, None] * D + cols[None, :]
        z0 = tl.load(R + rows, mask=m2, other=0.0)
        y0 = _layer_norm(z0, G0, BE0, cols, cmask, D, eps0)
        if NS_PREV == 1:
            return y0
        else:
            z1 = tl.load(R + B * D + rows, mask=m2, other=0.0)
            y1 = _layer_norm(z1, G1, BE1, cols, cmask, D, eps1)
            if COMBINE == 0:
                a = tl.sigmoid(y0)
                b = tl.sigmoid(y1)
                return (a + b) * 0.5 - a * b
            elif COMBINE == 1:
                s = tl.sigmoid(y0 - y1)
                return s * y0 + (1.0 - s) * y1
            else:
                return y0 + y1

    @triton.jit
    def _embed_input(XIN, sxb, PE, s_pe, FREQ, pos, offs_b, bmask, cols, cmask, CAUSAL: tl.constexpr):
        """Token embedding + positional row (row ``pos`` in causal mode, else row 0: the reference
        restarts positions on every call); causal mode rotates each (2i, 2i+1) pair by pos·f_i."""
        m2 = bmask[:, None] & cmask[None, :]
        xrow = XIN + offs_b.to(tl.int64)[:, None] * sxb
        if CAUSAL:
            prow = PE + pos * s_pe
        else:
            prow = PE
        x = tl.load(xrow + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x += tl.load(prow + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if CAUSAL:
            # x'[2i] = x[2i]·cos − x[2i+1]·sin, x'[2i+1] = x[2i]·sin + x[2i+1]·cos: the partner
            # element is loaded again rather than moved between registers.
            partner = cols ^ 1
            xp = tl.load(xrow + partner[None, :], mask=m2, other=0.0).to(tl.float32)
            xp += tl.load(prow + partner, mask=cmask, other=0.0).to(tl.float32)[None, :]
            f = tl.load(FREQ + cols // 2, mask=cmask, other=0.0).to(tl.float32)
            theta = pos.to(tl.float32) * f
            sgn = tl.where((cols % 2) == 0, -1.0, 1.0)
            x = x * _math.cos(theta)[None, :] + (sgn * _math.sin(theta))[None, :] * xp
        return x

    @triton.jit
    def _attn_kernel(
        XIN, sxb, R, G0, BE0, G1, BE1, eps0, eps1,
        PE0, PE1, s_pe, FREQ0, FREQ1, POS,
        W0, W1, S0, S1, BI0, BI1,
        KV, s_blk, s_kv, s_kb, s_kh, s_kt, blk0,
        X, Q, O,
        B, D, DH, NH, qk_scale2,
        IN_MODE: tl.constexpr, CAUSAL: tl.constexpr, NS_PREV: tl.constexpr, COMBINE: tl.constexpr,
        IS_INT8: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, BN: tl.constexpr,
        BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr, RTNE_BF16: tl.constexpr,
    ):  # fmt: skip
        # One program per (side, attention head, batch tile). Traffic: the head's 3·dh rows of W_in
        # (3·dh·D weights), its cache rows (2·(pos+1)·dh·B elements), one K/V row written.
        side = tl.program_id(0)
        h = tl.program_id(1)
        pb = tl.program_id(2)
        offs_b = pb * BB + tl.arange(0, BB)
        bmask = offs_b < B
        cols = tl.arange(0, BD)
        cmask = cols < D
        pos = tl.load(POS)
        if IN_MODE == 0:
            x = _embed_input(XIN, sxb, _pick(side, PE0, PE1), s_pe, _pick(side, FREQ0, FREQ1), pos,
                             offs_b, bmask, cols, cmask, CAUSAL)  # fmt: skip
        elif IN_MODE == 1:
            x = tl.load(XIN + offs_b.to(tl.int64)[:, None] * sxb + cols[None, :],
                        mask=bmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        else:
            x = _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D, NS_PREV, COMBINE)
        rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
        if h == 0:  # the residual for launch 2
            tl.store(X + rows_bd + cols[None, :], x, mask=bmask[:, None] & cmask[None, :])

        W = _pick(side, W0, W1)
        S = _pick(side, S0, S1)
        BI = _pick(side, BI0, BI1)
        kv_blk = KV + (blk0 + side).to(tl.int64) * s_blk + h * s_kh
        kv_b = offs_b.to(tl.int64)[:, None] * s_kb
        q_rows = ((side * NH + h) * B + offs_b).to(tl.int64)[:, None] * DH
        for n0 in range(0, DH, BN):
            rows = n0 + tl.arange(0, BN)
            rmask = rows < DH
            m2 = bmask[:, None] & rmask[None, :]
            for part in tl.static_range(3):  # q, k, v rows of this head
                wrow = part * D + h * DH + rows
                w = tl.load(W + wrow.to(tl.int64)[:, None] * D + cols[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
                y = _mm(x, w, KV.dtype.element_ty, USE_DOT, PREC)
                if IS_INT8:
                    y = y * tl.load(S + wrow, mask=rmask, other=0.0)[None, :]
                y = y + tl.load(BI + wrow, mask=rmask, other=0.0).to(tl.float32)[None, :]
                if part == 0:
                    tl.store(Q + q_rows + rows[None, :], y, mask=m2)
                else:
                    ptr = kv_blk + (part - 1) * s_kv + pos * s_kt + kv_b + rows[None, :]
                    tl.store(ptr, _cast(y, KV.dtype.element_ty, RTNE_BF16), mask=m2)
        # The attention below reads back q and the K/V row this program wrote (other threads of
        # the block stored them): make those global writes visible block-wide first.
        tl.debug_barrier()

        d = tl.arange(0, BDH)
        dmask = d < DH
        q = tl.load(Q + q_rows + d[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
        length = pos + 1
        m_i = tl.full((BB,), float("-inf"), tl.float32)
        l_i = tl.zeros((BB,), tl.float32)
        acc = tl.zeros((BB, BDH), tl.float32)
        kv_b3 = offs_b.to(tl.int64)[:, None, None] * s_kb + d[None, None, :]
        for t0 in range(0, length, BT):
            t = t0 + tl.arange(0, BT)
            tmask = t < length
            m3 = bmask[:, None, None] & tmask[None, :, None] & dmask[None, None, :]
            off3 = kv_b3 + t.to(tl.int64)[None, :, None] * s_kt
            k = tl.load(kv_blk + off3, mask=m3, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k, axis=2) * qk_scale2  # [BB, BT], log2 units
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: row 0 is always filled
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(kv_blk + s_kv + off3, mask=m3, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + rows_bd + h * DH + d[None, :], o, mask=bmask[:, None] & dmask[None, :])

    @triton.jit
    def _mlp_in_kernel(
        O, X, HB, A,
        WO0, WO1, SO0, SO1, BO0, BO1, G0, G1, BE0, BE1, eps0, eps1,
        WE0, WE1, SE0, SE1, BX0, BX1,
        B, D, F, f_per_prog,
        IS_INT8: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
        USE_DOT: tl.constexpr, PREC: tl.constexpr, DDT: tl.constexpr,
    ):  # fmt: skip
        # One program per (side, expand tile of f_per_prog rows, batch tile). Traffic: all of W_out
        # (D² weights; the side's other programs read it again from L2) and f_per_prog·D of W_exp.
        side = tl.program_id(0)
        pf = tl.program_id(1)
        pb = tl.program_id(2)
        offs_b = pb * BB + tl.arange(0, BB)
        bmask = offs_b < B
        cols = tl.arange(0, BD)
        cmask = cols < D
        rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
        WO = _pick(side, WO0, WO1)
        acc = tl.zeros((BB, BD), tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < D
            o = tl.load(O + rows_bd + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(WO + cols.to(tl.int64)[:, None] * D + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0)  # fmt: skip
            acc += _mm(o, w, DDT, USE_DOT, PREC)
        if IS_INT8:
            acc = acc * tl.load(_pick(side, SO0, SO1) + cols, mask=cmask, other=0.0)[None, :]
        acc += tl.load(_pick(side, BO0, BO1) + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        m2 = bmask[:, None] & cmask[None, :]
        z = tl.where(m2, acc + tl.load(X + rows_bd + cols[None, :], mask=m2, other=0.0), 0.0)
        eps = tl.where(side == 0, eps0, eps1)
        hrow = _layer_norm(z, _pick(side, G0, G1), _pick(side, BE0, BE1), cols, cmask, D, eps)
        if pf == 0:  # the residual for launch 3
            tl.store(HB + rows_bd + cols[None, :], hrow, mask=m2)

        WE = _pick(side, WE0, WE1)
        SE = _pick(side, SE0, SE1)
        BX = _pick(side, BX0, BX1)
        f_lo = pf * f_per_prog
        f_hi = tl.minimum(f_lo + f_per_prog, F)
        rows_bf = (side * B + offs_b).to(tl.int64)[:, None] * F
        for n0 in range(f_lo, f_hi, BN):
            rows = n0 + tl.arange(0, BN)
            rmask = rows < f_hi
            w = tl.load(WE + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)  # fmt: skip
            y = _mm(hrow, w, DDT, USE_DOT, PREC)
            if IS_INT8:
                y = y * tl.load(SE + rows, mask=rmask, other=0.0)[None, :]
            y += tl.load(BX + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            tl.store(A + rows_bf + rows[None, :], _act_fwd(y), mask=bmask[:, None] & rmask[None, :])

    @triton.jit
    def _mlp_out_kernel(
        A, HB, R, WD0, WD1, SD0, SD1,
        B, D, F,
        IS_INT8: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        USE_DOT: tl.constexpr, PREC: tl.constexpr, DDT: tl.constexpr,
    ):  # fmt: skip
        # One program per (side, BN output channels, batch tile): BN·F weights of W_down.
        side = tl.program_id(0)
        pd = tl.program_id(1)
        pb = tl.program_id(2)
        offs_b = pb * BB + tl.arange(0, BB)
        bmask = offs_b < B
        rows = pd * BN + tl.arange(0, BN)
        rmask = rows < D
        WD = _pick(side, WD0, WD1)
        rows_bf = (side * B + offs_b).to(tl.int64)[:, None] * F
        acc = tl.zeros((BB, BN), tl.float32)
        for k0 in range(0, F, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < F
            a = tl.load(A + rows_bf + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(WD + rows.to(tl.int64)[:, None] * F + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)  # fmt: skip
            acc += _mm(a, w, DDT, USE_DOT, PREC)
        if IS_INT8:
            acc = acc * tl.load(_pick(side, SD0, SD1) + rows, mask=rmask, other=0.0)[None, :]
        m2 = bmask[:, None] & rmask[None, :]
        rows_bd = (side * B + offs_b).to(tl.int64)[:, None] * D
        acc += tl.load(HB + rows_bd + rows[None, :], mask=m2, other=0.0)
        tl.store(R + rows_bd + rows[None, :], acc, mask=m2)

    @triton.jit
    def _pair_out_kernel(
        R, G0, BE0, G1, BE1, eps0, eps1, OUT, s_ob, B, D,
        NS_PREV: tl.constexpr, COMBINE: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
        RTNE_BF16: tl.constexpr,
    ):  # fmt: skip
        pb = tl.program_id(0)
        offs_b = pb * BB + tl.arange(0, BB)
        bmask = offs_b < B
        cols = tl.arange(0, BD)
        cmask = cols < D
        y = _pair_input(R, G0, BE0, G1, BE1, eps0, eps1, offs_b, bmask, cols, cmask, B, D, NS_PREV, COMBINE)
        tl.store(OUT + offs_b.to(tl.int64)[:, None] * s_ob + cols[None, :], _cast(y, OUT.dtype.element_ty, RTNE_BF16),
                 mask=bmask[:, None] & cmask[None, :])  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Tiles and launchers
# --------------------------------------------------------------------------------------------------


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


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
    bb = 1 if b == 1 else min(16, _p2(b))
    # tl.dot wants ≥ 16 rows; the interpreter's bf16 dot is wrong, so it keeps the broadcast form there.
    use_dot = bb >= 16 and not (dtype == torch.bfloat16 and interpreting())
    bd = max(16, _p2(d)) if use_dot else _p2(d)
    bdh = max(16, _p2(dh)) if use_dot else _p2(dh)
    budget = _TILE * 64 if compact else _TILE

    def fit(*fixed: int, lo: int = 1, hi: int = 1 << 30) -> int:
        # The largest power of two with prod(fixed)·n ≤ budget, within [lo, hi].
        n = budget
        for v in fixed:
            n //= v
        return max(lo, min(hi, _p2(n + 1) // 2 if n >= 1 else 1))

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
        bn1, bk2, bn2, bk3, bn3 = bdh, bd, min(_p2(f), 256), min(_p2(f), 256), bd
    else:
        bn1 = fit(bb, bd, hi=bdh)
        bk2 = fit(bb, bd, hi=bd)
        bn2 = fit(bb, bd, hi=_p2(f)) if compact else bn1
        bn3 = bd if compact else min(16, _p2(d))
        bk3 = fit(bb, bn3, hi=_p2(f))
    # B = 16 holds [16, BT, dh] key and value tiles and their products at once: half the budget.
    bt = fit(bb, bdh, 2 if (use_dot and not compact) else 1, hi=64)
    # Expand rows a program: as many as the out-projection has weights (D² ≈ f_per_prog·D), so the
    # redundant out-projection at most doubles launch 2's L2 traffic while the side spreads over
    # f/D programs.
    f_per_prog = f if compact else max(bn2, _p2(d))
    f_per_prog = _cdiv(f_per_prog, bn2) * bn2
    warps = 8 if bd >= 256 or bb >= 16 else 4
    return _Tiles(bb, use_dot, dot1, bd, bdh, bn1, bt, bk2, bn2, f_per_prog, bn3, bk3, warps)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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
    bb = 1 if b == 1 else min(16, _p2(b))
    p0, p1 = sides[0], sides[-1]
    _pair_out_kernel[(_cdiv(b, bb),)](
        ws.r, p0.ln2_w, p0.ln2_b, p1.ln2_w, p1.ln2_b, p0.ln2_eps, p1.ln2_eps, out, out.stride(0), b, d,
        NS_PREV=len(sides), COMBINE=combine, BB=bb, BD=_p2(d), RTNE_BF16=rtne_bf16(out.dtype),
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
    from tape_kernels._aot import AotSpec

    specs = []
    d, dh, f = 256, 64, 2048

    def names(kernel) -> list[str]:  # noqa: ANN001
        while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
            kernel = kernel.fn
        return list(kernel.arg_names)

    ints = {"sxb", "s_pe", "s_blk", "s_kv", "s_kb", "s_kh", "s_kt", "blk0", "B", "D", "DH", "NH", "F", "f_per_prog",
            "s_ob"}  # fmt: skip
    floats = {"eps0", "eps1", "qk_scale2"}
    for dtype in KERNEL_DTYPES:
        act = "*" + _TL[dtype]
        ddt = _tl_dtype(dtype)
        for i8 in (False, True):
            wptr = "*i8" if i8 else act
            for b in (1, 16):
                t = tiles(b, d, dh, f, dtype, compact=False)
                prec = dot_precision(dtype)
                tag = f"{_TL[dtype]},{'int8' if i8 else 'float'},B{b}"

                def sig(kernel, ptrs: dict, consts: dict) -> dict:  # noqa: ANN001
                    out = {}
                    for a in names(kernel):
                        if a in consts:
                            out[a] = "constexpr"
                        elif a in ptrs:
                            out[a] = ptrs[a]
                        elif a in ints:
                            out[a] = "i32"
                        elif a in floats:
                            out[a] = "fp32"
                        else:
                            raise KeyError(a)
                    return out

                for mode, causal, ns_prev in ((EMBED, True, 1), (EMBED, False, 1), (PLAIN, False, 1), (PAIR, True, 2)):
                    consts = {"IN_MODE": mode, "CAUSAL": causal, "NS_PREV": ns_prev, "COMBINE": 1, "IS_INT8": i8,
                              "BB": t.bb, "BD": t.bd, "BDH": t.bdh, "BN": t.bn1, "BT": t.bt, "USE_DOT": t.dot1,
                              "PREC": prec, "RTNE_BF16": False}  # fmt: skip
                    ptrs = {"XIN": act, "R": "*fp32", "G0": act, "BE0": act, "G1": act, "BE1": act, "PE0": act,
                            "PE1": act, "FREQ0": act, "FREQ1": act, "POS": "*i64", "W0": wptr, "W1": wptr,
                            "S0": "*fp32" if i8 else act, "S1": "*fp32" if i8 else act, "BI0": act, "BI1": act,
                            "KV": act, "X": "*fp32", "Q": "*fp32", "O": "*fp32"}  # fmt: skip
                    specs.append(AotSpec(f"_attn_kernel[{tag},mode{mode},{'causal' if causal else 'ref'}]",
                                         _attn_kernel, sig(_attn_kernel, ptrs, consts), consts, t.warps, 1))
                consts = {"IS_INT8": i8, "BB": t.bb, "BD": t.bd, "BK": t.bk2, "BN": t.bn2, "USE_DOT": t.use_dot,
                          "PREC": prec, "DDT": ddt}  # fmt: skip
                sc = "*fp32" if i8 else act
                ptrs = {"O": "*fp32", "X": "*fp32", "HB": "*fp32", "A": "*fp32", "WO0": wptr, "WO1": wptr, "SO0": sc,
                        "SO1": sc, "BO0": act, "BO1": act, "G0": act, "G1": act, "BE0": act, "BE1": act,
                        "WE0": wptr, "WE1": wptr, "SE0": sc, "SE1": sc, "BX0": act, "BX1": act}  # fmt: skip
                specs.append(AotSpec(f"_mlp_in_kernel[{tag}]", _mlp_in_kernel, sig(_mlp_in_kernel, ptrs, consts),
                                     consts, t.warps, 1))  # fmt: skip
                consts = {"IS_INT8": i8, "BB": t.bb, "BN": t.bn3, "BK": t.bk3, "USE_DOT": t.use_dot, "PREC": prec,
                          "DDT": ddt}  # fmt: skip
                ptrs = {"A": "*fp32", "HB": "*fp32", "R": "*fp32", "WD0": wptr, "WD1": wptr, "SD0": sc, "SD1": sc}
                specs.append(AotSpec(f"_mlp_out_kernel[{tag}]", _mlp_out_kernel, sig(_mlp_out_kernel, ptrs, consts),
                                     consts, 4, 1))  # fmt: skip
        for b in (1, 16):
            bb = 1 if b == 1 else 16
            consts = {"NS_PREV": 2, "COMBINE": 0, "BB": bb, "BD": d, "RTNE_BF16": False}
            ptrs = {"R": "*fp32", "G0": act, "BE0": act, "G1": act, "BE1": act, "OUT": act}
            specs.append(AotSpec(f"_pair_out_kernel[{_TL[dtype]},B{b}]", _pair_out_kernel,
                                 sig(_pair_out_kernel, ptrs, consts), consts, 8, 1))  # fmt: skip
    return specs
