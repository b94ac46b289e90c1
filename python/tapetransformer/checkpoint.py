"""Checkpoints: written atomically (temp file + fsync + rename), loaded with ``weights_only=True``
so loading never runs code from the file.

A checkpoint is a dict of tensors and plain Python values::

    {"format": "tapetransformer-v1", "config": {...}, "vocab": "<chars>", "model": state_dict,
     "optimizer": state_dict | None, "step": int, "rng": {...}, "extra": {...}}

A bare ``state_dict`` saved by the original notebook is accepted too (:func:`load_checkpoint`
infers the config from its shapes).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tapetransformer.model import ModelConfig

__all__ = ["FORMAT", "ModelConfig", "atomic_save", "load_checkpoint", "save_checkpoint"]

FORMAT = "tapetransformer-v1"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the target directory, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    config: ModelConfig,
    vocab: str,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    ckpt = {
        "format": FORMAT,
        "config": config.to_dict(),
        "vocab": vocab,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng or {},
        "extra": extra or {},
    }
    return atomic_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a bare reference state_dict) without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint (weights_only load failed: {e})") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj
    if isinstance(obj, dict) and "unembedding" in obj:
        return {
            "format": FORMAT,
            "config": ModelConfig.from_state_dict(obj).to_dict(),
            "vocab": None,
            "model": obj,
            "optimizer": None,
            "step": 0,
            "rng": {},
            "extra": {"source": "bare state_dict"},
        }
    raise ValueError(f"{path} is neither a tapetransformer checkpoint nor a TapeTransformer state_dict")
