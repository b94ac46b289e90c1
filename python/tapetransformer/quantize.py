"""int8 inference for the TapeTransformer: ``quantize_int8(model)``.

Per token, eval cost is streaming weights; the ones that run at inference are, in every
TapeHeadBlock, the attention projections (``cached_attn.attn``: in_proj (3D, D) and out_proj (D, D))
and the MLP (``mlp.expand`` D→8D, ``mlp.linear`` 8D→D), plus the prophet's Char-RNN cells
(``i2h``, ``h2h``), which run in eval to update their cache although their output never reaches
the log-probabilities. Those become int8 (``tape_kernels.int8``); everything else stays as it is:
``rnn_projection`` runs only in training, merger / final_norm / merge_projection* never run, and
the embedding, LayerNorms and the Student-t unembedding stay in float (the unembedding's logits
reach thousands and need fp32).
"""

from __future__ import annotations

import copy

from torch import nn

from tape_kernels.int8 import Int8Linear, Int8MultiheadAttention

__all__ = ["quantize_int8"]


def _is_rnn_cell(m: nn.Module) -> bool:
    return isinstance(getattr(m, "i2h", None), nn.Linear) and isinstance(getattr(m, "h2h", None), nn.Linear)


def _is_block(m: nn.Module) -> bool:
    # Duck-typed on the TapeHeadBlock layout (the reference and the fused model share it).
    attn = getattr(getattr(m, "cached_attn", None), "attn", None)
    mlp = getattr(m, "mlp", None)
    return attn is not None and mlp is not None and hasattr(mlp, "expand") and hasattr(mlp, "linear")


def quantize_int8(model: nn.Module, act_quant: bool | None = None, inplace: bool = False) -> nn.Module:
    """Return ``model`` with int8 weights for inference; works on the fused and the reference model.

    * the fused ``tapetransformer.TapeTransformer``: a copy (or ``model`` itself with ``inplace``) whose
      blocks carry int8 copies of their four Linear weights (``quantize_int8_``). Every eval-mode
      ``forward`` (under ``torch.no_grad()`` or not: the same output) and ``generate`` use them; the float
      weights stay, so training-mode ``forward``, ``loss`` and backward work as before (on the float
      weights) and the state_dict is unchanged;
    * the reference (or any module with TapeHeadBlock-shaped children): the attention projections and
      MLP Linears of every TapeHeadBlock and the Char-RNN cells are replaced by int8 modules
      (``tape_kernels.int8``); forward runs int8, and gradients flow to the inputs (not to the frozen
      int8 weights).

    ``act_quant=None`` (default): the faster mode per call (W8A8 on CPU; on CUDA the weight-only
    GEMV for decode, ≤ 16 rows, and W8A8 for prefill — see ``tape_kernels.int8.resolve_act_quant``);
    ``False``: weight-only int8 everywhere (accuracy of the dequantized weights);
    ``True``: W8A8 everywhere (dynamic per-row activation quantization).
    The result is in eval mode; by default the input model is left untouched.
    """
    from tapetransformer.model import TapeTransformer

    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize_int8 expects an nn.Module, got {type(model).__name__}")
    if act_quant not in (None, True, False):
        raise ValueError(f"act_quant must be None, True or False, got {act_quant!r}")
    out = model if inplace else copy.deepcopy(model)
    if isinstance(out, TapeTransformer):
        return out.quantize_int8_(act_quant).eval()
    blocks = [m for m in out.modules() if _is_block(m)]
    if not blocks:
        raise ValueError("quantize_int8 found no TapeHeadBlock (cached_attn.attn + mlp.expand/linear) in the model")
    for cell in [m for m in out.modules() if _is_rnn_cell(m)]:
        cell.i2h = Int8Linear.from_float(cell.i2h, act_quant)
        cell.h2h = Int8Linear.from_float(cell.h2h, act_quant)
    for blk in blocks:
        attn = blk.cached_attn.attn
        if isinstance(attn, nn.MultiheadAttention):
            blk.cached_attn.attn = Int8MultiheadAttention.from_float(attn, act_quant)
        for name in ("expand", "linear"):
            lin = getattr(blk.mlp, name)
            if isinstance(lin, nn.Linear):
                setattr(blk.mlp, name, Int8Linear.from_float(lin, act_quant))
    return out.eval()
