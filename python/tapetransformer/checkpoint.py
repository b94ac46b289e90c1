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
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from tapetransformer.fileio import atomic_write, remove_stale_temp, temp_path
from tapetransformer.model import ModelConfig

FORMAT = "tapetransformer-v1"
__all__ = ["FORMAT", "ModelConfig", "atomic_save", "atomic_write", "check_finite", "load_checkpoint", "load_weights",
           "remove_stale_temp", "save_checkpoint", "temp_path"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


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
    """Load a checkpoint (or a bare reference state_dict) without unpickling code.

    Raises FileNotFoundError when there is no file, ValueError (one line, naming the file) when it is
    not a checkpoint, holds anything but tensors and plain values, or records a malformed config.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # every failure becomes one line naming the file
        raise ValueError(f"{path} is not a loadable checkpoint: {_load_error(e)}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _check_checkpoint(obj, path)
    if isinstance(obj, dict) and "unembedding" in obj:
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} is not a TapeTransformer state_dict: it holds values other than tensors")
        try:
            config = ModelConfig.from_state_dict(obj).to_dict()
        except (ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: {e}") from None
        return {
            "format": FORMAT,
            "config": config,
            "vocab": None,
            "model": obj,
            "optimizer": None,
            "step": 0,
            "rng": {},
            "extra": {"source": "bare state_dict"},
        }
    raise ValueError(f"{path} is neither a tapetransformer checkpoint nor a TapeTransformer state_dict")


def _load_error(e: BaseException) -> str:
    """torch.load's reason in one line, without its advice to retry with ``weights_only=False``: that
    would run whatever code the file carries, the one thing never to do with a file of unknown origin."""
    msg = " ".join(str(e).split())
    not_torch = "it is not in torch.save's format, or it is truncated"
    if "weights_only" in msg or "Weights only load failed" in msg:
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m is None and "Unsupported operand" in msg:  # not a pickle at all
            return not_torch
        what = f"it refers to the Python object {m.group(1)}" if m else "it holds objects other than tensors and values"
        return f"the safe (weights_only) loader refused it: {what}, so it may carry code (nothing was run)"
    if isinstance(e, (KeyError, EOFError, pickle.UnpicklingError)) or len(msg) < 8:
        return not_torch
    first = msg.split(". ")[0].rstrip(".")
    return f"{first} (the file is damaged or truncated)" if "zip archive" in first else first


_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "vocab_size": (int,), "seq_len": (int,), "embed_dim": (int,), "num_heads": (int,), "dropout": (float, int),
    "causal": (bool,),
}


def _check_checkpoint(ck: dict[str, Any], path: Path) -> dict[str, Any]:
    """The structure :func:`save_checkpoint` writes, with a config that can build a model."""
    for key, types in (("config", (dict,)), ("model", (dict,)), ("step", (int,))):
        if not isinstance(ck.get(key), types):
            got = "missing" if key not in ck else f"a {type(ck[key]).__name__}"
            raise ValueError(f"{path}: the checkpoint's {key!r} is {got}; the file is damaged or not from "
                             "tapetransformer")
    if ck.get("vocab") is not None and not isinstance(ck["vocab"], str):
        raise ValueError(f"{path}: the checkpoint's 'vocab' is a {type(ck['vocab']).__name__}, not a string")
    cfg = ck["config"]
    for key, types in _CONFIG_TYPES.items():
        if key not in cfg:
            if key == "vocab_size":
                raise ValueError(f"{path}: the checkpoint's config has no 'vocab_size'")
            continue
        v = cfg[key]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise ValueError(f"{path}: the checkpoint's config {key}={v!r} is not a {types[0].__name__}")
    if ck["step"] < 0:
        raise ValueError(f"{path}: the checkpoint's step {ck['step']} is negative")
    ck.setdefault("vocab", None)
    ck.setdefault("optimizer", None)
    ck.setdefault("rng", {})
    ck.setdefault("extra", {})
    return ck


def load_weights(model: torch.nn.Module, state_dict: dict[str, Any], source: str | os.PathLike) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a one-line ValueError naming ``source``
    when the weights do not fit the model its config builds (missing, unexpected or mis-shaped)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (first {shapes[0]})")
    if problems:
        raise ValueError(f"{source}: its weights do not match the model its config describes: {'; '.join(problems)}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{source}: its weights cannot be loaded: {' '.join(str(e).split())[:300]}") from None


def check_finite(state_dict: dict[str, Any], source: str | os.PathLike) -> None:
    """A one-line ValueError naming ``source`` and the first floating tensor holding NaN or Inf: such
    weights give NaN log-probs, which would otherwise pass silently as token 0 or a NaN loss."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(f"{source}: tensor {name!r} holds non-finite values ({n_nan} NaN, {n_inf} Inf of "
                             f"{t.numel()}); the checkpoint is damaged or its training diverged")
