"""Fused Char-RNN (the TapeTransformer's "prophet"): whole-sequence forward, BPTT backward, decode step.

Reference semantics (CharRNNModel, ``act`` = ReferenceActivation): per time step t, per layer l,
with x = emb[:, t] for l = 0 and x = h[l−1] above,

    c_L = act(i2h_L(x) + h2h_L(h[l])),   c_R = act(i2h_R(x) + h2h_R(h[l]))
    a = act(c_L),  b = act(c_R),  h[l] ← ½(a + b − 2ab)

Layer l at step t needs only layer l−1 at step t and layer l at t−1, so the sequence runs layer by
layer: per layer one GEMM projects all S inputs for both cells at once, P = x·[W_iL; W_iR]ᵀ + biases
(B, S, 2Hd), and a recurrent kernel advances the S steps; per step it needs only the (B, Hd) state
times the stacked (2Hd, Hd) recurrent weight, both activations twice and the soft-XOR combine.

Recurrent kernel layouts (all programs split the Hd hidden units, each program owns BLOCK_H units of
both cells for every batch row):
  * per-step launches (``GRID_SYNC=False``): one launch per step; runs in the Triton interpreter and
    is the fallback when the grid does not fit on the GPU at once (Hd > 64·SMs, or
    ``TAPE_KERNELS_CHARRNN_PERSISTENT=0``). These launches are not captured in a CUDA graph here: a
    graph captured per call saves nothing, and caching one needs static buffers; callers that want
    it can capture the whole step with ``torch.cuda.graphs``.
  * persistent (``GRID_SYNC=True``, CUDA only): one launch per layer for all S steps; programs meet
    at a grid-wide barrier (atomic counter, release/acquire) after each step, since every unit of
    step t+1 reads every unit of step t. The grid is kept ≤ the number of SMs so all programs are
    resident. Each program re-reads only its 2·BLOCK_H·Hd slice of the recurrent weight (L1/L2
    resident: 32 KB at Hd = 512, BLOCK_H = 16, fp16) and the (B, Hd) state, so a step costs one
    barrier plus ~B·Hd·2 bytes of L2 traffic per program instead of a kernel launch. (The
    alternative, one program per batch row with no inter-program sync, streams the whole 1 MB
    weight through one SM every step, too slow for S = 128.)
The state of step t lives in ``HS[:, t]`` (HS is (B, S+1, Hd), HS[:, 0] = h0); it is read with
``.cg`` loads (L2, bypassing the non-coherent L1) because other SMs wrote it.

Saved for backward: the per-layer pre-activations Z (B, S, 2Hd, fp32) and the layer outputs (which
are the next layer's inputs anyway). Backward runs a reverse-time kernel of the same two layouts,
producing dZ (B, S, 2Hd) and the carried dh; the weight gradients are then three GEMMs per layer.

Decode step (generation): all layers advanced by one token for small B in one launch (persistent,
a grid barrier between layers; the input projection is fused since there is only one token).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from tape_kernels._dispatch import triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, TRITON_TYPE, dot_precision
from tape_kernels._validate import check_same_device, check_same_dtype, check_tensor
from tape_kernels.activation import reference_activation, reference_activation_ref

_BLOCK_B = 16
_STEP_CONFIG = (32, 64)  # (BLOCK_H, BLOCK_K) of the per-step-launch layout
_PERSISTENT_CONFIGS = ((16, 64), (32, 64), (64, 32))  # smallest BLOCK_H whose grid fits on the SMs wins
_NUM_WARPS = 4
# num_stages=1: no software pipelining. The pipeliner turns loads into cp.async.ca (L1-allocating)
# and drops the .cg modifier; a state row written by another SM could then be read from a stale L1
# line (rows of adjacent steps share lines unless Hd·itemsize is a multiple of 128 B). The K loops
# are short (Hd/BLOCK_K iterations) and the weights stay L1/L2-resident, so little is lost.
_NUM_STAGES = 1
_LAUNCH = {"num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES}
_PER_LAYER = 8  # flat weight order per layer: W_iL, b_iL, W_hL, b_hL, W_iR, b_iR, W_hR, b_hR

if triton_available():
    import triton

    from tape_kernels._charrnn_kernels import rnn_bwd_kernel, rnn_decode_kernel, rnn_fwd_kernel


# ----------------------------------------------------------------------------------------------
# eager reference


def _layer_weights(weights: Sequence[torch.Tensor], l: int) -> tuple[torch.Tensor, ...]:
    return tuple(weights[_PER_LAYER * l : _PER_LAYER * (l + 1)])


def charrnn_ref(
    emb: torch.Tensor, weights: Sequence[torch.Tensor], h0: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eager CharRNNModel loop, written as the reference does it (the oracle and the CPU path).

    emb (B, S, D); ``weights`` flat, per layer ``W_iL, b_iL, W_hL, b_hL, W_iR, b_iR, W_hR, b_hR``
    (left = ``cells_left``); h0 None (zeros) or a list of (B, k, Hd) per layer, of which [:, −1] is
    used. Returns out (B, S, Hd) (top layer's h at every step) and hs, a list of (B, 1, Hd).
    """
    num_layers = len(weights) // _PER_LAYER
    bsz, seq = emb.shape[0], emb.shape[1]
    hd = weights[2].shape[0]
    if h0 is None:
        h = [emb.new_zeros(bsz, hd) for _ in range(num_layers)]
    else:
        h = [c[:, -1] for c in h0]
    outs = []
    for t in range(seq):
        x = emb[:, t]
        for l in range(num_layers):
            wil, bil, whl, bhl, wir, bir, whr, bhr = _layer_weights(weights, l)
            cl = reference_activation_ref(nn.functional.linear(x, wil, bil) + nn.functional.linear(h[l], whl, bhl))
            cr = reference_activation_ref(nn.functional.linear(x, wir, bir) + nn.functional.linear(h[l], whr, bhr))
            a = reference_activation_ref(cl)
            b = reference_activation_ref(cr)
            h[l] = 0.5 * (a + b - 2 * a * b)
            x = h[l]
        outs.append(x)
    return torch.stack(outs, dim=1), [hl.unsqueeze(1) for hl in h]


# ----------------------------------------------------------------------------------------------
# launchers


def _layout(hd: int, device: torch.device, persistent: bool | None) -> tuple[int, int, bool]:
    """(BLOCK_H, BLOCK_K, grid_sync): persistent on CUDA when a config's grid fits on the SMs.

    ``TAPE_KERNELS_CHARRNN_PERSISTENT=0`` makes the default (``persistent=None``) the per-step layout,
    for setups where all SMs are not available to one kernel (MPS limits, green contexts) and a
    grid-wide barrier could wait forever.
    """
    if persistent is None and os.environ.get("TAPE_KERNELS_CHARRNN_PERSISTENT", "1") == "0":
        persistent = False
    if persistent is not False and device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        for bh, bk in _PERSISTENT_CONFIGS:
            if triton.cdiv(hd, bh) <= n_sm:
                return bh, bk, True
        if persistent:
            raise ValueError(f"hidden_size {hd} is too large for one persistent launch on {n_sm} SMs")
    elif persistent:
        raise ValueError("the persistent (grid-synchronized) kernels need CUDA tensors")
    return _STEP_CONFIG[0], _STEP_CONFIG[1], False


def _recurrent_forward(p: torch.Tensor, wh: torch.Tensor, hs: torch.Tensor, z: torch.Tensor, persistent: bool | None) -> None:
    bsz, seq, two_hd = p.shape
    hd = two_hd // 2
    bh, bk, sync = _layout(hd, p.device, persistent)
    grid = (triton.cdiv(hd, bh),)
    common = dict(BLOCK_B=_BLOCK_B, BLOCK_H=bh, BLOCK_K=bk, DOT_PRECISION=dot_precision(wh.dtype), **_LAUNCH)
    strides = (p.stride(0), p.stride(1), hs.stride(0), hs.stride(1), z.stride(0), z.stride(1))
    counter = torch.zeros(1, dtype=torch.int32, device=p.device)
    if sync:
        rnn_fwd_kernel[grid](p, wh, hs, z, counter, bsz, hd, 0, seq, *strides, GRID_SYNC=True, **common)
        return
    for t in range(seq):
        rnn_fwd_kernel[grid](p, wh, hs, z, counter, bsz, hd, t, 1, *strides, GRID_SYNC=False, **common)


def _recurrent_backward(
    dout: torch.Tensor, dhlast: torch.Tensor, z: torch.Tensor, wh: torch.Tensor, dz: torch.Tensor, persistent: bool | None
) -> None:
    bsz, seq, two_hd = z.shape
    hd = two_hd // 2
    bh, bk, sync = _layout(hd, z.device, persistent)
    grid = (triton.cdiv(hd, bh),)
    common = dict(BLOCK_B=_BLOCK_B, BLOCK_H=bh, BLOCK_K=bk, DOT_PRECISION=dot_precision(wh.dtype), **_LAUNCH)
    strides = (dout.stride(0), dout.stride(1), z.stride(0), z.stride(1))
    counter = torch.zeros(1, dtype=torch.int32, device=z.device)
    if sync:
        rnn_bwd_kernel[grid](dout, dhlast, z, wh, dz, counter, bsz, seq, hd, seq - 1, seq, *strides, GRID_SYNC=True, **common)
        return
    for t in range(seq - 1, -1, -1):
        rnn_bwd_kernel[grid](dout, dhlast, z, wh, dz, counter, bsz, seq, hd, t, 1, *strides, GRID_SYNC=False, **common)


def _stack_layer(weights: Sequence[torch.Tensor], l: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_i (2Hd, D_in), bias (2Hd,) = b_i + b_h, W_h (2Hd, Hd)), left cell first."""
    wil, bil, whl, bhl, wir, bir, whr, bhr = _layer_weights(weights, l)
    wi = torch.cat([wil, wir], dim=0)
    bias = torch.cat([bil + bhl, bir + bhr], dim=0)
    wh = torch.cat([whl, whr], dim=0).contiguous()
    return wi, bias, wh


def _native_ops() -> Any:
    """``torch.ops.tape_kernels`` when the C++ extension is loaded, else None."""
    from tape_kernels.int8 import extension_available

    return torch.ops.tape_kernels if extension_available() else None


def native_runnable(emb: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether the C++ sequence recurrence (``charrnn_forward`` / ``charrnn_backward``) can run: fp32
    CPU tensors and the extension loaded."""
    tensors = (emb, *weights)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return _native_ops() is not None


class CharRNNFunction(torch.autograd.Function):
    """The layer-by-layer sequence: per layer one input-projection GEMM over all steps, the recurrence
    (the Triton kernels, or on the CPU the extension's ``charrnn_forward``: one call per layer, its
    threads meeting once per step), and in backward the reverse recurrence and the weight gradients as
    whole-sequence GEMMs."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, h0: torch.Tensor, persistent: bool | None, native: bool,
                *weights: torch.Tensor):
        # emb (B, S, D); h0 (L, B, Hd). Returns out (B, S, Hd) and the last states (L, B, Hd).
        num_layers = len(weights) // _PER_LAYER
        bsz, seq, _ = emb.shape
        hd = h0.shape[-1]
        x = emb
        saved_hs, saved_z = [], []
        for l in range(num_layers):
            wi, bias, wh = _stack_layer(weights, l)
            # One GEMM for both cells' input projections over all steps (both biases folded in).
            p = torch.addmm(bias, x.reshape(bsz * seq, -1), wi.t()).view(bsz, seq, 2 * hd)
            if native:  # fp32 (under CPU autocast the projection may arrive in bf16)
                hs, z = torch.ops.tape_kernels.charrnn_forward(p.float(), wh.float(), h0[l].float().contiguous())
            else:
                hs = torch.empty(bsz, seq + 1, hd, device=emb.device, dtype=emb.dtype)
                hs[:, 0] = h0[l]
                z = torch.empty(bsz, seq, 2 * hd, device=emb.device, dtype=torch.float32)
                _recurrent_forward(p, wh, hs, z, persistent)
            saved_hs.append(hs)
            saved_z.append(z)
            x = hs[:, 1:]
        ctx.num_layers = num_layers
        ctx.persistent = persistent
        ctx.native = native
        # The stacked weights are re-built in backward from the parameters (no saved copies).
        ctx.save_for_backward(emb, *saved_hs, *saved_z, *weights)
        out = x.contiguous()
        last = torch.stack([hs[:, seq] for hs in saved_hs], dim=0)
        return out, last

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_last: torch.Tensor | None):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        emb = saved[0]
        hss = saved[1 : 1 + num_layers]
        zs = saved[1 + num_layers : 1 + 2 * num_layers]
        weights = saved[1 + 2 * num_layers :]
        bsz, seq, _ = emb.shape
        hd = hss[0].shape[-1]
        dev = emb.device
        dx = grad_out.float().contiguous() if grad_out is not None else torch.zeros(bsz, seq, hd, device=dev)
        grads: list[torch.Tensor | None] = [None] * (_PER_LAYER * num_layers)
        dh0 = torch.empty(num_layers, bsz, hd, device=dev, dtype=torch.float32)
        for l in range(num_layers - 1, -1, -1):
            z, hs = zs[l], hss[l]
            wi, _, wh = _stack_layer(weights, l)
            dhlast = grad_last[l].float().contiguous() if grad_last is not None else torch.zeros(bsz, hd, device=dev)
            if ctx.native:
                dz = torch.ops.tape_kernels.charrnn_backward(dx.contiguous(), dhlast, z, wh.float())
            else:
                dz = torch.empty_like(z)
                _recurrent_backward(dx, dhlast, z, wh, dz, ctx.persistent)
            dz2 = dz.view(bsz * seq, 2 * hd)
            xin = emb if l == 0 else hss[l - 1][:, 1:]
            # Weight gradients after the loop: batched GEMMs over all B·S rows, fp32 accumulation.
            dwi = dz2.t() @ xin.reshape(bsz * seq, -1).float()
            dwh = dz2.t() @ hs[:, :seq].reshape(bsz * seq, hd).float()
            db = dz2.sum(dim=0)
            dh0[l] = dz[:, 0] @ wh.float()
            dx = (dz2 @ wi.float()).view(bsz, seq, -1) if (l > 0 or ctx.needs_input_grad[0]) else None
            pdt = wi.dtype
            grads[_PER_LAYER * l : _PER_LAYER * (l + 1)] = [
                dwi[:hd].to(pdt), db[:hd].to(pdt), dwh[:hd].to(pdt), db[:hd].to(pdt),
                dwi[hd:].to(pdt), db[hd:].to(pdt), dwh[hd:].to(pdt), db[hd:].to(pdt),
            ]  # fmt: skip
        demb = dx.to(emb.dtype) if dx is not None else None
        return demb, dh0.to(emb.dtype), None, None, *grads


# ----------------------------------------------------------------------------------------------
# checks


def _check_weights(weights: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """Validate the flat weight list; returns (num_layers, D, Hd)."""
    if not isinstance(weights, (list, tuple)) or len(weights) == 0 or len(weights) % _PER_LAYER:
        raise ValueError(f"weights must be a non-empty list of {_PER_LAYER}·num_layers tensors")
    num_layers = len(weights) // _PER_LAYER
    w0 = check_tensor("weights[0]", weights[0], ndim=2, dtypes=INPUT_DTYPES)
    hd, d = w0.shape
    for l in range(num_layers):
        din = d if l == 0 else hd
        want = [(hd, din), (hd,), (hd, hd), (hd,)] * 2
        for j, shp in enumerate(want):
            check_tensor(f"weights[{_PER_LAYER * l + j}] (layer {l})", weights[_PER_LAYER * l + j], shape=shp)
    check_same_dtype(**{f"weights[{i}]": w for i, w in enumerate(weights)})
    check_same_device(**{f"weights[{i}]": w for i, w in enumerate(weights)})
    return num_layers, d, hd


def _check_state(
    hs: Sequence[torch.Tensor] | None, num_layers: int, bsz: int, hd: int, ref: torch.Tensor, name: str
) -> None:
    if hs is None:
        return
    if not isinstance(hs, (list, tuple)) or len(hs) != num_layers:
        raise ValueError(f"{name} must be a list of {num_layers} tensors (one per layer), got {type(hs).__name__}")
    for l, h in enumerate(hs):
        check_tensor(f"{name}[{l}]", h, ndim=3, shape=(bsz, None, hd))
        if h.shape[1] < 1:
            raise ValueError(f"{name}[{l}] has an empty time dim: shape {tuple(h.shape)}")
        check_same_dtype(**{"emb": ref, f"{name}[{l}]": h})
        check_same_device(**{"emb": ref, f"{name}[{l}]": h})


def _check_emb(emb: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    num_layers, d, hd = _check_weights(weights)
    check_tensor("emb", emb, ndim=3, dtypes=INPUT_DTYPES)
    if emb.shape[2] != d:
        raise ValueError(f"emb has shape {tuple(emb.shape)}; its last dim must be embed_dim = {d}")
    if emb.shape[0] < 1 or emb.shape[1] < 1:
        raise ValueError(f"emb must have B ≥ 1 and S ≥ 1, got shape {tuple(emb.shape)}")
    check_same_dtype(emb=emb, weights=weights[0])
    check_same_device(emb=emb, weights=weights[0])
    if emb.shape[0] * (emb.shape[1] + 1) * 2 * max(hd, d) >= 2**31:
        raise ValueError(f"emb of shape {tuple(emb.shape)} with hidden_size {hd} exceeds the kernels' int32 indexing")
    return num_layers, d, hd


# ----------------------------------------------------------------------------------------------
# functional API


def charrnn(
    emb: torch.Tensor,
    weights: Sequence[torch.Tensor],
    h0: Sequence[torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    persistent: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused Char-RNN over a whole sequence.

    emb (B, S, D); ``weights`` flat per layer ``W_iL, b_iL, W_hL, b_hL, W_iR, b_iR, W_hR, b_hR``;
    h0 None (zeros) or a list of (B, k, Hd) per layer ([:, −1] is the state, the reference's cache
    form). Returns out (B, S, Hd) and hs, a list of (B, 1, Hd) per layer. ``persistent``: None picks
    the one-launch-per-layer kernel on CUDA when it fits, False forces per-step launches.

    On a CPU without the Triton interpreter, ``backend="auto"`` runs fp32 through the extension's
    sequence recurrence (:func:`native_runnable`) and anything else through :func:`charrnn_ref`;
    ``backend="eager"`` always runs :func:`charrnn_ref`.
    """
    num_layers, _, hd = _check_emb(emb, weights)
    _check_state(h0, num_layers, emb.shape[0], hd, emb, "h0")
    native = False
    if emb.dtype == torch.float64 or not use_triton(emb, weights[0], backend=backend):
        if backend == "triton":
            raise ValueError("backend='triton' supports fp16/bf16/fp32 only; float64 runs eager")
        if backend == "eager" or not native_runnable(emb, weights):
            return charrnn_ref(emb, weights, h0)
        native = True  # a CPU without the interpreter: the extension's recurrence
    bsz = emb.shape[0]
    if h0 is None:
        h0_t = emb.new_zeros(num_layers, bsz, hd)
    else:
        h0_t = torch.stack([h[:, -1] for h in h0], dim=0)
    out, last = CharRNNFunction.apply(emb.contiguous(), h0_t, persistent, native, *weights)
    return out, [last[l].unsqueeze(1) for l in range(num_layers)]


class DecodeWeights(NamedTuple):
    """The decode kernel's packed weights (built by :func:`pack_decode_weights`).

    wi0 (2Hd, D); wir (L−1, 2Hd, Hd) (wi0 again when L = 1, unused); wh (L, 2Hd, Hd);
    bias (L, 2Hd) fp32 = b_i + b_h; left cell first in every 2Hd dim.
    """

    wi0: torch.Tensor
    wir: torch.Tensor
    wh: torch.Tensor
    bias: torch.Tensor


@torch.no_grad()
def pack_decode_weights(weights: Sequence[torch.Tensor]) -> DecodeWeights:
    """Stack the flat weights once for repeated decode steps (generation re-uses them per token)."""
    num_layers = len(weights) // _PER_LAYER
    stacked = [_stack_layer(weights, l) for l in range(num_layers)]
    wi0 = stacked[0][0].contiguous()
    wir = torch.stack([s[0] for s in stacked[1:]], dim=0).contiguous() if num_layers > 1 else wi0
    wh = torch.stack([s[2] for s in stacked], dim=0).contiguous()
    bias = torch.stack([s[1] for s in stacked], dim=0).float().contiguous()
    return DecodeWeights(wi0, wir, wh, bias)


@torch.no_grad()
def _decode_launch(x: torch.Tensor, packed: DecodeWeights, hin: torch.Tensor, persistent: bool | None) -> torch.Tensor:
    num_layers = packed.wh.shape[0]
    bsz, d = x.shape
    hd = hin.shape[-1]
    hout = torch.empty_like(hin)
    bh, bk, sync = _layout(hd, x.device, persistent)
    grid = (triton.cdiv(hd, bh),)
    common = dict(BLOCK_B=_BLOCK_B, BLOCK_H=bh, BLOCK_K=bk, DOT_PRECISION=dot_precision(x.dtype), **_LAUNCH)
    counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    args = (x, packed.wi0, packed.wir, packed.wh, packed.bias, hin, hout, counter, bsz, d, hd)
    if sync:
        rnn_decode_kernel[grid](*args, 0, num_layers, GRID_SYNC=True, **common)
    else:
        for l in range(num_layers):
            rnn_decode_kernel[grid](*args, l, 1, GRID_SYNC=False, **common)
    return hout


def charrnn_step(
    x_t: torch.Tensor,
    weights: Sequence[torch.Tensor],
    hs: Sequence[torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    persistent: bool | None = None,
    packed: DecodeWeights | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Advance every layer by one token (generation). x_t (B, D) or (B, 1, D); hs as ``charrnn``'s h0.

    Returns (out (B, 1, Hd), hs list of (B, 1, Hd)), equal to ``charrnn(x_t.view(B, 1, D), weights, hs)``.
    Runs the single-launch decode kernel when no gradient is needed, else the differentiable path.
    ``packed``: ``pack_decode_weights(weights)``, computed once per generation (else per call).
    """
    if isinstance(x_t, torch.Tensor) and x_t.dim() == 2:
        x_t = x_t.unsqueeze(1)
    num_layers, _, hd = _check_emb(x_t, weights)
    if x_t.shape[1] != 1:
        raise ValueError(f"x_t must be (B, D) or (B, 1, D), got shape {tuple(x_t.shape)}")
    _check_state(hs, num_layers, x_t.shape[0], hd, x_t, "hs")
    needs_grad = torch.is_grad_enabled() and (x_t.requires_grad or any(w.requires_grad for w in weights))
    needs_grad = needs_grad or (hs is not None and torch.is_grad_enabled() and any(h.requires_grad for h in hs))
    if needs_grad or x_t.dtype == torch.float64 or not use_triton(x_t, weights[0], backend=backend):
        return charrnn(x_t, weights, hs, backend=backend, persistent=persistent)
    bsz = x_t.shape[0]
    if hs is None:
        hin = x_t.new_zeros(num_layers, bsz, hd)
    else:
        hin = torch.stack([h[:, -1] for h in hs], dim=0).contiguous()
    if packed is None:
        packed = pack_decode_weights(weights)
    hout = _decode_launch(x_t[:, 0].contiguous(), packed, hin, persistent)
    new = [hout[l].unsqueeze(1) for l in range(num_layers)]
    return new[-1], new


# ----------------------------------------------------------------------------------------------
# modules


class FusedCharRNNCell(nn.Module):
    """The reference CharRNNCell (its parameter layout), with the fused activation:
    cell(x, h) = act(i2h(x) + h2h(h)). x (..., in), h (..., Hd)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.i2h = nn.Linear(input_size, hidden_size)
        self.h2h = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return reference_activation(self.i2h(x) + self.h2h(h))


class CharRNN(nn.Module):
    """Drop-in fused CharRNNModel (the prophet). Parameter names equal the reference's
    (``cells_right.{l}.i2h.weight``, ... ``cells_left.{l}.h2h.bias``, cells_right registered first),
    so ``prophet.*`` of a reference checkpoint loads with ``strict=True``.

    forward(emb (B, S, D), h0=None | list of (B, k, Hd)) -> (out (B, S, Hd), hs list of (B, 1, Hd)).
    """

    def __init__(self, embed_dim: int, hidden_size: int, num_layers: int = 2, backend: str = "auto") -> None:
        super().__init__()
        if embed_dim < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(f"embed_dim, hidden_size, num_layers must be ≥ 1, got {embed_dim}, {hidden_size}, {num_layers}")
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.backend = backend
        sizes = [embed_dim] + [hidden_size] * (num_layers - 1)
        self.cells_right = nn.ModuleList(FusedCharRNNCell(s, hidden_size) for s in sizes)
        self.cells_left = nn.ModuleList(FusedCharRNNCell(s, hidden_size) for s in sizes)
        self._decode_cache: tuple[tuple, DecodeWeights] | None = None

    def flat_weights(self) -> list[torch.Tensor]:
        """Per layer: W_iL, b_iL, W_hL, b_hL, W_iR, b_iR, W_hR, b_hR (the order ``charrnn`` takes)."""
        out: list[torch.Tensor] = []
        for cl, cr in zip(self.cells_left, self.cells_right):
            out += [cl.i2h.weight, cl.i2h.bias, cl.h2h.weight, cl.h2h.bias]
            out += [cr.i2h.weight, cr.i2h.bias, cr.h2h.weight, cr.h2h.bias]
        return out

    def forward(
        self, emb: torch.Tensor, h0: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return charrnn(emb, self.flat_weights(), h0, backend=self.backend)

    def step(
        self, x_t: torch.Tensor, hs: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One token through all layers: x_t (B, D) or (B, 1, D) -> (out (B, 1, Hd), hs).

        The packed decode weights are cached and rebuilt when a parameter changes (version counter,
        storage, dtype or device), so a generation loop pays the stacking once.
        """
        weights = self.flat_weights()
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        if self._decode_cache is None or self._decode_cache[0] != key:
            self._decode_cache = (key, pack_decode_weights(weights))
        return charrnn_step(x_t, weights, hs, backend=self.backend, packed=self._decode_cache[1])

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, hidden_size={self.hidden_size}, num_layers={self.num_layers}"


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile specs


def aot_specs() -> list:
    """Every kernel × (layout, block config) × dtype (× tf32 for fp32) that the launchers can pick."""
    from tape_kernels._aot import kernel_spec

    configs = [(_STEP_CONFIG, False)] + [(c, True) for c in _PERSISTENT_CONFIGS]
    kernels = (("fwd", rnn_fwd_kernel), ("bwd", rnn_bwd_kernel), ("decode", rnn_decode_kernel))
    # Z, dZ, upstream gradients and the folded biases are fp32 whatever the data dtype.
    ptrs = {**dict.fromkeys(("Z", "DZ", "DOUT", "DHLAST", "BIAS"), torch.float32), "COUNTER": torch.int32}
    specs = []
    for dt in KERNEL_DTYPES:
        for (bh, bk), sync in configs:
            for prec in ("ieee", "tf32") if dt == torch.float32 else ("ieee",):
                cx = {"BLOCK_B": _BLOCK_B, "BLOCK_H": bh, "BLOCK_K": bk, "GRID_SYNC": sync, "DOT_PRECISION": prec}
                tag = f"{TRITON_TYPE[dt]}_bh{bh}_bk{bk}_{'persistent' if sync else 'step'}_{prec}"
                specs += [kernel_spec(f"rnn_{kind}_{tag}", k, dt, cx, pointers=ptrs, **_LAUNCH) for kind, k in kernels]
    return specs
