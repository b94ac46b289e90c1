"""Input checks shared by the ops: bad input raises ValueError naming the problem,
never a crash inside a kernel."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tape_kernels._utils import KERNEL_DTYPES as FLOAT_DTYPES  # noqa: F401 - int8.py's name for the kernel dtypes


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Validate one tensor argument; ``None`` entries in ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {dtypes}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want}")
    return t


def _check_same(what: str, attr: str, tensors: dict[str, torch.Tensor | None]) -> object:
    present = {k: v for k, v in tensors.items() if v is not None}
    values = {getattr(v, attr) for v in present.values()}
    if len(values) > 1:
        desc = ", ".join(f"{k}: {getattr(v, attr)}" for k, v in present.items())
        raise ValueError(f"tensors must {what}: {desc}")
    return next(iter(values))


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    return _check_same("be on one device", "device", tensors)


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    return _check_same("share one dtype", "dtype", tensors)
