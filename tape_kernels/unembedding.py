"""Student-t unembedding: log_softmax over v of −½(df+D)·log1p(max(|h−U[:,v]|², 1e-12)/df).

Logits reach thousands in magnitude at D=256, so the math runs in fp32 (or fp64 for fp64 inputs)
even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DF = 2.718281828459


def student_t_unembedding_ref(
    hidden_states: torch.Tensor, unembedding: torch.Tensor, df: float = DEFAULT_DF
) -> torch.Tensor:
    """Eager reference. hidden_states (B, S, D), unembedding (D, V) -> log-probs (B, S, V)."""
    d = hidden_states.shape[-1]
    x2 = (hidden_states**2).sum(dim=-1, keepdim=True)  # (B, S, 1)
    w2 = (unembedding**2).sum(dim=0)[None, None, :]  # (1, 1, V)
    xw = torch.matmul(hidden_states, unembedding)  # (B, S, V)
    dist_sq = (x2 - 2 * xw + w2).clamp(min=1e-12)
    logits = -0.5 * (df + d) * torch.log1p(dist_sq / df)
    return F.log_softmax(logits, dim=-1)
