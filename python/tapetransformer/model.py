"""The fused TapeTransformer: the reference's module tree and state_dict, computed with tape_kernels.

``TapeTransformer`` subclasses the reference module and builds its TapeHeads from
:class:`~tapetransformer.blocks.FusedTapeHead` / ``FusedTapeHeadBlock``, which own the dataflow
(training forward, prefill, one-token decode). Parameter names, shapes, order and initialisation are
the original's, so checkpoints load both ways with ``strict=True``. This module only wires the heads
together, keeps the reference's gradient pattern, and manages the generation cache and int8 weights:

* every critic attention, residual+LayerNorm, MLP bias+activation, TapeHead combine and the Student-t
  unembedding run fused kernels (``backend="triton"``; ``"eager"`` runs the same dataflow in plain
  PyTorch; ``"auto"`` picks Triton on CUDA and eager on CPU unless ``TRITON_INTERPRET=1``); in
  training the two blocks of each TapeHead layer run as one pair of grouped GEMM kernels with fused
  epilogues (``FusedTapeHead.pair_forward``, ``tape_kernels.fused_linear``);
* ``skip_dead=True`` (default) skips what provably cannot change an output (spec findings 1–3): the
  prophet and ``rnn_projection`` never run, the concatenation that only kept them in the graph is gone,
  and with ``need_aux=False`` critics 0..n−2 do not run either. The parameters the reference reaches
  only through those dead paths still receive exact zero gradients (not None) through
  :class:`_ZeroGradLink`. ``skip_dead=False`` runs the reference's full dataflow (the prophet through
  the Char-RNN kernel), for like-for-like benchmarks;
* ``causal=True`` repairs the semantics: causal masks in every attention, and absolute positions
  (pos_emb and RoPE, a single token rotated at its position) in cached decode, so that prefill +
  one-token decode reproduces the full causal forward.

* ``design="seed"`` computes the design the seed README describes and the notebook never runs: the
  critics all read a mixture of the coda and the prophet (``merge_projection``), and a moderator
  (``final_norm`` + ``merge_projection_final``) curates the critics, merged with the coda by
  ``merger.proj``; always causal; the prophet's recurrent state lives in the generation cache. Its
  oracle is ``reference.seed_forward``.

Eval-mode caches are :class:`~tapetransformer.kvcache.KVCache` objects holding *projected* K/V (and
the prophet's state where it runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tape_kernels.charrnn import DecodeWeights, charrnn, charrnn_step, pack_decode_weights
from tape_kernels.unembedding import DEFAULT_DF, student_t_nll, student_t_unembedding
from tapetransformer.blocks import FusedOptions, FusedTapeHead, FusedTapeHeadBlock, weight_state
from tapetransformer.kvcache import KVCache
from tapetransformer.reference import ATTENTION_HEADS, ReferenceTapeTransformer, check_tokens

__all__ = ["DESIGNS", "KVCache", "ModelConfig", "TapeTransformer"]

DESIGNS = ("reference", "seed")


@dataclass
class ModelConfig:
    """What a checkpoint records to rebuild a model. ``num_heads`` counts critics (the reference's name)."""

    vocab_size: int
    seq_len: int = 64
    embed_dim: int = 64
    num_heads: int = 2
    dropout: float = 0.0
    causal: bool = False  # the repaired semantics of the fused model (False: the reference's)
    design: str = "reference"  # "seed": prophet and moderator wired in (always causal)

    @property
    def num_critics(self) -> int:
        return self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        keys = ("vocab_size", "seq_len", "embed_dim", "num_heads", "dropout", "causal", "design")
        known = {k: d[k] for k in keys if k in d}
        return cls(**known)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        """Infer the config of a reference-layout state_dict (e.g. one saved by the notebook)."""
        try:
            embed_dim, vocab = sd["unembedding"].shape
            seq_len = sd["codahead.blocks_left.0.pos_emb"].shape[1]
        except KeyError as e:
            raise ValueError(f"not a TapeTransformer state_dict: missing {e.args[0]!r}") from None
        heads = {k.split(".")[1] for k in sd if k.startswith("residualheads.")}
        return cls(vocab_size=int(vocab), seq_len=int(seq_len), embed_dim=int(embed_dim), num_heads=len(heads))


class _ZeroGradLink(torch.autograd.Function):
    """Identity on ``out`` whose backward hands exact zero gradients to ``params``.

    The reference reaches the prophet, ``rnn_projection`` and (for the log-probs) critics 0..n−2 only
    through a concatenation whose slice discards them, so autograd gives them zero tensors. Skipping
    that work must not turn those zeros into None. The zeros are views into one buffer (one fill for
    all of them, not one per parameter).
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.meta = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        zeros: list[torch.Tensor | None] = [None] * len(ctx.meta)
        groups: dict[tuple, list[int]] = {}
        for i, (_, dt, dev) in enumerate(ctx.meta):
            groups.setdefault((dt, dev), []).append(i)
        for (dt, dev), idx in groups.items():
            sizes = [ctx.meta[i][0].numel() for i in idx]
            flat = torch.zeros(sum(sizes), dtype=dt, device=dev)
            for i, z in zip(idx, flat.split(sizes)):
                zeros[i] = z.view(ctx.meta[i][0])
        return (grad, *zeros)


def _link_dead(out: torch.Tensor, dead: list[torch.Tensor]) -> torch.Tensor:
    """``out`` with exact zero gradients for ``dead`` (see :class:`_ZeroGradLink`).

    Under ``torch.compile`` the link is a sum over empty slices of the parameters instead: exactly 0
    in the forward (NaN or inf in a dead parameter cannot reach ``out``) and zero tensors in the
    backward. An autograd.Function in the graph would make AOTAutograd bypass its cache, so every
    warm start would retrace the joint forward-backward graph."""
    if not (torch.is_grad_enabled() and dead):
        return out
    if torch.compiler.is_compiling():
        return out + torch.cat([p.reshape(-1)[:0] for p in dead]).sum()
    return _ZeroGradLink.apply(out, *dead)


class TapeTransformer(ReferenceTapeTransformer):
    """Fused TapeTransformer; the reference's constructor plus ``causal``, ``backend``, ``skip_dead``, ``design``.

    ``num_critics`` is the clear name of the reference's ``num_heads`` (residual TapeHeads, not
    attention heads); give either.

    training: ``forward(x (B,S)) -> (logp (B,S,V), entropy (), attn_weights (B,S))``;
              ``need_aux=False`` returns ``(logp, None, None)`` and skips critics 0..n−2.
    eval:     ``forward(x, past_kv=None) -> (logp (B,S,V), KVCache)``.
    ``loss(x, targets)``: mean NLL through the fused Student-t NLL (no (B,S,V) log-probs stored).
    ``prefill(x, cache)`` / ``decode_step(x, pos, cache)``: generation (see ``tapetransformer.generate``).
    """

    head_cls = FusedTapeHead

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        num_layers: int = 4,
        embed_dim: int = 128,
        num_heads: int | None = None,
        dropout: float = 0.1,
        *,
        num_critics: int | None = None,
        causal: bool | None = None,
        backend: str = "auto",
        skip_dead: bool = True,
        design: str = "reference",
    ) -> None:
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
        if design == "seed" and causal is False:
            raise ValueError("design='seed' always uses the causal semantics; drop causal=False")
        if num_heads is not None and num_critics is not None and num_heads != num_critics:
            raise ValueError(f"num_heads={num_heads} and num_critics={num_critics} disagree (they are one setting: "
                             "the number of residual TapeHeads)")
        critics = num_critics if num_critics is not None else (num_heads if num_heads is not None else 2)
        for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len), ("embed_dim", embed_dim),
                        ("num_critics", critics)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        super().__init__(vocab_size, seq_len, num_layers, embed_dim, critics, dropout)
        self.design = design
        causal = design == "seed" if causal is None else bool(causal)
        self.opts = FusedOptions(causal=causal, backend=backend, skip_dead=bool(skip_dead))
        for blk in self.fused_blocks():
            blk.opts = self.opts

    # ------------------------------------------------------------------ options

    @property
    def num_critics(self) -> int:
        return self.num_heads

    @property
    def causal(self) -> bool:
        return self.opts.causal

    @causal.setter
    def causal(self, value: bool) -> None:
        if self.design == "seed" and not value:
            raise ValueError("design='seed' always uses the causal semantics")
        self.opts.causal = bool(value)

    @property
    def backend(self) -> str:
        return self.opts.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.opts.backend = FusedOptions(backend=value).backend

    @property
    def skip_dead(self) -> bool:
        return self.opts.skip_dead

    @property
    def recompute(self) -> bool:
        """Activation recomputation around every TapeHead block in training."""
        return self.opts.recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self.opts.recompute = bool(value)

    def fused_blocks(self) -> Iterator[FusedTapeHeadBlock]:
        return (m for m in self.modules() if isinstance(m, FusedTapeHeadBlock))

    @property
    def runs_prophet(self) -> bool:
        """Whether eval runs the prophet: its output feeds the seed design; the reference design runs it
        only with ``skip_dead=False`` (its output never reaches an output there)."""
        return self.design == "seed" or not self.skip_dead

    def eval_heads(self) -> list[FusedTapeHead]:
        """The heads an eval/decode pass runs, in order: the coda, then the critics that can reach the
        output (all of them in the seed design; only the last with ``skip_dead`` in the reference's)."""
        critics = list(self.residualheads) if self.design == "seed" or not self.skip_dead else [self.residualheads[-1]]
        return [self.codahead, *critics]

    # ------------------------------------------------------------------ int8 inference weights

    def quantize_int8_(self, act_quant: bool | None = None) -> TapeTransformer:
        """Give every block int8 copies (per-channel symmetric) of its four Linear weights, used by every
        eval-mode forward, with or without autograd, and by any forward without autograd (a training-mode
        forward with autograd trains the float weights; the state_dict is unaffected).

        Cached per block: calling again (as every ``generate(int8=True)`` does) re-quantizes only a
        block whose weights changed, were replaced or moved since. ``act_quant``: False weight-only,
        True W8A8, None the faster of the two per call (``tape_kernels.int8.resolve_act_quant``).
        """
        for blk in self.fused_blocks():
            blk.int8 = blk.quantized()
            blk.int8_act_quant = act_quant
        return self

    def dequantize_(self) -> TapeTransformer:
        """Drop the int8 weights (and the cached copies ``generate(int8=True)`` reuses)."""
        for blk in self.fused_blocks():
            blk.drop_int8()
        return self

    def int8_up_to_date(self) -> bool:
        """Whether every block's cached int8 weights were made from its current float weights."""
        return all(blk.quantized_cached() is not None for blk in self.fused_blocks())

    @property
    def int8_mode(self) -> tuple[str, bool | None] | None:
        """None when the blocks use float weights, else ("int8", act_quant)."""
        blk = next(self.fused_blocks())
        return None if blk.int8 is None else ("int8", blk.int8_act_quant)

    def int8_tensors(self) -> list[torch.Tensor]:
        """Every int8 tensor the blocks use now (what a captured graph must keep alive)."""
        return [t for blk in self.fused_blocks() if blk.int8 is not None for pair in blk.int8 for t in pair]

    @contextlib.contextmanager
    def int8_weights(self, enabled: bool = True, act_quant: bool | None = None) -> Iterator[TapeTransformer]:
        """Within the block, eval paths use int8 weights (``enabled``); the previous setting returns after."""
        saved = [(blk.int8, blk.int8_act_quant) for blk in self.fused_blocks()]
        try:
            if enabled:
                self.quantize_int8_(act_quant)
            yield self
        finally:
            for blk, (q, aq) in zip(self.fused_blocks(), saved):
                blk.int8, blk.int8_act_quant = q, aq

    # ------------------------------------------------------------------ training

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

    def _seed_hidden(self, coda: torch.Tensor, p: torch.Tensor, critic: Any) -> torch.Tensor:
        """The seed design after the coda (B, S, D) and the projected prophecy p (B, S, D): the critics'
        shared input, the critics (``critic(i, head, mix) -> c_i``), the moderator and the merger."""
        mix = self.merge_projection(torch.cat([coda, p], dim=-1))
        cs = [critic(i, head, mix) for i, head in enumerate(self.residualheads)]
        mod = self.merge_projection_final(self.final_norm(torch.cat(cs, dim=-1)))
        return self.merger.proj(torch.cat([coda, mod], dim=-1))

    def _seed_train(self, x: torch.Tensor, stats: bool = True) -> tuple[torch.Tensor, list[tuple[Any, Any]]]:
        """Seed design, training: -> (last hidden (B, S, D), [(entropy, attn) of the coda and each critic];
        with ``stats=False`` the pairs are (None, None))."""
        e = self.holistic_embed(x)
        coda, _, ent, attn = self.codahead(e, None, None, stats=stats)
        p = self.rnn_projection(charrnn(e, self._prophet_weights(), None, backend=self.backend)[0])
        pairs, want = [(ent, attn)], stats

        def critic(i: int, head: FusedTapeHead, mix: torch.Tensor) -> torch.Tensor:
            c, _, ent_i, attn_i = head(e, mix, None, stats=want)
            pairs.append((ent_i, attn_i))
            return c

        return self._seed_hidden(coda, p, critic), pairs

    def _forward_train(self, x: torch.Tensor, need_aux: bool) -> tuple[Any, ...]:
        if self.design == "seed":
            h, stats = self._seed_train(x)
            logp = student_t_unembedding(h, self.unembedding, DEFAULT_DF, backend=self.backend)
            if not need_aux:
                return logp, None, None
            n = self.num_heads
            attn = torch.stack([a for _, a in stats]).sum(dim=0)
            return logp, torch.stack([en for en, _ in stats]).sum() / n + 1, attn / n
        e = self.holistic_embed(x)  # (B, S, D)
        coda_h, _, ent, attn = self.codahead(e, None, None)
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
            tok, _, ent_i, attn_i = self.residualheads[i](tok, coda_h, prophecy)
            attn = attn + attn_i
            ents.append(ent_i)
        logp = student_t_unembedding(tok, self.unembedding, DEFAULT_DF, backend=self.backend)
        link = self.skip_dead and torch.is_grad_enabled()
        if link:
            # The log-probs reach critics 0..n-2 only through discarded paths, whether or not they ran.
            logp = _link_dead(logp, self._dead_params(list(range(n - 1))))
        if not need_aux:
            return logp, None, None
        entropy = torch.stack(ents).sum() / n + 1
        attn = attn / n
        if link:
            dead = self._dead_params([])
            entropy = _link_dead(entropy, dead)
            attn = _link_dead(attn, dead)
        return logp, entropy, attn

    def loss(self, x: torch.Tensor, targets: torch.Tensor, *, check: bool = True, link: bool = True) -> torch.Tensor:
        """Mean NLL of ``targets`` (B, S) through the fused Student-t NLL; runs only the coda and the
        last critic (the reference design). Gradients equal those of ``nll(forward(x)[0], targets)``.

        ``check=False`` skips the token-range checks (a host read on CUDA, a graph break under
        ``torch.compile``): for callers that validated the batch already, outside a captured region.
        ``link=False`` leaves out the zero-gradient link to the parameters the loss does not reach (their
        ``.grad`` stays None): for a caller that applies :meth:`link_dead` to the result itself, outside
        a compiled region, where the link costs nothing to trace."""
        if check:
            x = check_tokens(x, self.vocab_size, self.seq_len)
            if not isinstance(targets, torch.Tensor) or targets.shape != x.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets shape {got} != tokens shape {tuple(x.shape)}")
            check_tokens(targets, self.vocab_size, self.seq_len, name="targets")
        if self.design == "seed":
            h, _ = self._seed_train(x, stats=False)
            return student_t_nll(h, self.unembedding, targets, "mean", DEFAULT_DF, backend=self.backend,
                            check_targets=False)  # checked above, or by the caller
        e = self.holistic_embed(x)
        coda_h, _, _, _ = self.codahead(e, None, None, stats=False)
        h, _, _, _ = self.residualheads[-1](e, coda_h, None, stats=False)
        nll = student_t_nll(h, self.unembedding, targets, "mean", DEFAULT_DF, backend=self.backend,
                            check_targets=False)  # checked above, or by the caller
        return self.link_dead(nll) if link else nll

    def link_dead(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` with exact zero gradients for the parameters the reference design's loss reaches only
        through discarded paths (the prophet, ``rnn_projection``, critics 0..n−2): what ``loss(link=True)``
        adds. The seed design has none."""
        if self.design == "seed":
            return loss
        return _link_dead(loss, self._dead_params(list(range(self.num_heads - 1))))

    # ------------------------------------------------------------------ eval / generation

    def new_cache(self, batch_size: int, capacity: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty preallocated cache for ``capacity`` tokens of the heads ``eval_heads()`` runs."""
        device = device or self.unembedding.device
        dtype = dtype or self.unembedding.dtype
        rnn = None
        if self.runs_prophet:  # one tensor, so that the native CPU step reads every layer's state at once
            rnn = torch.zeros(self.prophet.num_layers, batch_size, 1, self.prophet.hidden_size, device=device,
                              dtype=dtype)
        return KVCache([h.num_layers for h in self.eval_heads()], batch_size, ATTENTION_HEADS,
                       self.embed_dim // ATTENTION_HEADS, capacity, device=device, dtype=dtype, rnn=rnn)

    def _check_cache(self, cache: Any, b: int, s: int, e: torch.Tensor) -> KVCache:
        if cache is None:
            return self.new_cache(b, s, e.device, e.dtype)
        if not isinstance(cache, KVCache):
            raise ValueError("past_kv must be a KVCache returned by this model (reference caches are not accepted)")
        want = [h.num_layers for h in self.eval_heads()]
        if list(cache.layers_per_head) != want:
            raise ValueError(f"past_kv holds heads of {list(cache.layers_per_head)} layers; this model evaluates "
                             f"{want}")
        kv = cache.kv
        if kv.shape[2] != b or kv.dtype != e.dtype or kv.device != e.device:
            raise ValueError(f"past_kv was built for batch {kv.shape[2]}, {kv.dtype} on {kv.device}; "
                             f"got batch {b}, {e.dtype} on {e.device}")
        if self.causal and cache.length + s > self.seq_len:
            raise ValueError(f"sequence too long: the cache holds {cache.length} tokens, adding {s} exceeds seq_len "
                             f"{self.seq_len} (generate() slides the window)")
        return cache

    def prefill(
        self, x: torch.Tensor, cache: KVCache | None = None, *, check: bool = True
    ) -> tuple[torch.Tensor, KVCache]:
        """Eval forward of S new tokens x (B, S) after the ``cache.length`` cached ones -> (log-probs
        (B, S, V), the cache advanced by S). ``check=False`` skips the token-range check (two device
        reads on CUDA), for ids known to be valid."""
        if check:
            x = check_tokens(x, self.vocab_size, self.seq_len)
        b, s = x.shape
        e = self.holistic_embed(x)  # (B, S, D)
        cache = self._check_cache(cache, b, s, e)
        cache.ensure(s)
        if self.design == "seed":
            coda = self.codahead.prefill(e, None, cache, 0)
            p = self.rnn_projection(self._advance_prophet(e, cache))
            h = self._seed_hidden(coda, p, lambda i, head, mix: head.prefill(e, mix, cache, 1 + i))
        else:
            h, coda_h = e, None
            for i, head in enumerate(self.eval_heads()):
                h = head.prefill(e, coda_h, cache, i)
                coda_h = h if coda_h is None else coda_h
            if cache.rnn is not None:  # skip_dead=False: the reference also advances the prophet
                self._advance_prophet(e, cache)
        cache.length += s
        return student_t_unembedding(h, self.unembedding, DEFAULT_DF, backend=self.backend), cache

    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step with static shapes and no host synchronisation, for CUDA-graph capture.

        x (B, 1) token ids, pos (1,) int64 on the device: the cache row this token fills (the number of
        tokens already cached) -> log-probs (B, 1, V). Attends over the whole preallocated cache with
        the length read on the device, so one capture replays for every position. Does not touch
        ``cache.length`` (the caller tracks it) and needs a cache with room for the row (not checked on
        the device; ``generate`` guarantees it). The prophet's state, where it runs, is advanced in
        place in the cache (the one-launch Char-RNN step kernel).
        """
        e = self.holistic_embed(x)  # (B, 1, D)
        lens = (pos + 1).to(torch.int32)
        if self.design == "seed":
            coda = self.codahead.decode_step(e, None, cache, 0, pos, lens)
            p = self.rnn_projection(self._advance_prophet(e, cache, step=True))
            h = self._seed_hidden(coda, p, lambda i, head, mix: head.decode_step(e, mix, cache, 1 + i, pos, lens))
        else:
            h, coda_h = e, None
            for i, head in enumerate(self.eval_heads()):
                h = head.decode_step(e, coda_h, cache, i, pos, lens)
                coda_h = h if coda_h is None else coda_h
            if cache.rnn is not None:
                self._advance_prophet(e, cache, step=True)
        return student_t_unembedding(h, self.unembedding, DEFAULT_DF, backend=self.backend)

    def _advance_prophet(self, e: torch.Tensor, cache: KVCache, step: bool = False) -> torch.Tensor:
        """Run the prophet over e (B, S, D) from the cache's state and store the new state *in place*
        (a captured graph keeps reading the same buffers) -> its output (B, S, Hd). ``step``: S = 1
        through the one-launch decode kernel with weights packed once (``prepare_decode``)."""
        weights = self._prophet_weights()
        if step:
            out, states = charrnn_step(e, weights, cache.rnn, backend=self.backend, packed=self.prophet_packed())
        else:
            out, states = charrnn(e, weights, cache.rnn, backend=self.backend)
        for old, new in zip(cache.rnn, states):
            old.copy_(new)
        return out

    def prophet_packed(self) -> DecodeWeights:
        """The prophet's weights stacked for the Char-RNN decode kernel, re-made only after they changed."""
        weights = self._prophet_weights()
        made = self.__dict__.get("_prophet_packed")
        if made is not None and all(w is src and weight_state(w) == st for w, (src, st) in zip(weights, made[1])):
            return made[0]
        packed = pack_decode_weights(weights)
        self.__dict__["_prophet_packed"] = (packed, [(w, weight_state(w)) for w in weights])
        return packed

    def prepare_decode(self) -> None:
        """Refresh what decode steps read besides the parameters (the prophet's packed weights), so a
        captured graph's fingerprint (``derived_tensors``) sees a weight update."""
        if self.runs_prophet:
            self.prophet_packed()

    def derived_tensors(self) -> list[torch.Tensor]:
        """Tensors made from the parameters that decode steps read: int8 copies, packed prophet weights."""
        made = self.__dict__.get("_prophet_packed")
        packed = list(made[0]) if made is not None and self.runs_prophet else []
        return [*self.int8_tensors(), *packed]

    # ------------------------------------------------------------------ entry point

    def forward(self, x: torch.Tensor, past_kv: KVCache | None = None, *, need_aux: bool = True) -> tuple[Any, ...]:
        x = check_tokens(x, self.vocab_size, self.seq_len)
        if self.training:
            if past_kv is not None:
                raise ValueError("past_kv is for eval mode; call model.eval() first")
            return self._forward_train(x, need_aux)
        return self.prefill(x, past_kv, check=False)

