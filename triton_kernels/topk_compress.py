"""Top-k compress / decompress: the PyTorch kernel (CPU path and reference).

Format (see ``razorpass.format``): the activation is flattened (contiguous, logical
order) and split into groups of ``group_size`` elements; the last group is padded.
Per group the ``k`` largest ``|x|`` are kept, ties going to the lower index and NaN
counting as the largest. Storage per group:

* ``mask``:   ``ceil(group_size / 8)`` uint8, bit ``j`` of byte ``i`` = element ``8i + j``;
  padding bits are always 0.
* ``values``: ``k`` kept values in position order, in ``value_dtype``; slots past the
  number of kept real elements (only in a padded last group) are 0.

The kernels here process a bounded number of groups at a time, so temporaries stay
within ``_CHUNK_ELEMS`` elements regardless of the activation's size.
"""

from __future__ import annotations

import torch

__all__ = ["torch_compress", "torch_decompress"]

# Upper bound on the elements one chunk of groups touches (temporaries scale with it).
_CHUNK_ELEMS = 1 << 20


def _rows_per_chunk(group_size: int) -> int:
    return max(1, _CHUNK_ELEMS // max(group_size, 1))


def _magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """An int64 key that orders |x| exactly, with NaN above +inf.

    The sign bit is cleared from the IEEE bit pattern: non-negative floats order as
    their bit patterns, and every NaN pattern lies above +inf.
    """
    if x.dtype == torch.float64:
        return x.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)
    return bits & 0x7FFFFFFF


def torch_compress(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``x`` into (packed mask, kept values); see the module docstring."""
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    groups = -(-n // group_size)
    mask_bytes = -(-group_size // 8)
    mask = torch.empty((groups, mask_bytes), dtype=torch.uint8, device=x.device)
    values = torch.empty((groups, k), dtype=value_dtype, device=x.device)
    if groups == 0:
        return mask, values
    k_eff = min(k, group_size)
    weights = (1 << torch.arange(8, device=x.device, dtype=torch.int64))
    # Position index inside the group; the tie-break term makes every key unique so
    # that top-k is exact: a lower position wins among equal magnitudes.
    pos = torch.arange(group_size, device=x.device, dtype=torch.int64)
    wide = x.dtype == torch.float64
    step = _rows_per_chunk(group_size)
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        lo, hi = g0 * group_size, min(n, g1 * group_size)
        chunk = flat[lo:hi]
        pad = (g1 - g0) * group_size - chunk.numel()
        if pad:
            chunk = torch.cat([chunk, chunk.new_zeros(pad)])
        rows = chunk.view(g1 - g0, group_size)
        valid = (pos + lo).unsqueeze(0) + (torch.arange(g1 - g0, device=x.device) * group_size).unsqueeze(1) < n
        mag = _magnitude_key(rows)
        if wide:
            # 63-bit magnitudes leave no room for a tie-break term: stable sort instead.
            mag = torch.where(valid, mag, torch.full_like(mag, -1))
            order = torch.sort(mag, dim=1, descending=True, stable=True).indices[:, :k_eff]
        else:
            key = (mag << 32) | (group_size - 1 - pos)
            key = torch.where(valid, key, torch.full_like(key, -1) - pos)
            order = torch.topk(key, k_eff, dim=1, sorted=False).indices
        idx = torch.sort(order, dim=1).values
        kept = torch.zeros((g1 - g0, group_size), dtype=torch.bool, device=x.device)
        kept.scatter_(1, idx, True)
        kept &= valid
        vals = torch.gather(rows, 1, idx)
        vals = torch.where(torch.gather(kept, 1, idx), vals, torch.zeros_like(vals))
        values[g0:g1, :k_eff] = vals.to(value_dtype)
        if k_eff < k:
            values[g0:g1, k_eff:] = 0
        padded = torch.zeros((g1 - g0, mask_bytes * 8), dtype=torch.int64, device=x.device)
        padded[:, :group_size] = kept
        mask[g0:g1] = (padded.view(g1 - g0, mask_bytes, 8) * weights).sum(-1).to(torch.uint8)
    return mask, values


def torch_decompress(
    mask: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense tensor of ``shape``/``dtype``: kept values at their positions, 0 elsewhere."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=dtype, device=values.device)
    groups, k = values.shape
    if n == 0:
        return out.view(shape)
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    step = _rows_per_chunk(group_size)
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        bits = ((mask[g0:g1].unsqueeze(-1) >> shifts) & 1).view(g1 - g0, -1)[:, :group_size].bool()
        if k == 0:
            dense = torch.zeros(bits.shape, dtype=dtype, device=values.device)
        else:
            slot = (torch.cumsum(bits, dim=1) - 1).clamp_(min=0)
            gathered = torch.gather(values[g0:g1], 1, slot).to(dtype)
            dense = torch.where(bits, gathered, torch.zeros((), dtype=dtype, device=values.device))
        lo, hi = g0 * group_size, min(n, g1 * group_size)
        out[lo:hi] = dense.reshape(-1)[: hi - lo]
    return out.view(shape)
