"""Next-token choice on the device, and sampling from the reference model with its own cache.

``pick_next`` draws with the exponential race (Gumbel-max, ``tape_kernels.sampling``): temperature,
top-k and the draw run on the logits' device with a counter-based generator (:class:`DeviceRNG`), so
a sampled token costs no host synchronisation and the draw can be captured in a CUDA graph. A
seed's samples differ from ``torch.multinomial``'s (another algorithm and generator; the same
distribution). Greedy is ``argmax``.

``sample_reference``: unlike the notebook, which fed only the prompt's last character, the whole
prompt is prefilled (its last ``seq_len`` characters), then one token is fed per call with the
cache. The reference's cached decode restarts positions at 0 on every call (spec finding 4), so this
reproduces what the original computes, not a left-to-right language model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tape_kernels import sampling as _ks
from tapetransformer.reference import ReferenceTapeTransformer

__all__ = ["DeviceRNG", "pick_next", "sample_reference", "topk_threshold"]


class DeviceRNG:
    """The sampler's generator: a (2,) int64 tensor ``[seed, step]`` on the device. Every draw reads
    it and advances ``step`` in place (on the device), so draws need no host synchronisation and a
    CUDA graph that captured one keeps drawing fresh samples on replay.

    ``seed`` None draws one from torch's default CPU generator (so ``torch.manual_seed`` governs it).
    ``state``: use this tensor (e.g. a captured graph's) as the state, re-seeded.
    """

    def __init__(self, seed: int | None = None, device: torch.device | str | None = None,
                 state: torch.Tensor | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # host generator: no device read
        fresh = _ks.new_state(seed)
        if state is None:
            self.state = fresh.to(device)
        else:
            self.state = state
            state.copy_(fresh)  # host -> device copy, no synchronisation with the device's queue

    @classmethod
    def from_generator(cls, gen: torch.Generator | None, device: torch.device | str | None) -> DeviceRNG:
        """A state seeded from a host ``torch.Generator`` (one 62-bit draw from it)."""
        return cls(int(torch.randint(0, 2**62, (1,), generator=gen).item()), device)


def topk_threshold(scores: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """The k-th largest score per row (B, 1), or None without top-k (a device op, no host read)."""
    if top_k is None:
        return None
    return torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]


def pick_next(
    logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: DeviceRNG | torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """logp (B, V) -> next ids (B,) on logp's device.

    Sampling: softmax(logp / temperature), restricted to the ``top_k`` largest (ties at the k-th
    kept), drawn by the exponential race. ``generator``: a :class:`DeviceRNG` (advanced in place on
    the device), or a host ``torch.Generator`` / None from which a fresh seed is drawn for this call.
    ``backend``: the draw's kernel ("auto": Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch
    ops; both give the same samples).
    """
    if greedy:
        return logp.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    rng = generator if isinstance(generator, DeviceRNG) else DeviceRNG.from_generator(generator, logp.device)
    # logp · fp32(1/T): the product a captured graph computes with its device-side 1/T (a division
    # by a host scalar would run as this product on CUDA but as a true division on the CPU).
    scores = logp.float() * (1.0 / temperature)
    return _ks.sample(scores, rng.state, topk_threshold(scores, top_k), backend=backend)


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
