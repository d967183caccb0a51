"""Top-k compress / decompress, both layouts: the Triton kernels (CUDA path).

Bit-identical to the PyTorch reference ``triton_kernels.topk_compress`` (whose module
docstring defines the format): same packed mask, same kept values in the same slots.
This module imports Triton at the top and is only imported when a Triton kernel runs.

Selection
---------
Every element gets an integer *magnitude key*: its IEEE bit pattern with the sign bit
cleared (31 bits for fp32, 15 bits for bf16/fp16, taken on the native bits; widening
to fp32 is monotonic, so the order is the reference's). Non-negative floats order as
their bit patterns, every NaN lies above +inf and -0.0 / +0.0 share key 0. (NaNs
with different payloads order by payload, as in the reference.)

Per group, with ``n_keep = min(k, real elements of the group)``, the kernels find the
threshold ``T`` = the ``n_keep``-th largest key and keep

* every element whose key is ``> T``, and
* the first ``need = n_keep - #{key > T}`` elements whose key is ``== T``, in position
  order (ties go to the lower index).

A kept element's value goes to slot ``#{kept elements before it}`` (a prefix sum), so
values are in position order. ``n_keep == 0`` gives ``T = 2**31 - 1``, ``need = 0``:
nothing is kept.

Two paths, chosen per call from the group size:

* **fused** (``group_size <= FUSED_MAX_GROUP``, e.g. the 1024-element blocks): one
  program holds ``ROWS`` whole groups in registers and finds ``T`` by bisection over
  the key bits, most significant first (``T |= bit`` whenever at least ``n_keep`` keys
  are ``>= T | bit``): at most ``KEY_BITS`` masked reductions (it stops once exactly
  ``n_keep`` keys are ``>= T``, about halfway for random fp32 data), then one cumsum
  for the tie ranks and one for the slots. The input is read once.
* **tiled** (larger groups, e.g. one ViT sample of 197 * 768 elements): one program per
  (group, tile of ``TILE`` elements). ``T`` is found by an MSD radix select over
  8-bit digits: pass ``p`` histograms digit ``p`` of the keys that match the digits
  chosen so far (``tl.histogram`` per tile, atomically added into a per-group
  histogram); the programs of pass ``p + 1`` read it and choose the digit. fp32 takes
  4 passes, bf16/fp16 take 2. A count pass then stores, per tile, how many keys are
  above ``T`` and equal to ``T``; the write pass turns the counts of the earlier tiles
  into its first slot and tie rank. ``passes + 2`` launches, no host sync, no sort.

Decompress is the inverse prefix sum: slot of a set mask bit = number of set bits
before it. The tiled path first counts the set bits of every tile.

The offsets layout (``topk_compress.py``) converts the same way: ``triton_mask_to_offsets``
writes the position of every set bit to its slot and ``group_size`` to the slots past
the last one (one launch; two on the tiled path, whose first counts the bits of every
tile). ``triton_decompress_offsets`` is one launch: every program writes +0 to its own
positions, then (after a barrier, since a kept value may go where another thread
wrote a zero) the kept values of its groups at their offsets; on the tiled path a
tile finds its range of slots by binary search, the offsets of a group ascending.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .topk_compress import offsets_dtype

__all__ = ["triton_compress", "triton_decompress", "triton_mask_to_offsets", "triton_decompress_offsets",
           "FUSED_MAX_GROUP", "TILE"]

# Groups of up to this many elements are selected in registers by one program
# (fused path); larger groups go through the tiled multi-pass radix select.
FUSED_MAX_GROUP = 8192
# Elements of one group handled by one program of the tiled path (power of two).
TILE = 4096
# Elements per program the fused path aims for when groups are small (it packs
# several groups into one program so that small block sizes still fill the lanes).
_FUSED_ELEMS = 2048
# Bits per radix digit of the tiled path: 256-bin histograms.
_RADIX_BITS = 8
# Earlier-tile counts summed per step when a tile computes its starting slot.
_SCAN_BLOCK = 256

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- helpers
@triton.jit
def _magnitude_key(x, valid):
    """int32 key that orders |x| exactly (NaN above +inf, -0.0 == +0.0); -1 where invalid.

    -1 is below every real key, so padding never counts and is never kept.
    """
    if x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:  # bf16 / fp16: the 15 magnitude bits of the native pattern
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return tl.where(valid, bits, -1)


@triton.jit
def bf16_to_f32(bits):
    """float32 of bfloat16 bit patterns (any integer type, the pattern in the low 16
    bits): the pattern is the float32's upper half. Exact, subnormals included, where
    the interpreter's own conversion flushes bfloat16 subnormals."""
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def bf16_rounded(f):
    """uint32 holding the bfloat16 pattern nearest float32 ``f``: ties to the even
    mantissa, overflow to infinity. Not for NaN (the callers choose the NaN)."""
    b = f.to(tl.uint32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even; conversions from and to bf16 in integer
    arithmetic.

    The GPU's fp32 -> bf16 conversion rounds to nearest even, as torch does, but
    Triton's CPU interpreter truncates it (and flushes bf16 subnormals when widening);
    converting the bits by hand gives the same bits on both, so the code the
    interpreter tests is the code the GPU runs. A NaN stays a (quiet, same-sign) NaN;
    its payload is not preserved.
    """
    if x.dtype == tl.bfloat16 and dtype != tl.bfloat16:
        return bf16_to_f32(x.to(tl.int16, bitcast=True)).to(dtype)  # exact, then rounded once
    elif dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        f = x.to(tl.float32)  # exact from fp16
        quiet_nan = (f.to(tl.uint32, bitcast=True) >> 16) | 0x40
        return tl.where(f != f, quiet_nan, bf16_rounded(f)).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _keep_count(group_start, numel, group_size, k):
    """min(k, real elements of the group) as int32; 0 for a group past the end."""
    n_real = tl.minimum(tl.maximum(numel - group_start, 0), group_size)
    return tl.minimum(n_real, k).to(tl.int32)


@triton.jit
def _pack_bits(keep, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(ROWS, BLOCK) booleans -> (ROWS, BLOCK // 8) uint8, bit j of byte i = column 8i + j."""
    bits = tl.reshape(keep.to(tl.int32), (ROWS, BLOCK // 8, 8))
    weights = 1 << tl.arange(0, 8)
    return tl.sum(bits * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_bits(packed, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(ROWS, BLOCK // 8) uint8 -> (ROWS, BLOCK) booleans; inverse of ``_pack_bits``."""
    shifts = tl.arange(0, 8)
    bits = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, BLOCK)) != 0


@triton.jit
def _emit_tile(
    x, key, thresh, need, slot0, tie0, rows, pos0, row_ok,
    mask_ptr, values_ptr, group_size, stride_mask_row, stride_values_row,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Store the mask bytes and kept values of a (ROWS, BLOCK) tile of groups ``rows``.

    The tile covers in-group positions ``[pos0, pos0 + BLOCK)`` (``pos0 % 8 == 0``).
    Per row: ``thresh`` / ``need`` are the group's threshold key and ties to keep;
    ``slot0`` / ``tie0`` count the kept elements / threshold ties before the tile.
    """
    above = key > thresh[:, None]
    tie = key == thresh[:, None]
    # 1-based rank of each tie within its group; the first ``need`` ties are kept.
    tie_rank = tie0[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
    keep = above | (tie & (tie_rank <= need[:, None]))
    slot = slot0[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
    row_off = rows.to(tl.int64)[:, None]
    tl.store(
        values_ptr + row_off * stride_values_row + slot,
        _cast(x, values_ptr.dtype.element_ty),
        mask=keep,
    )
    packed = _pack_bits(keep, ROWS, BLOCK)
    byte = pos0 // 8 + tl.arange(0, BLOCK // 8)
    mask_bytes = (group_size + 7) // 8
    tl.store(
        mask_ptr + row_off * stride_mask_row + byte[None, :],
        packed,
        mask=row_ok[:, None] & (byte[None, :] < mask_bytes),
    )


@triton.jit
def _zero_fill_values(
    values_ptr, rows, row_ok, n_keep, k, stride_values_row,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Write 0 to slots ``[n_keep, k)`` of each row.

    Only a padded last group (or ``k > group_size``) has such slots; for every other
    row the loop below runs zero times.
    """
    first = tl.min(tl.where(row_ok, n_keep, k), axis=0)
    cols = tl.arange(0, BLOCK)
    zeros = tl.zeros((ROWS, BLOCK), dtype=values_ptr.dtype.element_ty)
    row_off = rows.to(tl.int64)[:, None] * stride_values_row
    for s0 in range(first, k, BLOCK):
        s = s0 + cols[None, :]
        m = row_ok[:, None] & (s >= n_keep[:, None]) & (s < k)
        tl.store(values_ptr + row_off + s, zeros, mask=m)


@triton.jit
def _radix_state(
    hist_ptr, state_ptr, group, num_groups, n_keep, is_writer,
    PASS: tl.constexpr, NUM_PASSES: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """(prefix, k_rem) of ``group`` entering radix pass ``PASS`` of the tiled path.

    ``prefix`` holds the digits chosen by the earlier passes (lower bits 0); ``k_rem``
    is how many keys still to keep among those matching the prefix. After the last
    digit (``PASS == NUM_PASSES``) they are the threshold ``T`` and ``need``.
    Pass ``p`` chooses digit ``p - 1`` from the histogram pass ``p - 1`` completed:
    the largest digit ``d`` with ``#{matching keys with digit >= d} >= k_rem``.
    ``is_writer`` (one program per group) records the state for the next pass.
    """
    if PASS == 0:
        prefix = n_keep * 0
        k_rem = n_keep
    else:
        BINS: tl.constexpr = 1 << RADIX_BITS
        state = state_ptr + ((PASS - 1) * num_groups + group) * 2
        prefix = tl.load(state)
        k_rem = tl.load(state + 1)
        bins = tl.arange(0, BINS)
        h = tl.load(hist_ptr + ((PASS - 1) * num_groups + group) * BINS + bins)
        # n_ge[d] = matching keys whose digit is >= d: non-increasing in d, so the
        # digits with n_ge >= k_rem are exactly 0..chosen.
        n_ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
        digit = tl.sum((n_ge >= k_rem).to(tl.int32), axis=0) - 1
        k_rem = k_rem - tl.sum(tl.where(bins > digit, h, 0), axis=0)
        # k_rem == 0 picks the top digit every time; the mask keeps T a valid key
        # (2**31 - 1 for fp32) instead of setting the sign bit.
        prefix = (prefix | (digit << ((NUM_PASSES - PASS) * RADIX_BITS))) & 0x7FFFFFFF
    out = state_ptr + (PASS * num_groups + group) * 2
    tl.store(out, prefix, mask=is_writer)
    tl.store(out + 1, k_rem, mask=is_writer)
    return prefix, k_rem


# --------------------------------------------------------------------------- kernels
@triton.jit
def _compress_kernel(
    x_ptr,  # flat input, fp32 / bf16 / fp16
    mask_ptr,  # (num_groups, ceil(group_size / 8)) uint8
    values_ptr,  # (num_groups, k) value dtype
    numel,
    group_size,
    k,
    num_groups,
    stride_mask_row,
    stride_values_row,
    ROWS: tl.constexpr,  # groups per program (power of two)
    BLOCK: tl.constexpr,  # power of two >= group_size, >= 8
    KEY_BITS: tl.constexpr,  # magnitude bits of the key: 31 (fp32) or 15 (bf16/fp16)
):
    """Fused path: select and emit ROWS whole groups held in registers."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < num_groups
    start = rows.to(tl.int64) * group_size
    offs = start[:, None] + cols[None, :]
    valid = row_ok[:, None] & (cols[None, :] < group_size) & (offs < numel)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    key = _magnitude_key(x, valid)
    n_keep = _keep_count(start, numel, group_size, k)

    # Bisection, MSB first. Invariant: n_ge_thresh = #{key >= thresh} >= n_keep. Run to
    # the last bit, thresh is the n_keep-th largest key. It may stop as soon as every
    # row has exactly n_keep keys >= thresh: those are then the top n_keep, and the
    # emitter keeps them all (need = #{key == thresh}). Random data usually gets there
    # well before bit 0; groups with ties at the threshold run every bit.
    thresh = tl.zeros((ROWS,), dtype=tl.int32)
    n_ge_thresh = tl.sum(valid.to(tl.int32), axis=1)
    i = 0
    while (i < KEY_BITS) & (tl.max(n_ge_thresh - n_keep, axis=0) > 0):
        cand = thresh | (1 << (KEY_BITS - 1 - i))
        n_ge = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        raise_ = n_ge >= n_keep
        thresh = tl.where(raise_, cand, thresh)
        n_ge_thresh = tl.where(raise_, n_ge, n_ge_thresh)
        i += 1
    need = n_keep - tl.sum((key > thresh[:, None]).to(tl.int32), axis=1)

    zero = tl.zeros((ROWS,), dtype=tl.int32)
    _emit_tile(
        x, key, thresh, need, zero, zero, rows, 0, row_ok,
        mask_ptr, values_ptr, group_size, stride_mask_row, stride_values_row, ROWS, BLOCK,
    )
    _zero_fill_values(values_ptr, rows, row_ok, n_keep, k, stride_values_row, ROWS, BLOCK)


@triton.jit
def _compress_histogram_kernel(
    x_ptr,  # flat input, fp32 / bf16 / fp16
    hist_ptr,  # (NUM_PASSES, num_groups, 2 ** RADIX_BITS) int32, zero-initialised
    state_ptr,  # (NUM_PASSES + 1, num_groups, 2) int32: (prefix, k_rem) per pass
    numel,
    group_size,
    k,
    num_groups,
    tiles_per_group,
    PASS: tl.constexpr,  # radix pass: histograms digit PASS (0 = most significant)
    NUM_PASSES: tl.constexpr,  # digits of the key: 4 (fp32) or 2 (bf16/fp16)
    TILE: tl.constexpr,  # elements of the group per program (power of two)
    RADIX_BITS: tl.constexpr,  # bits per digit; histograms have 2 ** RADIX_BITS bins
):
    """Tiled path, pass PASS: add this tile's digit histogram to its group's."""
    pid = tl.program_id(0)
    group = pid // tiles_per_group
    tile = pid % tiles_per_group
    start = group.to(tl.int64) * group_size
    pos = tile * TILE + tl.arange(0, TILE)
    valid = (pos < group_size) & (start + pos < numel)
    x = tl.load(x_ptr + start + pos, mask=valid, other=0.0)
    key = _magnitude_key(x, valid)
    n_keep = _keep_count(start, numel, group_size, k)
    prefix, k_rem = _radix_state(
        hist_ptr, state_ptr, group, num_groups, n_keep, tile == 0, PASS, NUM_PASSES, RADIX_BITS
    )

    BINS: tl.constexpr = 1 << RADIX_BITS
    shift: tl.constexpr = (NUM_PASSES - 1 - PASS) * RADIX_BITS
    if PASS == 0:
        match = valid
    else:  # agree with the prefix on every digit above this one
        match = valid & ((key >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS)))
    digit = (key >> shift) & (BINS - 1)
    hist = tl.histogram(digit, BINS, mask=match)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + (PASS * num_groups + group) * BINS + bins, hist, mask=hist != 0, sem="relaxed")


@triton.jit
def _compress_count_kernel(
    x_ptr,  # flat input, fp32 / bf16 / fp16
    hist_ptr,  # (NUM_PASSES, num_groups, 2 ** RADIX_BITS) int32, filled by the radix passes
    state_ptr,  # (NUM_PASSES + 1, num_groups, 2) int32
    counts_ptr,  # (2, num_groups, tiles_per_group) int32: keys > T, keys == T
    numel,
    group_size,
    k,
    num_groups,
    tiles_per_group,
    NUM_PASSES: tl.constexpr,  # digits of the key: 4 (fp32) or 2 (bf16/fp16)
    TILE: tl.constexpr,  # elements of the group per program (power of two)
    RADIX_BITS: tl.constexpr,  # bits per digit; histograms have 2 ** RADIX_BITS bins
):
    """Tiled path: choose the last digit (so T is final) and count this tile's keys > T / == T."""
    pid = tl.program_id(0)
    group = pid // tiles_per_group
    tile = pid % tiles_per_group
    start = group.to(tl.int64) * group_size
    pos = tile * TILE + tl.arange(0, TILE)
    valid = (pos < group_size) & (start + pos < numel)
    x = tl.load(x_ptr + start + pos, mask=valid, other=0.0)
    key = _magnitude_key(x, valid)
    n_keep = _keep_count(start, numel, group_size, k)
    thresh, need = _radix_state(
        hist_ptr, state_ptr, group, num_groups, n_keep, tile == 0, NUM_PASSES, NUM_PASSES, RADIX_BITS
    )
    plane = num_groups * tiles_per_group
    tl.store(counts_ptr + pid, tl.sum((key > thresh).to(tl.int32), axis=0))
    tl.store(counts_ptr + plane + pid, tl.sum((key == thresh).to(tl.int32), axis=0))


@triton.jit
def _compress_write_kernel(
    x_ptr,  # flat input, fp32 / bf16 / fp16
    mask_ptr,  # (num_groups, ceil(group_size / 8)) uint8
    values_ptr,  # (num_groups, k) value dtype
    state_ptr,  # (NUM_PASSES + 1, num_groups, 2) int32; row NUM_PASSES = (T, need)
    counts_ptr,  # (2, num_groups, tiles_per_group) int32 from the count pass
    numel,
    group_size,
    k,
    num_groups,
    tiles_per_group,
    stride_mask_row,
    stride_values_row,
    NUM_PASSES: tl.constexpr,  # digits of the key: 4 (fp32) or 2 (bf16/fp16)
    TILE: tl.constexpr,  # elements of the group per program (power of two, >= 8)
    SCAN_BLOCK: tl.constexpr,  # earlier-tile counts summed per step
):
    """Tiled path: emit this tile's mask bytes and kept values."""
    pid = tl.program_id(0)
    group = pid // tiles_per_group
    tile = pid % tiles_per_group
    state = state_ptr + (NUM_PASSES * num_groups + group) * 2
    thresh = tl.load(state)
    need = tl.load(state + 1)

    # Keys above T and ties at T in the earlier tiles of this group.
    above0 = 0
    tie0 = 0
    plane = num_groups * tiles_per_group
    for t0 in range(0, tile, SCAN_BLOCK):
        t = t0 + tl.arange(0, SCAN_BLOCK)
        m = t < tile
        above0 += tl.sum(tl.load(counts_ptr + group * tiles_per_group + t, mask=m, other=0), axis=0)
        tie0 += tl.sum(tl.load(counts_ptr + plane + group * tiles_per_group + t, mask=m, other=0), axis=0)
    slot0 = above0 + tl.minimum(tie0, need)

    # One group, one tile: a (1, TILE) block so the fused path's emitter applies.
    rows = group + tl.zeros((1,), dtype=tl.int32)
    pos0 = tile * TILE
    pos = pos0 + tl.arange(0, TILE)[None, :]
    start = group.to(tl.int64) * group_size
    valid = (pos < group_size) & (start + pos < numel)
    x = tl.load(x_ptr + start + pos, mask=valid, other=0.0)
    key = _magnitude_key(x, valid)
    row_ok = rows < num_groups
    one = tl.full((1,), 1, dtype=tl.int32)
    _emit_tile(
        x, key, thresh * one, need * one, slot0 * one, tie0 * one, rows, pos0, row_ok,
        mask_ptr, values_ptr, group_size, stride_mask_row, stride_values_row, 1, TILE,
    )
    # The group's first tile zero-fills its unused value slots (the others skip: from k).
    n_keep = _keep_count(start, numel, group_size, k)
    fill_from = tl.where(tile == 0, n_keep, k) * one
    _zero_fill_values(values_ptr, rows, row_ok, fill_from, k, stride_values_row, 1, TILE)


@triton.jit
def _mask_popcount_kernel(
    mask_ptr,  # (num_groups, ceil(group_size / 8)) uint8
    counts_ptr,  # (num_groups, tiles_per_group) int32 out: set bits per tile
    group_size,
    tiles_per_group,
    stride_mask_row,
    TILE: tl.constexpr,  # elements (= 8 * bytes) per tile, power of two
):
    """Tiled decompress, first pass: set bits of each tile of the mask."""
    pid = tl.program_id(0)
    group = pid // tiles_per_group
    tile = pid % tiles_per_group
    byte = tile * (TILE // 8) + tl.arange(0, TILE // 8)
    packed = tl.load(
        mask_ptr + group.to(tl.int64) * stride_mask_row + byte[None, :],
        mask=byte[None, :] < (group_size + 7) // 8,
        other=0,
    )
    pos = tile * TILE + tl.arange(0, TILE)[None, :]
    bits = _unpack_bits(packed, 1, TILE) & (pos < group_size)
    tl.store(counts_ptr + pid, tl.sum(tl.sum(bits.to(tl.int32), axis=1), axis=0))


@triton.jit
def _earlier_tiles(counts_ptr, row_off, row_ok, tiles_per_group, tile, ROWS: tl.constexpr,
                   SCAN_BLOCK: tl.constexpr):
    """(ROWS,) int32: the counts of tiles 0 .. tile - 1 of every row's group, summed."""
    total = tl.zeros((ROWS,), dtype=tl.int32)
    for t0 in range(0, tile, SCAN_BLOCK):
        t = t0 + tl.arange(0, SCAN_BLOCK)[None, :]
        c = tl.load(counts_ptr + row_off * tiles_per_group + t, mask=row_ok[:, None] & (t < tile), other=0)
        total += tl.sum(c, axis=1)
    return total


@triton.jit
def _mask_tile(mask_ptr, row_off, row_ok, tile, group_size, stride_mask_row, ROWS: tl.constexpr,
               BLOCK: tl.constexpr):
    """The mask bits of positions ``tile * BLOCK ..`` of ROWS groups (False past the group)
    and those positions, (1, BLOCK)."""
    byte = tile * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    packed = tl.load(
        mask_ptr + row_off * stride_mask_row + byte[None, :],
        mask=row_ok[:, None] & (byte[None, :] < (group_size + 7) // 8),
        other=0,
    )
    pos = tile * BLOCK + tl.arange(0, BLOCK)[None, :]
    return _unpack_bits(packed, ROWS, BLOCK) & (pos < group_size), pos


@triton.jit
def _program_rows(num_groups, tiles_per_group, ROWS: tl.constexpr):
    """This program's (group block, tile, rows, rows in range, row offsets (ROWS, 1))."""
    pid = tl.program_id(0)
    row_block = pid // tiles_per_group
    rows = row_block * ROWS + tl.arange(0, ROWS)
    return row_block, pid % tiles_per_group, rows, rows < num_groups, rows.to(tl.int64)[:, None]


@triton.jit
def _mask_slots(mask_ptr, counts_ptr, num_groups, tiles_per_group, group_size, stride_mask_row, ROWS: tl.constexpr,
                BLOCK: tl.constexpr, TILED: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """This program's tile of the mask: ``(tile, row_ok, row_off, bits, pos, slot)``, the
    slot of a set bit being the number of set bits before it in its group (the counts
    of the earlier tiles included when TILED)."""
    _, tile, rows, row_ok, row_off = _program_rows(num_groups, tiles_per_group, ROWS)
    slot0 = tl.zeros((ROWS,), dtype=tl.int32)
    if TILED:
        slot0 = _earlier_tiles(counts_ptr, row_off, row_ok, tiles_per_group, tile, ROWS, SCAN_BLOCK)
    bits, pos = _mask_tile(mask_ptr, row_off, row_ok, tile, group_size, stride_mask_row, ROWS, BLOCK)
    return tile, row_ok, row_off, bits, pos, slot0[:, None] + tl.cumsum(bits.to(tl.int32), axis=1) - 1


@triton.jit
def _decompress_kernel(
    mask_ptr,  # (num_groups, ceil(group_size / 8)) uint8
    values_ptr,  # (num_groups, k) value dtype
    out_ptr,  # flat output, fp32 / bf16 / fp16
    counts_ptr,  # (num_groups, tiles_per_group) int32 set bits per tile (if TILED)
    numel,
    group_size,
    k,
    num_groups,
    tiles_per_group,
    stride_mask_row,
    stride_values_row,
    ROWS: tl.constexpr,  # groups per program (1 when TILED)
    BLOCK: tl.constexpr,  # positions per program (power of two, >= 8)
    TILED: tl.constexpr,  # groups span several tiles: start slots come from counts_ptr
    SCAN_BLOCK: tl.constexpr,  # earlier-tile counts summed per step
):
    """Scatter the kept values back to their positions; exact +0 elsewhere."""
    _, row_ok, row_off, bits, pos, slot = _mask_slots(mask_ptr, counts_ptr, num_groups, tiles_per_group, group_size,
                                                      stride_mask_row, ROWS, BLOCK, TILED, SCAN_BLOCK)
    # ``slot < k`` only guards against a malformed mask (more bits than values).
    take = bits & (slot < k)
    vals = tl.load(values_ptr + row_off * stride_values_row + slot, mask=take, other=0.0)
    out = tl.where(take, _cast(vals, out_ptr.dtype.element_ty), 0.0)
    offs = row_off * group_size + pos
    tl.store(out_ptr + offs, out, mask=row_ok[:, None] & (pos < group_size) & (offs < numel))


# --------------------------------------------------------------------- offsets layout
@triton.jit
def _mask_to_offsets_kernel(
    mask_ptr,  # (num_groups, ceil(group_size / 8)) uint8
    offsets_ptr,  # (num_groups, k) int16 / int32 out
    counts_ptr,  # (num_groups, tiles_per_group) int32 set bits per tile (if TILED)
    group_size,
    k,
    num_groups,
    tiles_per_group,
    stride_mask_row,
    stride_offsets_row,
    ROWS: tl.constexpr,  # groups per program (1 when TILED)
    BLOCK: tl.constexpr,  # positions per program (power of two, >= 8)
    TILED: tl.constexpr,  # groups span several tiles: start slots come from counts_ptr
    SCAN_BLOCK: tl.constexpr,  # earlier-tile counts summed per step
    FILL_BLOCK: tl.constexpr,  # slots filled per step (power of two)
):
    """The positions of the set bits, in order, to their slots (the n-th set bit to slot
    n - 1 while n <= k); ``group_size`` in the slots past the last set bit."""
    tile, row_ok, row_off, bits, pos, slot = _mask_slots(mask_ptr, counts_ptr, num_groups, tiles_per_group,
                                                         group_size, stride_mask_row, ROWS, BLOCK, TILED, SCAN_BLOCK)
    row_ptr = offsets_ptr + row_off * stride_offsets_row
    tl.store(row_ptr + slot, pos.to(offsets_ptr.dtype.element_ty), mask=row_ok[:, None] & bits & (slot < k))

    # The group's first tile fills the slots past its set bits (the other tiles: from k).
    if TILED:
        total = _earlier_tiles(counts_ptr, row_off, row_ok, tiles_per_group, tiles_per_group, ROWS, SCAN_BLOCK)
        fill_from = tl.where(tile == 0, total, k)
    else:
        fill_from = tl.sum(bits.to(tl.int32), axis=1)
    fill_from = tl.where(row_ok, fill_from, k)
    filler = (tl.zeros((ROWS, FILL_BLOCK), dtype=tl.int32) + group_size).to(offsets_ptr.dtype.element_ty)
    for s0 in range(tl.min(fill_from, axis=0) // FILL_BLOCK * FILL_BLOCK, k, FILL_BLOCK):
        s = s0 + tl.arange(0, FILL_BLOCK)[None, :]
        tl.store(row_ptr + s, filler, mask=(s >= fill_from[:, None]) & (s < k))


@triton.jit
def _count_below(row_ptr, k, bound, steps):
    """How many of the ``k`` ascending values at ``row_ptr`` are below ``bound``: a binary
    search of ``steps`` >= log2(k + 1) rounds."""
    lo = tl.full((), 0, tl.int32)
    hi = lo + k
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(row_ptr + mid, mask=active, other=0)
        lo = tl.where(active & (v < bound), mid + 1, lo)
        hi = tl.where(active & (v >= bound), mid, hi)
    return lo


@triton.jit
def _decompress_offsets_kernel(
    offsets_ptr,  # (num_groups, k) int16 / int32: positions ascending, group_size in unused slots
    values_ptr,  # (num_groups, k) value dtype
    out_ptr,  # flat output, fp32 / bf16 / fp16
    numel,
    group_size,
    k,
    num_groups,
    tiles_per_group,
    stride_offsets_row,
    stride_values_row,
    search_steps,  # rounds of the binary search for a tile's slots (TILED): log2(k + 1) rounded up
    ROWS: tl.constexpr,  # groups per program (1 when TILED)
    BLOCK: tl.constexpr,  # positions per program (power of two, >= 8)
    TILED: tl.constexpr,  # groups span several tiles: a tile takes the slots whose offsets fall in it
    K_BLOCK: tl.constexpr,  # slots scattered per step (power of two)
):
    """Exact +0 at this program's positions, then the kept values at their offsets."""
    row_block, tile, _, row_ok, row_off = _program_rows(num_groups, tiles_per_group, ROWS)
    pos0 = tile * BLOCK
    pos = pos0 + tl.arange(0, BLOCK)[None, :]
    offs = row_off * group_size + pos
    zeros = tl.zeros((ROWS, BLOCK), dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, zeros, mask=row_ok[:, None] & (pos < group_size) & (offs < numel))
    # A kept value may land where another thread of this program wrote a zero: the
    # barrier orders the two stores (programs own disjoint positions).
    tl.debug_barrier()

    first = 0
    last = k
    if TILED:  # offsets ascend: the slots of this tile are a range, found by binary search
        group_ptr = offsets_ptr + row_block.to(tl.int64) * stride_offsets_row  # ROWS == 1
        first = _count_below(group_ptr, k, pos0, search_steps)
        last = _count_below(group_ptr, k, pos0 + BLOCK, search_steps)
    for s0 in range(first, last, K_BLOCK):
        s = s0 + tl.arange(0, K_BLOCK)[None, :]
        in_row = row_ok[:, None] & (s < last)
        off = tl.load(offsets_ptr + row_off * stride_offsets_row + s, mask=in_row, other=0).to(tl.int64)
        vals = tl.load(values_ptr + row_off * stride_values_row + s, mask=in_row, other=0.0)
        dst = row_off * group_size + off
        keep = in_row & (off >= pos0) & (off < pos0 + BLOCK) & (off < group_size) & (dst < numel)
        tl.store(out_ptr + dst, _cast(vals, out_ptr.dtype.element_ty), mask=keep)


# --------------------------------------------------------------------------- launchers
# The three checks below serve every Triton kernel of razorpass (quantize_triton too).
def check_dtype(dtype: torch.dtype, allowed, what: str) -> None:
    if dtype not in allowed:
        raise NotImplementedError(
            f"the Triton kernels take {what} in {[str(d) for d in allowed]}, got {dtype}; "
            "use backend='torch' (the PyTorch kernel handles every floating dtype)"
        )


def check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpreted():
        raise ValueError(
            f"the Triton kernels need a CUDA tensor, got one on {t.device}; use backend='torch' or "
            "'native' on CPU (or set TRITON_INTERPRET=1 before Triton is first imported)"
        )


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(_compress_kernel, triton.runtime.JITFunction)


def on_device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fused_config(group_size: int, num_groups: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of the fused path."""
    block = max(8, triton.next_power_of_2(group_size))
    rows = max(1, min(_FUSED_ELEMS // block, triton.next_power_of_2(num_groups)))
    elems = rows * block
    num_warps = 4 if elems <= 2048 else (8 if elems <= 4096 else 16)
    return rows, block, num_warps


def _tiled_config(group_size: int, tile: int | None) -> tuple[int, int, int]:
    """(TILE, tiles per group, num_warps) of the tiled path; ``tile`` None: the library's."""
    tile = TILE if tile is None else tile
    assert tile >= 8 and tile & (tile - 1) == 0, "tile must be a power of two >= 8"
    return tile, triton.cdiv(group_size, tile), 8 if tile >= 4096 else 4


def triton_compress(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``x`` into (packed mask, kept values); same contract as ``torch_compress``."""
    with on_device_of(x):
        return _compress(x, group_size, k, value_dtype, tile=None)


def _compress(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype, tile: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_compress``; ``tile`` forces the tiled path with that tile (tests)."""
    if group_size < 1 or k < 0:
        raise ValueError(f"need group_size >= 1 and k >= 0, got group_size={group_size}, k={k}")
    check_dtype(x.dtype, _INPUT_DTYPES, "inputs")
    check_dtype(value_dtype, _VALUE_DTYPES, "value dtypes")
    check_device(x)
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    groups = -(-n // group_size)
    mask = torch.empty((groups, -(-group_size // 8)), dtype=torch.uint8, device=x.device)
    values = torch.empty((groups, k), dtype=value_dtype, device=x.device)
    if groups == 0:
        return mask, values
    if k == 0:  # nothing is kept
        return mask.zero_(), values

    key_bits = 31 if x.dtype == torch.float32 else 15
    if tile is None and group_size <= FUSED_MAX_GROUP:
        rows, block, num_warps = _fused_config(group_size, groups)
        _compress_kernel[(triton.cdiv(groups, rows),)](
            flat, mask, values, n, group_size, k, groups, mask.stride(0), values.stride(0),
            ROWS=rows, BLOCK=block, KEY_BITS=key_bits, num_warps=num_warps,
        )
        return mask, values

    tile, tiles, num_warps = _tiled_config(group_size, tile)
    passes = triton.cdiv(key_bits, _RADIX_BITS)
    hist = torch.zeros((passes, groups, 1 << _RADIX_BITS), dtype=torch.int32, device=x.device)
    state = torch.empty((passes + 1, groups, 2), dtype=torch.int32, device=x.device)
    counts = torch.empty((2, groups, tiles), dtype=torch.int32, device=x.device)
    grid = (groups * tiles,)
    for p in range(passes):
        _compress_histogram_kernel[grid](
            flat, hist, state, n, group_size, k, groups, tiles,
            PASS=p, NUM_PASSES=passes, TILE=tile, RADIX_BITS=_RADIX_BITS, num_warps=num_warps,
        )
    _compress_count_kernel[grid](
        flat, hist, state, counts, n, group_size, k, groups, tiles,
        NUM_PASSES=passes, TILE=tile, RADIX_BITS=_RADIX_BITS, num_warps=num_warps,
    )
    _compress_write_kernel[grid](
        flat, mask, values, state, counts, n, group_size, k, groups, tiles,
        mask.stride(0), values.stride(0),
        NUM_PASSES=passes, TILE=tile, SCAN_BLOCK=_SCAN_BLOCK, num_warps=num_warps,
    )
    return mask, values


def triton_decompress(
    mask: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense tensor of ``shape``/``dtype``; same contract as ``torch_decompress``."""
    with on_device_of(values):
        return _decompress(mask, values, shape, group_size, dtype, tile=None)


def _decompress(
    mask: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
    tile: int | None,
) -> torch.Tensor:
    """``triton_decompress``; ``tile`` forces the tiled path with that tile (tests)."""
    out = _dense_output(values, shape, dtype)
    if out is None:
        return torch.zeros(shape, dtype=dtype, device=values.device)
    n, (groups, k) = out.numel(), values.shape
    mask = mask.contiguous()
    values = values.contiguous()

    if tile is None and group_size <= FUSED_MAX_GROUP:
        rows, block, num_warps = _fused_config(group_size, groups)
        _decompress_kernel[(triton.cdiv(groups, rows),)](
            # counts_ptr is unused when TILED=False: pass any pointer.
            mask, values, out, out, n, group_size, k, groups, 1, mask.stride(0), values.stride(0),
            ROWS=rows, BLOCK=block, TILED=False, SCAN_BLOCK=_SCAN_BLOCK, num_warps=num_warps,
        )
        return out.view(shape)

    tile, tiles, num_warps = _tiled_config(group_size, tile)
    counts = torch.empty((groups, tiles), dtype=torch.int32, device=values.device)
    grid = (groups * tiles,)
    _mask_popcount_kernel[grid](mask, counts, group_size, tiles, mask.stride(0), TILE=tile, num_warps=num_warps)
    _decompress_kernel[grid](
        mask, values, out, counts, n, group_size, k, groups, tiles, mask.stride(0), values.stride(0),
        ROWS=1, BLOCK=tile, TILED=True, SCAN_BLOCK=_SCAN_BLOCK, num_warps=num_warps,
    )
    return out.view(shape)


def _dense_output(values: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor | None:
    """The flat output of a top-k decode after its checks; None when it is all zeros
    (no element, or k = 0)."""
    check_dtype(dtype, _INPUT_DTYPES, "output dtypes")
    check_dtype(values.dtype, _VALUE_DTYPES, "value dtypes")
    check_device(values)
    n = math.prod(shape)
    if n == 0 or values.shape[1] == 0:
        return None
    return torch.empty(n, dtype=dtype, device=values.device)


def triton_mask_to_offsets(mask: torch.Tensor, group_size: int, k: int, tile: int | None = None) -> torch.Tensor:
    """The offsets layout of ``mask``; same contract as ``torch_mask_to_offsets``.
    ``tile`` forces the tiled path with that tile (tests)."""
    check_device(mask)
    groups = mask.shape[0]
    out = torch.empty((groups, k), dtype=offsets_dtype(group_size), device=mask.device)
    if groups == 0 or k == 0:
        return out
    mask = mask.contiguous()
    fused = tile is None and group_size <= FUSED_MAX_GROUP
    if fused:
        rows, block, num_warps = _fused_config(group_size, groups)
        grid, tiles, counts = (triton.cdiv(groups, rows),), 1, out  # counts_ptr unused: any pointer
    else:
        block, tiles, num_warps = _tiled_config(group_size, tile)
        rows, grid = 1, (groups * tiles,)
        counts = torch.empty((groups, tiles), dtype=torch.int32, device=mask.device)
    with on_device_of(mask):
        if not fused:
            _mask_popcount_kernel[grid](mask, counts, group_size, tiles, mask.stride(0), TILE=block,
                                        num_warps=num_warps)
        _mask_to_offsets_kernel[grid](
            mask, out, counts, group_size, k, groups, tiles, mask.stride(0), out.stride(0),
            ROWS=rows, BLOCK=block, TILED=not fused, SCAN_BLOCK=_SCAN_BLOCK,
            FILL_BLOCK=min(triton.next_power_of_2(k), block), num_warps=num_warps,
        )
    return out


def triton_decompress_offsets(offsets: torch.Tensor, values: torch.Tensor, shape: list[int], group_size: int,
                              dtype: torch.dtype, tile: int | None = None) -> torch.Tensor:
    """Dense tensor of ``shape``/``dtype`` from the offsets layout; same contract as
    ``torch_decompress_offsets`` (offsets ascending in each group, as
    ``razor::compress_offsets`` writes them). ``tile`` forces the tiled path with that
    tile (tests)."""
    out = _dense_output(values, shape, dtype)
    if out is None:
        return torch.zeros(shape, dtype=dtype, device=values.device)
    (groups, k), offsets, values = values.shape, offsets.contiguous(), values.contiguous()
    if tile is None and group_size <= FUSED_MAX_GROUP:
        rows, block, num_warps = _fused_config(group_size, groups)
        grid, tiles, tiled = (triton.cdiv(groups, rows),), 1, False
    else:
        block, tiles, num_warps = _tiled_config(group_size, tile)
        rows, grid, tiled = 1, (groups * tiles,), True
    with on_device_of(values):
        _decompress_offsets_kernel[grid](
            offsets, values, out, out.numel(), group_size, k, groups, tiles, offsets.stride(0), values.stride(0),
            k.bit_length(), ROWS=rows, BLOCK=block, TILED=tiled, K_BLOCK=min(triton.next_power_of_2(k), block),
            num_warps=num_warps,
        )
    return out.view(shape)
