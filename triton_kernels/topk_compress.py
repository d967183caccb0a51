"""Top-k compress / decompress: the PyTorch kernel (CPU path and reference).

Format (see ``razorpass.format``): the activation is flattened (contiguous, logical
order) and split into groups of ``group_size`` elements; the last group is padded.
Per group the ``k`` largest ``|x|`` are kept, ties going to the lower index and NaN
counting as the largest. Storage per group:

* ``mask``:   ``ceil(group_size / 8)`` uint8, bit ``j`` of byte ``i`` = element ``8i + j``;
  padding bits are always 0.
* ``values``: ``k`` kept values in position order, in ``value_dtype``; slots past the
  number of kept real elements (only in a padded last group) are 0.

The *offsets* layout stores the same selection with ``offsets`` instead of ``mask``
(``values`` unchanged): per group, the ``k`` positions of the kept elements inside the
group, ascending, as int16 when ``group_size`` < 2**15 (int32 otherwise); slots past
the number of kept real elements hold ``group_size``. 2 bytes per kept element against
``group_size / 8`` bytes per group: cheaper when ``k < group_size / 16`` (sparsity
above 15/16 for int16), e.g. 62 against 128 bytes per group of 1024 at sparsity 0.97.
Converting between the two layouts is lossless.

The kernels here process a bounded number of groups at a time, so temporaries stay
within ``_CHUNK_ELEMS`` elements regardless of the activation's size.
"""

from __future__ import annotations

import torch

__all__ = ["torch_compress", "torch_decompress", "offsets_dtype", "torch_mask_to_offsets", "torch_decompress_offsets"]

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


def _assemble(values: torch.Tensor, shape: list[int], group_size: int, dtype: torch.dtype, rows) -> torch.Tensor:
    """The dense tensor of ``shape``/``dtype`` whose groups ``g0 .. g1 - 1``, as a
    ``(g1 - g0, group_size)`` tensor, are ``rows(g0, g1)``; chunk by chunk."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=dtype, device=values.device)
    if n == 0:
        return out.view(shape)
    groups, step = values.shape[0], _rows_per_chunk(group_size)
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        lo, hi = g0 * group_size, min(n, g1 * group_size)
        out[lo:hi] = rows(g0, g1).reshape(-1)[: hi - lo]
    return out.view(shape)


def torch_decompress(
    mask: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense tensor of ``shape``/``dtype``: kept values at their positions, 0 elsewhere."""
    k = values.shape[1]

    def rows(g0: int, g1: int) -> torch.Tensor:
        bits = _mask_bits(mask[g0:g1], group_size)
        if k == 0:
            return torch.zeros(bits.shape, dtype=dtype, device=values.device)
        slot = (torch.cumsum(bits, dim=1) - 1).clamp_(min=0)
        gathered = torch.gather(values[g0:g1], 1, slot).to(dtype)
        return torch.where(bits, gathered, torch.zeros((), dtype=dtype, device=values.device))

    return _assemble(values, shape, group_size, dtype, rows)

def offsets_dtype(group_size: int) -> torch.dtype:
    """int16 while every position and the filler ``group_size`` fit, else int32."""
    return torch.int16 if group_size < (1 << 15) else torch.int32


def _mask_bits(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, group_size) bool of packed mask rows."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> shifts) & 1).view(mask.shape[0], -1)[:, :group_size].bool()


def torch_mask_to_offsets(mask: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """The offsets of the kept elements of every mask row (see the module docstring).

    Each kept element's rank in its row (a running count) is its slot; every element
    that is not kept goes to a column of its own past the ``k`` slots, so no index is
    written twice (deterministic on every device) and those columns are dropped."""
    groups = mask.shape[0]
    dtype = offsets_dtype(group_size)
    out = torch.empty((groups, k), dtype=dtype, device=mask.device)
    if groups == 0 or k == 0:
        return out
    pos = torch.arange(group_size, device=mask.device, dtype=torch.int64)
    step = _rows_per_chunk(group_size)
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        bits = _mask_bits(mask[g0:g1], group_size)
        slot = torch.where(bits, torch.cumsum(bits, dim=1) - 1, k + pos)
        buf = torch.full((g1 - g0, k + group_size), group_size, dtype=torch.int64, device=mask.device)
        buf.scatter_(1, slot, pos.expand(g1 - g0, -1))
        out[g0:g1] = buf[:, :k].to(dtype)
    return out


def torch_decompress_offsets(
    offsets: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense tensor of ``shape``/``dtype`` from the offsets layout: the same tensor,
    bit for bit, that ``torch_decompress`` gives from the mask layout."""
    k = values.shape[1]

    def rows(g0: int, g1: int) -> torch.Tensor:
        dense = torch.zeros((g1 - g0, group_size + k), dtype=dtype, device=values.device)
        if k:
            idx = offsets[g0:g1].to(torch.int64)
            # unused slots (value 0) go to columns of their own past the group: no
            # index is written twice
            idx = torch.where(idx >= group_size, group_size + torch.arange(k, device=idx.device), idx)
            dense.scatter_(1, idx, values[g0:g1].to(dtype))
        return dense[:, :group_size]

    return _assemble(values, shape, group_size, dtype, rows)
