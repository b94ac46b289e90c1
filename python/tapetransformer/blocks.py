"""The fused TapeHead and its blocks: each module owns its forward, its prefill and its decode step.

:class:`FusedTapeHeadBlock` subclasses the reference ``TapeHeadBlock`` (same parameters, buffers and
order, so state_dicts are interchangeable) and computes it with ``tape_kernels``:

* ``forward`` (training, full sequences): the fused critic attention with its entropy / attention-weight
  statistics, residual + LayerNorm, the MLP's bias + activation, dropout as the reference;
* ``prefill`` (eval, S new tokens): projects K/V into the generation cache and attends over it;
* ``decode_step`` (eval, one token, static shapes, no host synchronisation: CUDA-graph capturable).

:class:`FusedTapeHead` runs its left/right block stacks and combines them, in the same three modes.
In training on the Triton path, the two blocks of a layer run *as a pair* (:meth:`FusedTapeHead.pair_forward`):
both read the same input, so every GEMM, LayerNorm and attention launch serves both blocks, with the
combine fused into the MLP's LayerNorm epilogue (``tape_kernels.fused_linear``): ~17 launches per layer
forward + backward instead of ~60 for two blocks and a combine.

Options shared by every block of a model (``FusedOptions``: causal semantics, kernel backend, dead-work
skipping, activation recomputation) live in one object the model owns. A block's int8 weights for
inference (``BlockInt8``) live on the block, outside the state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tape_kernels import decode_block as db
from tape_kernels._dispatch import check_backend, triton_runnable, use_triton
from tape_kernels.activation import reference_activation
from tape_kernels.attention import attention_stats, critic_attention, critic_attention_decode, kernel_supports
from tape_kernels.combine import tapehead_combine
from tape_kernels.fused_linear import (
    grouped_linear,
    grouped_linear_add_layer_norm,
    grouped_mlp_add_layer_norm,
    supports_ln_width,
)
from tape_kernels.layernorm import add_layer_norm
from tape_kernels.rope import rope_embed
from tapetransformer.kvcache import BlockKV, KVCache
from tapetransformer.reference import TapeHead, TapeHeadBlock, apply_rope

__all__ = ["DECODE_MODES", "BlockInt8", "FusedOptions", "FusedTapeHead", "FusedTapeHeadBlock"]

DECODE_MODES = ("block", "ops")


@dataclass
class FusedOptions:
    """How a fused model computes; one instance is shared by the model and all its blocks.

    causal:    causal masks and absolute positions (``False``: the reference's semantics);
    backend:   "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1), "triton", "eager";
    skip_dead: skip what provably cannot change an output (the reference's discarded concatenation);
    recompute: activation recomputation around every block in training (torch.utils.checkpoint);
    decode:    how the static one-token decode step runs on the Triton path: "block" (default) the
               fused decode kernels, three launches per layer of a TapeHead plus one per head for the last
               layer's LayerNorm and combine (``tape_kernels.decode_block``);
               "ops" one kernel per op (attention, LayerNorm, activation, combine, cuBLAS GEMVs), kept
               for comparison.
    """

    causal: bool = False
    backend: str = "auto"
    skip_dead: bool = True
    recompute: bool = False
    decode: str = "block"

    def __post_init__(self) -> None:
        self.backend = check_backend(self.backend)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")


class BlockInt8(NamedTuple):
    """Per-channel int8 copies (qweight (N, K) int8, scale (N,) fp32) of a block's four Linear weights."""

    in_proj: tuple[torch.Tensor, torch.Tensor]
    out_proj: tuple[torch.Tensor, torch.Tensor]
    expand: tuple[torch.Tensor, torch.Tensor]
    linear: tuple[torch.Tensor, torch.Tensor]


def weight_state(w: torch.Tensor) -> tuple:
    """What changes when a weight's values may have: in-place updates bump ``_version``; ``.data``
    swaps (``.to()``, ``.half()``) change the storage, dtype or device."""
    return (w._version, w.data_ptr(), w.dtype, w.device)


class FusedTapeHeadBlock(TapeHeadBlock):
    """A TapeHeadBlock computed with fused kernels. Shapes: tok (B, S, D) token embeddings, prev_h
    (B, ≥S, D) the previous layer's output (None for a head's first layer fed by tokens)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opts = FusedOptions()  # replaced by the owning model's shared options
        self.int8: BlockInt8 | None = None  # inference weights, used by eval paths (see int8_active)
        self.int8_act_quant: bool | None = None

    @property
    def attention(self) -> torch.nn.MultiheadAttention:
        return self.cached_attn.attn

    # ------------------------------------------------------------------ int8 weights

    def _int8_sources(self) -> tuple[torch.Tensor, ...]:
        mha = self.attention
        return (mha.in_proj_weight, mha.out_proj.weight, self.mlp.expand.weight, self.mlp.linear.weight)

    def quantized_cached(self) -> BlockInt8 | None:
        """The cached int8 copies if the float weights are still those they were made from."""
        made = self.__dict__.get("_int8_made")
        if made is None:
            return None
        q, sources = made
        ok = all(w is src and weight_state(w) == st for w, (src, st) in zip(self._int8_sources(), sources))
        return q if ok else None

    def quantized(self) -> BlockInt8:
        """int8 copies of the four Linear weights, re-made only after a weight changed or moved."""
        q = self.quantized_cached()
        if q is None:
            from tape_kernels.int8 import quantize_weight

            ws = self._int8_sources()
            q = BlockInt8(*(quantize_weight(w.detach().float()) for w in ws))
            # Kept out of nn.Module's registries: a cache, not state.
            self.__dict__["_int8_made"] = (q, [(w, weight_state(w)) for w in ws])
        return q

    def drop_int8(self) -> None:
        self.int8, self.int8_act_quant = None, None
        self.__dict__.pop("_int8_made", None)

    # ------------------------------------------------------------------ pieces

    def embed(self, tok: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """tok + pos_emb, then RoPE. Reference semantics: positions restart at 0 on every call and a
        single token is not rotated. Causal: absolute positions ``start .. start+S-1``, always rotated;
        ``start`` may be a (1,) int64 device tensor (one token, the static decode step)."""
        s = tok.shape[1]
        if not self.opts.causal:
            e = tok + self.pos_emb[:, :s, :]
            return apply_rope(e, self.rope_freqs) if s > 1 else e
        if isinstance(start, torch.Tensor):
            return apply_rope(tok + self.pos_emb.index_select(1, start), self.rope_freqs, offset=start)
        if start + s > self.pos_emb.shape[1]:
            raise ValueError(f"sequence too long: positions up to {start + s} > seq_len {self.pos_emb.shape[1]}")
        return apply_rope(tok + self.pos_emb[:, start : start + s, :], self.rope_freqs, offset=start)

    def int8_active(self) -> bool:
        """Whether this forward uses the int8 weights: every eval-mode forward, with autograd or without
        (so ``model.eval()(x)`` gives the same output under ``torch.no_grad()`` or not), and any forward
        without autograd; a training-mode forward with autograd trains the float weights."""
        return self.int8 is not None and not (self.training and torch.is_grad_enabled())

    def _linear(self, x: torch.Tensor, which: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear``, or the int8 copy of ``which``'s weight when it is in use (:meth:`int8_active`)."""
        q = getattr(self.int8, which) if self.int8_active() else None
        if q is not None and q[0].device == x.device:
            from tape_kernels.int8 import int8_linear

            return int8_linear(x, q[0], q[1], bias, act_quant=self.int8_act_quant)
        return F.linear(x, weight, bias)

    def mlp_ln(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """LN_mlp(h + MLP(h)), h = LN_attn(x + attn_out); the expand bias is fused into the activation."""
        be = self.opts.backend
        h = add_layer_norm(x, attn_out, self.ln_attn.weight, self.ln_attn.bias, self.ln_attn.eps, backend=be)
        z = self._linear(h, "expand", self.mlp.expand.weight, None)  # (B, S, 8D)
        a = reference_activation(z, self.mlp.expand.bias, backend=be)
        m = self._linear(a, "linear", self.mlp.linear.weight, None)  # (B, S, D)
        m = F.dropout(m, self.mlp.dropout.p, self.training)
        return add_layer_norm(h, m, self.ln_mlp.weight, self.ln_mlp.bias, self.ln_mlp.eps, backend=be)

    # ------------------------------------------------------------------ training

    def forward(
        self, tok: torch.Tensor, prev_h: torch.Tensor | None, prev_emb: torch.Tensor | None, stats: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Full-sequence forward -> (h, layer_emb or None, entropy (B, S), softmax(aw) (B, S)); with
        ``stats=False`` (a loss that does not use them) the last two are None and cost nothing more."""
        s = tok.shape[1]
        if prev_h is None:
            layer_emb = self.embed(tok, 0)
            x = layer_emb
        elif self.opts.skip_dead:
            layer_emb = None  # it only ever feeds the discarded part of the reference's concatenation
            # a whole-tensor slice is the tensor: no slice node, whose backward would launch a zeros + copy
            x = prev_h if prev_h.shape[1] == s else prev_h[:, -s:, :]
        else:  # the reference's concatenation, kept in the graph (zero gradients for what it discards)
            layer_emb = self.embed(tok, 0)
            parts = ([prev_emb] if prev_emb is not None else []) + [layer_emb, prev_h[:, -s:, :]]
            x = torch.cat(parts, dim=1)[:, -s:, :]
        mha = self.attention
        out, ent, aw = critic_attention(
            x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, mha.num_heads,
            causal=self.opts.causal, dropout_p=mha.dropout, training=self.training, backend=self.opts.backend,
        )  # fmt: skip
        if not stats:
            return self.mlp_ln(x, out), layer_emb, None, None
        return self.mlp_ln(x, out), layer_emb, ent, torch.softmax(aw, dim=-1)

    # ------------------------------------------------------------------ generation

    def _attend(self, x: torch.Tensor, kv: BlockKV, pos: int | torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        """Project x (B, S, D), write its K/V at ``pos``, attend over the cache, out-project -> (B, S, D)."""
        b, s, d = x.shape
        mha = self.attention
        hh = mha.num_heads
        qkv = self._linear(x, "in_proj", mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(b, s, 3, hh, d // hh).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, dh)
        kc, vc = kv.update(pos, k, v)
        q = q.to(kc.dtype)  # under autocast the projection is half while the cache keeps its dtype
        o = critic_attention_decode(q, kc, vc, causal=self.opts.causal, backend=self.opts.backend, length=lens)
        o = o.transpose(1, 2).reshape(b, s, d)
        return self._linear(o, "out_proj", mha.out_proj.weight, mha.out_proj.bias)

    def prefill(self, tok: torch.Tensor, prev_h: torch.Tensor | None, kv: BlockKV) -> torch.Tensor:
        """S new tokens at cache rows ``length .. length+S-1`` (the caller advances the length)."""
        start = kv.cache.length
        s = tok.shape[1]
        if prev_h is not None:
            x = prev_h if prev_h.shape[1] == s else prev_h[:, -s:, :]
        else:
            x = self.embed(tok, start)
        return self.mlp_ln(x, self._attend(x, kv, start, None))

    def decode_weights(self) -> db.BlockDecodeWeights | None:
        """What the fused decode kernels read for this block: its float weights, or its int8 copies
        (weight-only) when they are set and autograd is off; None where they do not apply (W8A8
        requested with ``act_quant=True``: that mode runs the ops path)."""
        mha = self.attention
        w = dict(
            w_in=mha.in_proj_weight, b_in=mha.in_proj_bias, w_out=mha.out_proj.weight, b_out=mha.out_proj.bias,
            ln1_w=self.ln_attn.weight, ln1_b=self.ln_attn.bias, ln1_eps=self.ln_attn.eps,
            w_exp=self.mlp.expand.weight, b_exp=self.mlp.expand.bias, w_down=self.mlp.linear.weight,
            ln2_w=self.ln_mlp.weight, ln2_b=self.ln_mlp.bias, ln2_eps=self.ln_mlp.eps,
            pos_emb=self.pos_emb[0], rope_freqs=self.rope_freqs,
        )  # fmt: skip
        if any(t is None for t in w.values()):
            return None
        if self.int8_active():
            if self.int8_act_quant:
                return None
            q = self.int8
            w.update(w_in=q.in_proj[0], s_in=q.in_proj[1], w_out=q.out_proj[0], s_out=q.out_proj[1],
                     w_exp=q.expand[0], s_exp=q.expand[1], w_down=q.linear[0], s_down=q.linear[1])  # fmt: skip
        return db.BlockDecodeWeights(**w)  # the kernels read raw pointers: no autograd (see fused_decode_ok)

    def fused_decode_ok(self, x: torch.Tensor) -> bool:
        """Whether the static decode step of input ``x`` may run the fused decode kernels: the "block"
        decode mode on the Triton path, eval, no autograd graph to build and no autocast (whose
        per-op casts the ops path reproduces)."""
        if self.opts.decode != "block" or self.training or not use_triton(x, backend=self.opts.backend):
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def decode_step(
        self, tok: torch.Tensor, prev_h: torch.Tensor | None, kv: BlockKV, pos: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        """One token (B, 1, D) at the device-side position ``pos`` ((1,) int64; ``lens`` = pos + 1 as
        int32): static shapes, no host read, so the step can be captured in a CUDA graph. On the
        Triton path (``opts.decode == "block"``) four launches of ``tape_kernels.decode_block``: the
        layer's three and one for its last LayerNorm."""
        src = prev_h if prev_h is not None else tok
        if self.fused_decode_ok(src):
            w = self.decode_weights()
            if w is not None and _fused_fits([w], src, kv.cache.kv, self.attention.num_heads):
                inp = _layer_input(tok, prev_h)
                return _fused_decode([self], [[w]], inp, kv.cache.kv, kv.index, pos, 2, src)
        x = prev_h[:, -1:, :] if prev_h is not None else self.embed(tok, pos)
        return self.mlp_ln(x, self._attend(x, kv, pos, lens))


class FusedTapeHead(TapeHead):
    """A TapeHead of fused blocks: left/right stacks combined after every layer (``discriminate``:
    0 sigmoid-XOR, 1 pair softmax, otherwise sum)."""

    block_cls = FusedTapeHeadBlock

    @property
    def opts(self) -> FusedOptions:
        return self.blocks_left[0].opts

    def combine(self, hl: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return tapehead_combine(hl, hr, self.discriminate, backend=self.opts.backend)

    def _block(self, blk: FusedTapeHeadBlock, *args: Any) -> tuple[Any, ...]:
        if self.opts.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # Only the block's inputs are kept; its internals are recomputed in backward (dropout's
            # RNG state is replayed).
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def pair_ok(self, left: FusedTapeHeadBlock, right: FusedTapeHeadBlock, tok: torch.Tensor,
                prev_h: torch.Tensor | None) -> bool:  # fmt: skip
        """Whether a layer's two blocks can run as one pair (:meth:`pair_forward`): the Triton path on
        these tensors, dead work skipped, no active dropout (the fused kernels have none), no int8 weights
        in use, kernel-supported sizes and dtypes, and the same attention heads and LayerNorm eps."""
        o = self.opts
        if o.backend == "eager" or not o.skip_dead or not triton_runnable(tok):
            return False
        d = tok.shape[-1]
        la, ra = left.attention, right.attention
        dt = la.in_proj_weight.dtype
        if dt not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        if tok.dtype != dt and not torch.is_autocast_enabled(tok.device.type):
            return False
        if prev_h is None and tok.shape[1] > min(left.pos_emb.shape[1], right.pos_emb.shape[1]):
            return False  # the per-block path reports the too-long sequence
        for blk in (left, right):
            if self.training and (blk.attention.dropout > 0 or blk.mlp.dropout.p > 0):
                return False
            if blk.int8_active():
                return False
        return (la.num_heads == ra.num_heads and kernel_supports(d, la.num_heads) and supports_ln_width(d)
                and left.ln_attn.eps == right.ln_attn.eps and left.ln_mlp.eps == right.ln_mlp.eps
                and self.discriminate in (0, 1, 2))  # fmt: skip

    def pair_forward(
        self, left: FusedTapeHeadBlock, right: FusedTapeHeadBlock, tok: torch.Tensor, prev_h: torch.Tensor | None,
        stats: bool = True,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None], tuple | None]:  # fmt: skip
        """One layer's left and right blocks and their combine, computed together -> (h (B, S, D),
        (layer_emb left, right) or Nones, ((ent_l, aw_l), (ent_r, aw_r)) or None without ``stats``).

        The same dataflow as two ``FusedTapeHeadBlock.forward`` calls and a combine: the in-projection
        GEMM writes both blocks' qkv as one (2B, S, 3D) batch for the attention kernels, and the
        fused Linear ops take both blocks' weights (``tape_kernels.fused_linear``)."""
        b, s, d = tok.shape
        m = b * s
        be = self.opts.backend
        if prev_h is None:  # a first layer: each block embeds the tokens with its own tables
            rotate = self.opts.causal or s > 1
            xs = rope_embed(tok, [left.pos_emb, right.pos_emb], [left.rope_freqs, right.rope_freqs], rotate,
                            backend=be)  # (2, B, S, D)  # fmt: skip
            embs: tuple[torch.Tensor | None, torch.Tensor | None] = (xs[0], xs[1])
            x = xs.view(2, m, d)
        else:  # both blocks read the previous layer's output
            x = (prev_h if prev_h.shape[1] == s else prev_h[:, -s:, :]).reshape(m, d)
            embs = (None, None)
        la, ra = left.attention, right.attention
        # x also feeds the LayerNorm residual: through the returned view, whose gradient the in-projection's
        # backward kernel adds to its own
        qkv, x = grouped_linear(x, [la.in_proj_weight, ra.in_proj_weight], [la.in_proj_bias, ra.in_proj_bias],
                                return_input=True, backend=be)  # (2, M, 3D)  # fmt: skip
        o, ent, aw = attention_stats(qkv.view(2 * b, s, 3 * d), la.num_heads, self.opts.causal, backend=be)
        h = grouped_linear_add_layer_norm(
            o.view(2, m, d), x, [la.out_proj.weight, ra.out_proj.weight], [la.out_proj.bias, ra.out_proj.bias],
            [left.ln_attn.weight, right.ln_attn.weight], [left.ln_attn.bias, right.ln_attn.bias], left.ln_attn.eps,
            backend=be,
        )  # (2, M, D)
        out = grouped_mlp_add_layer_norm(
            h, [left.mlp.expand.weight, right.mlp.expand.weight], [left.mlp.expand.bias, right.mlp.expand.bias],
            [left.mlp.linear.weight, right.mlp.linear.weight], [left.ln_mlp.weight, right.ln_mlp.weight],
            [left.ln_mlp.bias, right.ln_mlp.bias], left.ln_mlp.eps, combine=self.discriminate, backend=be,
        ).view(b, s, d)
        if not stats:
            return out, embs, None
        ent2 = ent.view(2, b, s)
        aw2 = torch.softmax(aw.view(2, b, s), dim=-1)
        return out, embs, ((ent2[0], aw2[0]), (ent2[1], aw2[1]))

    def _pair(self, *args: Any) -> tuple[Any, ...]:
        if self.opts.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.pair_forward, *args, use_reentrant=False)
        return self.pair_forward(*args)

    def forward(
        self, tok: torch.Tensor, prev_h: torch.Tensor | None, prev_emb: torch.Tensor | None, stats: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Training forward -> (h (B, S, D), prev_emb for the next head or None, entropy (), attn (B, S));
        ``stats=False``: entropy and attn are None and not computed."""
        prev_h_l = prev_h_r = prev_h
        prev_emb_l = prev_emb_r = prev_emb
        ents, aws = [], []
        h = prev_h
        for left, right in zip(self.blocks_left, self.blocks_right):
            if prev_h_l is prev_h_r and self.pair_ok(left, right, tok, prev_h_l):
                h, (prev_emb_l, prev_emb_r), st = self._pair(left, right, tok, prev_h_l, stats)
                if stats:
                    (ent_l, aw_l), (ent_r, aw_r) = st
            else:
                hl, prev_emb_l, ent_l, aw_l = self._block(left, tok, prev_h_l, prev_emb_l, stats)
                hr, prev_emb_r, ent_r, aw_r = self._block(right, tok, prev_h_r, prev_emb_r, stats)
                h = self.combine(hl, hr)
            prev_h_l = prev_h_r = h
            if stats:
                ents.append((ent_l + ent_r) / 2.0)
                aws.append((aw_l + aw_r) / 2.0)
        out_emb = None if prev_emb_r is None else 0.5 * (prev_emb_r + prev_emb_l)
        if not stats:
            return h, out_emb, None, None
        attn = (torch.stack(aws, dim=0) * self.layer_weights.view(-1, 1, 1).to(aws[0].dtype)).sum(dim=0)  # (B, S)
        entropy = torch.stack(ents).sum() / self.num_layers
        return h, out_emb, entropy, attn

    def prefill(self, tok: torch.Tensor, prev_h: torch.Tensor | None, cache: KVCache, head: int) -> torch.Tensor:
        """S new tokens through every layer, K/V into ``cache``'s blocks of head number ``head``."""
        h = prev_h
        for i, (left, right) in enumerate(zip(self.blocks_left, self.blocks_right)):
            hl = left.prefill(tok, h, cache.block(head, i, 0))
            hr = right.prefill(tok, h, cache.block(head, i, 1))
            h = self.combine(hl, hr)
        return h

    def decode_step(
        self, tok: torch.Tensor, prev_h: torch.Tensor | None, cache: KVCache, head: int, pos: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        """One token through every layer with static shapes (see ``FusedTapeHeadBlock.decode_step``).
        On the Triton path (``opts.decode == "block"``) each layer's left and right blocks run together
        in three launches of ``tape_kernels.decode_block``, the combine folded into the next layer's
        first launch, plus one launch for the last layer's LayerNorm and combine."""
        src = prev_h if prev_h is not None else tok
        lefts, rights = list(self.blocks_left), list(self.blocks_right)
        if lefts and lefts[0].fused_decode_ok(src):
            layers = [[left.decode_weights(), right.decode_weights()] for left, right in zip(lefts, rights)]
            flat = [w for pair in layers for w in pair]
            if all(w is not None for w in flat) and _fused_fits(flat, src, cache.kv, lefts[0].attention.num_heads):
                mode = self.discriminate if self.discriminate in (0, 1) else 2
                return _fused_decode(lefts, layers, _layer_input(tok, prev_h), cache.kv, cache.index(head, 0, 0),
                                     pos, mode, src)  # fmt: skip
        h = prev_h
        for i, (left, right) in enumerate(zip(self.blocks_left, self.blocks_right)):
            hl = left.decode_step(tok, h, cache.block(head, i, 0), pos, lens)
            hr = right.decode_step(tok, h, cache.block(head, i, 1), pos, lens)
            h = self.combine(hl, hr)
        return h


# ---------------------------------------------------------------------------------- fused decode


def _layer_input(tok: torch.Tensor, prev_h: torch.Tensor | None) -> db.DecodeInput:
    """A head's (or a block's) first-layer input: the previous output's last row, else the token
    embeddings (each block adds its positional row)."""
    if prev_h is not None:
        return db.DecodeInput(db.PLAIN, x=prev_h[:, -1, :])
    return db.DecodeInput(db.EMBED, x=tok[:, -1, :])


def _fused_fits(ws: list[db.BlockDecodeWeights], src: torch.Tensor, kv: torch.Tensor, num_heads: int) -> bool:
    """The inputs, cache and weights share one dtype, device and batch the kernels serve (else the
    per-op path runs, and reports a mismatch)."""
    return src.dtype == kv.dtype and src.device == kv.device and src.stride(-1) == 1 and \
        kv.shape[2] == src.shape[0] and db.decode_supported(ws, kv, num_heads)


def _fused_decode(
    blocks: list[FusedTapeHeadBlock], layers: list[list[db.BlockDecodeWeights]], inp: db.DecodeInput,
    kv: torch.Tensor, blk0: int, pos: torch.Tensor, combine: int, src: torch.Tensor,
) -> torch.Tensor:
    """Run ``layers`` (each a list of 1 or 2 blocks side by side, cache blocks ``blk0 + ns·i + side``)
    for one token -> (B, 1, D) in the input's dtype."""
    b, d = src.shape[0], src.shape[-1]
    ns = len(layers[0])
    w0 = layers[0][0]
    ws = db.Workspace(ns, b, d, w0.w_exp.shape[0], src.device)
    causal = blocks[0].opts.causal
    heads = blocks[0].attention.num_heads
    for i, sides in enumerate(layers):
        if i > 0:
            inp = db.DecodeInput(db.PAIR, prev=tuple(layers[i - 1]), combine=combine)
        db.decode_layer(inp, sides, kv, blk0 + ns * i, pos, ws, causal, heads)
    out = torch.empty(b, 1, d, device=src.device, dtype=src.dtype)
    db.decode_finish(ws, layers[-1], combine, out[:, 0])
    return out
