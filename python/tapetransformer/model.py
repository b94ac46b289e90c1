"""The fused TapeTransformer: the reference's module tree and state_dict, computed with tape_kernels.

``TapeTransformer`` subclasses the reference module, so parameter names, shapes, order and
initialisation are the original's and checkpoints load both ways with ``strict=True``. Only the
forward passes differ:

* every critic attention runs the fused Triton attention (with its entropy / attention-weight
  statistics), every residual+LayerNorm, MLP bias+activation, TapeHead combine and the Student-t
  unembedding run fused kernels (``backend="triton"``; ``"eager"`` runs the same dataflow in plain
  PyTorch; ``"auto"`` picks Triton on CUDA and eager on CPU unless ``TRITON_INTERPRET=1``);
* ``skip_dead=True`` (default) skips what provably cannot change an output (spec findings 1–3):
  the prophet and ``rnn_projection`` never run, the concatenation that only kept them in the graph
  is gone, and with ``need_aux=False`` critics 0..n−2 do not run either. The parameters the
  reference reaches only through those dead paths still receive exact zero gradients (not None)
  through :class:`_ZeroGradLink`. ``skip_dead=False`` runs the reference's full dataflow (the
  prophet through the Char-RNN kernel), for like-for-like benchmarks;
* ``causal=True`` repairs the semantics: causal masks in every attention, and absolute positions
  (pos_emb and RoPE, a single token rotated at its position) in cached decode, so that prefill +
  one-token decode reproduces the full causal forward.

Eval-mode caches are :class:`FusedCache` objects holding *projected* K/V per block (the reference
keeps unprojected inputs and re-projects the whole history on every call; projecting is linear, so
the results agree to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tape_kernels._dispatch import check_backend
from tape_kernels.activation import reference_activation
from tape_kernels.attention import critic_attention, critic_attention_decode
from tape_kernels.charrnn import charrnn
from tape_kernels.combine import tapehead_combine
from tape_kernels.layernorm import add_layer_norm
from tape_kernels.unembedding import DEFAULT_DF, student_t_nll, student_t_unembedding
from tapetransformer import reference as ref
from tapetransformer.reference import TapeHead, TapeHeadBlock, apply_rope, check_tokens

__all__ = ["FusedCache", "TapeTransformer"]


class _ZeroGradLink(torch.autograd.Function):
    """Identity on ``out`` whose backward hands exact zero gradients to ``params``.

    The reference reaches the prophet, ``rnn_projection`` and (for the log-probs) critics 0..n−2
    only through a concatenation whose slice discards them, so autograd gives them zero tensors.
    Skipping that work must not turn those zeros into None.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.meta = [(p.shape, p.dtype, p.device) for p in params]
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, *(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.meta))


@dataclass
class FusedCache:
    """Per-block projected K/V, preallocated: k[i], v[i] (B, H, capacity, dh); ``length`` tokens filled.

    ``blocks`` names the cached blocks in order; ``rnn`` is the prophet's per-layer (B, 1, Hd) state
    (None when the prophet is skipped, as it never affects an output).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int
    capacity: int
    blocks: list[str] = field(default_factory=list)
    rnn: list[torch.Tensor] | None = None

    def ensure(self, extra: int) -> None:
        """Grow (amortised doubling) so that ``extra`` more tokens fit."""
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                bigger = t.new_empty(*t.shape[:2], cap, t.shape[3])
                bigger[:, :, : self.length] = t[:, :, : self.length]
                lst[i] = bigger
        self.capacity = cap


def _weight_state(w: torch.Tensor) -> tuple:
    """What changes when a weight's values may have: in-place updates bump ``_version``; ``.data``
    swaps (``.to()``, ``.half()``) change the storage, dtype or device."""
    return (w._version, w.data_ptr(), w.dtype, w.device)


class TapeTransformer(ref.TapeTransformer):
    """Fused TapeTransformer; same constructor as the reference plus ``causal``, ``backend``, ``skip_dead``.

    training: ``forward(x (B,S)) -> (logp (B,S,V), entropy (), attn_weights (B,S))``;
              ``need_aux=False`` returns ``(logp, None, None)`` and skips critics 0..n−2.
    eval:     ``forward(x, past_kv=None) -> (logp (B,S,V), FusedCache)``.
    ``loss(x, targets)``: mean NLL through the fused Student-t NLL (no (B,S,V) log-probs stored).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        num_layers: int = 4,
        embed_dim: int = 128,
        num_heads: int = 2,
        dropout: float = 0.1,
        *,
        causal: bool = False,
        backend: str = "auto",
        skip_dead: bool = True,
    ) -> None:
        super().__init__(vocab_size, seq_len, num_layers, embed_dim, num_heads, dropout)
        self.causal = bool(causal)
        self.backend = check_backend(backend)
        self.skip_dead = bool(skip_dead)
        # int8 weights for inference, keyed by the float weight's name; not part of the state_dict.
        self._int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._int8_act_quant: bool | None = None
        # The last quantize_int8_ result and the (weight, version, device) it was made from, so that
        # generate(int8=True) re-quantizes only after the weights changed (in-place updates such as
        # an optimizer step bump a tensor's version; .to() or load_state_dict swap the tensors).
        self._int8_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._int8_sources: dict[str, tuple[torch.Tensor, tuple]] = {}

    # ------------------------------------------------------------------ helpers

    def _linear(self, x: torch.Tensor, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self._int8.get(name) if not torch.is_grad_enabled() else None
        if q is not None and q[0].device == x.device:
            from tape_kernels.int8 import int8_linear

            return int8_linear(x, q[0], q[1], bias, act_quant=self._int8_act_quant)
        return F.linear(x, weight, bias)

    def _block_names(self) -> list[tuple[str, TapeHeadBlock]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, TapeHeadBlock)]

    def quantize_int8_(self, act_quant: bool | None = None) -> TapeTransformer:
        """Build int8 copies (per-channel symmetric) of every Linear weight the eval path uses.

        Float weights stay in place (training and the state_dict are unaffected). The result is
        cached: calling again (as every ``generate(int8=True)`` does) re-quantizes only when a weight
        changed, was replaced or moved since. ``act_quant``: False weight-only, True W8A8, None (default) the
        faster of the two per call (``tape_kernels.int8.resolve_act_quant``: W8A8 on CPU, weight-only
        GEMV for decode on CUDA).
        """
        from tape_kernels.int8 import quantize_weight

        if not self.int8_up_to_date():
            self._int8_cache, self._int8_sources = {}, {}
            for key, w in self._int8_weights():
                self._int8_cache[key] = quantize_weight(w.detach().float())
                self._int8_sources[key] = (w, _weight_state(w))
        self._int8 = dict(self._int8_cache)
        self._int8_act_quant = act_quant
        return self

    def _int8_weights(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, blk in self._block_names():
            mha = blk.cached_attn.attn
            for wname, w in (
                ("cached_attn.attn.in_proj_weight", mha.in_proj_weight),
                ("cached_attn.attn.out_proj.weight", mha.out_proj.weight),
                ("mlp.expand.weight", blk.mlp.expand.weight),
                ("mlp.linear.weight", blk.mlp.linear.weight),
            ):
                out.append((f"{name}.{wname}", w))
        return out

    def int8_up_to_date(self) -> bool:
        """Whether the cached int8 weights were made from the current float weights (same tensors,
        unmodified since, same storage, dtype and device)."""
        src = self._int8_sources
        if not src:
            return False
        weights = self._int8_weights()
        return len(weights) == len(src) and all(
            key in src and src[key][0] is w and src[key][1] == _weight_state(w) for key, w in weights
        )

    def dequantize_(self) -> TapeTransformer:
        """Drop the int8 weights (and the cache that ``generate(int8=True)`` reuses)."""
        self._int8 = {}
        self._int8_cache, self._int8_sources = {}, {}
        return self

    def _embed_positions(self, blk: TapeHeadBlock, tok: torch.Tensor, start: int) -> torch.Tensor:
        """tok + pos_emb, then RoPE. Reference semantics: positions restart at 0 on every call and a
        single token is not rotated; causal: absolute positions ``start..start+S-1``, always rotated."""
        s = tok.shape[1]
        if not self.causal:
            start = 0
        if start + s > blk.pos_emb.shape[1]:
            raise ValueError(f"sequence too long: positions up to {start + s} > seq_len {blk.pos_emb.shape[1]}")
        e = tok + blk.pos_emb[:, start : start + s, :]
        if self.causal or s > 1:
            e = apply_rope(e, blk.rope_freqs, offset=start)
        return e

    def _mlp_ln(self, blk: TapeHeadBlock, name: str, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """LN_mlp(h + MLP(h)), h = LN_attn(x + attn_out); the expand bias is fused into the activation."""
        be = self.backend
        h = add_layer_norm(x, attn_out, blk.ln_attn.weight, blk.ln_attn.bias, blk.ln_attn.eps, backend=be)
        z = self._linear(h, f"{name}.mlp.expand.weight", blk.mlp.expand.weight, None)  # (B, S, 8D)
        a = reference_activation(z, blk.mlp.expand.bias, backend=be)
        m = self._linear(a, f"{name}.mlp.linear.weight", blk.mlp.linear.weight, None)  # (B, S, D)
        m = F.dropout(m, blk.mlp.dropout.p, self.training)
        return add_layer_norm(h, m, blk.ln_mlp.weight, blk.ln_mlp.bias, blk.ln_mlp.eps, backend=be)

    # ------------------------------------------------------------------ training

    def _block_train(
        self, blk: TapeHeadBlock, name: str, tok: torch.Tensor, prev_h: torch.Tensor | None,
        prev_emb: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        s = tok.shape[1]
        if prev_h is None:
            layer_emb = self._embed_positions(blk, tok, 0)
            x = layer_emb
        elif self.skip_dead:
            layer_emb = None  # only ever feeds the discarded part of the concatenation
            x = prev_h[:, -s:, :]
        else:
            layer_emb = self._embed_positions(blk, tok, 0)
            parts = ([prev_emb] if prev_emb is not None else []) + [layer_emb, prev_h[:, -s:, :]]
            x = torch.cat(parts, dim=1)[:, -s:, :]
        mha = blk.cached_attn.attn
        out, ent, aw = critic_attention(
            x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, mha.num_heads,
            causal=self.causal, dropout_p=mha.dropout, training=self.training, backend=self.backend,
        )  # fmt: skip
        h = self._mlp_ln(blk, name, x, out)
        return h, layer_emb, ent, torch.softmax(aw, dim=-1)

    def _head_train(
        self, head: TapeHead, name: str, tok: torch.Tensor, prev_h: torch.Tensor | None,
        prev_emb: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        prev_h_l = prev_h_r = prev_h
        prev_emb_l = prev_emb_r = prev_emb
        ents, aws = [], []
        h = prev_h
        for i in range(head.num_layers):
            hl, prev_emb_l, ent_l, aw_l = self._block_train(
                head.blocks_left[i], f"{name}.blocks_left.{i}", tok, prev_h_l, prev_emb_l)
            hr, prev_emb_r, ent_r, aw_r = self._block_train(
                head.blocks_right[i], f"{name}.blocks_right.{i}", tok, prev_h_r, prev_emb_r)
            h = tapehead_combine(hl, hr, head.discriminate, backend=self.backend)
            prev_h_l = prev_h_r = h
            ents.append((ent_l + ent_r) / 2.0)
            aws.append((aw_l + aw_r) / 2.0)
        attn = (torch.stack(aws, dim=0) * head.layer_weights.view(-1, 1, 1).to(aws[0].dtype)).sum(dim=0)  # (B, S)
        entropy = torch.stack(ents).sum() / head.num_layers
        out_emb = None if prev_emb_r is None else 0.5 * (prev_emb_r + prev_emb_l)
        return h, out_emb, entropy, attn

    def _prophet_weights(self) -> list[torch.Tensor]:
        w: list[torch.Tensor] = []
        for left, right in zip(self.prophet.cells_left, self.prophet.cells_right):
            w += [left.i2h.weight, left.i2h.bias, left.h2h.weight, left.h2h.bias,
                  right.i2h.weight, right.i2h.bias, right.h2h.weight, right.h2h.bias]  # fmt: skip
        return w

    def _dead_params(self, skipped_heads: list[int]) -> list[torch.Tensor]:
        """Parameters the reference reaches only through discarded paths (zero gradients there)."""
        mods = [self.prophet, self.rnn_projection] + [self.residualheads[i] for i in skipped_heads]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def _forward_train(self, x: torch.Tensor, need_aux: bool) -> tuple[Any, ...]:
        e = self.holistic_embed(x)  # (B, S, D)
        coda_h, _, ent, attn = self._head_train(self.codahead, "codahead", e, None, None)
        n = self.num_heads
        if self.skip_dead:
            prophecy = None
            run = list(range(n)) if need_aux else [n - 1]
        else:
            prophecy, _ = charrnn(e, self._prophet_weights(), None, backend=self.backend)  # (B, S, 2D)
            prophecy = self.rnn_projection(prophecy)  # (B, S, D)
            run = list(range(n))
        ents = [ent]
        tok = e
        for i in run:
            tok, _, ent_i, attn_i = self._head_train(self.residualheads[i], f"residualheads.{i}", tok, coda_h, prophecy)
            attn = attn + attn_i
            ents.append(ent_i)
        logp = student_t_unembedding(tok, self.unembedding, DEFAULT_DF, backend=self.backend)
        link = self.skip_dead and torch.is_grad_enabled()
        if link:
            # The log-probs reach critics 0..n-2 only through discarded paths, whether or not they ran.
            logp = _ZeroGradLink.apply(logp, *self._dead_params(list(range(n - 1))))
        if not need_aux:
            return logp, None, None
        entropy = torch.stack(ents).sum() / n + 1
        attn = attn / n
        if link:
            dead = self._dead_params([])
            entropy = _ZeroGradLink.apply(entropy, *dead)
            attn = _ZeroGradLink.apply(attn, *dead)
        return logp, entropy, attn

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean NLL of ``targets`` (B, S) through the fused Student-t NLL; runs only the coda and the
        last critic. Gradients equal those of ``nll(forward(x)[0], targets)``."""
        x = check_tokens(x, self.vocab_size, self.seq_len)
        if targets.shape != x.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(x.shape)}")
        e = self.holistic_embed(x)
        coda_h, _, _, _ = self._head_train(self.codahead, "codahead", e, None, None)
        n = self.num_heads
        h, _, _, _ = self._head_train(self.residualheads[n - 1], f"residualheads.{n - 1}", e, coda_h, None)
        nll = student_t_nll(h, self.unembedding, targets, "mean", DEFAULT_DF, backend=self.backend)
        dead = self._dead_params(list(range(n - 1)))
        return _ZeroGradLink.apply(nll, *dead) if torch.is_grad_enabled() and dead else nll

    # ------------------------------------------------------------------ eval / decode

    def _eval_heads(self) -> list[tuple[str, TapeHead]]:
        heads = [("codahead", self.codahead)]
        idx = range(self.num_heads) if not self.skip_dead else [self.num_heads - 1]
        return heads + [(f"residualheads.{i}", self.residualheads[i]) for i in idx]

    def new_cache(self, batch_size: int, capacity: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> FusedCache:
        """An empty preallocated cache for ``capacity`` tokens."""
        device = device or self.unembedding.device
        dtype = dtype or self.unembedding.dtype
        ks, vs, names = [], [], []
        for hname, head in self._eval_heads():
            for side in ("left", "right"):
                for i, blk in enumerate(getattr(head, f"blocks_{side}")):
                    mha = blk.cached_attn.attn
                    dh = self.embed_dim // mha.num_heads
                    ks.append(torch.empty(batch_size, mha.num_heads, capacity, dh, device=device, dtype=dtype))
                    vs.append(torch.empty_like(ks[-1]))
                    names.append(f"{hname}.blocks_{side}.{i}")
        rnn = None
        if not self.skip_dead:
            rnn = [torch.zeros(batch_size, 1, self.prophet.hidden_size, device=device, dtype=dtype)
                   for _ in range(self.prophet.num_layers)]  # fmt: skip
        return FusedCache(ks, vs, 0, capacity, names, rnn)

    def _embed_position_at(self, blk: TapeHeadBlock, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``_embed_positions`` for one token (B, 1, D) at a device-side position ``pos`` (1,) int64."""
        if not self.causal:  # reference semantics: position 0, a single token is not rotated
            return tok + blk.pos_emb[:, :1, :]
        e = tok + blk.pos_emb.index_select(1, pos)
        return apply_rope(e, blk.rope_freqs, offset=pos)

    def _block_eval(self, blk: TapeHeadBlock, name: str, tok: torch.Tensor, prev_h: torch.Tensor | None,
                    cache: FusedCache, idx: int, pos: torch.Tensor | None = None,
                    lens: torch.Tensor | None = None) -> torch.Tensor:
        """One block over S new tokens. ``pos``/``lens`` ((1,) int64 position, (1,) int32 pos + 1 on the
        device) select the static-shape single-token step (see ``_decode_step_static``)."""
        b, s, d = tok.shape
        t0 = cache.length
        if prev_h is not None:
            x = prev_h[:, -s:, :]
        elif pos is None:
            x = self._embed_positions(blk, tok, t0)
        else:
            x = self._embed_position_at(blk, tok, pos)
        mha = blk.cached_attn.attn
        hh = mha.num_heads
        qkv = self._linear(x, f"{name}.cached_attn.attn.in_proj_weight", mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(b, s, 3, hh, d // hh).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, dh)
        kc, vc = cache.k[idx], cache.v[idx]
        q = q.to(kc.dtype)  # under autocast the projection is half while the cache keeps its dtype
        if pos is None:
            kc[:, :, t0 : t0 + s] = k
            vc[:, :, t0 : t0 + s] = v
            o = critic_attention_decode(q, kc[:, :, : t0 + s], vc[:, :, : t0 + s], causal=self.causal,
                                        backend=self.backend)  # (B, H, S, dh)
        else:
            kc.index_copy_(2, pos, k.to(kc.dtype))
            vc.index_copy_(2, pos, v.to(vc.dtype))
            o = critic_attention_decode(q, kc, vc, causal=self.causal, backend=self.backend, length=lens)
        o = o.transpose(1, 2).reshape(b, s, d)
        out = self._linear(o, f"{name}.cached_attn.attn.out_proj.weight", mha.out_proj.weight, mha.out_proj.bias)
        return self._mlp_ln(blk, name, x, out)

    def _forward_eval(self, x: torch.Tensor, cache: FusedCache | None) -> tuple[torch.Tensor, FusedCache]:
        b, s = x.shape
        e = self.holistic_embed(x)  # (B, S, D)
        if cache is None:
            cache = self.new_cache(b, s, e.device, e.dtype)
        elif not isinstance(cache, FusedCache):
            raise ValueError("past_kv must be a FusedCache returned by this model (reference caches are not accepted)")
        elif cache.k and (cache.k[0].shape[0] != b or cache.k[0].dtype != e.dtype or cache.k[0].device != e.device):
            raise ValueError(
                f"cache was built for batch {cache.k[0].shape[0]}, {cache.k[0].dtype} on {cache.k[0].device}; "
                f"got batch {b}, {e.dtype} on {e.device}")
        if self.causal and cache.length + s > self.seq_len:
            raise ValueError(f"sequence too long: cache holds {cache.length} tokens, adding {s} exceeds seq_len "
                             f"{self.seq_len} (generate() slides the window)")
        cache.ensure(s)
        tok = self._eval_heads_through(e, cache)
        if cache.rnn is not None:  # skip_dead=False: the reference also advances the prophet
            _, cache.rnn = charrnn(e, self._prophet_weights(), cache.rnn, backend=self.backend)
        cache.length += s
        return student_t_unembedding(tok, self.unembedding, DEFAULT_DF, backend=self.backend), cache

    def _eval_heads_through(self, e: torch.Tensor, cache: FusedCache, pos: torch.Tensor | None = None,
                            lens: torch.Tensor | None = None) -> torch.Tensor:
        """The coda and the evaluated critics over embedded tokens e (B, S, D) -> last hidden (B, S, D)."""
        idx = 0
        coda_h = None
        tok = e
        for hname, head in self._eval_heads():
            h = None if hname == "codahead" else coda_h
            for i in range(head.num_layers):
                hl = self._block_eval(head.blocks_left[i], f"{hname}.blocks_left.{i}", tok, h, cache, idx, pos, lens)
                hr = self._block_eval(head.blocks_right[i], f"{hname}.blocks_right.{i}", tok, h, cache,
                                      idx + head.num_layers, pos, lens)  # fmt: skip
                h = tapehead_combine(hl, hr, head.discriminate, backend=self.backend)
                idx += 1
            idx += head.num_layers
            if hname == "codahead":
                coda_h = h
            tok = h
        return tok

    def _decode_step_static(self, x: torch.Tensor, pos: torch.Tensor, cache: FusedCache) -> torch.Tensor:
        """One decode step with static shapes and no host synchronisation, for CUDA-graph capture.

        x (B, 1) token ids, pos (1,) int64 on the device: the cache row this token fills (the number
        of tokens already cached) -> log-probs (B, 1, V). Attends over the whole preallocated cache
        with the length read on the device, so one capture replays for every position. Does not
        touch ``cache.length`` (the caller tracks it) and needs ``skip_dead=True`` (no prophet
        state) and a cache with room for the row (neither is checked on the device; ``generate``
        guarantees both).
        """
        if cache.rnn is not None:
            raise ValueError("the static decode step needs skip_dead=True (the prophet's state is not static)")
        e = self.holistic_embed(x)  # (B, 1, D)
        lens = (pos + 1).to(torch.int32)
        tok = self._eval_heads_through(e, cache, pos, lens)
        return student_t_unembedding(tok, self.unembedding, DEFAULT_DF, backend=self.backend)

    # ------------------------------------------------------------------ entry point

    def forward(self, x: torch.Tensor, past_kv: FusedCache | None = None, *, need_aux: bool = True) -> tuple[Any, ...]:
        x = check_tokens(x, self.vocab_size, self.seq_len)
        if self.training:
            if past_kv is not None:
                raise ValueError("past_kv is for eval mode; call model.eval() first")
            return self._forward_train(x, need_aux)
        return self._forward_eval(x, past_kv)
