"""Generation engine for the fused TapeTransformer.

One prefill of the prompt into a preallocated cache of *projected* K/V, then one token per step
through the decode attention kernel, with optional int8 weights.

Semantics follow the model:
* reference semantics (``causal=False``): exactly the reference's cached loop — each call's
  positions restart at 0 and a single token is not rotated; the prompt is prefilled (its last
  ``seq_len`` tokens, the most one call may take). Greedy fp32 generation reproduces the reference
  model's greedy cached loop token for token.
* ``causal=True``: absolute positions. When the window is full (``seq_len`` tokens cached), the
  window slides: the cache is reset and the last ``seq_len // 2`` tokens are prefilled again, so
  generation never runs past the positional table and never raises an index error.

On CPU every decode token is one call into the extension (``tapetransformer.native_decode``: the
whole step in C++ with fp32 or int8 weights over the same cache, the seed design's prophet state
included), and so is the prefill where that measured faster, and so is the draw (argmax or the
exponential race with the same Philox stream, ``native_pick``; a NaN log-prob raises); without the
extension (or for what it does not cover: the reference design with ``skip_dead=False``, autocast)
the model's own decode runs.

The one-token decode step (``TapeTransformer.decode_step``) runs the fused decode kernels on the
Triton path (``tape_kernels.decode_block``: three launches per TapeHead layer, 24 per token at the
notebook size instead of ~130). On CUDA it is captured in a CUDA graph (``cuda_graph=None`` or True)
together with the next token's draw, and replayed for every token: one graph launch per token, and
the host never waits for the device (the drawn ids stay on the device and feed the next replay;
``on_token`` receives them as device tensors). Sampling is the exponential race with a counter-based
generator whose state lives on the device (``tapetransformer.sampling``); a seed's samples differ from
``torch.multinomial``'s. Without a graph (CPU under the interpreter, or ``cuda_graph=False``) the same
static step runs eagerly.

The graph and its cache are kept (per model, batch size, capacity, dtype, int8 mode, decode mode and
sampling mode — greedy, or sampling with a given top-k; the temperature is a device tensor; at most
four graphs) and replayed by later calls while the weights stay where they were captured (in-place
updates are seen by the replay; a ``.to()`` or a re-quantization captures again);
``clear_decode_graphs(model)`` frees them. In reference semantics the capacity is rounded up to a
power of two so that calls of different lengths share one graph. The captured step has static
shapes: it writes its K/V row at a device-side position and the decode kernels read the filled length
from the device, so one capture serves every position, and the window slide (an eager re-prefill
into the same cache) does not invalidate it. Where the prophet runs (the seed design, or
``skip_dead=False``), its recurrent state is a cache buffer the step advances in place, so it is
captured too. Prefill stays eager.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from tape_kernels import sampling as _ks
from tapetransformer.model import KVCache, TapeTransformer
from tapetransformer.native_decode import native_decoder, native_pick, native_prefill_faster
from tapetransformer.sampling import DeviceRNG, pick_next, topk_threshold

__all__ = ["clear_decode_graphs", "generate"]


@torch.no_grad()
def generate(
    model: TapeTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    int8: bool = False,
    seed: int | None = None,
    *,
    act_quant: bool | None = None,
    cuda_graph: bool | None = None,
    native: bool | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """prompt (B, P) or (P,) token ids -> (B, P + max_new_tokens) LongTensor.

    ``int8=True`` runs every Linear of the decode path with int8 weights (quantized on the first
    call and reused while the float weights are unchanged, see ``quantize_int8_``); ``act_quant`` picks
    weight-only (False), W8A8 (True) or the faster per call (None); the fused decode kernels run
    int8 weight-only (with ``act_quant=True`` the decode takes the per-op path). ``cuda_graph``:
    capture the decode step and the draw in a CUDA graph (None: on CUDA; True on CPU is an error).
    ``native``: decode on the CPU through the extension's one-call step (None: where it applies;
    False: the model's own decode, op by op; True: an error where it does not apply).
    ``seed`` (in [0, 2^63)) fixes the samples; None draws one from torch's default generator.
    ``stats``, if given, receives ``prefill_ms``, ``ms_per_token``, ``tokens``, ``cuda_graph`` and,
    when captured, ``capture_ms`` (not included in ``ms_per_token``). ``on_token`` is called with
    each new (B,) id tensor, on the model's device (streaming; reading it back synchronises).
    """
    if not isinstance(model, TapeTransformer):
        raise ValueError(f"generate() needs the fused tapetransformer.TapeTransformer, got {type(model).__name__}")
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int64, torch.int32):
        raise ValueError("prompt must be an int64/int32 tensor of token ids")
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (P,) or (B, P) with P >= 1, got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.unembedding.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if native not in (None, True, False):
        raise ValueError(f"native must be None, True or False, got {native!r}")
    prompt = prompt.to(device=device, dtype=torch.long)
    if not greedy:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    was_training = model.training
    model.eval()
    window = model.seq_len
    try:
        with model.int8_weights(enabled=int8, act_quant=act_quant):
            return _generate(model, prompt, max_new_tokens, window, use_graph, native, seed, temperature, top_k,
                             greedy, on_token, stats)
    finally:
        model.train(was_training)


def _nonfinite_error(token: int | None) -> ValueError:
    where = f" at new token {token}" if token is not None else ""
    return ValueError(f"generate: the model's log-probabilities are not finite (NaN or Inf){where}; its weights hold "
                      "non-finite values or the logits overflow, so no token can be drawn")


class _ModelDecode:
    """A decode strategy: ``prefill(tokens)`` fills the cache and returns the log-probs of its last
    position; ``step(tok)`` decodes one token (B,) and returns the next ids, drawn by ``pick``. This one
    is the fallback, the model's own prefill one token at a time; the native, static and graph steps
    below replace ``step`` (and the native one ``prefill``)."""

    def __init__(self, model: TapeTransformer, cache: KVCache, pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model, self.cache, self.pick = model, cache, pick

    def prefill(self, tokens: torch.Tensor, first: bool = False) -> torch.Tensor:
        if first:  # the prompt: the model's checked entry point
            logp, self.cache = self.model(tokens, past_kv=self.cache)
        else:
            logp, self.cache = self.model.prefill(tokens, self.cache, check=False)
        return logp

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        logp, self.cache = self.model.prefill(tok[:, None], self.cache, check=False)
        return self.pick(logp)

    def slid(self) -> None:
        """The window slid (the cache was reset and re-prefilled)."""


class _NativeDecode(_ModelDecode):
    """CPU: one call into the extension per token, and per prefill where that measured faster."""

    def __init__(self, model: TapeTransformer, cache: KVCache, pick: Callable[[torch.Tensor], torch.Tensor],
                 native: Any) -> None:
        super().__init__(model, cache, pick)
        self.native, self.native_prefill = native, native_prefill_faster(native.weights)

    def prefill(self, tokens: torch.Tensor, first: bool = False) -> torch.Tensor:
        return self.native.extend(tokens) if self.native_prefill else super().prefill(tokens, first)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self.pick(self.native.step(tok))


class _StaticDecode(_ModelDecode):
    """The static one-token step (the fused decode kernels): its position is a device tensor."""

    def __init__(self, model: TapeTransformer, cache: KVCache, pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(model, cache, pick)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.unembedding.device)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.cache.ensure(1)
        self.pos.fill_(self.cache.length)
        logp = self.model.decode_step(tok[:, None], self.pos, self.cache)
        self.cache.length += 1
        return self.pick(logp)


class _GraphDecode(_ModelDecode):
    """CUDA: the static step and the draw in one captured graph (captured at the first step unless an
    earlier call's graph is replayed); the next ids stay on the device."""

    def __init__(self, model: TapeTransformer, cache: KVCache, pick: Callable[[torch.Tensor], torch.Tensor],
                 graph: _GraphedDecodeStep | None, batch: int, sampling: tuple, rng: DeviceRNG | None,
                 temperature: float) -> None:
        super().__init__(model, cache, pick)
        self.graph, self.batch, self.sampling, self.rng, self.temperature = graph, batch, sampling, rng, temperature
        self.capture_ms = 0.0

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            tc = time.perf_counter()
            self.graph = _GraphedDecodeStep(self.model, self.cache, self.batch, self.sampling,
                                            self.rng.state if self.rng is not None else None)  # fmt: skip
            _store_graph(self.model, self.graph)
            self.capture_ms = (time.perf_counter() - tc) * 1e3
        nxt = self.graph.advance(tok, self.cache.length, self.temperature)
        self.cache.length += 1
        return nxt

    def slid(self) -> None:
        if self.graph is not None:
            self.graph.release()  # its token and position buffers no longer hold the next step's inputs


def _generate(
    model: TapeTransformer, prompt: torch.Tensor, max_new_tokens: int, window: int, use_graph: bool,
    use_native: bool | None, seed: int | None, temperature: float, top_k: int | None, greedy: bool,
    on_token: Callable[[torch.Tensor], None] | None, stats: dict[str, Any] | None,
) -> torch.Tensor:
    device, b = prompt.device, prompt.shape[0]
    model.prepare_decode()
    ctx = prompt[:, -window:]
    sampling = _sampling_key(greedy, top_k)
    # Reference semantics never hits a positional limit in decode, so the cache can hold the whole
    # run; causal decode holds at most one window.
    cap = window if model.causal else ctx.shape[1] + max_new_tokens
    graph: _GraphedDecodeStep | None = None
    if use_graph and max_new_tokens > 1:
        # A graph captured by an earlier call with the same shapes and weights is replayed over its
        # own cache (the prefill rewrites the rows it reads), so the capture is paid once.
        if not model.causal:
            cap = _graph_capacity(cap)
        graph = _cached_graph(model, b, cap, device, sampling)
    if graph is not None:
        cache = graph.cache
        cache.reset()
        graph.release()
    else:
        cache = model.new_cache(b, max(cap, 1), device, model.unembedding.dtype)
    # The sampler's state lives on the device (a captured graph's own tensor when there is one), so
    # draws never wait for the host.
    rng = None if greedy else DeviceRNG(seed, device, state=graph.rng_state if graph is not None else None)
    # CPU: one native call per token (tape_kernels._C, tapetransformer.native_decode), and the native
    # prefill where it measured faster; None where unsupported, and by default where the model's
    # decode runs Triton kernels (backend "triton", or the interpreter: the kernels asked for). Else,
    # where the static step runs the fused decode kernels (CUDA without a graph, or the interpreter),
    # that step; else the model's prefill per token.
    fused_static = not use_graph and _fused_static_step(model, device)
    want_native = device.type == "cpu" and (use_native or (use_native is None and not fused_static))
    native = native_decoder(model, cache) if want_native else None
    if use_native and native is None:
        raise ValueError("native=True needs an eval-mode fp32 CPU model (the seed design, or the reference design "
                         "with skip_dead) and the extension tape_kernels._C (see "
                         "tapetransformer.native_decode.native_supported)")
    # A non-finite log-prob (NaN weights, an overflow) is an error, never a token: checked per token on
    # CPU; on CUDA gathered into a device flag read once at the end (no sync per token).
    nonfinite = torch.zeros((), dtype=torch.bool, device=device) if device.type != "cpu" else None
    out = [prompt]

    def pick(lp: torch.Tensor) -> torch.Tensor:
        if native is not None:  # one native call, the same draws as pick_next's; -1 marks a non-finite row
            ids = native_pick(lp, temperature=temperature, top_k=top_k, greedy=greedy,
                              state=rng.state if rng is not None else None, check=False)  # fmt: skip
            if bool((ids < 0).any()):
                raise _nonfinite_error(len(out) - 1)
            return ids
        last = lp[:, -1]
        if nonfinite is None:
            if not bool(torch.isfinite(last).all()):
                raise _nonfinite_error(len(out) - 1)
        else:
            nonfinite.logical_or_(~torch.isfinite(last).all())
        return pick_next(last, temperature=temperature, top_k=top_k, greedy=greedy, generator=rng,
                         backend=model.backend)  # fmt: skip

    decode: _ModelDecode
    if use_graph:
        decode = _GraphDecode(model, cache, pick, graph, b, sampling, rng, temperature)
    elif native is not None:
        decode = _NativeDecode(model, cache, pick, native)
    elif fused_static:
        decode = _StaticDecode(model, cache, pick)
    else:
        decode = _ModelDecode(model, cache, pick)
    reused = graph is not None
    t0 = time.perf_counter()
    logp = decode.prefill(ctx, first=True)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3

    t1 = time.perf_counter()
    nxt = pick(logp)
    for i in range(max_new_tokens):
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if i + 1 == max_new_tokens:
            break
        # Sampled ids are in range by construction: no token check, whose min/max reads would cost
        # two device syncs per token on CUDA.
        if model.causal and decode.cache.length >= window:  # the window slides: re-prefill its recent half
            decode.cache.reset()
            nxt = pick(decode.prefill(torch.cat(out, dim=1)[:, -max(window // 2, 1) :]))
            decode.slid()
        else:
            nxt = decode.step(nxt)
    _sync(device)
    if nonfinite is not None and bool(nonfinite):
        raise _nonfinite_error(None)
    n = max(max_new_tokens, 1)
    capture_ms = decode.capture_ms if isinstance(decode, _GraphDecode) else 0.0
    if stats is not None:
        stats.update(prefill_ms=prefill_ms, ms_per_token=(time.perf_counter() - t1 - capture_ms / 1e3) * 1e3 / n,
                     tokens=max_new_tokens, cuda_graph=isinstance(decode, _GraphDecode) and decode.graph is not None)
        if isinstance(decode, _GraphDecode) and decode.graph is not None:
            stats["capture_ms"] = capture_ms  # 0.0 when an earlier call's graph was replayed
            stats["graph_reused"] = reused
    return torch.cat(out, dim=1)


def _fused_static_step(model: TapeTransformer, device: torch.device) -> bool:
    """Whether ``model.decode_step`` runs the fused decode kernels here (then it, not a prefill of
    one token, is the eager decode step)."""
    blk = next(model.fused_blocks(), None)
    return blk is not None and blk.fused_decode_ok(model.unembedding) and model.unembedding.device == device


def _sampling_key(greedy: bool, top_k: int | None) -> tuple:
    """What a captured draw bakes in: greedy, or sampling with this top-k (the temperature is a
    device tensor the graph reads, so it may change between replays)."""
    return ("greedy",) if greedy else ("sample", top_k)


_MAX_GRAPHS = 4  # captured decode graphs kept per model (each holds its cache: ~4 MB at the notebook size)


def _graph_capacity(need: int) -> int:
    """Reference-semantics cache capacity rounded up (to a power of two, at least 64) so that calls
    with different prompt and output lengths can share one captured graph; the decode kernel reads
    only the filled length, so the extra rows cost little."""
    return max(64, 1 << (max(need, 1) - 1).bit_length())


def _graph_key(model: TapeTransformer, batch: int, capacity: int, device: torch.device,
               sampling: tuple = ("greedy",)) -> tuple:
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (batch, capacity, model.unembedding.dtype, device, model.causal, model.backend, model.int8_mode,
            model.opts.decode, torch.backends.cuda.matmul.allow_tf32, autocast, sampling)


def _weights_fingerprint(model: TapeTransformer) -> tuple:
    """The addresses a captured graph reads weights from: replaying is right while every parameter,
    buffer and int8 tensor still lives there (in-place updates are then seen by the replay)."""
    tensors = [*model.parameters(), *model.buffers(), *model.derived_tensors()]
    return tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)


# model -> {key: graph}. Kept beside the model, not on it, so that copying or pickling a model never
# meets a CUDA graph; an entry goes when its model is garbage-collected.
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_graph(model: TapeTransformer, batch: int, capacity: int, device: torch.device,
                  sampling: tuple = ("greedy",)) -> _GraphedDecodeStep | None:
    graphs = _GRAPHS.setdefault(model, {})
    key = _graph_key(model, batch, capacity, device, sampling)
    g = graphs.get(key)
    if g is not None and g.fingerprint != _weights_fingerprint(model):
        del graphs[key]  # the weights moved (a .to(), a re-quantization): capture again
        g = None
    return g


def _store_graph(model: TapeTransformer, graph: _GraphedDecodeStep) -> None:
    graphs = _GRAPHS.setdefault(model, {})
    graphs[graph.key] = graph
    while len(graphs) > _MAX_GRAPHS:
        graphs.pop(next(iter(graphs)))


def clear_decode_graphs(model: TapeTransformer) -> None:
    """Free the CUDA graphs (and their caches) that ``generate`` keeps on ``model`` for reuse."""
    _GRAPHS.pop(model, None)


class _GraphedDecodeStep:
    """``model.decode_step`` and the next token's draw, captured in one CUDA graph over one cache's
    buffers.

    Static buffers: the token ids ``tok`` (B, 1), the position ``pos`` (1,), 1 / temperature
    ``inv_temp`` (1,) and the sampler state ``rng_state`` ((2,) ``[seed, step]``, see ``DeviceRNG``).
    One replay runs the decode step, draws the next ids into ``tok`` (argmax, or the exponential race with the
    baked-in top-k) and advances ``pos``, so consecutive replays need no host work at all; the host
    only copies a fresh token or position in after a prefill. ``logp`` (B, 1, V) is the static output,
    overwritten by every replay. The graph keeps its cache and the int8 tensors it reads alive, so a
    later ``generate`` call with the same key and weights can replay it (see ``_cached_graph``).
    """

    def __init__(self, model: TapeTransformer, cache: KVCache, batch: int, sampling: tuple = ("greedy",),
                 rng_state: torch.Tensor | None = None) -> None:
        dev = cache.kv.device
        self.cache = cache
        self.sampling = sampling
        self.key = _graph_key(model, batch, cache.capacity, dev, sampling)
        self.fingerprint = _weights_fingerprint(model)
        self.derived = model.derived_tensors()  # the captured kernels read these tensors: keep them alive
        self.capacity = cache.capacity
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        self.inv_temp = torch.ones(1, dtype=torch.float32, device=dev)
        self.rng_state = rng_state if rng_state is not None else _ks.new_state(0, dev)
        self.next_pos = -1  # the position ``pos`` holds after the last replay (-1: unknown)
        self.tok_fresh = False  # whether ``tok`` holds the token the last replay drew
        self._temp_set: float | None = None  # the temperature ``inv_temp`` was set for
        backend = model.backend
        # Warm-up outside the capture: Triton compiles/autotunes and the allocator settles. It writes
        # K/V of token 0 into row cache.length, which the first replay overwrites before any read,
        # and advances the sampler state and the prophet's state (where it runs), which are put back:
        # the first replay must advance the prefill's prophet state, not one two tokens further.
        rnn = cache.rnn or []
        saved = (self.pos.clone(), self.rng_state.clone(), [h.clone() for h in rnn])  # before the side stream's wait
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(model, backend)
                self.pos.copy_(saved[0])
                self.tok.zero_()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.rng_state.copy_(saved[1])
        for h, h0 in zip(rnn, saved[2]):
            h.copy_(h0)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logp = self._step(model, backend)
        self.pos.copy_(saved[0])

    def _step(self, model: TapeTransformer, backend: str) -> torch.Tensor:
        """The captured work: decode step, draw into ``tok``, position + 1."""
        logp = model.decode_step(self.tok, self.pos, self.cache)
        last = logp[:, -1]
        if self.sampling[0] == "greedy":
            nxt = last.argmax(dim=-1)
        else:
            scores = last.float() * self.inv_temp  # pick_next's product: the same fp32 scores
            nxt = _ks.sample(scores, self.rng_state, topk_threshold(scores, self.sampling[1]), backend=backend)
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        return logp

    def __call__(self, tok: torch.Tensor, position: int) -> torch.Tensor:
        """Decode ``tok`` (B, 1) at ``position`` -> log-probs (B, 1, V) (the draw also runs)."""
        if position >= self.capacity:  # the graph's buffers cannot grow; generate() sizes them
            raise RuntimeError(f"decode position {position} is past the captured cache's capacity {self.capacity}")
        self.tok.copy_(tok)
        self.pos.fill_(position)
        self.graph.replay()
        self.next_pos, self.tok_fresh = position + 1, False
        return self.logp

    def advance(self, tok: torch.Tensor, position: int, temperature: float = 1.0) -> torch.Tensor:
        """Decode ``tok`` (B,) at ``position`` and draw the next ids -> (B,) (a copy: the next replay
        overwrites ``tok``). After a replay ``tok`` and ``pos`` already hold the next step's inputs,
        so nothing is copied in."""
        if position >= self.capacity:
            raise RuntimeError(f"decode position {position} is past the captured cache's capacity {self.capacity}")
        if not self.tok_fresh:
            self.tok.copy_(tok[:, None])
        if self.next_pos != position:
            self.pos.fill_(position)
        if self.sampling[0] != "greedy" and self._temp_set != temperature:
            self.inv_temp.fill_(1.0 / temperature)
            self._temp_set = temperature
        self.graph.replay()
        self.next_pos, self.tok_fresh = position + 1, True
        return self.tok[:, 0].clone()

    def release(self) -> None:
        """Forget what the buffers hold (a new generate() call starts over)."""
        self.next_pos, self.tok_fresh, self._temp_set = -1, False, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
