"""Ahead-of-time compile specs of ``tape_kernels.fused_linear``'s kernels (``fused_linear.aot_specs``):
the variants its launchers emit, with the tiles they pick."""

from __future__ import annotations

import torch

from tape_kernels._aot import AotSpec, signature
from tape_kernels._fused_linear_kernels import _fl_bwd_kernel, _fl_fwd_kernel, _ln_bwd_kernel
from tape_kernels.fused_linear import _CDT, NUM_STAGES, _bwd_tile, _fwd_tile, _ln_bwd_warps, _ln_tile


# Pointer dtypes per launch under autocast (cdt = the autocast dtype; parameters and LayerNorm outputs
# fp32, GEMM outputs cdt), by what each launcher passes.
def _autocast_pointers(kind: str, cdt: torch.dtype) -> dict[str, torch.dtype]:
    f32 = torch.float32
    return {
        "in_proj": {"X": f32, "Y": cdt},  # x is the previous LayerNorm's fp32 output (or fp32 embeddings)
        "out_proj_ln": {"X": cdt, "R": f32, "Y": f32, "OUT": f32},
        "mlp_ln": {"X": cdt, "R": f32, "Y": f32, "OUT": f32},
        "bwd_in_proj": {"DY": cdt, "X": f32, "R": f32, "DX": f32},
        "bwd_out_proj": {"DY": f32, "X": cdt, "DX": cdt},
        "bwd_mlp_linear": {"DY": f32, "X": cdt, "DX": cdt},
        "bwd_mlp_expand": {"DY": cdt, "X": f32, "R": f32, "DX": f32},
        "ln_bwd": {"DY": f32, "DR": f32, "DRSUM": f32},
    }[kind]


def aot_specs() -> list:
    """The kernel variants the launchers emit: in fp32 every op variant (G = 1 and 2, shared and
    per-group inputs, every combine mode) at the notebook's LayerNorm width (256) and the LayerNorm
    tiles of widths 16, 64, 512 and 1024; the model's own variants in bf16 and under bf16/fp16 autocast (the
    16-bit MMA path; pure fp16 compiles as bf16 does)."""
    f32 = torch.float32
    stats = {"XHAT": f32, "RSTD": f32, "PW": f32, "PB": f32}
    schemes = [("fp32", f32, None), ("bf16", torch.bfloat16, None), ("ac_bf16", f32, torch.bfloat16),
               ("ac_fp16", f32, torch.float16)]  # fmt: skip
    specs = []

    def add(name: str, kernel, kind: str, scheme: tuple, consts: dict, warps: int) -> None:  # noqa: ANN001
        tag, dt, ac = scheme
        ptrs = dict(stats)
        if ac is not None:
            ptrs.update(_autocast_pointers(kind, ac))
        cdt = ac or dt
        c = dict(consts)
        if "CDT" in c:
            c["CDT"], c["PREC"] = _CDT[cdt], "ieee"
        c.setdefault("RTNE_BF16", False)
        specs.append(AotSpec(name=f"{name}_{tag}", kernel=kernel, signature=signature(kernel, dt, ptrs),
                             constexprs=c, num_warps=warps, num_stages=NUM_STAGES))  # fmt: skip

    base_f = {"HAS_BIAS": True, "ACT_IN": False, "HAS_RES": False, "LN": False, "STORE_Y": True, "COMBINE": -1,
              "CDT": 0, "PREC": "ieee"}  # fmt: skip

    def fwd_tile(fp32: bool) -> tuple[dict, int]:
        bm, bn, bk, w = _fwd_tile(fp32)
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w

    def bwd(fp32: bool, **kw) -> tuple[dict, int]:
        dxm, dxk, dxr, dwn, dwk, dwr, w = _bwd_tile(fp32, kw.get("ACT_IN", False))
        return {"G": 2, "SUM_G": False, "ACT_IN": False, "HAS_RES": False, "HAS_DB": True, "LN_RED": False,
                "CDT": 0, "PREC": "ieee", "DX_M": dxm, "DX_K": dxk, "DX_R": dxr, "DW_N": dwn, "DW_K": dwk,
                "DW_R": dwr, **kw}, w  # fmt: skip

    def ln_fwd(n: int, fp32: bool, **kw) -> tuple[dict, int]:
        bm, bn, bk, w = _ln_tile(n, fp32, kw.get("ACT_IN", False))
        return {**base_f, "LN": True, "HAS_RES": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **kw}, w

    for scheme in schemes:
        tag, dt, ac = scheme
        fp32 = (ac or dt) == f32
        full = tag == "fp32"  # every variant in fp32; the model's own in the 16-bit schemes
        tile, fw = fwd_tile(fp32)
        add("fl_fwd_linear", _fl_fwd_kernel, "in_proj", scheme, {**base_f, **tile}, fw)
        add("fl_fwd_linear_ln_N256", _fl_fwd_kernel, "out_proj_ln", scheme, *ln_fwd(256, fp32))
        for mode in ((-1, 0, 1, 2) if full else (0, 1)):
            add(f"fl_fwd_mlp_ln_combine{mode}_N256", _fl_fwd_kernel, "mlp_ln", scheme,
                *ln_fwd(256, fp32, HAS_BIAS=False, ACT_IN=True, STORE_Y=mode < 0, COMBINE=mode))  # fmt: skip
        for g in ((1, 2) if full else (2,)):
            for shared in ((True, False) if g == 2 else (True,)):
                add(f"fl_bwd_in_proj_{'shared' if shared else 'grouped'}_G{g}", _fl_bwd_kernel, "bwd_in_proj",
                    scheme, *bwd(fp32, G=g, SUM_G=shared, HAS_RES=True))  # fmt: skip
        add("fl_bwd_out_proj", _fl_bwd_kernel, "bwd_out_proj", scheme, *bwd(fp32, LN_RED=True))
        add("fl_bwd_mlp_linear", _fl_bwd_kernel, "bwd_mlp_linear", scheme,
            *bwd(fp32, ACT_IN=True, HAS_DB=False, LN_RED=True))  # fmt: skip
        add("fl_bwd_mlp_expand", _fl_bwd_kernel, "bwd_mlp_expand", scheme, *bwd(fp32, HAS_RES=True))
        for g in ((1, 2) if full else (2,)):
            if g == 1:
                variants: tuple = ((-1, True),)
            elif full:
                variants = ((-1, True), (-1, False), (0, False), (1, False), (2, False))
            else:
                variants = ((-1, True), (-1, False), (1, False))
            for mode, has_sum in variants:
                add(f"ln_bwd_combine{mode}{'_sum' if has_sum else ''}_N256_G{g}", _ln_bwd_kernel, "ln_bwd", scheme,
                    {"G": g, "COMBINE": mode, "HAS_SUM": has_sum, "BLOCK_N": 256}, _ln_bwd_warps(256))  # fmt: skip
    for bn in (16, 64, 512, 1024):  # other model widths, fp32
        add(f"fl_fwd_linear_ln_N{bn}", _fl_fwd_kernel, "out_proj_ln", schemes[0], *ln_fwd(bn, True))
        add(f"fl_fwd_mlp_ln_combine1_N{bn}", _fl_fwd_kernel, "mlp_ln", schemes[0],
            *ln_fwd(bn, True, HAS_BIAS=False, ACT_IN=True, STORE_Y=False, COMBINE=1))  # fmt: skip
        add(f"ln_bwd_combine1_N{bn}_G2", _ln_bwd_kernel, "ln_bwd", schemes[0],
            {"G": 2, "COMBINE": 1, "HAS_SUM": False, "BLOCK_N": bn}, _ln_bwd_warps(bn))  # fmt: skip
    return specs
