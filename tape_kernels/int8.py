"""int8 linear layers for low-latency inference: y = x·(q·s)ᵀ + b.

Decoding one token streams every weight once, so per-token cost is weight bytes: int8 weights with
one fp32 scale per output channel (symmetric, ``q = round(w·127/max|w_n|)``) cut that 4× vs fp32.

Two modes of ``int8_linear``:

* weight-only (default, W8A32 on CPU / W8A16 on CUDA): q is dequantized in registers and
  multiplied with x in fp32 — the same math as ``F.linear(x, q·s, b)`` up to float rounding.
* ``act_quant=True`` (W8A8): each row of x is quantized on the fly (``xs = max|x_m|/127``,
  ``xq = round(x·127/max|x_m|)``), dot products accumulate exactly in int32 (AVX-512 VNNI or AVX2
  on CPU, dp4a on CUDA) and ``y = acc·xs[m]·s[n] + b``. Faster on CPU; adds activation rounding.
  A row of x holding inf or NaN, and a channel whose scale is non-finite or above ``MAX_FAST_SCALE``,
  is computed in float instead, so NaN and inf land where ``F.linear(x, q·s, b)`` puts them.
* ``act_quant=None``: whichever is faster for the call: W8A8 on CPU; on CUDA weight-only for
  M ≤ 16 (decode GEMV) and W8A8 for larger M (prefill).

The kernels live in the C++/CUDA extension ``tape_kernels._C`` (ops ``torch.ops.tape_kernels.*``).
Without it, one warning is raised and the pure-PyTorch ``int8_linear_ref`` runs instead.
The CPU W8A8 kernel reads weights in a packed layout; it is built on first use and cached per
qweight tensor (invalidated by in-place writes to it), so the public form stays ``(N, K) int8``.

These are inference modules: no autograd through the int8 ops.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tape_kernels._validate import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = [
    "Int8Linear",
    "Int8MultiheadAttention",
    "extension_available",
    "int8_linear",
    "int8_linear_ref",
    "quantize_rows_ref",
    "resolve_act_quant",
    "quantize_weight",
]

QMAX = 127
# The CUDA GEMV serves M ≤ 16 rows (decode); larger M is prefill.
GEMV_MAX_M = 16

_ext: Any = None
_ext_state = "unloaded"  # "unloaded" | "ok" | "missing"
_ext_lock = threading.Lock()


def _register_fakes() -> None:
    """Meta/fake kernels so the ops trace under torch.compile and pass torch.library.opcheck."""
    lib = "tape_kernels::"

    def pack_n(n: Any) -> Any:
        return (n + 63) // 64 * 64

    def pack_k(k: Any) -> Any:
        return (k + 3) // 4 * 4

    @torch.library.register_fake(lib + "pack_int8_weight")
    def _(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = qweight.shape
        packed = qweight.new_empty((pack_n(n) // 64, pack_k(k) // 4, 64, 4))
        return packed, qweight.new_empty((pack_n(n),), dtype=torch.int32)

    @torch.library.register_fake(lib + "quantize_rows")
    def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)

    @torch.library.register_fake(lib + "int8_mm")
    def _(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=torch.int32)

    @torch.library.register_fake(lib + "int8_mm_packed")
    def _(xq: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, n: int) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], n), dtype=torch.int32)

    def linear_fake(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Any) -> torch.Tensor:
        return x.new_empty((x.shape[0], qweight.shape[0]))

    torch.library.register_fake(lib + "w8_linear")(linear_fake)
    torch.library.register_fake(lib + "w8a8_linear")(linear_fake)

    @torch.library.register_fake(lib + "w8a8_linear_packed")
    def _(x: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, scale: torch.Tensor, bias: Any) -> torch.Tensor:
        return x.new_empty((x.shape[0], scale.shape[0]))

    # The Char-RNN's CPU training recurrence (tape_kernels.charrnn), in the same extension.
    @torch.library.register_fake(lib + "charrnn_forward")
    def _(p: torch.Tensor, wh: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = p.shape
        return p.new_empty((b, s + 1, wh.shape[1])), p.new_empty((b, s, 2 * wh.shape[1]))

    @torch.library.register_fake(lib + "charrnn_backward")
    def _(dout: torch.Tensor, dlast: torch.Tensor, z: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(z, memory_format=torch.contiguous_format)


def _load_ext() -> Any:
    """The extension module, or None (warning once) when it is not built."""
    global _ext, _ext_state
    if _ext_state == "unloaded":
        with _ext_lock:
            if _ext_state == "unloaded":
                try:
                    from tape_kernels import _C  # registers torch.ops.tape_kernels.*

                    built, running = _C.built_with_torch(), _torch_release()
                    if built != running:
                        raise ImportError(f"it was compiled against torch {built}, this is torch {running}")
                    _register_fakes()
                    _ext, _ext_state = _C, "ok"
                except (ImportError, OSError, AttributeError) as e:  # not built, or built for another torch
                    _ext_state = "missing"
                    warnings.warn(
                        f"tape_kernels._C is not available ({e}); int8 ops run the pure-PyTorch fallback "
                        "(rebuild it with `pip install -e . --no-build-isolation`)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _ext


def _torch_release() -> str:
    """major.minor.patch of the running torch, as setup.py records it in the extension."""
    parts = (torch.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
    return ".".join(str(int("".join(c for c in p if c.isdigit()) or 0)) for p in parts)


def extension_info() -> str:
    """One line on the int8 extension: built or not, CPU instruction set, CUDA, torch it was built for."""
    ext = _load_ext()
    if ext is None:
        return "tape_kernels._C: not available (the int8 ops run their PyTorch fallback)"
    cuda = "CPU + CUDA" if ext.with_cuda else "CPU only"
    return f"tape_kernels._C: {cuda}, CPU kernels {ext.cpu_isa()}, built for torch {ext.built_with_torch()}"


def extension_available() -> bool:
    """Whether the compiled int8 kernels (``tape_kernels._C``) are loaded."""
    return _load_ext() is not None


# --------------------------------------------------------------------------------------------------
# Quantization and eager references
# --------------------------------------------------------------------------------------------------


def _inv_scale(amax: torch.Tensor) -> torch.Tensor:
    """127 / amax, correctly rounded (as the kernels compute it), 0 where amax is 0.

    ``127 / tensor`` would run as ``reciprocal(tensor) · 127``, which rounds twice and can move a
    quantized value across a .5 tie.
    """
    inv = torch.full_like(amax, float(QMAX)).div_(amax)
    return torch.where(amax > 0, inv, torch.zeros_like(amax))


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization.

    w (N, K) float -> qweight (N, K) int8 in [-127, 127], scale (N,) fp32 with w ≈ qweight·scale[:, None].
    An all-zero row gets scale 0 and zeros.
    """
    check_tensor("w", w, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    if not torch.isfinite(w).all():
        raise ValueError("w holds inf or nan; cannot quantize")
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)
    inv = _inv_scale(amax)
    q = torch.round(w32 * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), (amax / QMAX).contiguous()


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic activation quantization, the kernels' exact rule.

    x (M, K) float -> xq (M, K) int8 = round_half_even(x·(127/max|x_m|)) clamped to ±127, xs (M,) = max|x_m|/127.
    A row holding inf or NaN has no int8 image: its xq is 0 and its xs is non-finite (NaN if the row
    holds a NaN, else inf, as ``amax`` gives it); the linear ops compute such rows in float.
    """
    x32 = x.float()
    amax = x32.abs().amax(dim=1) if x32.shape[1] > 0 else x32.new_zeros(x32.shape[0])
    finite = torch.isfinite(amax)
    inv = torch.where(finite, _inv_scale(amax), torch.zeros_like(amax))
    xq = torch.round(torch.where(finite[:, None], x32, 0.0) * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return xq, amax / QMAX


# Largest |scale| the factored int8 forms handle: 128·s stays finite, so every q·s does (csrc's kMaxFastScale).
MAX_FAST_SCALE = torch.finfo(torch.float32).max / 128


def _float_path_mask(x2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """(M, N) mask of the outputs whose inputs the factored int8 forms cannot reproduce in float
    semantics: rows of x holding inf/NaN and channels whose scale is non-finite or makes q·s
    overflow; None when there are none (the usual case)."""
    bad_rows = ~torch.isfinite(x2).all(dim=1) if x2.shape[1] > 0 else torch.zeros(x2.shape[0], dtype=torch.bool)
    bad_cols = ~(scale.float().abs() <= MAX_FAST_SCALE)
    if not bool(bad_rows.any()) and not bool(bad_cols.any()):
        return None
    return bad_rows.to(x2.device)[:, None] | bad_cols[None, :]


def int8_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch int8 linear (the test oracle's math and the fallback). x (..., K) -> (..., N) in x's dtype.

    Non-finite inputs give the float path's answer: where a row of x holds inf/NaN or a scale is
    non-finite (or makes q·s overflow), W8A8 outputs are those of ``F.linear(x, q·s, b)``.
    """
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    b32 = bias.float() if bias is not None else None
    float_path = _float_path_mask(x2, scale) if act_quant else None
    if act_quant:
        xq, xs = quantize_rows_ref(x2)
        # float64 holds every int32-range dot product exactly, so this is the integer accumulation.
        acc = (xq.double() @ qweight.double().t()).float()
        y = acc * (xs[:, None] * scale.float()[None, :])
        if b32 is not None:
            y = y + b32
    if not act_quant or float_path is not None:
        y_float = F.linear(x2.float(), qweight.float() * scale.float()[:, None], b32)
        y = y_float if float_path is None else torch.where(float_path, y_float, y)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------------
# Packed-weight cache (CPU W8A8)
# --------------------------------------------------------------------------------------------------

_pack_cache: dict[int, tuple[Any, int, torch.Tensor, torch.Tensor]] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _packed(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = id(qweight)
    hit = _pack_cache.get(key)
    ver = _version(qweight)
    if hit is not None and hit[0]() is qweight and hit[1] == ver:
        return hit[2], hit[3]
    packed, wsum = torch.ops.tape_kernels.pack_int8_weight(qweight)
    ref = weakref.ref(qweight, lambda _r, key=key: _pack_cache.pop(key, None))
    _pack_cache[key] = (ref, ver, packed, wsum)
    return packed, wsum


# --------------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------------


def _validate(x: Any, qweight: Any, scale: Any, bias: Any) -> None:
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int8,))
    n, k = qweight.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must equal qweight's K={k}")
    check_tensor("scale", scale, shape=(n,), dtypes=(torch.float32,))
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=FLOAT_DTYPES)
    check_same_device(x=x, qweight=qweight, scale=scale, bias=bias)
    if k > 0 and qweight.stride(1) != 1:
        raise ValueError(f"qweight must be contiguous along K (stride {qweight.stride()}); call .contiguous()")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"int8_linear supports CPU and CUDA tensors, got {x.device}")
    _remember_validated(qweight, scale, bias)


def resolve_act_quant(x: torch.Tensor) -> bool:
    """The faster mode for input x: W8A8 on CPU (VNNI/AVX2 int8 dot products beat dequantize-and-FMA);
    on CUDA weight-only for M ≤ 16 rows (the GEMV streams the weights once; decode) and W8A8 above
    (the dp4a GEMM; prefill)."""
    if x.device.type != "cuda":
        return True
    return x.numel() // max(x.shape[-1], 1) > GEMV_MAX_M


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_quant: bool | None = False,
) -> torch.Tensor:
    """y = x·(qweight·scale[:, None])ᵀ + bias.

    x (..., K) fp32/fp16/bf16, qweight (N, K) int8, scale (N,) fp32, bias (N,) or None -> y (..., N) in x's dtype.
    ``act_quant=False``: weight-only, fp32 accumulation. ``act_quant=True``: W8A8, int32 accumulation
    (needs qweight in [-127, 127], as ``quantize_weight`` makes it). ``act_quant=None``: the faster
    mode for the call (see ``resolve_act_quant``).
    """
    # At decode size the kernel is short next to Python overhead, so per-call work is kept to a few attribute
    # reads: the weights' checks are remembered per (qweight, scale, bias) objects and only x is
    # checked on every call (the C++ ops re-check every input, so a weight swapped in place
    # through ``.data`` still gets a ValueError, not a crash).
    if not isinstance(x, torch.Tensor) or not _weights_validated(qweight, scale, bias):
        _validate(x, qweight, scale, bias)
    dev = x.device
    shape = x.shape
    if x.dtype not in _FLOAT_SET or not shape or shape[-1] != qweight.shape[1] or dev != qweight.device:
        _validate(x, qweight, scale, bias)
    if act_quant is None:
        act_quant = resolve_act_quant(x)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return Int8LinearFunction.apply(x, qweight, scale, bias, act_quant)
    return _int8_linear_forward(x, qweight, scale, bias, act_quant)


class Int8LinearFunction(torch.autograd.Function):
    """``int8_linear`` with gradients for the input and the bias (the int8 weights are frozen).

    dx = dy·(q·s) — the dequantized weight, the exact derivative of the weight-only path; for W8A8 the
    per-row activation rounding is treated as the identity (straight-through), so dx is the gradient of
    the weight-only map at the same weights. dbias = Σ dy over the leading dims.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                act_quant: bool) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.x_dtype = x.dtype
        ctx.bias_meta = None if bias is None else (bias.dtype, bias.shape)
        return _int8_linear_forward(x, qweight, scale, bias, act_quant)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qweight, scale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = qweight.float() * scale[:, None]  # (N, K)
            gx = (grad.float() @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            gb = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_meta[0])
        return gx, None, None, gb, None


def _int8_linear_forward(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, act_quant: bool
) -> torch.Tensor:
    shape = x.shape
    dev = x.device
    if _ext_state != "ok" and _load_ext() is None:
        return int8_linear_ref(x, qweight, scale, bias, act_quant)
    n, k = qweight.shape
    x2 = x if len(shape) == 2 else x.reshape(-1, k)
    if k > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dev.type == "cpu":
        # The CPU kernels compute in fp32; fp16/bf16 inputs round-trip through it.
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        bf = bias if bias is None or bias.dtype == torch.float32 else bias.float()
        if act_quant:
            packed, wsum = _packed(qweight)
            y = _op("w8a8_linear_packed")(xf, packed, wsum, scale, bf)
        else:
            y = _op("w8_linear")(xf, qweight, scale, bf)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    else:
        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        y = _op("w8a8_linear" if act_quant else "w8_linear")(x2, qweight, scale, b)
    return y if len(shape) == 2 else y.reshape(*shape[:-1], n)


_FLOAT_SET = frozenset(FLOAT_DTYPES)
_op_cache: dict[str, Any] = {}


def _op(name: str) -> Any:
    op = _op_cache.get(name)
    if op is None:
        op = _op_cache[name] = getattr(torch.ops.tape_kernels, name).default
    return op


_validated: dict[tuple[int, int, int], tuple[Any, Any, Any]] = {}


def _weights_validated(qweight: Any, scale: Any, bias: Any) -> bool:
    """Whether these exact weight objects passed ``_validate`` before (then they still pass)."""
    hit = _validated.get((id(qweight), id(scale), id(bias)))
    return (
        hit is not None
        and hit[0]() is qweight
        and hit[1]() is scale
        and (bias is None or (hit[2] is not None and hit[2]() is bias))
    )


def _remember_validated(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    key = (id(qweight), id(scale), id(bias))

    def drop(_r: Any, key: tuple[int, int, int] = key) -> None:
        _validated.pop(key, None)

    refs = (weakref.ref(qweight, drop), weakref.ref(scale, drop), None if bias is None else weakref.ref(bias, drop))
    _validated[key] = refs


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` with int8 weights (see ``int8_linear``).

    Buffers: qweight (N, K) int8, scale (N,) fp32, bias (N,) or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_quant: bool | None = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.act_quant = act_quant
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_quant: bool | None = False) -> Int8Linear:
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, act_quant)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, act_quant: bool | None = False
    ) -> Int8Linear:
        """From a float weight (N, K) and optional bias (N,)."""
        q, s = quantize_weight(weight)
        mod = cls(weight.shape[1], weight.shape[0], bias is not None, act_quant, device=weight.device)
        mod.qweight.copy_(q)
        mod.scale.copy_(s)
        if bias is not None:
            mod.bias = bias.detach().clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias, self.act_quant)

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        # model.half() / .to(dtype) cast float buffers; the per-channel scales stay fp32 (the kernels'
        # epilogue and the 127-step grid need them exact), only the bias follows the model's dtype.
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(self.scale.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act_quant={self.act_quant}"
        )


class Int8MultiheadAttention(nn.Module):
    """Inference replacement for ``nn.MultiheadAttention`` (packed in_proj, no bias_k/v, no zero-attn)
    with int8 in/out projections.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (out, weights or None)`` as nn.MultiheadAttention;
    dropout is not applied (inference). When key is value (self-attention, or a cache of unprojected
    inputs), K and V are projected by one int8 GEMM, and Q too when query is key as well.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, batch_first: bool = True, act_quant: bool | None = False
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.in_proj = Int8Linear(embed_dim, 3 * embed_dim, act_quant=act_quant)
        self.out_proj = Int8Linear(embed_dim, embed_dim, act_quant=act_quant)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, act_quant: bool | None = False) -> Int8MultiheadAttention:
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"from_float expects an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with packed in_proj, no bias_k/bias_v, no add_zero_attn")
        mod = cls(mha.embed_dim, mha.num_heads, mha.batch_first, act_quant)
        mod.in_proj = Int8Linear.from_weight(mha.in_proj_weight, mha.in_proj_bias, act_quant)
        mod.out_proj = Int8Linear.from_float(mha.out_proj, act_quant)
        return mod

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        d, p = self.embed_dim, self.in_proj
        if query is key and key is value:
            return list(int8_linear(query, p.qweight, p.scale, p.bias, p.act_quant).split(d, dim=-1))

        rows = self._row_views()
        q = int8_linear(query, *rows["q"], p.act_quant)
        if key is value:
            k, v = int8_linear(key, *rows["kv"], p.act_quant).split(d, dim=-1)
        else:
            k = int8_linear(key, *rows["k"], p.act_quant)
            v = int8_linear(value, *rows["v"], p.act_quant)
        return [q, k, v]

    def _row_views(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        # Row-slice views of in_proj, made once per buffer set so that the CPU W8A8 path's packed-weight
        # cache (keyed on the qweight tensor) keeps hitting; views share the buffers' version counter.
        p, d = self.in_proj, self.embed_dim
        key = (p.qweight, p.scale, p.bias)
        cached = getattr(self, "_rows_cache", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        spans = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d), "kv": (d, 3 * d)}
        views = {
            name: (p.qweight[lo:hi], p.scale[lo:hi], None if p.bias is None else p.bias[lo:hi])
            for name, (lo, hi) in spans.items()
        }
        self._rows_cache = (key, views)
        return views

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("Int8MultiheadAttention supports no masks (the TapeTransformer uses none)")
        for name, t in (("query", query), ("key", key), ("value", value)):
            # dtype and device are checked by int8_linear; this is the per-token path, keep it cheap.
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 3-D tensor (..., embed_dim={self.embed_dim}), got {got}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        b, s, _ = q.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = (t.reshape(b, t.shape[1], h, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        w = None
        if need_weights:
            attn = torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)), dim=-1)  # (B, H, S, L)
            o = attn @ v
            w = attn.mean(dim=1) if average_attn_weights else attn
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        out = self.out_proj(o.transpose(1, 2).reshape(b, s, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, w
