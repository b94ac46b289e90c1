"""The generation cache: projected K/V of every evaluated TapeHeadBlock in one tensor.

Layout (documented because the CUDA-graph step and the native CPU step address it directly)::

    kv : (n_blocks, 2, B, H, capacity, dh)     2 = (k, v); H attention heads of dh = D / H
    block index of (head h, layer l, side s) = offsets[h] + 2·l + s     s: 0 left, 1 right

``heads`` are the evaluated TapeHeads in model order: the coda (head 0), then the critics that run at
eval (all of them with ``skip_dead=False``, only the last otherwise). A layer's left and right blocks
are adjacent, so ``kv[i : i + 2]`` is one layer's pair. Rows ``0 .. length-1`` of every block are
filled. ``rnn`` holds the prophet's per-layer state (B, 1, Hd) where the prophet runs at eval (views
of one (L, B, 1, Hd) tensor, ``rnn_state``, when the model made the cache).

The reference caches *unprojected* inputs and re-projects the whole history every token; projecting
is linear, so caching projected K/V gives the same results to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BlockKV", "KVCache"]


class KVCache:
    """Preallocated K/V for ``capacity`` tokens of every evaluated block; ``length`` tokens filled."""

    def __init__(
        self,
        layers_per_head: Sequence[int],
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rnn: list[torch.Tensor] | torch.Tensor | None = None,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"a cache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
        self.layers_per_head = tuple(int(n) for n in layers_per_head)
        offsets, n = [], 0
        for layers in self.layers_per_head:
            offsets.append(n)
            n += 2 * layers
        self.offsets = tuple(offsets)
        self.kv = torch.empty(n, 2, batch_size, num_heads, capacity, head_dim, device=device, dtype=dtype)
        self.length = 0
        # rnn given as one (L, B, 1, Hd) tensor: ``rnn`` is its per-layer views and ``rnn_state`` the
        # tensor itself, which the native CPU step advances in place (one pointer for every layer).
        self.rnn_state = rnn if isinstance(rnn, torch.Tensor) else None
        self.rnn = list(rnn.unbind(0)) if isinstance(rnn, torch.Tensor) else rnn

    # ------------------------------------------------------------------ layout

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    def index(self, head: int, layer: int, side: int) -> int:
        """Block index of (head, layer, side) in ``kv``'s first dim."""
        if not (0 <= head < len(self.offsets) and 0 <= layer < self.layers_per_head[head] and side in (0, 1)):
            raise IndexError(f"no block (head {head}, layer {layer}, side {side}) in a cache of heads with "
                             f"{self.layers_per_head} layers")
        return self.offsets[head] + 2 * layer + side

    def block(self, head: int, layer: int, side: int) -> BlockKV:
        return BlockKV(self, self.index(head, layer, side))

    # ------------------------------------------------------------------ growth

    def ensure(self, extra: int) -> None:
        """Make room for ``extra`` more tokens (amortised doubling; copies the filled rows)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        bigger = self.kv.new_empty(*self.kv.shape[:4], max(need, 2 * self.capacity), self.kv.shape[5])
        bigger[:, :, :, :, : self.length] = self.kv[:, :, :, :, : self.length]
        self.kv = bigger

    def reset(self) -> None:
        """Forget every token (the buffers stay allocated, e.g. for the window slide)."""
        self.length = 0
        if self.rnn is not None:
            for h in self.rnn:
                h.zero_()


class BlockKV:
    """One block's K/V in a :class:`KVCache`, each (B, H, capacity, dh). Holds the cache, not a view,
    so it stays valid when the cache grows."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    @property
    def k(self) -> torch.Tensor:
        return self.cache.kv[self.index, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.cache.kv[self.index, 1]

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, S, dh) at rows ``pos .. pos+S-1``; return the keys and values to attend over.

        ``pos`` an int: the filled prefix ``[: pos + S]`` is returned. ``pos`` a (1,) int64 device tensor
        (one token, the CUDA-graph step): written with ``index_copy_`` and the whole buffer is returned
        (the attention reads the filled length from the device).
        """
        # Each view is taken right before its write: a view made before the cache joined an autograd
        # graph (eval with grad enabled) cannot be written in place after it did.
        if isinstance(pos, torch.Tensor):
            self.k.index_copy_(2, pos, k.to(self.cache.kv.dtype))
            self.v.index_copy_(2, pos, v.to(self.cache.kv.dtype))
            return self.k, self.v
        s = k.shape[2]
        self.k[:, :, pos : pos + s] = k
        self.v[:, :, pos : pos + s] = v
        return self.k[:, :, : pos + s], self.v[:, :, : pos + s]
