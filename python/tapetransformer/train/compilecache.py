"""Whether Inductor's on-disk cache already holds this run's compiled training step.

``--compile auto`` weighs a compile's cost against the steps it would save. A cold compile costs about a
minute on a 2-core CPU at the notebook's size; with Inductor's caches warm (FX graphs, AOTAutograd) the
first compiled step comes within seconds. Inductor keeps no index a caller can ask, so the training tool
leaves its own marker beside Inductor's cache after a compiled step finished: one small file per step
signature (model structure, micro-batch shape, autocast dtype, torch version). Markers live inside the
cache directory, so clearing Inductor's cache clears them too. A marker is a hint for ``auto`` only: a
stale one costs at worst one cold compile, never a wrong result.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["inductor_cache_dir", "is_warm", "mark_warm", "step_signature"]


def inductor_cache_dir() -> Path:
    """Inductor's cache directory: ``TORCHINDUCTOR_CACHE_DIR`` or its per-user default under the temp dir."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir())
    except Exception:  # the helper moved in another torch version: Inductor's documented default
        env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if env:
            return Path(env)
        try:
            user = getpass.getuser()
        except Exception:
            user = "unknown"
        return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


def step_signature(model: torch.nn.Module, micro_batch: int, seq_len: int, amp_dtype: torch.dtype | None,
                   ddp: bool) -> str:
    """A short hash of what decides whether a compiled step can come from the cache."""
    desc: dict[str, Any] = {
        "torch": torch.__version__,
        "model": type(model).__qualname__,
        "attrs": {k: repr(getattr(model, k, None)) for k in ("design", "causal", "backend", "vocab_size")},
        # dropout rates (nn.Dropout.p, nn.MultiheadAttention.dropout): a rate of 0 traces no RNG
        "dropout": sorted({repr(v) for m in model.modules() for k, v in vars(m).items()
                           if k in ("p", "dropout") and isinstance(v, float)}),
        "params": [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()],
        "batch": [micro_batch, seq_len],
        "amp": str(amp_dtype),
        "ddp": ddp,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _marker(signature: str) -> Path:
    return inductor_cache_dir() / "tapetransformer-steps" / f"{signature}.json"


def is_warm(signature: str) -> bool:
    """Whether a compiled step with this signature finished here before (and the cache was not cleared)."""
    try:
        return _marker(signature).is_file()
    except OSError:
        return False


def mark_warm(signature: str) -> None:
    """Record that a compiled step with this signature finished (best effort: a read-only or full disk
    only costs a later run the cold estimate)."""
    path = _marker(signature)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"torch": torch.__version__}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
