"""Sampling from the reference model with its own cache (reference semantics).

Unlike the notebook, which fed only the prompt's last character, the whole prompt is prefilled
(its last ``seq_len`` characters), then one token is fed per call with the cache. The reference's
cached decode restarts positions at 0 on every call (spec finding 4), so this reproduces what the
original computes, not a left-to-right language model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tapetransformer.reference import ReferenceTapeTransformer


def pick_next(
    logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logp (B, V) -> next ids (B,)."""
    if greedy:
        return logp.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    logits = logp.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logp.device)


@torch.no_grad()
def sample_reference(
    model: ReferenceTapeTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """prompt (B, P) -> (tokens (B, P + N), mean ms per generated token)."""
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        logp, cache = model(prompt[:, -model.seq_len :])
        out = [prompt]
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            nxt = pick_next(logp[:, -1], temperature=temperature, top_k=top_k, greedy=greedy, generator=gen)
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if i + 1 < max_new_tokens:
                logp, cache = model(nxt[:, None], past_kv=cache)
        ms = (time.perf_counter() - t0) * 1e3 / max(max_new_tokens, 1)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1), ms
