"""Native CPU decode: one call into ``tape_kernels._C`` per token (``torch.ops.tape_kernels.decode_step``).

The model's own decode dispatches ~420 ATen ops per token (int8; ~590 in fp32); here the
whole step — embedding, the coda and the last critic (every TapeHeadBlock: QKV projection, K/V write,
attention, out projection, LayerNorms, MLP), the combines and the Student-t unembedding — runs in
C++ (``csrc/decode_cpu.cpp``), with the weights' pointers collected once into a
``torch.classes.tape_kernels.DecodePlan`` when a :class:`NativeDecoder` is built (once per
``generate()`` call). Python only samples and keeps the length.

K/V cache: the model's :class:`~tapetransformer.kvcache.KVCache` layout, which the decoder borrows
(a ``KVCache``, or its ``kv`` tensor): one fp32 contiguous tensor of shape
``(n_blocks, 2 [k, v], B, H, capacity, dh)``, blocks ordered (head, layer, side): block =
head_offset + 2·layer + side (side 0 left, 1 right); the coda is head 0 (4 blocks), the last critic
head 1 (8 blocks). Step t writes row t and attends over rows 0..t. So ``model.prefill`` and the
native step continue each other's cache.

Weights: fp32 (the model's parameters, read in place), W8A8 or weight-only int8 (the int8 kernels
of ``csrc/int8_cpu.cpp``). :func:`int8_weight` is the single place int8 weights come from.

The same op takes S > 1 tokens (:meth:`NativeDecoder.extend`, :func:`prefill`): a native prefill
that streams each weight once for all B·S rows (faster than the fused model's prefill, see
:func:`prefill`).

The seed design (``design="seed"``) runs through ``torch.ops.tape_kernels.decode_step_seed``: the
coda, every critic on the mixture of the coda and the prophet, the moderator and the merger; the
prophet's Char-RNN state is the KVCache's ``rnn_state`` ((layers, B, 1, Hd), made by
``model.new_cache``), advanced in place by each step and rebuilt by a native prefill, so the model's
prefill and the native step continue each other there too. The prophet, the projections, the
moderator and the merger stay fp32 in the int8 modes, as in the model's int8 path.

Sampling: :func:`native_pick` draws in one native call (``torch.ops.tape_kernels.sample_next``) with the
Philox stream of ``tape_kernels.sampling`` (the same ids for a seed) and raises on NaN log-probs.

Semantics are the model's (``_forward_eval`` for one token): reference semantics (``causal=False``)
put the token at position 0 and do not rotate it; ``causal=True`` uses the absolute position and RoPE.
Results equal ``_forward_eval``'s to fp32 rounding (the summation order of the products differs),
not bitwise; see tests/test_native_decode.py for the bounds.
"""

from __future__ import annotations

from typing import Any

import torch

from tape_kernels.int8 import _packed, extension_available
from tape_kernels.unembedding import DEFAULT_DF
from tapetransformer.blocks import BlockInt8, FusedTapeHeadBlock
from tapetransformer.model import KVCache, TapeTransformer

__all__ = [
    "NativeDecoder",
    "build_plan",
    "int8_weights",
    "kv_shape",
    "native_available",
    "native_decoder",
    "native_pick",
    "native_prefill_faster",
    "native_supported",
    "new_kv",
    "prefill",
]

WEIGHT_KINDS = ("fp32", "w8a8", "w8")  # config code 0, 1, 2 of the plan
_LINEARS = ("in_proj", "out_proj", "expand", "linear")  # BlockInt8's fields, the plan's order
_fakes_registered = False


def native_available() -> bool:
    """Whether the loaded extension has the native decode op (an older build may lack it)."""
    if not extension_available() or not hasattr(torch.ops.tape_kernels, "decode_step"):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Fake class and kernel, so that torch.library.opcheck (and tracing) can run the op on fake tensors."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    from torch._library.fake_class_registry import register_fake_class

    @register_fake_class("tape_kernels::DecodePlan")
    class _FakeDecodePlan:  # noqa: F841  (registered by the decorator)
        def __init__(self, tensors: list[torch.Tensor], config: list[int], floats: list[float]) -> None:
            self.tensors, self.config, self.floats = tensors, config, floats

        @classmethod
        def __obj_unflatten__(cls, flat: Any) -> _FakeDecodePlan:
            return cls(**dict(flat))

        def vocab(self) -> int:
            return self.config[2]

        def n_blocks(self) -> int:
            return sum(2 * n for n in self.config[7 : 7 + 2 * self.config[6] : 2])

    @torch.library.register_fake("tape_kernels::decode_step")
    def _(plan: Any, tok: torch.Tensor, kv: torch.Tensor, t0: int) -> torch.Tensor:
        s = tok.shape[1] if tok.dim() == 2 else 1
        return kv.new_empty((tok.shape[0], s, plan.vocab()))

    @torch.library.register_fake("tape_kernels::decode_step_seed")
    def _(plan: Any, tok: torch.Tensor, kv: torch.Tensor, rnn: torch.Tensor, t0: int) -> torch.Tensor:
        s = tok.shape[1] if tok.dim() == 2 else 1
        return kv.new_empty((tok.shape[0], s, plan.vocab()))

    @torch.library.register_fake("tape_kernels::sample_next")
    def _(logp: torch.Tensor, state: Any, inv_temp: float, top_k: int) -> torch.Tensor:
        return logp.new_empty((logp.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("tape_kernels::decode_linear_f32")
    def _(x: torch.Tensor, w: torch.Tensor, bias: Any) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("tape_kernels::decode_activation")
    def _(x: torch.Tensor, bias: Any) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def native_supported(model: TapeTransformer) -> bool:
    """Whether :class:`NativeDecoder` computes what ``model.prefill`` computes: an eval-mode fp32 CPU model
    of the seed design, or of the reference design whose eval path runs no prophet (``skip_dead=True``),
    outside autocast."""
    if not isinstance(model, TapeTransformer) or model.training:
        return False
    if model.design == "reference" and model.runs_prophet:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return False
    if any(t.device.type != "cpu" for t in model.int8_tensors()):
        return False
    if not native_available():
        return False
    return model.design != "seed" or hasattr(torch.ops.tape_kernels, "decode_step_seed")  # an older build lacks it


# ----------------------------------------------------------------------------------------------- cache


def _n_blocks(model: TapeTransformer) -> int:
    return sum(2 * head.num_layers for head in model.eval_heads())


def _attn_heads(model: TapeTransformer) -> int:
    return model.codahead.blocks_left[0].attention.num_heads


def kv_shape(model: TapeTransformer, batch: int, capacity: int) -> tuple[int, ...]:
    """(n_blocks, 2, B, H, capacity, dh): ``model.new_cache(batch, capacity).kv.shape``."""
    h = _attn_heads(model)
    return (_n_blocks(model), 2, batch, h, capacity, model.embed_dim // h)


def new_kv(model: TapeTransformer, batch: int, capacity: int) -> KVCache:
    """An empty fp32 CPU cache of ``model`` (rows are written before they are read)."""
    return model.new_cache(batch, capacity, torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------------------------- weights


def int8_weights(block: FusedTapeHeadBlock) -> BlockInt8:
    """The (qweight (N, K) int8, scale (N,) fp32) pairs of ``block``'s four Linear weights.

    THE ONE PLACE the native decoder gets int8 weights from: the copies the block uses now
    (``quantize_int8_``), else its cached quantization of the current float weights (made on first
    use, by the same per-channel rule, ``tape_kernels.int8.quantize_weight``).
    """
    return block.int8 if block.int8 is not None else block.quantized()


def _weight_kind(model: TapeTransformer, weights: str | None) -> str:
    if weights is None:
        mode = model.int8_mode
        if mode is None:
            return "fp32"
        return "w8" if mode[1] is False else "w8a8"  # act_quant None picks W8A8 on CPU
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS} or None, got {weights!r}")
    return weights


def _eval_blocks(model: TapeTransformer) -> list[FusedTapeHeadBlock]:
    """The evaluated blocks in the cache's order: (head, layer, side)."""
    return [blk for head in model.eval_heads() for i in range(head.num_layers)
            for blk in (head.blocks_left[i], head.blocks_right[i])]  # fmt: skip


def build_plan(model: TapeTransformer, weights: str | None = None) -> Any:
    """A ``torch.classes.tape_kernels.DecodePlan`` over ``model``'s current weights (see csrc/bindings.cpp
    for its layout). It holds the tensors it reads (the fp32 parameters themselves, no copy; the int8
    and packed copies; tables derived from the weights, such as Σ unembedding²), so it stays valid,
    but reflects the weights as they were when built: build a new one after the weights change."""
    kind = _weight_kind(model, weights)
    d, v, seq = model.embed_dim, model.vocab_size, model.seq_len
    heads = model.eval_heads()
    config = [d, _attn_heads(model), v, seq, int(model.causal), WEIGHT_KINDS.index(kind), len(heads)]
    for head in heads:
        config += [head.num_layers, int(head.discriminate)]
    floats = [float(DEFAULT_DF)]

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().contiguous()

    u = f32(model.unembedding)
    coda = (model.codahead.blocks_left[0], model.codahead.blocks_right[0])
    # RoPE tables as the model builds them: theta = p·f_i in fp32, then torch's cos/sin.
    pos_t = torch.arange(seq, dtype=torch.float32)
    theta = torch.stack([pos_t[:, None] * b.rope_freqs.float()[None, :] for b in coda])  # (2, seq, D/2)
    tensors = [
        f32(model.holistic_embed.weight),
        u,
        (u**2).sum(dim=0).contiguous(),  # student_t_unembedding_ref's w2, the same op
        torch.stack([f32(b.pos_emb[0]) for b in coda]),
        theta.cos().contiguous(),
        theta.sin().contiguous(),
    ]
    empty = torch.empty(0)
    for blk in _eval_blocks(model):
        mha = blk.attention
        tensors += [f32(mha.in_proj_bias), f32(mha.out_proj.bias), f32(blk.mlp.expand.bias), f32(blk.ln_attn.weight),
                    f32(blk.ln_attn.bias), f32(blk.ln_mlp.weight), f32(blk.ln_mlp.bias)]  # fmt: skip
        floats += [float(blk.ln_attn.eps), float(blk.ln_mlp.eps)]
        if kind == "fp32":
            for w in (mha.in_proj_weight, mha.out_proj.weight, blk.mlp.expand.weight, blk.mlp.linear.weight):
                tensors += [f32(w), empty, empty]
            continue
        q8 = int8_weights(blk)
        for which in _LINEARS:
            q, sc = getattr(q8, which)
            q, sc = q.contiguous(), sc.float().contiguous()
            if kind == "w8a8":
                packed, wsum = _packed(q)  # int8_linear's pack cache: the model's prefill reuses the packs
                tensors += [packed, wsum, sc]
            else:
                tensors += [q, sc, empty]
    if model.design == "seed":
        _seed_plan(model, config, tensors, floats)
    return torch.classes.tape_kernels.DecodePlan(tensors, config, floats)


def _seed_plan(model: TapeTransformer, config: list[int], tensors: list[torch.Tensor], floats: list[float]) -> None:
    """The seed design's part of a plan (csrc/bindings.cpp): prophet, projections, moderator, merger;
    fp32 whatever the blocks' weights (the model's int8 path quantizes only the blocks)."""
    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().contiguous()

    w = model._prophet_weights()  # per layer: left W_i, b_i, W_h, b_h, then right's
    layers = model.prophet.num_layers
    config += [1, layers, model.prophet.hidden_size]
    for l in range(layers):
        wil, bil, whl, bhl, wir, bir, whr, bhr = w[8 * l : 8 * (l + 1)]
        tensors += [f32(torch.cat([wil, wir])), f32(torch.cat([bil, bir])), f32(torch.cat([whl, whr])),
                    f32(torch.cat([bhl, bhr]))]  # fmt: skip
    tensors += [f32(model.rnn_projection.weight), f32(model.rnn_projection.bias), f32(model.merge_projection.weight),
                f32(model.final_norm.weight), f32(model.merge_projection_final.weight),
                f32(model.merger.proj.weight)]  # fmt: skip
    floats.append(float(model.final_norm.eps))


# ----------------------------------------------------------------------------------------------- decoder


class NativeDecoder:
    """Decode one token per :meth:`step` (or S per :meth:`extend`) through ``torch.ops.tape_kernels.decode_step``.

    ``kv``: the cache, a :class:`KVCache` of ``model`` (as ``model.new_cache`` / ``model.prefill`` make
    it) or its ``kv`` tensor, holding ``length`` tokens (default: the KVCache's length, else 0; a given
    length is set on the KVCache too). The
    decoder writes row ``length`` on each step and keeps a KVCache's ``length`` in step with its own,
    so ``model.prefill`` can continue from where it stopped (and vice versa: set ``length``, or pass
    the cache again). It does not grow the cache: a full one raises ValueError (``generate`` sizes it;
    the causal window slide re-prefills and sets ``length``); if the KVCache's tensor was replaced
    (``ensure`` grew it), the next call reads the new one.
    ``weights``: "fp32", "w8a8", "w8" (weight-only int8) or None, which follows the model: its int8
    weights if ``quantize_int8_`` set them (W8A8 unless ``act_quant=False``), else fp32.
    The plan (:func:`build_plan`) is built here, once: make a new decoder after the weights change.
    """

    def __init__(self, model: TapeTransformer, kv: KVCache | torch.Tensor, length: int | None = None, *,
                 weights: str | None = None) -> None:
        if not native_supported(model):
            raise ValueError("NativeDecoder needs an eval-mode fp32 CPU TapeTransformer (seed design, or reference "
                             "design with skip_dead=True) and tape_kernels._C with decode_step (see native_supported)")
        self.cache = kv if isinstance(kv, KVCache) else None
        self.seed = model.design == "seed"
        if self.seed and (self.cache is None or self.cache.rnn_state is None):
            raise ValueError("the seed design decodes into a KVCache made by model.new_cache (it holds the "
                             "prophet's state), not a bare kv tensor")
        tensor = kv.kv if isinstance(kv, KVCache) else kv
        self._check_kv(model, tensor)
        self.model = model
        self.kv = tensor
        self.batch = tensor.shape[2]
        if length is None:
            length = self.cache.length if self.cache is not None else 0
        self.length = length  # a KVCache's length follows
        self.weights = _weight_kind(model, weights)
        self.plan = build_plan(model, self.weights)
        self._op = torch.ops.tape_kernels.decode_step.default
        self._seed_op = torch.ops.tape_kernels.decode_step_seed.default if self.seed else None
        self._tok_shape = torch.Size([self.batch])

    def _run(self, tok: torch.Tensor, t0: int) -> torch.Tensor:
        if self._seed_op is not None:  # the prophet's state advances in place
            return self._seed_op(self.plan, tok, self.kv, self.cache.rnn_state, t0)
        return self._op(self.plan, tok, self.kv, t0)

    @staticmethod
    def _check_kv(model: TapeTransformer, kv: Any) -> None:
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv must be a KVCache or a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != torch.float32 or kv.device.type != "cpu":
            raise ValueError(f"kv must be a float32 CPU tensor, got {kv.dtype} on {kv.device}")
        if kv.dim() != 6 or kv.shape[2] < 1 or kv.shape[4] < 1 or kv.shape != kv_shape(model, kv.shape[2], kv.shape[4]):
            raise ValueError(f"kv must have shape (n_blocks, 2, B, H, capacity, dh) = "
                             f"{kv_shape(model, 'B', 'capacity')}, got {tuple(kv.shape)}")  # type: ignore[arg-type]
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous")

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def length(self) -> int:
        """Tokens cached; the next step writes this row."""
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = self._check_length(value)
        if self.cache is not None:
            self.cache.length = self._length

    def _check_length(self, length: int) -> int:
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.capacity:
            raise ValueError(f"length must be an int in [0, capacity={self.capacity}], got {length!r}")
        return length

    def _sync(self) -> None:
        """Follow the borrowed KVCache: a grown tensor, or a length the model changed."""
        c = self.cache
        if c.kv is not self.kv:
            self._check_kv(self.model, c.kv)
            if c.kv.shape[2] != self.batch:
                raise ValueError(f"the cache's batch changed from {self.batch} to {c.kv.shape[2]}")
            self.kv = c.kv
        self._length = self._check_length(c.length)

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B,) int64 ids -> log-probs (B, 1, V) of the next token; the length advances by one."""
        if type(tok) is not torch.Tensor or tok.dtype != torch.int64 or tok.device.type != "cpu" or (
            tok.shape != self._tok_shape
        ):
            self._bad_tok(tok)
        if self.cache is not None:
            self._sync()
        t0 = self._length
        if t0 >= self.kv.shape[4]:
            raise ValueError(f"kv is full: it holds {t0} tokens (capacity {self.kv.shape[4]})")
        logp = self._run(tok, t0)  # range checks (ids, causal positions) in C++
        self._length = t0 + 1
        if self.cache is not None:
            self.cache.length = t0 + 1
        return logp

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) int64 -> log-probs (B, S, V): S tokens at once (a native prefill, or a chunk of
        one), what ``model.prefill`` computes for them (causal: the same as S steps; reference
        semantics: positions 0..S-1, rotated when S > 1, every new row sees every row). Each weight is
        read once for all B·S rows."""
        if type(tokens) is not torch.Tensor or tokens.dtype != torch.int64 or tokens.device.type != "cpu" or (
            tokens.dim() != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1
        ):
            self._bad_tok(tokens, "tokens", f"({self.batch}, S)")
        if self.cache is not None:
            self._sync()
        t0, s = self._length, tokens.shape[1]
        if t0 + s > self.kv.shape[4]:
            raise ValueError(f"kv holds {t0} tokens: {s} more exceed its capacity {self.kv.shape[4]}")
        logp = self._run(tokens, t0)
        self.length = t0 + s
        return logp

    def _bad_tok(self, tok: Any, name: str = "tok", shape: str | None = None) -> None:
        if not isinstance(tok, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tok).__name__}")
        if tok.dtype != torch.int64:
            raise ValueError(f"{name} must have dtype int64, got {tok.dtype}")
        if tok.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {tok.device}")
        raise ValueError(f"{name} must have shape {shape or f'({self.batch},)'}, got {tuple(tok.shape)}")


def native_decoder(model: TapeTransformer, kv: KVCache | torch.Tensor, length: int | None = None, *,
                   weights: str | None = None) -> NativeDecoder | None:
    """A :class:`NativeDecoder`, or None when the model, the cache or the extension is unsupported (the
    caller falls back)."""
    if not native_supported(model):
        return None
    t = kv.kv if isinstance(kv, KVCache) else kv
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
        return None
    if model.design == "seed" and not (isinstance(kv, KVCache) and kv.rnn_state is not None):
        return None
    return NativeDecoder(model, kv, length, weights=weights)


def native_pick(logp: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
                state: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """``sampling.pick_next`` for CPU log-probs in one native call (``torch.ops.tape_kernels.sample_next``):
    argmax, or the exponential race with the same Philox stream as ``tape_kernels.sampling.sample_ref``
    (a seed draws the same ids), ``state`` (a CPU ``DeviceRNG.state``) advanced in place. logp (B, V) or
    (B, S, V) (its last row) -> ids (B,). Raises ValueError where a row holds NaN or +inf (a NaN weight
    or input), instead of returning some token; ``check=False`` returns -1 for such a row instead (for a
    caller that raises its own error)."""
    if greedy:
        ids = torch.ops.tape_kernels.sample_next(logp, None, 0.0, 0)
    else:
        if state is None:
            raise ValueError("sampling needs the generator's state (a CPU DeviceRNG.state)")
        ids = torch.ops.tape_kernels.sample_next(logp, state, 1.0 / temperature, top_k or 0)
    if check and bool((ids < 0).any()):
        rows = (ids < 0).nonzero().flatten().tolist()
        raise ValueError(f"the model produced non-finite log-probs (NaN or inf) for batch row(s) {rows}: "
                         "its weights or inputs hold NaN/inf")
    return ids


def native_prefill_faster(weights: str) -> bool:
    """Whether :meth:`NativeDecoder.extend` beat the model's own prefill in our measurements: with int8
    weights always; fp32 only with AVX-512 (its register-blocked GEMM; the AVX2 / portable fp32 paths
    are GEMV loops, no faster than the model's MKL GEMM)."""
    if weights != "fp32":
        return True
    from tape_kernels import _C

    return _C.cpu_isa() == "avx512_vnni"


@torch.no_grad()
def prefill(model: TapeTransformer, ctx: torch.Tensor, capacity: int, *, weights: str | None = None,
            native: bool | None = None) -> tuple[torch.Tensor, NativeDecoder]:
    """Prefill ``ctx`` (B, S) into a new cache with room for ``capacity`` tokens and return (log-probs
    (B, S, V), a decoder on that cache at length S).

    ``native=True``: :meth:`NativeDecoder.extend` — one call, each weight read once for all B·S rows.
    ``native=False``: ``model.prefill`` (with int8 weights if ``quantize_int8_`` set them).
    ``native=None`` (default): :func:`native_prefill_faster`, which follows the measured prefill times
    (the README's prefill row and its results file).
    """
    if ctx.dim() == 1:
        ctx = ctx.unsqueeze(0)
    s = ctx.shape[1]
    if capacity < s:
        raise ValueError(f"capacity {capacity} < the {s} prompt tokens")
    if native is None:
        native = native_prefill_faster(_weight_kind(model, weights))
    cache = new_kv(model, ctx.shape[0], capacity)
    if native:
        dec = NativeDecoder(model, cache, 0, weights=weights)
        return dec.extend(ctx), dec
    logp, cache = model.prefill(ctx, cache)
    return logp, NativeDecoder(model, cache, weights=weights)
