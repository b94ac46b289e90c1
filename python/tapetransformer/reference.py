"""The reference TapeTransformer: an eager re-implementation of the original notebook module.

This is the oracle every fused path is tested against, so it keeps the original's behaviour —
quirks included (see ``README.md`` / the spec): positions restart at 0 on every call, a single
token is never rotated, attention is bidirectional, the prophet and ``rnn_projection`` never reach
an output, only the last residual head reaches the log-probabilities, and several modules are
registered but never used. Parameter names, shapes and registration order equal the original's,
so a ``state_dict`` saved by the notebook loads with ``strict=True``.

Two deliberate deviations, both required to make the original runnable at all:
  * the eval path's undefined global ``batch_size`` is the input's batch size;
  * recurrent zeros are created in the input's dtype (the original used the default dtype).
Bad input raises ``ValueError`` (the original asserted).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import Optimizer

from tape_kernels.activation import reference_activation_ref
from tape_kernels.unembedding import DEFAULT_DF, student_t_unembedding_ref

__all__ = [
    "CachedMultiheadAttention",
    "CharRNNCell",
    "CharRNNModel",
    "Merger",
    "RMSNorm",
    "RectifiedKAN",
    "ReferenceActivation",
    "ATTENTION_HEADS",
    "ReferenceTapeTransformer",
    "TapeHead",
    "TapeHeadBlock",
    "Wolf",
    "seed_forward",
]

# The Wolf optimizer's (and the visualization's EWMA's) mixing constant, 1/e.
WOLF_C = 0.367879441

# Attention heads in every TapeHeadBlock. The original fixes them at 4 inside TapeHead; its
# constructor's ``num_heads`` counts residual TapeHeads ("critics") instead.
ATTENTION_HEADS = 4


class Wolf(Optimizer):
    """The notebook's sign-agreement optimizer.

    u = m·(1−c) + g·c;  m ← m·(1−c) + u·c;  p ← p − lr·u where sign(u)·sign(g) > 0.
    ``betas`` and ``eps`` are accepted and unused.
    """

    def __init__(self, params: Any, lr: float = 0.25, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["p"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = 1.0 - WOLF_C
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                m = state["p"]
                u = m * keep + g * WOLF_C
                state["p"] = m * keep + u * WOLF_C
                agree = (torch.sign(u) * torch.sign(g)) > 0
                p.copy_(torch.where(agree, p - lr * u, p))
                state["step"] = state.get("step", 0) + 1
        return loss


class ReferenceActivation(nn.Module):
    """Bounded smooth activation (|y| < 0.2047); ``gamma`` is ignored, as in the original."""

    def __init__(self, gamma: float = 24) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_activation_ref(x)


class CachedMultiheadAttention(nn.Module):
    """Bidirectional self-attention returning (out, entropy, aw) in training, (out, (keys, values)) in eval.

    The eval cache holds the *unprojected* inputs; every call re-projects all of them.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=batch_first)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if self.training:
            out, w = self.attn(query, key, value)  # w: (B, S, S), averaged over heads
            entropy = -torch.sum(w * torch.log(w + 1e-12), dim=-1)  # (B, S)
            aw = (w.sum(dim=-1) + w.sum(dim=-2)) / 2  # (B, S): row sums (≈1) plus column sums
            return out, entropy, aw
        if past_kv is not None:
            key = torch.cat([past_kv[0], key], dim=1)
            value = torch.cat([past_kv[1], value], dim=1)
        out, _ = self.attn(query, key, value)
        return out, (key, value)


class RectifiedKAN(nn.Module):
    def __init__(self, embed_dim: int, expansion_factor: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.expand = nn.Linear(embed_dim, expansion_factor * embed_dim)
        self.activation = ReferenceActivation()
        self.linear = nn.Linear(expansion_factor * embed_dim, embed_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(self.activation(self.expand(x))))


def sinusoidal_positions(seq_len: int, embed_dim: int) -> torch.Tensor:
    """(1, seq_len, D): pe[p, 2i] = sin(p·ω_i), pe[p, 2i+1] = cos(p·ω_i), ω_i = 10000^(−2i/D)."""
    pos = torch.arange(seq_len).unsqueeze(1)
    omega = torch.exp(torch.arange(0, embed_dim, 2) * -(math.log(10000.0) / embed_dim))
    pe = torch.zeros(seq_len, embed_dim)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe.unsqueeze(0)


def rope_frequencies(embed_dim: int) -> torch.Tensor:
    """(D/2,): f_i = 10000^(−i/(D/2)), computed in fp32 as the original does."""
    half = embed_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, half, dtype=torch.float32) / half))


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotate each interleaved pair (x[..., 2i], x[..., 2i+1]) of (B, S, D) by angle (offset+t)·f_i.

    The reference calls this with offset 0 and skips S == 1 (see TapeHeadBlock); the offset exists
    for the causal model's cached decode, and may be a (1,) integer tensor on x's device (the
    CUDA-graph decode step, whose position changes between replays).
    """
    _, s, d = x.shape
    if d % 2:
        raise ValueError(f"RoPE needs an even embedding dim, got {d}")
    freqs = freqs.to(x.dtype)
    if isinstance(offset, torch.Tensor):
        # Small integers are exact in every float dtype used here, so this equals the arange below.
        pos = offset.to(x.dtype) + torch.arange(s, device=x.device, dtype=x.dtype)
    else:
        pos = torch.arange(offset, offset + s, device=x.device, dtype=x.dtype)
    theta = pos[:, None] * freqs[None, :]  # (S, D/2)
    return rotate_pairs(x, theta.cos(), theta.sin())


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) with each interleaved pair (x[..., 2i], x[..., 2i+1]) rotated by the angle whose
    cos/sin (broadcastable to (..., D/2)) are given: RoPE's rotation, shared by the decode paths."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class TapeHeadBlock(nn.Module):
    def __init__(self, seq_len: int, embed_dim: int, vocab_size: int, num_heads: int = 1, dropout: float = 0.1):
        super().__init__()
        self.seq_len = seq_len
        self.embed_dim = embed_dim
        self.max_seq_len = seq_len
        self.vocab_size = vocab_size
        self.register_buffer("pos_emb", sinusoidal_positions(seq_len, embed_dim))
        self.use_rope = True
        self.register_buffer("rope_freqs", rope_frequencies(embed_dim))
        self.cached_attn = CachedMultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.ln_attn = nn.LayerNorm(embed_dim)
        self.mlp = RectifiedKAN(embed_dim)
        self.ln_mlp = nn.LayerNorm(embed_dim)

    def forward(
        self,
        token_emb: torch.Tensor,
        prev_h: torch.Tensor | None,
        prev_emb: torch.Tensor | None,
        past_kv: dict | None = None,
    ) -> tuple[Any, ...]:
        s = token_emb.shape[1]
        layer_emb = token_emb + self.pos_emb[:, :s, :]  # (B, S, D)
        if self.use_rope and s > 1:
            layer_emb = apply_rope(layer_emb, self.rope_freqs)
        if prev_h is not None:
            # Only prev_h's last S rows survive the slice; the concatenation is kept because it keeps
            # prev_emb and layer_emb in the autograd graph (zero gradients, not None).
            parts = ([prev_emb] if prev_emb is not None else []) + [layer_emb, prev_h[:, -s:, :]]
            attn_in = torch.cat(parts, dim=1)[:, -s:, :]
        else:
            attn_in = layer_emb
        if self.training:
            attn_out, entropy, aw = self.cached_attn(attn_in, attn_in, attn_in)
        else:
            past = past_kv.get("chunk_attn") if past_kv is not None else None
            attn_out, cache = self.cached_attn(attn_in, attn_in, attn_in, past_kv=past)
        h = self.ln_attn(attn_in + attn_out)
        h = self.ln_mlp(h + self.mlp(h))
        if self.training:
            return h, layer_emb, entropy, torch.softmax(aw, dim=-1)
        return h, layer_emb, {"chunk_attn": cache}


class CharRNNCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size, hidden_size)
        self.h2h = nn.Linear(hidden_size, hidden_size)
        self.activation = ReferenceActivation()

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return self.activation(self.i2h(x) + self.h2h(h_prev))


class CharRNNModel(nn.Module):
    """Two-cell soft-XOR RNN (the "prophet"): (B, S, D) -> (B, S, Hd), cache = per-layer (B, 1, Hd)."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_size: int = 256,
        num_layers: int = 2,
        placeholder_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.activation = ReferenceActivation()
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.placeholder_idx = placeholder_idx
        sizes = [embed_dim] + [hidden_size] * (num_layers - 1)
        self.cells_right = nn.ModuleList([CharRNNCell(n, hidden_size) for n in sizes])
        self.cells_left = nn.ModuleList([CharRNNCell(n, hidden_size) for n in sizes])

    def forward(
        self, embedded_x: torch.Tensor, past_kv: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        b, s, _ = embedded_x.shape
        if not self.training and past_kv is not None:
            hidden = [kv[:, -1, :] for kv in past_kv]
        else:
            hidden = [embedded_x.new_zeros(b, self.hidden_size) for _ in range(self.num_layers)]
        outputs = []
        for t in range(s):
            x = embedded_x[:, t, :]
            new_hidden = []
            for left, right, h_prev in zip(self.cells_left, self.cells_right, hidden):
                a = self.activation(left(x, h_prev))
                c = self.activation(right(x, h_prev))
                x = 0.5 * (a + c - 2 * a * c)
                new_hidden.append(x)
            hidden = new_hidden
            outputs.append(x)
        out = torch.stack(outputs, dim=1)  # (B, S, Hd)
        if self.training:
            return out, None
        return out, [h.unsqueeze(1) for h in hidden]


def combine_heads(hl: torch.Tensor, hr: torch.Tensor, discriminate: int) -> torch.Tensor:
    if discriminate == 0:
        a, b = torch.sigmoid(hl), torch.sigmoid(hr)
        return (a + b) * 0.5 - a * b
    if discriminate == 1:
        pair = torch.stack([hl, hr], dim=-1)  # (B, S, D, 2)
        return (pair * torch.softmax(pair, dim=-1)).sum(dim=-1)
    return hl + hr


class TapeHead(nn.Module):
    """Paired left/right TapeHeadBlock stacks whose outputs are combined after every layer."""

    # The block class the stacks are built from: the fused model's heads build fused blocks, with the
    # same parameters in the same order (so state_dicts are interchangeable).
    block_cls: type[TapeHeadBlock] = TapeHeadBlock

    def __init__(
        self,
        seq_len: int,
        embed_dim: int,
        vocab_size: int,
        num_layers: int = 3,
        dropout: float = 0.1,
        discriminate: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.discriminate = discriminate
        w = torch.linspace(0.3, 1.0, steps=num_layers)
        self.register_buffer("layer_weights", w / w.sum())

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                [self.block_cls(seq_len, embed_dim, vocab_size, num_heads=ATTENTION_HEADS, dropout=dropout)
                 for _ in range(num_layers)]
            )

        self.blocks_left = blocks()
        self.blocks_right = blocks()
        self.activation = nn.Sigmoid()

    def forward(
        self,
        token_emb: torch.Tensor,
        prev_h: torch.Tensor | None,
        prev_emb: torch.Tensor | None,
        past_kv: dict | None = None,
    ) -> tuple[Any, ...]:
        prev_emb_left = prev_emb.clone() if prev_emb is not None else None
        prev_h_left = prev_h.clone() if prev_h is not None else None
        if not self.training and past_kv is None:
            past_kv = {"left": [None] * self.num_layers, "right": [None] * self.num_layers}
        aws, ents, caches_l, caches_r = [], [], [], []
        for i in range(self.num_layers):
            if self.training:
                hl, prev_emb_left, ent_l, aw_l = self.blocks_left[i](token_emb, prev_h_left, prev_emb_left)
                hr, prev_emb, ent_r, aw_r = self.blocks_right[i](token_emb, prev_h, prev_emb)
                aws.append((aw_l + aw_r) / 2.0)
                ents.append((ent_l + ent_r) / 2.0)
            else:
                hl, prev_emb_left, c_l = self.blocks_left[i](token_emb, prev_h_left, prev_emb_left, past_kv["left"][i])
                hr, prev_emb, c_r = self.blocks_right[i](token_emb, prev_h, prev_emb, past_kv["right"][i])
                caches_l.append(c_l)
                caches_r.append(c_r)
            h = combine_heads(hl, hr, self.discriminate)
            prev_h_left = prev_h = h
        prev_emb = 0.5 * (prev_emb + prev_emb_left)
        if not self.training:
            return h, prev_emb, {"left": caches_l, "right": caches_r}
        attn = (torch.stack(aws, dim=0) * self.layer_weights.view(-1, 1, 1)).sum(dim=0)  # (B, S)
        entropy = torch.sum(torch.stack(ents)) / self.num_layers
        return h, prev_emb, entropy, attn


class RMSNorm(nn.Module):
    """Registered by the original but never used."""

    def __init__(self, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.norm(2, dim=-1, keepdim=True) + self.eps) * self.weight


class Merger(nn.Module):
    """Registered by the original but never used: a Linear(2·D, D) over two stacked heads."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim * 2, out_dim, bias=False)

    def forward(self, heads_2d: torch.Tensor) -> torch.Tensor:
        _, b, s, v = heads_2d.shape
        return self.proj(heads_2d.reshape(b, s, 2 * v))


def check_tokens(x: Any, vocab_size: int, seq_len: int, name: str = "tokens") -> torch.Tensor:
    """Validate token ids: integer (S,) or (B, S), 1 <= S <= seq_len, ids in [0, vocab_size)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (S,) or (B, S), got {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.shape[1] > seq_len:
        raise ValueError(f"sequence too long: {x.shape[1]} {name} > seq_len {seq_len}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{'token' if name == 'tokens' else name} id {bad} out of range [0, {vocab_size})")
    return x


class ReferenceTapeTransformer(nn.Module):
    """The reference model (the notebook's ``TapeTransformer``). ``num_layers`` is unused; ``num_heads``
    counts residual TapeHeads ("critics"), not attention heads (those are ``ATTENTION_HEADS``).

    training: ``forward(x) -> (logp (B,S,V), entropy (), attn_weights (B,S))``
    eval:     ``forward(x, past_kv=None) -> (logp (B,S,V), cache)``
    """

    # The head class the coda and the critics are built from (the fused model substitutes its own).
    head_cls: type[TapeHead] = TapeHead

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        num_layers: int = 4,
        embed_dim: int = 128,
        num_heads: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 ({ATTENTION_HEADS} attention heads, RoPE pairs), "
                             f"got {embed_dim}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        # Registration order is the original's; state_dict lists a module's own parameters
        # (norm_gate, unembedding) before its sub-modules, whatever the assignment order.
        self.holistic_embed = nn.Embedding(vocab_size, embed_dim)
        self.prophet = CharRNNModel(seq_len, vocab_size, embed_dim=embed_dim, hidden_size=embed_dim * 2)
        self.rnn_projection = nn.Linear(embed_dim * 2, embed_dim)
        self.embed_ln = nn.LayerNorm(embed_dim)
        self.codahead = self.head_cls(seq_len, embed_dim, vocab_size, num_layers=2, dropout=dropout, discriminate=0)
        self.residualheads = nn.ModuleList(
            [
                self.head_cls(seq_len, embed_dim, vocab_size, num_layers=4, dropout=dropout, discriminate=1)
                for _ in range(num_heads)
            ]
        )
        self.merger = Merger(in_dim=embed_dim, out_dim=embed_dim)
        self.final_norm = RMSNorm(num_heads * embed_dim)
        self.norm_gate = nn.Parameter(torch.tensor(0.5))
        self.activation = ReferenceActivation()
        self.unembedding = nn.Parameter(torch.randn(embed_dim, vocab_size))
        nn.init.kaiming_uniform_(self.unembedding, a=math.sqrt(5))
        self.merge_projection = nn.Linear(2 * embed_dim, embed_dim, bias=False)
        self.merge_projection_final = nn.Linear(num_heads * embed_dim, embed_dim, bias=False)

    def empty_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
        """The cache the original builds for a first eval call (``batch_size`` = the input's)."""

        def head(h: TapeHead) -> dict:
            return {"left": [None] * h.num_layers, "right": [None] * h.num_layers}

        rnn = [
            torch.zeros(batch_size, 1, self.prophet.hidden_size, device=device, dtype=dtype)
            for _ in range(self.prophet.num_layers)
        ]
        return [head(self.codahead), rnn] + [head(h) for h in self.residualheads]

    def forward(self, x: torch.Tensor, past_kv: list[Any] | None = None) -> tuple[Any, ...]:
        x = check_tokens(x, self.vocab_size, self.seq_len)
        b = x.shape[0]
        e = self.holistic_embed(x)  # (B, S, D)
        if not self.training:
            if past_kv is None:
                past_kv = self.empty_cache(b, x.device, e.dtype)
            coda_h, prev_emb, c0 = self.codahead(e, None, None, past_kv=past_kv[0])
            _, rnn_cache = self.prophet(e, past_kv[1])  # its output never reaches the logits
            caches = [c0, rnn_cache]
            for i, head in enumerate(self.residualheads):
                e, _, ci = head(e, coda_h, prev_emb, past_kv=past_kv[2 + i])
                caches.append(ci)
            return student_t_unembedding_ref(e, self.unembedding, DEFAULT_DF), caches

        coda_h, _, ent, attn = self.codahead(e, None, None)
        ents = [ent]
        prophecy, _ = self.prophet(e)
        prophecy = self.rnn_projection(prophecy)  # only ever feeds prev_emb: zero gradients
        for head in self.residualheads:
            e, _, ent_i, attn_i = head(e, coda_h, prophecy)
            attn = attn + attn_i
            ents.append(ent_i)
        attn = attn / self.num_heads
        logp = student_t_unembedding_ref(e, self.unembedding, DEFAULT_DF)
        return logp, torch.sum(torch.stack(ents)) / self.num_heads + 1, attn


# ---------------------------------------------------------------------------------------------
# The seed README's design, which the notebook registers the modules for but never computes. Plain
# eager equations, the oracle of the fused model's ``design="seed"`` (causal semantics throughout).


def _causal_block(blk: TapeHeadBlock, tok: torch.Tensor, prev_h: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A TapeHeadBlock with a causal mask: -> (h, entropy (B, S), softmax(aw) (B, S))."""
    s = tok.shape[1]
    x = prev_h[:, -s:, :] if prev_h is not None else apply_rope(tok + blk.pos_emb[:, :s, :], blk.rope_freqs)
    mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)  # True = not attended
    out, w = blk.cached_attn.attn(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=True)
    entropy = -torch.sum(w * torch.log(w + 1e-12), dim=-1)
    aw = (w.sum(dim=-1) + w.sum(dim=-2)) / 2
    h = blk.ln_attn(x + out)
    return blk.ln_mlp(h + blk.mlp(h)), entropy, torch.softmax(aw, dim=-1)


def _causal_head(head: TapeHead, tok: torch.Tensor, prev_h: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A TapeHead of causal blocks: -> (h, entropy (), attn (B, S)), aggregated as TapeHead does."""
    h, ents, aws = prev_h, [], []
    for left, right in zip(head.blocks_left, head.blocks_right):
        hl, ent_l, aw_l = _causal_block(left, tok, h)
        hr, ent_r, aw_r = _causal_block(right, tok, h)
        h = combine_heads(hl, hr, head.discriminate)
        ents.append((ent_l + ent_r) / 2.0)
        aws.append((aw_l + aw_r) / 2.0)
    attn = (torch.stack(aws, dim=0) * head.layer_weights.view(-1, 1, 1)).sum(dim=0)
    return h, torch.sum(torch.stack(ents)) / head.num_layers, attn


def seed_forward(model: ReferenceTapeTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed design on the reference's modules, causal: x (B, S) -> (logp, entropy (), attn (B, S)).

        coda = codahead(e);  p = rnn_projection(prophet(e));  mix = merge_projection([coda, p])
        c_i  = residualheads[i](e, prev_h=mix);  mod = merge_projection_final(final_norm([c_1..c_n]))
        logp = student_t_unembedding(merger.proj([coda, mod]))
    """
    x = check_tokens(x, model.vocab_size, model.seq_len)
    e = model.holistic_embed(x)
    coda, ent, attn = _causal_head(model.codahead, e, None)
    was = model.prophet.training
    model.prophet.train()  # its training-mode forward: zero initial state, no cache
    p = model.rnn_projection(model.prophet(e)[0])
    model.prophet.train(was)
    mix = model.merge_projection(torch.cat([coda, p], dim=-1))
    ents, critics = [ent], []
    for head in model.residualheads:
        c, ent_i, attn_i = _causal_head(head, e, mix)
        critics.append(c)
        ents.append(ent_i)
        attn = attn + attn_i
    mod = model.merge_projection_final(model.final_norm(torch.cat(critics, dim=-1)))
    h = model.merger.proj(torch.cat([coda, mod], dim=-1))
    logp = student_t_unembedding_ref(h, model.unembedding, DEFAULT_DF)
    return logp, torch.sum(torch.stack(ents)) / model.num_heads + 1, attn / model.num_heads


def nll_loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` (B, S) under ``logp`` (B, S, V)."""
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1))

