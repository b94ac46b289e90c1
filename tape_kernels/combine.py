"""TapeHead combines: how a TapeHead merges its left and right block outputs, elementwise.

    mode 0 (sigmoid XOR):   a = σ(hl), b = σ(hr), h = (a + b)/2 − a·b
    mode 1 (pair softmax):  h = hl·softmax(hl, hr)_0 + hr·softmax(hl, hr)_1
    mode 2 (sum):           h = hl + hr

Pair softmax over two values is a sigmoid of their difference: with s = σ(hl − hr),
h = s·hl + (1 − s)·hr. That form needs no max-subtraction (σ saturates instead of overflowing) and reads
each input once, so forward and backward are single memory-bound passes in fp32 registers.
"""

from __future__ import annotations

import torch
from torch import nn

from tape_kernels._dispatch import triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, TRITON_TYPE, rtne_bf16
from tape_kernels._validate import check_same_device, check_same_dtype, check_tensor

MODES = (0, 1, 2)
_BLOCK = 1024
_NUM_WARPS = 4

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels._utils import cast_out

    @triton.jit
    def _inf_poison(hl, hr):
        """0, or NaN where hl or hr is not finite: the eager pair softmax (max-subtracted, then c·softmax(c))
        is NaN there, and its gradient too, where the sigmoid form would give ±inf or a finite value."""
        return 0.0 * hl + 0.0 * hr

    @triton.jit
    def combine_fwd(hl, hr, MODE: tl.constexpr):
        """The combine of two fp32 tiles, for every kernel that runs it (this module's, and the ones
        fused into ``fused_linear``'s LayerNorm epilogue and ``decode_block``'s pair input)."""
        if MODE == 0:
            a = tl.sigmoid(hl)
            b = tl.sigmoid(hr)
            return (a + b) * 0.5 - a * b
        elif MODE == 1:
            # s·hl + (1−s)·hr rather than hr + δ·s: δ may overflow to ±inf where s is exactly 0 or 1.
            s = tl.sigmoid(hl - hr)
            return s * hl + (1.0 - s) * hr + _inf_poison(hl, hr)
        else:
            return hl + hr

    @triton.jit
    def combine_bwd(g, hl, hr, MODE: tl.constexpr):
        """(dL/dhl, dL/dhr) of ``combine_fwd`` for the upstream gradient g."""
        if MODE == 0:
            # ∂h/∂a = 1/2 − b, ∂a/∂hl = a(1 − a); symmetric in (hl, hr).
            a = tl.sigmoid(hl)
            b = tl.sigmoid(hr)
            return g * (0.5 - b) * a * (1.0 - a), g * (0.5 - a) * b * (1.0 - b)
        elif MODE == 1:
            # h = hr + δ·σ(δ):  ∂h/∂δ = s + δ·s(1 − s);  ∂h/∂hl = ∂h/∂δ,  ∂h/∂hr = 1 − ∂h/∂δ.
            delta = hl - hr
            s = tl.sigmoid(delta)
            t = s * (1.0 - s)
            k = s + tl.where(t > 0.0, delta * t, 0.0) + _inf_poison(hl, hr)
            return g * k, g * (1.0 - k)
        else:
            return g, g

    @triton.jit
    def _combine_fwd_kernel(HL, HR, OUT, n, MODE: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        hl = tl.load(HL + offs, mask=mask, other=0.0).to(tl.float32)
        hr = tl.load(HR + offs, mask=mask, other=0.0).to(tl.float32)
        h = combine_fwd(hl, hr, MODE)
        tl.store(OUT + offs, cast_out(h, OUT.dtype.element_ty, RTNE_BF16), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(
        G, HL, HR, DHL, DHR, n, MODE: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        hl = tl.load(HL + offs, mask=mask, other=0.0).to(tl.float32)
        hr = tl.load(HR + offs, mask=mask, other=0.0).to(tl.float32)
        dl, dr = combine_bwd(g, hl, hr, MODE)
        tl.store(DHL + offs, cast_out(dl, DHL.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(DHR + offs, cast_out(dr, DHR.dtype.element_ty, RTNE_BF16), mask=mask)


def tapehead_combine_ref(hl: torch.Tensor, hr: torch.Tensor, mode: int) -> torch.Tensor:
    """Eager reference, written as the original does it. hl, hr (...) same shape -> h (...)."""
    if mode == 0:
        a = torch.sigmoid(hl)
        b = torch.sigmoid(hr)
        return (a + b) / 2 - a * b
    if mode == 1:
        c = torch.stack((hl, hr), dim=0)
        return (c * torch.softmax(c, dim=0)).sum(dim=0)
    return hl + hr


def _check_mode(mode: object) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (0 sigmoid-XOR, 1 pair softmax, 2 sum), got {mode!r}")
    return mode


def _check_inputs(hl: torch.Tensor, hr: torch.Tensor) -> None:
    check_tensor("hl", hl, dtypes=INPUT_DTYPES)
    check_tensor("hr", hr, dtypes=INPUT_DTYPES)
    if hl.shape != hr.shape:
        raise ValueError(f"hl and hr must have the same shape, got {tuple(hl.shape)} and {tuple(hr.shape)}")
    check_same_device(hl=hl, hr=hr)
    check_same_dtype(hl=hl, hr=hr)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, _BLOCK),)


def _combine_fwd(hl: torch.Tensor, hr: torch.Tensor, mode: int) -> torch.Tensor:
    hl_c, hr_c = hl.contiguous(), hr.contiguous()
    out = torch.empty_like(hl_c)
    n = hl_c.numel()
    if n:
        _combine_fwd_kernel[_grid(n)](
            hl_c, hr_c, out, n, MODE=mode, BLOCK=_BLOCK, RTNE_BF16=rtne_bf16(out.dtype), num_warps=_NUM_WARPS
        )
    return out


class TapeHeadCombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hl: torch.Tensor, hr: torch.Tensor, mode: int) -> torch.Tensor:
        hl_c, hr_c = hl.contiguous(), hr.contiguous()
        if mode != 2:
            ctx.save_for_backward(hl_c, hr_c)
        ctx.mode = mode
        return _combine_fwd(hl_c, hr_c, mode)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.mode == 2:
            return g, g, None
        hl, hr = ctx.saved_tensors
        g = g.contiguous()
        dhl = torch.empty_like(hl)
        dhr = torch.empty_like(hr)
        n = hl.numel()
        if n:
            _combine_bwd_kernel[_grid(n)](
                g, hl, hr, dhl, dhr, n, MODE=ctx.mode, BLOCK=_BLOCK,
                RTNE_BF16=rtne_bf16(hl.dtype), num_warps=_NUM_WARPS,
            )
        return dhl, dhr, None


def tapehead_combine(hl: torch.Tensor, hr: torch.Tensor, mode: int, *, backend: str = "auto") -> torch.Tensor:
    """Combine a TapeHead's left and right outputs. hl, hr (...) same shape/dtype -> h (...), same dtype.

    fp32/fp16/bf16 run the kernel (fp32 math, output rounded once to the input dtype); fp64 and
    CPU without the interpreter take the eager reference.
    """
    mode = _check_mode(mode)
    _check_inputs(hl, hr)
    if hl.dtype == torch.float64 or not use_triton(hl, hr, backend=backend):
        return tapehead_combine_ref(hl, hr, mode)
    return TapeHeadCombineFunction.apply(hl, hr, mode)


class TapeHeadCombine(nn.Module):
    """Drop-in module: ``TapeHeadCombine(mode)(hl, hr)``; mode 0 sigmoid-XOR, 1 pair softmax, 2 sum."""

    def __init__(self, mode: int, backend: str = "auto") -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        self.backend = backend

    def forward(self, hl: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return tapehead_combine(hl, hr, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def aot_specs() -> list:
    """Every (kernel, mode, dtype) the launchers can emit."""
    from tape_kernels._aot import kernel_spec

    specs = []
    for dt in KERNEL_DTYPES:
        for mode in MODES:
            consts = {"MODE": mode, "BLOCK": _BLOCK, "RTNE_BF16": False}
            kernels = {"fwd": _combine_fwd_kernel} if mode == 2 else {"fwd": _combine_fwd_kernel, "bwd": _combine_bwd_kernel}
            for kind, kernel in kernels.items():  # the sum's backward is the identity: no kernel
                name = f"combine_{kind}_mode{mode}_{TRITON_TYPE[dt]}"
                specs.append(kernel_spec(name, kernel, dt, consts, num_warps=_NUM_WARPS))
    return specs
