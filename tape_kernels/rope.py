"""A TapeHead block's input embedding, x = RoPE(tok + pos_emb), for G blocks in one launch.

Each TapeHeadBlock of a head's first layer adds its sinusoidal position table to the token
embeddings and rotates each interleaved pair (x[2i], x[2i+1]) by the angle t·f_i (RoPE). Eager, that
is ~12 elementwise kernels per block forward and as many backward; here one kernel writes every
block's x (G, B, S, D) and one kernel sums the blocks' rotated-back gradients into d tok.

The pair partner of column c is c ^ 1, so a tile needs no shuffles: with θ = t·f_{c//2},

    x[c] = e[c]·cos θ − e[c+1]·sin θ   (c even),     x[c] = e[c]·cos θ + e[c−1]·sin θ   (c odd)

with e = tok + pos_emb, i.e. x[c] = e[c]·cos θ + σ_c·e[c ^ 1]·sin θ, σ = −1 on even columns, +1 on odd
ones; the transpose (the backward) flips σ. θ = t·f is computed in fp32 exactly as the eager
``apply_rope`` does for fp32 inputs (t exact, one rounding), its cos/sin with libdevice on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tape_kernels._dispatch import check_backend, triton_available, use_triton
from tape_kernels._utils import INPUT_DTYPES, TRITON_TYPE, rtne_bf16
from tape_kernels._validate import check_same_device, check_tensor

__all__ = ["rope_embed", "rope_embed_ref"]

MAX_GROUPS = 2
MAX_D = 4096  # one row per tile on the kernel path

if triton_available():
    import triton
    import triton.language as tl

    from tape_kernels import _math
    from tape_kernels._utils import cast_out

    @triton.jit
    def _cos_sin(theta):
        """(cos θ, sin θ) in fp32: libdevice on a GPU (``tl.cos``/``tl.sin`` may lower to the approximate
        instructions, whose error grows with |θ| up to seq_len rad); numpy in the interpreter."""
        return _math.cos(theta), _math.sin(theta)

    @triton.jit
    def _angles(FREQS, t, cols, dmask):
        f = tl.load(FREQS + cols // 2, mask=dmask, other=0.0).to(tl.float32)
        return _cos_sin(t.to(tl.float32)[:, None] * f[None, :])

    @triton.jit
    def _rope_fwd_kernel(
        TOK, POS0, POS1, F0, F1, X, n_rows, seq, d, stride_pos0, stride_pos1,
        G: tl.constexpr, ROTATE: tl.constexpr, RTNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """X[g, r, :] = RoPE(TOK[r, :] + POS_g[r % seq, :]) for rows r of (B·seq, d); POS_g rows are
        stride_pos_g apart."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        dmask = cols < d
        mask = rmask[:, None] & dmask[None, :]
        t = rows % seq
        partner = cols ^ 1
        offs = rows[:, None].to(tl.int64) * d + cols[None, :]
        offs_p = rows[:, None].to(tl.int64) * d + partner[None, :]
        e = tl.load(TOK + offs, mask=mask, other=0.0).to(tl.float32)
        e_p = tl.load(TOK + offs_p, mask=mask, other=0.0).to(tl.float32)
        sign = tl.where((cols % 2) == 0, -1.0, 1.0)
        nrd = n_rows.to(tl.int64) * d
        for g in tl.static_range(G):
            if g == 0:
                POS = POS0
                FREQS = F0
                sp = stride_pos0
            else:
                POS = POS1
                FREQS = F1
                sp = stride_pos1
            pos = tl.load(POS + t[:, None].to(tl.int64) * sp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            pos_p = tl.load(POS + t[:, None].to(tl.int64) * sp + partner[None, :], mask=mask, other=0.0)
            x = e + pos
            if ROTATE:
                c, s = _angles(FREQS, t, cols, dmask)
                x = x * c + sign[None, :] * (e_p + pos_p.to(tl.float32)) * s
            tl.store(X + g * nrd + offs, cast_out(x, X.dtype.element_ty, RTNE_BF16), mask=mask)

    @triton.jit
    def _rope_bwd_kernel(
        DX, F0, F1, DTOK, n_rows, seq, d,
        G: tl.constexpr, ROTATE: tl.constexpr, RTNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """DTOK[r, :] = Σ_g RoPEᵀ(DX[g, r, :]): the rotation by −θ, summed over the groups."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        dmask = cols < d
        mask = rmask[:, None] & dmask[None, :]
        t = rows % seq
        offs = rows[:, None].to(tl.int64) * d + cols[None, :]
        offs_p = rows[:, None].to(tl.int64) * d + (cols ^ 1)[None, :]
        sign = tl.where((cols % 2) == 0, 1.0, -1.0)
        nrd = n_rows.to(tl.int64) * d
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for g in tl.static_range(G):
            dx = tl.load(DX + g * nrd + offs, mask=mask, other=0.0).to(tl.float32)
            if ROTATE:
                if g == 0:
                    FREQS = F0
                else:
                    FREQS = F1
                dx_p = tl.load(DX + g * nrd + offs_p, mask=mask, other=0.0).to(tl.float32)
                c, s = _angles(FREQS, t, cols, dmask)
                dx = dx * c + sign[None, :] * dx_p * s
            acc += dx
        tl.store(DTOK + offs, cast_out(acc, DTOK.dtype.element_ty, RTNE_BF16), mask=mask)


def rope_embed_ref(
    tok: torch.Tensor, pos_embs: Sequence[torch.Tensor], freqs: Sequence[torch.Tensor], rotate: bool = True
) -> torch.Tensor:
    """Eager: for each group, e = tok + pos_emb[:, :S]; RoPE(e) (as the reference's ``apply_rope``) when
    ``rotate`` -> (G, B, S, D)."""
    s = tok.shape[1]
    outs = []
    for pe, f in zip(pos_embs, freqs):
        e = tok + pe[:, :s, :]
        if rotate:
            theta = torch.arange(s, device=e.device, dtype=e.dtype)[:, None] * f.to(e.dtype)[None, :]
            cos, sin = theta.cos(), theta.sin()
            x1, x2 = e[..., 0::2], e[..., 1::2]
            out = torch.empty_like(e)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            e = out
        outs.append(e)
    return torch.stack(outs)


def _block_r(block_d: int) -> int:
    """Rows per program: 512 elements (D = 256: 2 rows), at least one row."""
    return max(1, min(16, 512 // block_d))


def _warps(block_d: int) -> int:
    """4 warps up to D = 1024, then one per 256 columns (≤ 16): about 4 values of a row per thread."""
    return max(4, min(16, block_d // 256))


class _RopeEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tok, rotate, *tables):  # noqa: ANN001, ANN205
        g = len(tables) // 2
        pos, freqs = tables[:g], tables[g:]
        b, s, d = tok.shape
        tok = tok.contiguous()
        n = b * s
        x = torch.empty((g, b, s, d), device=tok.device, dtype=tok.dtype)
        bd = max(16, triton.next_power_of_2(d))
        br = _block_r(bd)
        if n:
            _rope_fwd_kernel[(triton.cdiv(n, br),)](
                tok, pos[0], pos[-1], freqs[0], freqs[-1], x, n, s, d, pos[0].stride(1), pos[-1].stride(1),
                G=g, ROTATE=rotate, RTNE_BF16=rtne_bf16(x.dtype), BLOCK_R=br, BLOCK_D=bd, num_warps=_warps(bd),
                num_stages=2,
            )  # fmt: skip
        ctx.save_for_backward(*freqs)
        ctx.meta = (g, rotate, tok.shape, tok.dtype)
        return x

    @staticmethod
    def backward(ctx, dx):  # noqa: ANN001, ANN205
        g, rotate, shape, dtype = ctx.meta
        freqs = ctx.saved_tensors
        b, s, d = shape
        n = b * s
        dx = dx.contiguous()
        dtok = torch.empty(shape, device=dx.device, dtype=dtype)
        bd = max(16, triton.next_power_of_2(d))
        br = _block_r(bd)
        if n:
            _rope_bwd_kernel[(triton.cdiv(n, br),)](
                dx, freqs[0], freqs[-1], dtok, n, s, d,
                G=g, ROTATE=rotate, RTNE_BF16=rtne_bf16(dtype), BLOCK_R=br, BLOCK_D=bd, num_warps=_warps(bd),
                num_stages=2,
            )  # fmt: skip
        return (dtok, None, *([None] * (2 * g)))


def rope_embed(
    tok: torch.Tensor, pos_embs: Sequence[torch.Tensor], freqs: Sequence[torch.Tensor], rotate: bool = True, *,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """x_g = RoPE(tok + pos_embs[g][:, :S]) for G = 1 or 2 blocks -> (G, B, S, D) in tok's dtype.

    tok (B, S, D) token embeddings (D even); pos_embs G × (1, ≥S, D) position tables; freqs G ×
    (D/2,) RoPE frequencies; ``rotate=False`` only adds the table (the reference does not rotate a
    single token). Differentiable in ``tok`` (the tables are buffers: no gradient)."""
    check_backend(backend)
    check_tensor("tok", tok, ndim=3, dtypes=INPUT_DTYPES)
    if isinstance(pos_embs, torch.Tensor) or isinstance(freqs, torch.Tensor):
        raise ValueError("pos_embs and freqs must be lists or tuples of tensors (one per group)")
    g = len(pos_embs)
    if not 1 <= g <= MAX_GROUPS or len(freqs) != g:
        raise ValueError(f"pos_embs and freqs must hold the same number (1 to {MAX_GROUPS}) of tensors, got "
                         f"{len(pos_embs)} and {len(freqs)}")  # fmt: skip
    b, s, d = tok.shape
    if d % 2:
        raise ValueError(f"RoPE needs an even embedding dim, got {d}")
    for i, (pe, f) in enumerate(zip(pos_embs, freqs)):
        check_tensor(f"pos_embs[{i}]", pe, ndim=3, dtypes=INPUT_DTYPES)
        if pe.shape[0] != 1 or pe.shape[2] != d or pe.shape[1] < s:
            raise ValueError(f"pos_embs[{i}] has shape {tuple(pe.shape)}; expected (1, >= {s}, {d})")
        check_tensor(f"freqs[{i}]", f, shape=(d // 2,), dtypes=INPUT_DTYPES)
    check_same_device(tok=tok, **{f"pos_embs[{i}]": t for i, t in enumerate(pos_embs)},
                      **{f"freqs[{i}]": t for i, t in enumerate(freqs)})  # fmt: skip
    fused = tok.dtype != torch.float64 and all(t.dtype != torch.float64 for t in (*pos_embs, *freqs)) and d <= MAX_D
    if not fused and backend == "triton":
        raise ValueError(f"rope_embed: backend='triton' supports fp32/fp16/bf16 and D <= {MAX_D}; this input runs "
                         "eager")  # fmt: skip
    if not fused or not use_triton(tok, *pos_embs, *freqs, backend=backend):
        return rope_embed_ref(tok, pos_embs, freqs, rotate)
    pos = [pe if pe.stride(2) == 1 else pe.contiguous() for pe in pos_embs]
    return _RopeEmbedFn.apply(tok, bool(rotate), *pos, *(f.contiguous() for f in freqs))


def aot_specs() -> list:
    """Forward and backward: fp32 for G = 1, 2, rotated or not, at D = 256 (the notebook's width) and
    BLOCK_D 16, 1024, 4096; fp16 and bf16 for the model's variant (G = 2, rotated, D = 256)."""
    from tape_kernels._aot import AotSpec, signature

    specs = []
    combos = [(torch.float32, 256, g, rot) for g in (1, 2) for rot in (True, False)]
    combos += [(dt, 256, 2, True) for dt in (torch.float16, torch.bfloat16)]
    combos += [(torch.float32, bd, 2, True) for bd in (16, 1024, 4096)]
    for dt, bd, g, rot in combos:
        ty = TRITON_TYPE[dt]
        c = {"G": g, "ROTATE": rot, "RTNE_BF16": False, "BLOCK_R": _block_r(bd), "BLOCK_D": bd}
        tag = f"G{g}_{'rot' if rot else 'norot'}_D{bd}_{ty}"
        specs.append(AotSpec(f"rope_fwd_{tag}", _rope_fwd_kernel, signature(_rope_fwd_kernel, dt),
                             dict(c), num_warps=_warps(bd)))  # fmt: skip
        specs.append(AotSpec(f"rope_bwd_{tag}", _rope_bwd_kernel, signature(_rope_bwd_kernel, dt),
                             dict(c), num_warps=_warps(bd)))  # fmt: skip
    return specs
