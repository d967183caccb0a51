"""The dtypes the reference's Functions compute in (autocast's lower precision, the
opmath of a pointwise backward) and their gradients returned to each input's dtype
and shape."""

from __future__ import annotations

import torch


def _autocast_dtype(t) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to for a lower-precision op (linear, conv,
    matmul), or None when autocast is off for its device or leaves it alone."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    dev = t.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if dt != t.dtype else None


def _cast(t, dtype):
    """``t`` as a lower-precision op under autocast reads it (floating point, not double)."""
    return t.to(dtype) if dtype is not None and _autocast_dtype(t) is not None else t


def _op_dtype(*operands) -> torch.dtype | None:
    """The autocast dtype a lower-precision op computes in, None without autocast."""
    return next((d for d in map(_autocast_dtype, operands) if d is not None), None)


def _dtypes(*ts):
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in ts)


def _back(g, dtype):
    return None if g is None else g.to(dtype)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype a pointwise backward computes in (half precision computes in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _unbroadcast(g, shape):
    if g is None or not shape or g.shape == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g
