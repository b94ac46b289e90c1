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
    """Validate one tensor argument; ``None`` entries in ``shape`` match any size.

    Written as plain loops (no comprehensions or generators): under ``torch.compile`` Dynamo traces
    every check of every op on every start, and a generator costs it several times a loop's work."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and not isinstance(dtypes, (tuple, list, set, frozenset)):
        dtypes = tuple(dtypes)  # a one-shot iterable would be used up by the membership test
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")
    if shape is not None:
        ok = t.dim() == len(shape)
        if ok:
            for i in range(len(shape)):
                if shape[i] is not None and shape[i] != t.shape[i]:
                    ok = False
                    break
        if not ok:
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want}")
    return t


def _check_same(what: str, attr: str, tensors: dict[str, torch.Tensor | None]) -> object:
    first = None
    for v in tensors.values():
        if v is None:
            continue
        value = getattr(v, attr)
        if first is None:
            first = value
        elif value != first:
            desc = ", ".join(f"{k}: {getattr(u, attr)}" for k, u in tensors.items() if u is not None)
            raise ValueError(f"tensors must {what}: {desc}")
    return first


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    return _check_same("be on one device", "device", tensors)


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    return _check_same("share one dtype", "dtype", tensors)
