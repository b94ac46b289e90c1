"""Grouped Linear layers with fused prologues and epilogues: the GEMMs of a TapeHead block pair.

A TapeHead layer runs two blocks (left and right) on the same input. Every op here takes ``G`` groups
(G = 1 or 2: one block, or a layer's pair) and their weights as separate tensors: the kernels take
both groups' weight pointers and pick one by program id, so a pair costs the launches of one block
and no per-step weight stacking. Where the groups must meet (the combine of their outputs, the sum
of a shared input's gradients) one program handles both.

Ops (x shared by the groups: (M, K); or one per group: (G, M, K)):

* ``grouped_linear``: y_g = x_g W_gᵀ + b_g -> (G, M, N)  (the attention in-projection);
* ``grouped_linear_add_layer_norm``: y_g = LN_g(r_g + x_g W_gᵀ + b_g) -> (G, M, N)  (out-projection +
  residual + LayerNorm, the whole row of N ≤ 1024 in one tile);
* ``grouped_mlp_add_layer_norm``: y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ), optionally combined as
  the TapeHead does, h = combine(y_0, y_1) -> (M, D)  (the RectifiedKAN MLP, residual, LayerNorm and
  the combine; ``act`` = ReferenceActivation).

Kernels (all fp32 accumulation; operands rounded to the compute dtype where eager rounds them):

* ``_fl_fwd_kernel``: tile GEMM acc = act?(X) Wᵀ with the bias / residual / LayerNorm / combine
  epilogue, grid (M tiles, N tiles, G). The MLP's activation runs in the *second* GEMM's prologue
  (on each loaded tile of the pre-activation z), so the (M, 8D) activation is never written: the
  forward writes z once and reads it once. The LayerNorm epilogue saves x̂ (fp32) and rstd for the
  backward.
* ``_fl_bwd_kernel``: one launch holds three kinds of programs, told apart by the program id:
  dX tiles (dX = dY W, with act'(z) or a residual gradient folded into the epilogue, summed over
  the groups when they share x), dW tiles (dW = dYᵀ act?(X), looping over all M rows, and the bias
  gradient as the column sums of dY in the same loop) and LayerNorm-parameter programs (column sums
  of the per-program partials the row kernel wrote). Every reduction runs in a fixed order: no
  atomics, bit-identical run to run.
* ``_ln_bwd_kernel``: LayerNorm backward by rows, with the combine's backward as its prologue (it
  recomputes y_g = x̂_g γ_g + β_g), the sum over groups of a shared residual's gradient, and
  per-program partial sums of dγ, dβ.

Launches per block pair (forward + backward): in-projection 1 + 1, out-projection + LN 1 + 2,
MLP + LN + combine 2 + 3. Memory traffic saved against eager: the activation's (M, 8D) output (written
and read twice), the bias/residual sums before each LayerNorm, the combine's inputs; weights are read
in place in any dtype (no autocast copies).

Autocast: the GEMM operands are rounded to the autocast dtype inside the kernels (weights stay
fp32 in memory: no cast launches), GEMM outputs are written in it, LayerNorm outputs in fp32 on
CUDA (as ``nn.LayerNorm`` under autocast). Weight and bias gradients are written in the parameters'
dtype straight from the fp32 accumulators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tape_kernels._dispatch import check_backend, triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, KERNEL_DTYPES, dot_precision, next_pow2, rtne_bf16
from tape_kernels._validate import check_same_device, check_tensor
from tape_kernels.activation import reference_activation_ref
from tape_kernels.combine import MODES, tapehead_combine_ref

__all__ = [
    "grouped_linear",
    "grouped_linear_add_layer_norm",
    "grouped_linear_add_layer_norm_ref",
    "grouped_linear_ref",
    "grouped_mlp_add_layer_norm",
    "grouped_mlp_add_layer_norm_ref",
    "supports_ln_width",
]

MAX_GROUPS = 2
# The LayerNorm epilogue holds a whole row per tile: nextnext_pow2(N) fp32 accumulators per row.
MAX_LN_N = 1024
_CDT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# The Triton kernels live in tape_kernels._fused_linear_kernels.
if triton_available():
    import triton

    from tape_kernels._fused_linear_kernels import _fl_bwd_kernel, _fl_fwd_kernel, _ln_bwd_kernel


# --------------------------------------------------------------------------------------------------
# Eager references (test oracles; the CPU / float64 path)
# --------------------------------------------------------------------------------------------------


def _per_group(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    return [x] * g if x.dim() == 2 else list(x.unbind(0))


def grouped_linear_ref(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Eager: torch.stack([F.linear(x_g, W_g, b_g)]) -> (G, M, N); x (M, K) shared or (G, M, K)."""
    xs = _per_group(x, len(weights))
    return torch.stack([F.linear(xg, w, b) for xg, w, b in zip(xs, weights, biases)])


def grouped_linear_add_layer_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor], eps: float = 1e-5,
) -> torch.Tensor:  # fmt: skip
    """Eager: LN_g(r_g + F.linear(x_g, W_g, b_g)) stacked -> (G, M, N)."""
    g = len(weights)
    xs, rs = _per_group(x, g), _per_group(residual, g)
    n = weights[0].shape[0]
    return torch.stack(
        [F.layer_norm(F.linear(xg, w, b) + r, (n,), lw, lb, eps)
         for xg, r, w, b, lw, lb in zip(xs, rs, weights, biases, ln_weights, ln_biases)]
    )  # fmt: skip


def grouped_mlp_add_layer_norm_ref(
    h: torch.Tensor, expand_weights: Sequence[torch.Tensor], expand_biases: Sequence[torch.Tensor | None],
    linear_weights: Sequence[torch.Tensor], ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor],
    eps: float = 1e-5, combine: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Eager: y_g = LN_g(h_g + F.linear(act(F.linear(h_g, W_e, b_e)), W_l)) -> (G, M, D), or with
    ``combine`` the TapeHead combine of y_0, y_1 -> (M, D). h (G, M, D)."""
    d = h.shape[-1]
    ys = []
    for hg, we, be, wl, lw, lb in zip(h.unbind(0), expand_weights, expand_biases, linear_weights, ln_weights,
                                      ln_biases):  # fmt: skip
        m = F.linear(reference_activation_ref(F.linear(hg, we, be)), wl)
        ys.append(F.layer_norm(hg + m, (d,), lw, lb, eps))
    if combine is None:
        return torch.stack(ys)
    return tapehead_combine_ref(ys[0], ys[1], combine)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype: autocast's on x's device when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _ln_dtype(cdt: torch.dtype, residual: torch.Tensor) -> torch.dtype:
    """LayerNorm output dtype, as ``add_layer_norm(gemm_out, residual)`` gives it: the promoted dtype,
    fp32 under CUDA autocast (where nn.LayerNorm runs in fp32)."""
    dt = torch.promote_types(cdt, residual.dtype)
    if residual.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.promote_types(dt, torch.float32)
    return dt


# Tiles (rows × columns × reduction step, warps), by the dot's operand class, chosen with
# benchmarks/kernel_report.py so that no variant the model uses spills on sm_86. fp32 products are FMA
# loops whose operands sit in registers (no tensor cores in IEEE mode): 32 × 32 tiles, 16-deep steps.
# 16-bit operands take the MMA path: 64 × 64 tiles, 16-deep steps, 8 warps. Where the activation runs
# in a prologue or epilogue (≈ 10 live fp32 temporaries per element) the tiles it touches shrink.
# LayerNorm tiles hold whole rows: 16 rows × nextnext_pow2(N) columns, 8 warps at N = 256 (16 fp32
# accumulators a thread; the combine keeps the first group's rows live while the second is computed).
NUM_STAGES = 2  # what the AOT specs compile (Triton's launch default would be 3)


def _fwd_tile(fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) of a plain GEMM tile."""
    return (32, 32, 16, 4) if fp32 else (64, 64, 32, 8)


def _bwd_tile(fp32: bool, act: bool) -> tuple[int, ...]:
    """(DX_M, DX_K, DX_R, DW_N, DW_K, DW_R, warps): dX tiles DX_M × DX_K in steps of DX_R, dW tiles
    DW_N × DW_K in steps of DW_R rows."""
    if fp32:
        return (32, 32, 16, 32, 32, 16, 8 if act else 4)
    return (32, 64, 32, 64, 64, 16, 8) if act else (64, 64, 16, 64, 64, 16, 8)


def _ln_tile(n: int, fp32: bool, act: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) of a whole-row LayerNorm tile of width n: 16 rows, 16-deep steps.
    Spill-free on sm_86 up to n = 256 with the combine (the model's D = 256) and n = 512 without;
    wider rows are correct but spill (kernel_report)."""
    bn = max(16, next_pow2(n))
    return 16, bn, 16, (4 if bn <= 64 else 8 if bn <= 256 else 16)


def _ln_bwd_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 8)


def _num_ln_progs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        # two programs per SM keep the loads in flight; more would only grow the partial buffers
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter runs programs one after another: fewer, longer ones are cheaper
    return max(1, min(m, target))


def _fwd(
    x: torch.Tensor, ws: Sequence[torch.Tensor], bs: Sequence[torch.Tensor | None], cdt: torch.dtype, *,
    act_in: bool = False, res: torch.Tensor | None = None, ln: tuple | None = None, y_dtype: torch.dtype,
    combine: int | None = None, store_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Launch ``_fl_fwd_kernel``: x (M, K) shared or (G, M, K) contiguous -> (y (G, M, N) or None, x̂, rstd,
    combined out (M, N) or None). ``ln`` = (lnws, lnbs, eps)."""
    g = len(ws)
    n, k = ws[0].shape
    m = x.shape[-2]
    dev = x.device
    has_bias = bs[0] is not None
    y = torch.empty((g, m, n), device=dev, dtype=y_dtype) if store_y else None
    out = torch.empty((m, n), device=dev, dtype=y_dtype) if combine is not None else None
    fp32 = cdt == torch.float32
    if ln is not None:
        xhat = torch.empty((g, m, n), device=dev, dtype=torch.float32)
        rstd = torch.empty((g, m), device=dev, dtype=torch.float32)
        lnws, lnbs, eps = ln
        bm, bn, bk, warps = _ln_tile(n, fp32, act_in)
    else:
        xhat = rstd = None
        lnws = lnbs = (ws[0],) * g
        eps = 0.0
        bm, bn, bk, warps = _fwd_tile(fp32)
    dummy = ws[0]
    w1 = ws[1] if g == 2 else dummy
    b0 = bs[0] if has_bias else dummy
    b1 = bs[1] if has_bias and g == 2 else dummy
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), 1 if combine is not None else g)
    if m:
        _fl_fwd_kernel[grid](
            x, ws[0], w1, b0, b1, res if res is not None else dummy,
            y if y is not None else (out if out is not None else dummy),
            xhat if xhat is not None else dummy, rstd if rstd is not None else dummy,
            lnws[0], lnws[-1], lnbs[0], lnbs[-1], out if out is not None else dummy,
            m, n, k, (m * k if x.dim() == 3 else 0), (m * n if res is not None and res.dim() == 3 else 0), float(eps),
            HAS_BIAS=has_bias, ACT_IN=act_in, HAS_RES=res is not None, LN=ln is not None, STORE_Y=store_y,
            COMBINE=-1 if combine is None else combine, CDT=_CDT[cdt], PREC=dot_precision(cdt),
            RTNE_BF16=rtne_bf16(y_dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    return y, xhat, rstd, out


def _bwd(
    dy: torch.Tensor, ws: Sequence[torch.Tensor], x: torch.Tensor, cdt: torch.dtype, *, act_in: bool = False,
    res_grad: torch.Tensor | None = None, dx_dtype: torch.dtype, bias_dtypes: Sequence[torch.dtype] | None = None,
    ln_partials: tuple | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None, tuple | None]:  # fmt: skip
    """Launch ``_fl_bwd_kernel`` for dy (G, M, N): -> (dx like x, [dW_g], [db_g] or None, (dγs, dβs) or
    None). ``res_grad`` (like x) is added to dx; ``ln_partials`` = (PW, PB, ln_weights, ln_biases)
    gives the LayerNorm parameters' gradients from ``_ln_bwd_kernel``'s partial sums."""
    g = len(ws)
    n, k = ws[0].shape
    m = x.shape[-2]
    dev = x.device
    shared = x.dim() == 2
    dx = torch.empty(x.shape, device=dev, dtype=dx_dtype)
    dws = [torch.empty_like(w) for w in ws]
    dbs = None if bias_dtypes is None else [torch.empty(n, device=dev, dtype=dt) for dt in bias_dtypes]
    dxm, dxk, dxr, dwn, dwk, dwr, warps = _bwd_tile(cdt == torch.float32, act_in)
    n_dx = triton.cdiv(m, dxm) * triton.cdiv(k, dxk) * (1 if shared else g)
    n_dw = triton.cdiv(n, dwn) * triton.cdiv(k, dwk) * g
    n_red = 0
    dummy = dws[0]
    if ln_partials is not None:
        pw, pb, lnws, lnbs = ln_partials
        dlnws = [torch.empty_like(t) for t in lnws]
        dlnbs = [torch.empty_like(t) for t in lnbs]
        n_red = triton.cdiv(n, dwk) * g
        p = pw.shape[1]
    else:
        pw = pb = dummy
        dlnws = dlnbs = [dummy] * g
        p = 0
    if m:
        _fl_bwd_kernel[(n_dx + n_dw + n_red,)](
            dy, ws[0], ws[-1], x, res_grad if res_grad is not None else dummy, dx, dws[0], dws[-1],
            dbs[0] if dbs else dummy, dbs[-1] if dbs else dummy, pw, pb, dlnws[0], dlnws[-1], dlnbs[0], dlnbs[-1],
            m, n, k, p, (0 if shared else m * k),
            (m * k if res_grad is not None and res_grad.dim() == 3 else 0), (0 if shared else m * k), n_dx, n_dw,
            G=g, SUM_G=shared, ACT_IN=act_in, HAS_RES=res_grad is not None, HAS_DB=dbs is not None,
            LN_RED=ln_partials is not None, CDT=_CDT[cdt], PREC=dot_precision(cdt), RTNE_BF16=rtne_bf16(dx_dtype),
            DX_M=dxm, DX_K=dxk, DX_R=dxr, DW_N=dwn, DW_K=dwk, DW_R=dwr, num_warps=warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    else:
        for t in dws + (dbs or []) + (list(dlnws) + list(dlnbs) if ln_partials is not None else []):
            t.zero_()
    return dx, dws, dbs, ((dlnws, dlnbs) if ln_partials is not None else None)


def _ln_bwd(
    dy: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, lnws: Sequence[torch.Tensor],
    lnbs: Sequence[torch.Tensor], dr_dtype: torch.dtype, *, combine: int | None = None, want_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch ``_ln_bwd_kernel``: -> (dr (G, M, N), Σ_g dr (M, N) or None, partials PW, PB (G, P, N))."""
    g, m, n = xhat.shape
    dev = xhat.device
    p = _num_ln_progs(m, dev)
    rows_per_prog = triton.cdiv(m, p) if m else 1
    p = triton.cdiv(m, rows_per_prog) if m else 1
    dr = torch.empty((g, m, n), device=dev, dtype=dr_dtype)
    drsum = torch.empty((m, n), device=dev, dtype=dr_dtype) if want_sum else None
    pw = torch.empty((g, p, n), device=dev, dtype=torch.float32)
    pb = torch.empty((g, p, n), device=dev, dtype=torch.float32)
    bn = max(16, next_pow2(n))
    if m:
        _ln_bwd_kernel[(p,)](
            dy, xhat, rstd, lnws[0], lnws[-1], lnbs[0], lnbs[-1], dr, drsum if drsum is not None else dr, pw, pb,
            m, n, rows_per_prog, G=g, COMBINE=-1 if combine is None else combine, HAS_SUM=want_sum,
            RTNE_BF16=rtne_bf16(dr_dtype), BLOCK_N=bn, num_warps=_ln_bwd_warps(bn), num_stages=NUM_STAGES,
        )  # fmt: skip
    else:
        pw.zero_()
        pb.zero_()
    return dr, drsum, pw, pb


# --------------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------------


def _grads_or_none(ctx, start: int, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:  # noqa: ANN001
    return [gr if ctx.needs_input_grad[start + i] else None for i, gr in enumerate(grads)]


class _GroupedLinearFn(torch.autograd.Function):
    """y (G, M, N) = x_g W_gᵀ + b_g. Inputs: x, cdt, return_input, then W_0, b_0, W_1, b_1 (b may be None
    for all). With return_input the outputs are (y, x as a view): the view's gradient (x's second
    consumer) is added to dx in the dX epilogue instead of by a separate autograd ``add``."""

    @staticmethod
    def forward(ctx, x, cdt, return_input, *wb):  # noqa: ANN001, ANN205
        ws, bs = list(wb[0::2]), list(wb[1::2])
        x = x.contiguous()
        y, _, _, _ = _fwd(x, ws, bs, cdt, y_dtype=cdt)
        ctx.save_for_backward(x, *ws)
        ctx.cdt = cdt
        ctx.bias_dtypes = None if bs[0] is None else [b.dtype for b in bs]
        ctx.set_materialize_grads(False)
        return (y, x.view_as(x)) if return_input else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dx_view: torch.Tensor | None = None):  # noqa: ANN001, ANN205
        x, *ws = ctx.saved_tensors
        if dy is None:  # only the input view was used
            dy = torch.zeros((len(ws), x.shape[-2], ws[0].shape[0]), device=x.device, dtype=ctx.cdt)
        res = None if dx_view is None else dx_view.contiguous()
        dx, dws, dbs, _ = _bwd(dy.contiguous(), ws, x, ctx.cdt, res_grad=res, dx_dtype=x.dtype,
                               bias_dtypes=ctx.bias_dtypes)  # fmt: skip
        wb = [t for pair in zip(dws, dbs or [None] * len(dws)) for t in pair]
        return (dx if ctx.needs_input_grad[0] else None, None, None, *_grads_or_none(ctx, 3, wb))


class _GroupedLinearLNFn(torch.autograd.Function):
    """y (G, M, N) = LN_g(r_g + x_g W_gᵀ + b_g). Inputs: x, residual, cdt, y dtype, eps, then per group
    W, b, γ, β."""

    @staticmethod
    def forward(ctx, x, residual, cdt, y_dtype, eps, *params):  # noqa: ANN001, ANN205
        g = len(params) // 4
        ws, bs, lnws, lnbs = (list(params[i::4]) for i in range(4))
        x = x.contiguous()
        residual = residual.contiguous()
        y, xhat, rstd, _ = _fwd(x, ws, bs, cdt, res=residual, ln=(lnws, lnbs, eps), y_dtype=y_dtype)
        ctx.save_for_backward(x, xhat, rstd, *ws, *lnws, *lnbs)
        ctx.meta = (g, cdt, residual.dtype, residual.dim() == 2, None if bs[0] is None else [b.dtype for b in bs])
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        g, cdt, r_dtype, shared_res, bias_dtypes = ctx.meta
        x, xhat, rstd, *rest = ctx.saved_tensors
        ws, lnws, lnbs = rest[:g], rest[g : 2 * g], rest[2 * g :]
        dr, drsum, pw, pb = _ln_bwd(dy.contiguous(), xhat, rstd, lnws, lnbs, r_dtype, want_sum=shared_res)
        dx, dws, dbs, (dlnws, dlnbs) = _bwd(dr, ws, x, cdt, dx_dtype=x.dtype, bias_dtypes=bias_dtypes,
                                            ln_partials=(pw, pb, lnws, lnbs))  # fmt: skip
        dbs = dbs or [None] * g
        params = [t for i in range(g) for t in (dws[i], dbs[i], dlnws[i], dlnbs[i])]
        dres = drsum if shared_res else dr
        return (dx if ctx.needs_input_grad[0] else None, dres if ctx.needs_input_grad[1] else None, None, None,
                None, *_grads_or_none(ctx, 5, params))  # fmt: skip


class _GroupedMLPLNFn(torch.autograd.Function):
    """y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ) -> (G, M, D), or combine(y_0, y_1) -> (M, D).
    Inputs: h (G, M, D), cdt, y dtype, eps, combine mode or None, then per group W_e, b_e, W_l, γ, β."""

    @staticmethod
    def forward(ctx, h, cdt, y_dtype, eps, combine, *params):  # noqa: ANN001, ANN205
        g = len(params) // 5
        wes, bes, wls, lnws, lnbs = (list(params[i::5]) for i in range(5))
        h = h.contiguous()
        z, _, _, _ = _fwd(h, wes, bes, cdt, y_dtype=cdt)
        y, xhat, rstd, out = _fwd(z, wls, [None] * g, cdt, act_in=True, res=h, ln=(lnws, lnbs, eps), y_dtype=y_dtype,
                                  combine=combine, store_y=combine is None)  # fmt: skip
        ctx.save_for_backward(h, z, xhat, rstd, *wes, *wls, *lnws, *lnbs)
        ctx.meta = (g, cdt, combine, None if bes[0] is None else [b.dtype for b in bes])
        return out if combine is not None else y

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        g, cdt, combine, bias_dtypes = ctx.meta
        h, z, xhat, rstd, *rest = ctx.saved_tensors
        wes, wls, lnws, lnbs = (rest[i * g : (i + 1) * g] for i in range(4))
        # LN backward (with the combine's backward in front) -> the gradient of h + m, for m and for h
        dr, _, pw, pb = _ln_bwd(dout.contiguous(), xhat, rstd, lnws, lnbs, h.dtype, combine=combine)
        # m = act(z) W_lᵀ: dz = (dr W_l)·act'(z), dW_l = drᵀ act(z), and the LayerNorm's dγ, dβ
        dz, dwls, _, (dlnws, dlnbs) = _bwd(dr, wls, z, cdt, act_in=True, dx_dtype=z.dtype,
                                           ln_partials=(pw, pb, lnws, lnbs))  # fmt: skip
        # z = h W_eᵀ + b_e: dh = dz W_e + dr (the residual), dW_e, db_e
        dh, dwes, dbes, _ = _bwd(dz, wes, h, cdt, res_grad=dr, dx_dtype=h.dtype, bias_dtypes=bias_dtypes)
        dbes = dbes or [None] * g
        params = [t for i in range(g) for t in (dwes[i], dbes[i], dwls[i], dlnws[i], dlnbs[i])]
        return (dh if ctx.needs_input_grad[0] else None, None, None, None, None, *_grads_or_none(ctx, 5, params))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def supports_ln_width(n: int) -> bool:
    """Whether the LayerNorm epilogue holds a row of width n (whole rows in one tile)."""
    return 0 < n <= MAX_LN_N


def _check_groups(name: str, ts: Sequence[torch.Tensor | None], g: int, optional: bool = False) -> list:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of {g} tensors (one per group)")
    if len(ts) != g:
        raise ValueError(f"{name} has {len(ts)} entries; expected {g} (one per group)")
    ts = list(ts)
    if optional:
        if any(t is None for t in ts) and not all(t is None for t in ts):
            raise ValueError(f"{name}: give a tensor for every group or None for every group")
    return ts


def _check_x(name: str, x: torch.Tensor, g: int, k: int | None = None, grouped_only: bool = False) -> None:
    check_tensor(name, x, ndim=(3,) if grouped_only else (2, 3), dtypes=INPUT_DTYPES)
    if x.dim() == 3 and x.shape[0] != g:
        raise ValueError(f"{name} has {x.shape[0]} groups (shape {tuple(x.shape)}); the weights give {g}")
    if k is not None and x.shape[-1] != k:
        raise ValueError(f"{name} has last dim {x.shape[-1]}; the weights expect {k}")


def _check_weights(
    ws: list[torch.Tensor], bs: list[torch.Tensor | None], wname: str, bname: str, k: int | None = None
) -> tuple[int, int]:
    n, kk = None, None
    for i, w in enumerate(ws):
        check_tensor(f"{wname}[{i}]", w, ndim=2, dtypes=INPUT_DTYPES)
        if n is None:
            n, kk = w.shape
        if w.shape != (n, kk) or (k is not None and kk != k):
            want = (n, k if k is not None else kk)
            raise ValueError(f"{wname}[{i}] has shape {tuple(w.shape)}; expected {want}")
    for i, b in enumerate(bs):
        if b is not None:
            check_tensor(f"{bname}[{i}]", b, shape=(n,), dtypes=INPUT_DTYPES)
    return n, kk


def _check_ln(lnws: list, lnbs: list, n: int) -> None:
    for i, (w, b) in enumerate(zip(lnws, lnbs)):
        check_tensor(f"ln_weights[{i}]", w, shape=(n,), dtypes=INPUT_DTYPES)
        check_tensor(f"ln_biases[{i}]", b, shape=(n,), dtypes=INPUT_DTYPES)


def _kernel_path(backend: str, tensors: list[torch.Tensor | None], ln_n: int | None = None) -> bool:
    """Whether the kernels run: dtypes they take, one dtype for activations and parameters unless autocast
    is on (then the parameters may be fp32 next to half activations), an LN width they hold; the
    eager reference otherwise (``backend="triton"`` raises instead)."""
    check_backend(backend)
    present = [t for t in tensors if t is not None]
    if not use_triton(*present, backend=backend):
        return False
    reason = None
    dts = {t.dtype for t in present}
    if not dts <= set(KERNEL_DTYPES):
        reason = f"dtypes {sorted(map(str, dts))} (kernels take fp32/fp16/bf16)"
    elif len(dts) > 1 and not torch.is_autocast_enabled(present[0].device.type):
        reason = f"mixed dtypes {sorted(map(str, dts))} outside autocast"
    elif ln_n is not None and not supports_ln_width(ln_n):
        reason = f"LayerNorm width {ln_n} > {MAX_LN_N}"
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"fused_linear Triton kernels do not support {reason}; use backend='eager'")
    return False


def grouped_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], *,
    return_input: bool = False, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """G Linear layers: x (M, K) shared by the groups or (G, M, K) one per group; weights G × (N, K);
    biases G × (N,) or G × None -> (G, M, N), in the autocast dtype under autocast, else x's dtype.
    G = 1 or 2. Differentiable in every input.

    ``return_input=True`` returns (y, x'), x' a view of x to hand to x's other consumer (the residual
    of the block's LayerNorm): on the kernel path x''s gradient is then added to dx inside the backward
    kernel, where autograd would launch an ``add`` for a tensor with two consumers."""
    ws = _check_groups("weights", weights, len(weights) if isinstance(weights, (list, tuple)) else 0)
    g = len(ws)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bs = _check_groups("biases", biases, g, optional=True)
    n, k = _check_weights(ws, bs, "weights", "biases")
    _check_x("x", x, g, k)
    check_same_device(x=x, **{f"weights[{i}]": w for i, w in enumerate(ws)},
                      **{f"biases[{i}]": b for i, b in enumerate(bs)})  # fmt: skip
    if not _kernel_path(backend, [x, *ws, *bs]):
        y = grouped_linear_ref(x, ws, bs)
        return (y, x) if return_input else y
    wb = [t for pair in zip(ws, bs) for t in pair]
    return _GroupedLinearFn.apply(x, _compute_dtype(x), bool(return_input), *wb)


def grouped_linear_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor], eps: float = 1e-5, *,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """y_g = LayerNorm_g(r_g + x_g W_gᵀ + b_g) -> (G, M, N). x (M, K) or (G, M, K); residual (M, N) or
    (G, M, N); weights G × (N, K); biases G × (N,) or None; ln_weights / ln_biases G × (N,).

    The LayerNorm holds whole rows (N ≤ 1024 on the kernel path). Output dtype: that of
    ``add_layer_norm(linear_out, residual)`` (fp32 under CUDA autocast)."""
    ws = _check_groups("weights", weights, len(weights) if isinstance(weights, (list, tuple)) else 0)
    g = len(ws)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bs = _check_groups("biases", biases, g, optional=True)
    lnws, lnbs = _check_groups("ln_weights", ln_weights, g), _check_groups("ln_biases", ln_biases, g)
    n, k = _check_weights(ws, bs, "weights", "biases")
    _check_ln(lnws, lnbs, n)
    _check_x("x", x, g, k)
    _check_x("residual", residual, g, n)
    if residual.shape[-2] != x.shape[-2]:
        raise ValueError(f"residual has {residual.shape[-2]} rows; x has {x.shape[-2]}")
    tensors = [x, residual, *ws, *bs, *lnws, *lnbs]
    check_same_device(**{f"t{i}": t for i, t in enumerate(tensors)})
    if not _kernel_path(backend, tensors, n):
        return grouped_linear_add_layer_norm_ref(x, residual, ws, bs, lnws, lnbs, eps)
    cdt = _compute_dtype(x)
    params = [t for i in range(g) for t in (ws[i], bs[i], lnws[i], lnbs[i])]
    return _GroupedLinearLNFn.apply(x, residual, cdt, _ln_dtype(cdt, residual), float(eps), *params)


def grouped_mlp_add_layer_norm(
    h: torch.Tensor, expand_weights: Sequence[torch.Tensor], expand_biases: Sequence[torch.Tensor | None],
    linear_weights: Sequence[torch.Tensor], ln_weights: Sequence[torch.Tensor], ln_biases: Sequence[torch.Tensor],
    eps: float = 1e-5, combine: int | None = None, *, backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """The TapeHead block's MLP half for G groups: y_g = LN_g(h_g + act(h_g W_eᵀ + b_e) W_lᵀ), act =
    ReferenceActivation. h (G, M, D); expand_weights G × (F, D); expand_biases G × (F,) or None;
    linear_weights G × (D, F); ln_weights / ln_biases G × (D,). -> (G, M, D), or with ``combine``
    (0 sigmoid-XOR, 1 pair softmax, 2 sum; needs G = 2) the TapeHead combine of y_0, y_1 -> (M, D).

    Output dtype: that of ``add_layer_norm(m, h)``; the pre-activation is kept (in the GEMM dtype) for
    the backward, the activation is recomputed from it."""
    wes = _check_groups("expand_weights", expand_weights,
                        len(expand_weights) if isinstance(expand_weights, (list, tuple)) else 0)  # fmt: skip
    g = len(wes)
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"expand_weights must hold 1 to {MAX_GROUPS} tensors, got {g}")
    bes = _check_groups("expand_biases", expand_biases, g, optional=True)
    wls = _check_groups("linear_weights", linear_weights, g)
    lnws, lnbs = _check_groups("ln_weights", ln_weights, g), _check_groups("ln_biases", ln_biases, g)
    if combine is not None:
        if isinstance(combine, bool) or combine not in MODES:
            raise ValueError(f"combine must be None or one of {MODES}, got {combine!r}")
        if g != 2:
            raise ValueError(f"combine needs 2 groups, got {g}")
    f, d = _check_weights(wes, bes, "expand_weights", "expand_biases")
    _check_weights(wls, [None] * g, "linear_weights", "-", k=f)
    if wls[0].shape[0] != d:
        raise ValueError(f"linear_weights[0] has shape {tuple(wls[0].shape)}; expected ({d}, {f})")
    _check_ln(lnws, lnbs, d)
    _check_x("h", h, g, d, grouped_only=True)
    tensors = [h, *wes, *bes, *wls, *lnws, *lnbs]
    check_same_device(**{f"t{i}": t for i, t in enumerate(tensors)})
    if not _kernel_path(backend, tensors, d):
        return grouped_mlp_add_layer_norm_ref(h, wes, bes, wls, lnws, lnbs, eps, combine)
    cdt = _compute_dtype(h)
    params = [t for i in range(g) for t in (wes[i], bes[i], wls[i], lnws[i], lnbs[i])]
    return _GroupedMLPLNFn.apply(h, cdt, _ln_dtype(cdt, h), float(eps), combine, *params)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# --------------------------------------------------------------------------------------------------


def aot_specs() -> list:
    """The kernel variants the launchers emit (listed in ``tape_kernels._fused_linear_aot``)."""
    from tape_kernels._fused_linear_aot import aot_specs as specs

    return specs()
