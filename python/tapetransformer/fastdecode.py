"""Lean CPU decode step: one new token (S = 1) through the fused model with few eager ops.

``TapeTransformer.prefill`` is general (any S, Triton or eager, autocast, validation on every
op). At decode size on a CPU its cost is per-op overhead, not arithmetic: 12 blocks × ~40 small ops
plus the Python checks in every ``tape_kernels`` wrapper. :class:`LeanDecoder` runs the same math
for S = 1 with the checks done once per ``generate()`` call:

* a TapeHead's left and right blocks of one layer run as a pair, their tensors stacked as
  (2, B, ...): one attention (both blocks' K/V live in one cache tensor), one K/V write, one
  activation, one grouped int8 linear (``torch.ops.tape_kernels.w8a8_linear_grouped``) per
  weight pair. When both blocks take the same input (every layer but the coda's first) their
  in_proj weights are concatenated into one GEMV;
* positional rows and RoPE tables are precomputed; weights are packed once;
* every elementwise op, LayerNorm, attention product and combine is the *same* eager op the
  reference path runs on CPU (stacking only adds a batch dim), and each group of the grouped int8
  op runs the single op's kernel, so the log-probs equal ``prefill``'s bitwise in fp32 and
  with int8 weights (W8A8 and weight-only) — the tests assert this.

Used by ``generate()`` for CPU models whose eval path is eager (``backend="eager"``, or ``"auto"``
without ``TRITON_INTERPRET``), fp32, ``skip_dead=True``; :func:`lean_decoder` returns None for
anything else, and the caller keeps the model's own decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tape_kernels._dispatch import interpreting
from tape_kernels.activation import reference_activation_ref
from tape_kernels.attention import critic_attention_decode_ref
from tape_kernels.combine import tapehead_combine_ref
from tape_kernels.int8 import _packed
from tape_kernels.unembedding import DEFAULT_DF, student_t_unembedding_ref
from tapetransformer.blocks import FusedTapeHeadBlock
from tapetransformer.model import KVCache, TapeTransformer
from tapetransformer.reference import rotate_pairs

__all__ = ["LeanDecoder", "lean_decoder", "lean_supported"]


def _grouped_ops_available() -> bool:
    """Whether the loaded extension has the grouped int8 ops (an older build may lack them)."""
    from tape_kernels.int8 import extension_available

    return extension_available() and hasattr(torch.ops.tape_kernels, "w8a8_linear_grouped")


def lean_supported(model: TapeTransformer) -> bool:
    """Whether :class:`LeanDecoder` computes exactly what the model's own decode computes for it."""
    if not isinstance(model, TapeTransformer) or model.training or model.runs_prophet:
        return False
    # The lean step is the eager math; a model that would run Triton kernels keeps them.
    if model.backend == "triton" or (model.backend == "auto" and interpreting()):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return False
    if model.int8_mode is not None:
        if not _grouped_ops_available() or any(t.device.type != "cpu" for t in model.int8_tensors()):
            return False
    return True


def lean_decoder(model: TapeTransformer, cache: KVCache) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model`` decoding into ``cache``, or None when unsupported."""
    if not lean_supported(model) or not isinstance(cache, KVCache):
        return None
    if cache.kv.dtype != torch.float32 or cache.kv.device.type != "cpu":
        return None
    return LeanDecoder(model, cache)


@dataclass
class _Linear:
    """One linear for a pair of blocks, ready to call: ``kind`` picks the kernel.

    "f32": ``w`` = (W_left, W_right) float (N, K), ``b`` = (b_left, b_right) or None;
    "w8a8" / "w8": the grouped (or, for ``shared``, concatenated) int8 tensors of the extension ops.
    """

    kind: str
    shared: bool  # both blocks read the same input: one GEMV over the concatenated weights
    n: int
    w: tuple = ()
    b: tuple | None = None
    q: tuple = ()  # int8 operands: (packed, wsum, scale, bias) or (qweight, scale, bias)
    op: Any = None  # the extension op taking (x, *q)


@dataclass
class _Pair:
    """Layer i of a TapeHead: its left and right blocks, evaluated together."""

    in_proj: _Linear
    out_proj: _Linear
    expand: _Linear
    linear: _Linear
    expand_bias: torch.Tensor  # (2, 1, 8D)
    ln_attn: tuple  # ((w, b, eps) left, (w, b, eps) right)
    ln_mlp: tuple
    index: int  # the left block's index in the cache; the right block's is index + 1


class LeanDecoder:
    """Decode one token per :meth:`step` with the model's current weights (int8 if quantized).

    Built once per ``generate()`` call, after the int8 weights are set. A layer's left and right blocks
    are adjacent in the cache (``KVCache`` layout), so ``kv[i : i + 2]`` is the pair's storage.
    """

    def __init__(self, model: TapeTransformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.causal = model.causal
        self.seq_len = model.seq_len
        d = model.embed_dim
        self.embed_dim = d
        mode = model.int8_mode
        # resolve_act_quant on CPU: W8A8 (the faster mode there).
        self.kind = "f32" if mode is None else ("w8" if mode[1] is False else "w8a8")
        self.pairs: list[tuple[_Pair, ...]] = []
        self.modes: list[int] = []
        for hi, head in enumerate(model.eval_heads()):
            pairs = []
            for i, blocks in enumerate(zip(head.blocks_left, head.blocks_right)):
                # The coda's first layer is the only one whose blocks read different inputs (the token
                # embedding plus each block's position); every other layer reads the shared h.
                shared = not (hi == 0 and i == 0)
                pairs.append(self._pair(blocks, shared, cache.index(hi, i, 0)))
            self.pairs.append(tuple(pairs))
            self.modes.append(head.discriminate)
        coda = (model.codahead.blocks_left[0], model.codahead.blocks_right[0])
        # (2, seq_len, D) positional rows and (2, 1, seq_len, D/2) RoPE cos/sin, per block (buffers
        # of equal value by construction, but each block's own in the state_dict).
        self.pos = torch.stack([b.pos_emb[0] for b in coda])
        pos_t = torch.arange(self.seq_len, dtype=torch.float32)
        theta = torch.stack([pos_t[:, None] * b.rope_freqs.float()[None, :] for b in coda])  # (2, seq_len, D/2)
        self.cos = theta.cos().unsqueeze(1)
        self.sin = theta.sin().unsqueeze(1)
        heads = coda[0].attention.num_heads
        self.heads, self.dh = heads, d // heads

    # ------------------------------------------------------------------ setup

    def _linear(self, qs: tuple | None, ws: tuple, bs: tuple | None, shared: bool) -> _Linear:
        n = ws[0].shape[0]
        if self.kind == "f32":
            return _Linear("f32", shared, n, w=ws, b=bs)
        ops = torch.ops.tape_kernels
        if shared:  # one (2N, K) weight: the W8A8 kernel's integer accumulation is per column
            q = torch.cat([qs[0][0], qs[1][0]])
            s = torch.cat([qs[0][1], qs[1][1]])
            b = None if bs is None else torch.cat(bs).float().contiguous()
            if self.kind == "w8a8":
                packed, wsum = ops.pack_int8_weight(q)
                return _Linear("w8a8", True, n, q=(packed, wsum, s, b), op=ops.w8a8_linear_packed.default)
            return _Linear("w8", True, n, q=(q, s, b), op=ops.w8_linear.default)
        s = torch.stack([qs[0][1], qs[1][1]])
        b = None if bs is None else torch.stack(bs).float().contiguous()
        if self.kind == "w8a8":
            packs = [_packed(q) for q, _ in qs]  # int8_linear's cache: the prefill reuses them
            packed = torch.stack([p for p, _ in packs])
            wsum = torch.stack([w for _, w in packs])
            return _Linear("w8a8", False, n, q=(packed, wsum, s, b), op=ops.w8a8_linear_grouped.default)
        q = torch.stack([qs[0][0], qs[1][0]])
        return _Linear("w8", False, n, q=(q, s, b), op=ops.w8_linear_grouped.default)

    def _pair(self, blocks: tuple[FusedTapeHeadBlock, FusedTapeHeadBlock], shared: bool, index: int) -> _Pair:
        mhas = [b.attention for b in blocks]

        def q8(which: str) -> tuple | None:  # the blocks' int8 copies of one weight
            return None if self.kind == "f32" else tuple(getattr(b.int8, which) for b in blocks)

        return _Pair(
            in_proj=self._linear(q8("in_proj"), tuple(m.in_proj_weight for m in mhas),
                                 tuple(m.in_proj_bias for m in mhas), shared=shared),
            out_proj=self._linear(q8("out_proj"), tuple(m.out_proj.weight for m in mhas),
                                  tuple(m.out_proj.bias for m in mhas), shared=False),
            expand=self._linear(q8("expand"), tuple(b.mlp.expand.weight for b in blocks), None, shared=False),
            linear=self._linear(q8("linear"), tuple(b.mlp.linear.weight for b in blocks), None, shared=False),
            expand_bias=torch.stack([b.mlp.expand.bias for b in blocks]).unsqueeze(1),
            ln_attn=tuple((b.ln_attn.weight, b.ln_attn.bias, b.ln_attn.eps) for b in blocks),
            ln_mlp=tuple((b.ln_mlp.weight, b.ln_mlp.bias, b.ln_mlp.eps) for b in blocks),
            index=index,
        )

    # ------------------------------------------------------------------ step

    @staticmethod
    def _run(lin: _Linear, x: torch.Tensor) -> torch.Tensor:
        """x (B, K) when ``lin.shared``, else (2, B, K) -> (2, B, N), left block's output first."""
        if lin.kind == "f32":
            # addmm / mm on each block: the very kernels F.linear runs for a contiguous (B, 1, K) input.
            w, b = lin.w, lin.b
            xs = (x, x) if lin.shared else (x[0], x[1])
            out = x.new_empty(2, xs[0].shape[0], lin.n)
            for g in range(2):
                if b is None:
                    torch.mm(xs[g], w[g].t(), out=out[g])
                else:
                    torch.addmm(b[g], xs[g], w[g].t(), out=out[g])
            return out
        if lin.shared:
            y = lin.op(x, *lin.q)  # (B, 2N)
            return y.view(x.shape[0], 2, lin.n).transpose(0, 1)  # (2, B, N) view
        return lin.op(x, *lin.q)  # grouped: (2, B, N)

    def _check_cache(self) -> int:
        c = self.cache
        t0 = c.length
        c.ensure(1)  # a no-op unless generate() sized the cache too small
        if self.causal and t0 + 1 > self.seq_len:
            raise ValueError(f"sequence too long: cache holds {t0} tokens, adding 1 exceeds seq_len {self.seq_len} "
                             "(generate() slides the window)")
        return t0

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """tok (B,) int64 ids, assumed in range -> (log-probs (B, 1, V), the cache advanced by one)."""
        t0 = self._check_cache()
        m = self.model
        e = F.embedding(tok, m.holistic_embed.weight)  # (B, D)
        b = e.shape[0]
        p = t0 if self.causal else 0  # reference semantics: a one-token call sits at position 0
        x = e + self.pos[:, p, None, :]  # (2, B, D): the coda's first layer, each block its own row
        if self.causal:  # RoPE at the absolute position (reference semantics never rotate one token)
            x = rotate_pairs(x, self.cos[:, :, p], self.sin[:, :, p])  # tables (2, 1, D/2)
        h = None
        coda_h = None
        hh, dh, d = self.heads, self.dh, self.embed_dim
        for pairs, mode in zip(self.pairs, self.modes):
            if coda_h is not None:
                x = h = coda_h
            for pr in pairs:
                # x: (2, B, D) for the coda's first layer, else the shared (B, D) input h.
                qkv = self._run(pr.in_proj, x).view(2, b, 3, hh, dh)  # (2, B, 3, H, dh)
                kv = self.cache.kv[pr.index : pr.index + 2].transpose(0, 1)  # (2 [k, v], 2 [l, r], B, H, cap, dh)
                kv[:, :, :, :, t0] = qkv[:, :, 1:3].permute(2, 0, 1, 3, 4)
                q = qkv[:, :, 0].unsqueeze(3)  # (2, B, H, 1, dh)
                # One new row sees every cached key, causal or not: (2, B, H, 1, dh).
                o = critic_attention_decode_ref(q, kv[0, :, :, :, : t0 + 1], kv[1, :, :, :, : t0 + 1])
                o = o.transpose(2, 3).reshape(2, b, d)
                z = x + self._run(pr.out_proj, o)  # (2, B, D)
                (wl, bl, el), (wr, br, er) = pr.ln_attn
                hs = torch.stack([F.layer_norm(z[0], (d,), wl, bl, el), F.layer_norm(z[1], (d,), wr, br, er)])
                a = reference_activation_ref(self._run(pr.expand, hs) + pr.expand_bias)  # (2, B, 8D)
                z = hs + self._run(pr.linear, a)
                (wl, bl, el), (wr, br, er) = pr.ln_mlp
                hl = F.layer_norm(z[0], (d,), wl, bl, el)
                hr = F.layer_norm(z[1], (d,), wr, br, er)
                x = h = tapehead_combine_ref(hl, hr, mode)  # (B, D)
            coda_h = h if coda_h is None else coda_h
        self.cache.length = t0 + 1
        logp = student_t_unembedding_ref(h.reshape(1, b, d), m.unembedding, DEFAULT_DF)  # (1, B, V)
        return logp.view(b, 1, -1), self.cache
