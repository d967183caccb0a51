"""Quantization per group (uniform levels, or the normal codebook) and on one fixed
range: the Triton kernels.

``triton_quantize_group`` / ``triton_quantize_group_centered`` /
``triton_quantize_group_stochastic`` / ``triton_dequantize_group``,
``triton_quantize_uniform`` / ``triton_dequantize_uniform`` and
``triton_quantize_normal`` / ``triton_dequantize_normal`` are bit-identical to the
PyTorch kernels of ``quantize.py`` (whose comments define rule and layout): the same
codes, the same bfloat16 bounds and statistics and the same decoded values, bit for bit
(NaN and signed zeros included; the normal codebook's section below names its two
limits). Each op is one launch, over whole groups (per-group codecs) or whole
words of eight codes (fixed range), with static shapes and no host synchronization.
A uniform group of up to ``MAX_BLOCK`` elements is held in registers and its input
read once; a larger group loops over chunks of ``MAX_BLOCK``, once for its bounds and
once for its codes. The uniform encoders read a non-contiguous input in place, through
the sizes and strides of a 4-d view of its merged dims (a copy only when more than four
dims remain); ``triton_quantize_group_centered`` subtracts the center as it reads. The
normal codebook's kernels hold whole groups and read a contiguous input (a copy of a
non-contiguous one).
This module imports Triton at the top and is only imported when a Triton kernel
runs; on CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` before the import).

Exactness on the GPU
--------------------
The interpreter computes with numpy, one IEEE-rounded float32 operation after the
other. Compiled, five things could part from the PyTorch kernel; each is pinned:

(a) Division. ``a / b`` on float32 compiles to ``div.full.f32`` (approximate, 2 ulp).
    Every quotient here is ``tl.div_rn`` (``div.rn.f32``: IEEE, no flush to zero).
(b) Fused multiply-add. ``q * step + lo`` is contracted into one ``fma.rn.f32`` by
    default (one rounding where PyTorch rounds twice). Every launch goes through
    ``_launch``, which passes ``LAUNCH_OPTIONS`` (``enable_fp_fusion=False``): LLVM
    emits ``mul.rn.f32`` and ``add.rn.f32`` and ptxas runs with ``--fmad=false``. (libdevice ``mul_rn`` / ``add_rn`` and inline PTX would do
    too, but neither runs under the interpreter; the option does, as a no-op.)
(c) Round half to even. Done in integers on the clamped quotient ``t`` in
    ``[0, 2**bits - 1]``: ``f = int(t)`` (truncation), ``r = t - f`` (exact, since
    ``t < 2**8``), up one when ``r > 0.5`` or ``r == 0.5`` with ``f`` odd. No rounding
    instruction and no rounding mode is involved.
(d) bfloat16. float32 -> bfloat16 rounds on the bit pattern (add ``0x7FFF`` plus the
    kept lsb, shift; overflow carries into infinity), bfloat16 -> float32 shifts the
    pattern; the outward step is ``nextafter`` on the pattern (+-1, and +-0 to the
    smallest subnormal of the direction). Hardware conversions are not used for
    bfloat16 (the interpreter truncates and mishandles subnormals).
(e) NaN and zeros in the bounds. ``tl.min`` / ``tl.max`` never see a NaN: they reduce
    the group with NaN (and padding) replaced by +-inf, and a separate reduction flags
    a NaN, which makes both bounds NaN as ``amin`` / ``amax`` do. A zero bound is made
    +0 by a select (``-0 + 0`` in the PyTorch kernel). A NaN written as bfloat16 (a
    bound, or a decoded value) takes the pattern torch's own conversion gives on the
    device (``_BF16_NAN``: 0xFFFF on CPU, 0x7FFF on CUDA); float16 and float32 NaN come
    from the same conversions and operations torch uses on the device.

Under the interpreter the tests check (c), (d) and (e) bit for bit: the same integer
code runs there. They cannot check (a) and (b) (numpy divides exactly and never
fuses), nor the CUDA NaN pattern of (e) or what CUDA's float16 conversion does with a
NaN: the CUDA tests of ``tests/test_triton_codecs.py`` do, against the PyTorch kernel
on the device (whose own divisions are true divisions there too: ``quantize._divisor``).
(a) and (b) are also checked without a GPU where Triton's CUDA toolchain is installed:
a test compiles the kernels for sm_90 with ``LAUNCH_OPTIONS`` and reads their PTX.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from .quantize import (_step, check_args, check_group_args, check_normal_args, check_normal_parts, check_stochastic,
                       check_group_shapes, check_uniform_codes, group_quantized_shapes, normal_levels, normal_shapes,
                       quantized_numel)
from .topk_compress_triton import bf16_rounded, bf16_to_f32, check_device, check_dtype, on_device_of

__all__ = ["triton_quantize_group", "triton_quantize_group_centered", "triton_dequantize_group",
           "triton_quantize_uniform", "triton_dequantize_uniform", "triton_quantize_normal", "triton_dequantize_normal",
           "MAX_BLOCK", "LAUNCH_OPTIONS"]

# Elements of one group a program holds in registers at a time (a power of two);
# larger groups loop over chunks of this many.
MAX_BLOCK = 4096
# Elements per program the kernels aim for (several small groups per program).
_PROGRAM_ELEMS = 2048
# Words of eight codes per program of the fixed-range kernels.
_WORDS = _PROGRAM_ELEMS // 8
# The bfloat16 NaN torch's float32 -> bfloat16 conversion gives, per device type.
_BF16_NAN = {"cpu": 0xFFFF, "cuda": 0x7FFF}
# The dtype ``x - center`` is rounded to before it is quantized (the promoted dtype).
_DIFF_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Integer arguments that follow the tensor's size: Triton does not specialize on them
# (divisible by 16, equal to 1), so a new size reuses the compiled kernel.
_SIZE_ARGS = ("numel", "num_groups", "nbytes", "size1", "size2", "size3", "stride0", "stride1", "stride2", "stride3",
              "inner", "channels")


def _jit_kernel(fn):
    """``triton.jit`` for a kernel, without specializing on its ``_SIZE_ARGS``."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[a for a in _SIZE_ARGS if a in params])


# --------------------------------------------------------------------------- helpers
@triton.jit
def _f32_to_bf16(f, NAN_BF16: tl.constexpr):
    """uint32 holding the bfloat16 pattern nearest ``f`` (ties to even, overflow to
    infinity); ``NAN_BF16`` for a NaN."""
    return tl.where(f != f, NAN_BF16, bf16_rounded(f))


@triton.jit
def _bf16_next(bits, DOWN: tl.constexpr):
    """``nextafter`` of finite bfloat16 patterns towards -inf (DOWN) or +inf."""
    away = ((bits & 0x8000) != 0) == DOWN  # the step moves away from zero
    stepped = tl.where(away, bits + 1, bits - 1)
    return tl.where((bits & 0x7FFF) == 0, 0x8001 if DOWN else 0x0001, stepped)


@triton.jit
def _to_f32(x):
    """The float32 value of fp32 / bf16 / fp16 ``x`` (exact)."""
    if x.dtype == tl.bfloat16:
        return bf16_to_f32(x.to(tl.int16, bitcast=True))
    else:
        return x.to(tl.float32)


@triton.jit
def _from_f32(f, dtype: tl.constexpr, NAN_BF16: tl.constexpr):
    """float32 ``f`` in ``dtype``, rounded to nearest even as torch converts."""
    if dtype == tl.bfloat16:
        return _f32_to_bf16(f, NAN_BF16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return f.to(dtype)


@triton.jit
def _round_through(f, DIFF: tl.constexpr, NAN_BF16: tl.constexpr):
    """float32 ``f`` rounded to the dtype ``DIFF`` codes (0 fp32, 1 bf16, 2 fp16) and back."""
    if DIFF == 1:
        return bf16_to_f32(_f32_to_bf16(f, NAN_BF16))
    elif DIFF == 2:
        return f.to(tl.float16).to(tl.float32)
    else:
        return f


@triton.jit
def _offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3, CONTIGUOUS: tl.constexpr):
    """Memory offsets (elements) of the logical (row-major) positions ``idx`` of a
    4-d view; the positions themselves when the input is contiguous."""
    if CONTIGUOUS:
        return idx
    else:
        i3 = idx % size3
        rest = idx // size3
        i2 = rest % size2
        rest = rest // size2
        return (rest // size1) * stride0 + (rest % size1) * stride1 + i2 * stride2 + i3 * stride3


@triton.jit
def _level(t, BITS: tl.constexpr):
    """int32 code of quotients ``t``: NaN to 0, clamped to [0, 2**BITS - 1], rounded
    half to even in integers (exact: the clamped ``t`` is below 2**8)."""
    TOP: tl.constexpr = (1 << BITS) - 1
    t = tl.where(t >= 0.0, t, 0.0)  # NaN and below the range: 0
    t = tl.where(t < TOP, t, TOP * 1.0)
    whole = t.to(tl.int32)  # truncation: the floor of t >= 0
    frac = t - whole.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    return whole + up.to(tl.int32)


@triton.jit
def _store_words(codes_ptr, q, byte0, ok, nbytes, BITS: tl.constexpr):
    """Store (W, 8) int32 codes as W words of eight codes, ``BITS`` bytes each: word
    ``w`` at bytes ``byte0[w] ..`` (the little-endian bit stream); only where ``ok`` and
    below ``nbytes``."""
    j = tl.arange(0, 8)
    if BITS == 8:
        byte = byte0[:, None] + j[None, :]
        tl.store(codes_ptr + byte, q.to(tl.uint8), mask=ok[:, None] & (byte < nbytes))
    else:
        word = tl.sum(q << (j * BITS)[None, :], axis=1)  # disjoint bits: the sum is the or
        for b in tl.static_range(BITS):
            tl.store(codes_ptr + byte0 + b, ((word >> (8 * b)) & 0xFF).to(tl.uint8),
                     mask=ok & (byte0 + b < nbytes))


@triton.jit
def _load_words(codes_ptr, byte0, ok, nbytes, BITS: tl.constexpr):
    """(W, 8) int32 codes of the words at ``byte0`` (the inverse of ``_store_words``);
    0 where not ``ok`` and past ``nbytes``."""
    j = tl.arange(0, 8)
    if BITS == 8:
        byte = byte0[:, None] + j[None, :]
        return tl.load(codes_ptr + byte, mask=ok[:, None] & (byte < nbytes), other=0).to(tl.int32)
    else:
        word = tl.load(codes_ptr + byte0, mask=ok & (byte0 < nbytes), other=0).to(tl.int32)
        for b in tl.static_range(1, BITS):
            byte = tl.load(codes_ptr + byte0 + b, mask=ok & (byte0 + b < nbytes), other=0)
            word = word | (byte.to(tl.int32) << (8 * b))
        return (word[:, None] >> (j * BITS)[None, :]) & ((1 << BITS) - 1)


# --------------------------------------------------------------------- per group
@triton.jit
def _group_chunk(x_ptr, center_ptr, start, row_ok, c0, numel, size1, size2, size3, stride0, stride1, stride2,
                 stride3, inner, channels, GROUP: tl.constexpr, BLOCK: tl.constexpr, CONTIGUOUS: tl.constexpr,
                 CENTERED: tl.constexpr, DIFF: tl.constexpr, NAN_BF16: tl.constexpr):
    """(ROWS, BLOCK) float32 elements ``c0 ..`` of the groups starting at ``start``
    (centered if CENTERED) and where they are real elements."""
    col = c0 + tl.arange(0, BLOCK)
    idx = start[:, None] + col[None, :]
    valid = row_ok[:, None] & (col < GROUP)[None, :] & (idx < numel)
    offs = _offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3, CONTIGUOUS)
    x = _to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0))
    if CENTERED:  # x - center[channel] in the promoted dtype, as the graph computes it
        c = _to_f32(tl.load(center_ptr + (idx // inner) % channels, mask=valid, other=0.0))
        x = _round_through(x - c, DIFF, NAN_BF16)
    return x, valid


@triton.jit
def _chunk_bounds(x, valid):
    """Per row: min and max of the real non-NaN elements (+inf / -inf if none), and
    the number of NaN among them."""
    real = valid & (x == x)
    lo = tl.min(tl.where(real, x, float("inf")), axis=1)
    hi = tl.max(tl.where(real, x, float("-inf")), axis=1)
    return lo, hi, tl.sum((valid & (x != x)).to(tl.int32), axis=1)


@triton.jit
def _scale(lo, hi, nans, BITS: tl.constexpr, NAN_BF16: tl.constexpr):
    """(lo, hi) bfloat16 patterns of the float32 bounds, rounded outwards, and the
    float32 (lo, step) the codes are computed with."""
    lo = tl.where(lo == 0.0, 0.0, lo)  # a zero bound is +0
    hi = tl.where(hi == 0.0, 0.0, hi)
    lo_b = _f32_to_bf16(lo, NAN_BF16)
    hi_b = _f32_to_bf16(hi, NAN_BF16)
    lo_b = tl.where(bf16_to_f32(lo_b) > lo, _bf16_next(lo_b, True), lo_b)  # rounded inwards: step out
    hi_b = tl.where(bf16_to_f32(hi_b) < hi, _bf16_next(hi_b, False), hi_b)
    lo_b = tl.where(nans > 0, NAN_BF16, lo_b)
    hi_b = tl.where(nans > 0, NAN_BF16, hi_b)
    lo_f = bf16_to_f32(lo_b)
    step = tl.div_rn(bf16_to_f32(hi_b) - lo_f, (1 << BITS) - 1)
    return lo_b, hi_b, lo_f, step


@triton.jit
def _mix32(x):
    """The 32-bit hash of ``torch_quantize_group``'s stochastic rounding (uint32 ``x``)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _stochastic_level(t, idx, key, BITS: tl.constexpr):
    """int32 ``min(floor(clamp(t) + u), 2**BITS - 1)`` with ``u`` the noise of the flat
    element indices ``idx`` under ``key`` (NaN to 0, as ``_level``)."""
    TOP: tl.constexpr = (1 << BITS) - 1
    t = tl.where(t >= 0.0, t, 0.0)
    t = tl.where(t < TOP, t, TOP * 1.0)
    h = _mix32(key ^ idx.to(tl.uint32))
    u = (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    q = (t + u).to(tl.int32)  # truncation: the floor of a non-negative sum
    return tl.minimum(q, TOP)


@triton.jit
def _encode_chunk(x, valid, lo, step, codes_ptr, nbytes, rows, row_ok, c0, key, GROUP: tl.constexpr,
                  BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store the codes of the (ROWS, BLOCK) chunk ``c0 ..`` of groups ``rows``."""
    t = tl.div_rn(x - lo[:, None], step[:, None])
    t = tl.where((step == 0.0)[:, None], 0.0, t)  # a constant group: code 0
    if STOCHASTIC:
        idx = rows.to(tl.int64)[:, None] * GROUP + (c0 + tl.arange(0, BLOCK))[None, :]
        q = tl.where(valid, _stochastic_level(t, idx, key, BITS), 0)
    else:
        q = tl.where(valid, _level(t, BITS), 0)  # the padding's codes are 0
    word = c0 // 8 + tl.arange(0, BLOCK // 8)
    byte0 = rows.to(tl.int64)[:, None] * (GROUP * BITS // 8) + (word * BITS)[None, :]
    ok = row_ok[:, None] & (word * 8 < GROUP)[None, :]
    WORDS: tl.constexpr = ROWS * BLOCK // 8
    _store_words(codes_ptr, tl.reshape(q, (WORDS, 8)), tl.reshape(byte0, (WORDS, )), tl.reshape(ok, (WORDS, )),
                 nbytes, BITS)


@_jit_kernel
def _quantize_group_kernel(
    x_ptr,  # input (fp32 / bf16 / fp16), read through the 4-d view below
    center_ptr,  # (channels,) fp32 / bf16 / fp16, subtracted per index of dim 1 (CENTERED)
    seed_ptr,  # (1,) int64: the seed of stochastic rounding (STOCHASTIC)
    codes_ptr,  # (num_groups * GROUP * BITS / 8,) uint8 out
    bounds_ptr,  # (2 * num_groups,) int16 out: the bfloat16 patterns lo, hi of every group
    numel,
    num_groups,
    nbytes,  # bytes of codes
    size1, size2, size3,  # the input as a 4-d view (size0 follows from numel)
    stride0, stride1, stride2, stride3,
    inner,  # elements per index of dim 1 (CENTERED): element i's channel is (i // inner) % channels
    channels,
    GROUP: tl.constexpr,  # elements per group, a positive multiple of 8
    BITS: tl.constexpr,  # bits per code: 2, 3, 4 or 8
    ROWS: tl.constexpr,  # groups per program
    BLOCK: tl.constexpr,  # elements of a group per chunk (a power of two >= 8)
    CONTIGUOUS: tl.constexpr,  # the input is contiguous: offsets are positions
    CENTERED: tl.constexpr,  # quantize x - center
    DIFF: tl.constexpr,  # the dtype x - center rounds to: 0 fp32, 1 bf16, 2 fp16
    NAN_BF16: tl.constexpr,  # the bfloat16 NaN pattern of torch's conversion on this device
    STOCHASTIC: tl.constexpr,  # round stochastically, keyed by the seed
):
    """Bounds and codes of ROWS groups (the rule of ``torch_quantize_group``)."""
    key = tl.full((), 0, tl.uint32)
    if STOCHASTIC:
        key = _mix32(tl.load(seed_ptr).to(tl.uint32))  # the seed's low 32 bits
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    start = rows.to(tl.int64) * GROUP
    if GROUP <= BLOCK:  # the whole group in registers: read once
        x, valid = _group_chunk(x_ptr, center_ptr, start, row_ok, 0, numel, size1, size2, size3, stride0, stride1,
                                stride2, stride3, inner, channels, GROUP, BLOCK, CONTIGUOUS, CENTERED, DIFF, NAN_BF16)
        lo, hi, nans = _chunk_bounds(x, valid)
        lo_b, hi_b, lo_f, step = _scale(lo, hi, nans, BITS, NAN_BF16)
        _encode_chunk(x, valid, lo_f, step, codes_ptr, nbytes, rows, row_ok, 0, key, GROUP, BITS, ROWS, BLOCK,
                      STOCHASTIC)
    else:  # chunk by chunk: the bounds, then the codes
        lo = tl.full((ROWS, ), float("inf"), tl.float32)
        hi = tl.full((ROWS, ), float("-inf"), tl.float32)
        nans = tl.zeros((ROWS, ), tl.int32)
        for c0 in range(0, GROUP, BLOCK):
            x, valid = _group_chunk(x_ptr, center_ptr, start, row_ok, c0, numel, size1, size2, size3, stride0,
                                    stride1, stride2, stride3, inner, channels, GROUP, BLOCK, CONTIGUOUS, CENTERED,
                                    DIFF, NAN_BF16)
            c_lo, c_hi, c_nans = _chunk_bounds(x, valid)
            lo = tl.minimum(lo, c_lo)
            hi = tl.maximum(hi, c_hi)
            nans += c_nans
        lo_b, hi_b, lo_f, step = _scale(lo, hi, nans, BITS, NAN_BF16)
        for c0 in range(0, GROUP, BLOCK):
            x, valid = _group_chunk(x_ptr, center_ptr, start, row_ok, c0, numel, size1, size2, size3, stride0,
                                    stride1, stride2, stride3, inner, channels, GROUP, BLOCK, CONTIGUOUS, CENTERED,
                                    DIFF, NAN_BF16)
            _encode_chunk(x, valid, lo_f, step, codes_ptr, nbytes, rows, row_ok, c0, key, GROUP, BITS, ROWS, BLOCK,
                          STOCHASTIC)
    tl.store(bounds_ptr + 2 * rows, lo_b.to(tl.int16), mask=row_ok)
    tl.store(bounds_ptr + 2 * rows + 1, hi_b.to(tl.int16), mask=row_ok)


@_jit_kernel
def _dequantize_group_kernel(
    codes_ptr,  # (num_groups * GROUP * BITS / 8,) uint8
    bounds_ptr,  # (2 * num_groups,) int16: the bfloat16 patterns lo, hi of every group
    out_ptr,  # (numel,) fp32 / bf16 / fp16 out
    numel,
    num_groups,
    nbytes,  # bytes of codes
    GROUP: tl.constexpr,  # elements per group, a positive multiple of 8
    BITS: tl.constexpr,  # bits per code: 2, 3, 4 or 8
    ROWS: tl.constexpr,  # groups per program
    BLOCK: tl.constexpr,  # elements of a group per chunk (a power of two >= 8)
    NAN_BF16: tl.constexpr,  # the bfloat16 NaN pattern of torch's conversion on this device
):
    """Decoded values of ROWS groups: ``q * step + lo``, NaN for a non-finite bound."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    lo_b = tl.load(bounds_ptr + 2 * rows, mask=row_ok, other=0)
    hi_b = tl.load(bounds_ptr + 2 * rows + 1, mask=row_ok, other=0)
    lo = bf16_to_f32(lo_b)
    step = tl.div_rn(bf16_to_f32(hi_b) - lo, (1 << BITS) - 1)
    finite = ((lo_b & 0x7F80) != 0x7F80) & ((hi_b & 0x7F80) != 0x7F80)  # exponent not all ones
    nan = tl.full((ROWS, BLOCK), 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)  # math.nan, as torch writes it
    WORDS: tl.constexpr = ROWS * BLOCK // 8
    for c0 in range(0, GROUP, BLOCK):
        word = c0 // 8 + tl.arange(0, BLOCK // 8)
        byte0 = rows.to(tl.int64)[:, None] * (GROUP * BITS // 8) + (word * BITS)[None, :]
        ok = row_ok[:, None] & (word * 8 < GROUP)[None, :]
        q = _load_words(codes_ptr, tl.reshape(byte0, (WORDS, )), tl.reshape(ok, (WORDS, )), nbytes, BITS)
        vals = tl.reshape(q, (ROWS, BLOCK)).to(tl.float32) * step[:, None] + lo[:, None]  # no fma: see _launch
        vals = tl.where(finite[:, None], vals, nan)
        col = c0 + tl.arange(0, BLOCK)
        idx = rows.to(tl.int64)[:, None] * GROUP + col[None, :]
        keep = row_ok[:, None] & (col < GROUP)[None, :] & (idx < numel)
        tl.store(out_ptr + idx, _from_f32(vals, out_ptr.dtype.element_ty, NAN_BF16), mask=keep)


# ------------------------------------------------------------------- fixed range
@_jit_kernel
def _quantize_uniform_kernel(
    x_ptr,  # input (fp32 / bf16 / fp16), read through the 4-d view below
    codes_ptr,  # (ceil(numel * BITS / 8),) uint8 out
    numel,
    nbytes,  # bytes of codes
    lo,  # float32(lo)
    step,  # float32((hi - lo) / (2**BITS - 1))
    size1, size2, size3,  # the input as a 4-d view (size0 follows from numel)
    stride0, stride1, stride2, stride3,
    BITS: tl.constexpr,  # bits per code: 2, 3, 4 or 8
    WORDS: tl.constexpr,  # words of eight codes per program (a power of two)
    CONTIGUOUS: tl.constexpr,  # the input is contiguous: offsets are positions
):
    """Codes of WORDS * 8 elements (the rule of ``torch_quantize_uniform``)."""
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    idx = word[:, None] * 8 + tl.arange(0, 8)[None, :]
    valid = idx < numel
    offs = _offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3, CONTIGUOUS)
    x = _to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0))
    q = tl.where(valid, _level(tl.div_rn(x - lo, step), BITS), 0)  # the padding's codes are 0
    _store_words(codes_ptr, q, word * BITS, word * 8 < numel, nbytes, BITS)


@_jit_kernel
def _dequantize_uniform_kernel(
    codes_ptr,  # (ceil(numel * BITS / 8),) uint8
    out_ptr,  # (numel,) fp32 / bf16 / fp16 out
    numel,
    nbytes,  # bytes of codes
    lo,  # float32(lo)
    step,  # float32((hi - lo) / (2**BITS - 1))
    BITS: tl.constexpr,  # bits per code: 2, 3, 4 or 8
    WORDS: tl.constexpr,  # words of eight codes per program (a power of two)
    NAN_BF16: tl.constexpr,  # the bfloat16 NaN pattern of torch's conversion on this device
):
    """Decoded values ``q * step + lo`` of WORDS * 8 elements."""
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    q = _load_words(codes_ptr, word * BITS, word * 8 < numel, nbytes, BITS)
    vals = q.to(tl.float32) * step + lo  # no fma: see _launch
    idx = word[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out_ptr + idx, _from_f32(vals, out_ptr.dtype.element_ty, NAN_BF16), mask=idx < numel)


# --------------------------------------------------------------------------- launchers
# The compile options of every launch: no multiply and add contracted into an fma (the
# PyTorch kernel rounds both; the interpreter ignores the option).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _launch(kernel, grid, *args, **meta):
    return kernel[grid](*args, **LAUNCH_OPTIONS, **meta)


def _num_warps(elems: int) -> int:
    return 4 if elems <= 2048 else 8


def _view4(x: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, bool]:
    """``(x, (size1, size2, size3), (stride0, .., stride3), contiguous)``: ``x`` read in
    its logical order through a 4-d view of its merged dims (no copy), or a contiguous
    copy when more than four dims remain after merging."""
    if x.is_contiguous():
        return x, (1, 1, 1), (0, 0, 0, 1), True
    dims: list[tuple[int, int]] = []  # (size, stride), outermost first, neighbours merged
    for size, stride in zip(x.shape, x.stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 4:
        return x.contiguous(), (1, 1, 1), (0, 0, 0, 1), True
    dims = [(1, 0)] * (4 - len(dims)) + dims
    return x, tuple(s for s, _ in dims[1:]), tuple(t for _, t in dims), False


def _group_config(group_size: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of the per-group kernels: a function of the group size alone, so
    that a new tensor size never compiles a kernel again."""
    block = min(triton.next_power_of_2(group_size), MAX_BLOCK)
    return max(1, _PROGRAM_ELEMS // block), block


def _f32(v: float) -> float:
    """``v`` rounded to float32 (as a float32 tensor op takes a Python number)."""
    return torch.tensor(v, dtype=torch.float32).item()


def _check(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    check_dtype(dtype, _DTYPES, what)
    check_device(t)


def triton_quantize_group(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, bounds)`` of ``x``; same contract as ``torch_quantize_group``."""
    return _quantize_group(x, None, group_size, bits)


def triton_quantize_group_stochastic(x: torch.Tensor, seed: torch.Tensor, group_size: int,
                                     bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, bounds)`` of ``x`` rounded stochastically under ``seed`` (an int64 tensor
    of one element, read by the kernel: no host synchronization); same contract as
    ``torch_quantize_group(x, group_size, bits, seed)``."""
    check_stochastic("quantize_group_stochastic", x, seed)
    return _quantize_group(x, None, group_size, bits, seed.reshape(1).to(x.device))


def triton_quantize_group_centered(x: torch.Tensor, center: torch.Tensor, group_size: int,
                                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, bounds)`` of ``x - center`` (``center`` along dim 1, subtracted in the
    promoted dtype as ``x - center.view(1, -1, 1, ..)`` is), without materializing it."""
    if x.dim() < 2 or center.numel() != x.shape[1]:
        raise ValueError(f"quantize_group_centered: the center needs x.shape[1] elements (x of 2+ dims), got "
                         f"x of shape {tuple(x.shape)} and a center of {center.numel()}")
    check_dtype(center.dtype, _DTYPES, "centers")
    return _quantize_group(x, center, group_size, bits)


def _quantize_group(x: torch.Tensor, center: torch.Tensor | None, group_size: int, bits: int,
                    seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_group_args("quantize_group", group_size, bits)
    _check(x, x.dtype, "inputs")
    n = x.numel()
    (nbytes,), (nbounds,) = group_quantized_shapes(n, group_size, bits)
    groups = nbounds // 2
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    bounds = torch.empty(nbounds, dtype=torch.bfloat16, device=x.device)
    if groups == 0:
        return codes, bounds
    view, sizes, strides, contiguous = _view4(x.detach())
    centered = center is not None
    if not centered:
        center, inner, channels, diff = view, 1, 1, 0  # center_ptr unused
    else:
        center = center.detach().reshape(-1).contiguous()
        channels = x.shape[1]
        inner, diff = n // (x.shape[0] * channels), _DIFF_CODES[torch.promote_types(x.dtype, center.dtype)]
    rows, block = _group_config(group_size)
    with on_device_of(x):
        _launch(_quantize_group_kernel, (triton.cdiv(groups, rows), ), view, center,
                codes if seed is None else seed, codes, bounds.view(torch.int16),
                n, groups, nbytes, *sizes, *strides, inner, channels, GROUP=group_size, BITS=bits, ROWS=rows,
                BLOCK=block, CONTIGUOUS=contiguous, CENTERED=centered, DIFF=diff, NAN_BF16=_BF16_NAN[x.device.type],
                STOCHASTIC=seed is not None, num_warps=_num_warps(rows * block))
    return codes, bounds


def triton_dequantize_group(codes: torch.Tensor, bounds: torch.Tensor, shape: list[int], group_size: int, bits: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that ``(codes, bounds)`` encode."""
    check_group_shapes("dequantize_group", codes, bounds, shape, group_size, bits)
    _check(codes, dtype, "output dtypes")
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    groups = bounds.numel() // 2
    if n == 0:
        return out.view(shape)
    rows, block = _group_config(group_size)
    with on_device_of(codes):
        _launch(_dequantize_group_kernel, (triton.cdiv(groups, rows), ), codes.contiguous(),
                bounds.contiguous().view(torch.int16), out, n, groups, codes.numel(), GROUP=group_size, BITS=bits, ROWS=rows,
                BLOCK=block, NAN_BF16=_BF16_NAN[codes.device.type], num_warps=_num_warps(rows * block))
    return out.view(shape)


def triton_quantize_uniform(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Codes of ``x``; same contract as ``torch_quantize_uniform``."""
    check_args("quantize_uniform", bits, lo, hi)
    _check(x, x.dtype, "inputs")
    n = x.numel()
    codes = torch.empty(quantized_numel(n, bits), dtype=torch.uint8, device=x.device)
    if n == 0:
        return codes
    view, sizes, strides, contiguous = _view4(x.detach())
    with on_device_of(x):
        _launch(_quantize_uniform_kernel, (triton.cdiv(n, 8 * _WORDS), ), view, codes, n, codes.numel(), _f32(lo),
                _f32(_step(bits, lo, hi)), *sizes, *strides, BITS=bits, WORDS=_WORDS, CONTIGUOUS=contiguous,
                num_warps=_num_warps(8 * _WORDS))
    return codes


def triton_dequantize_uniform(codes: torch.Tensor, shape: list[int], bits: int, lo: float, hi: float,
                              dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that ``codes`` encode."""
    check_uniform_codes("dequantize_uniform", codes, shape, bits, lo, hi)
    _check(codes, dtype, "output dtypes")
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n == 0:
        return out.view(shape)
    with on_device_of(codes):
        _launch(_dequantize_uniform_kernel, (triton.cdiv(n, 8 * _WORDS), ), codes.contiguous(), out, n,
                codes.numel(), _f32(lo), _f32(_step(bits, lo, hi)), BITS=bits, WORDS=_WORDS,
                NAN_BF16=_BF16_NAN[codes.device.type], num_warps=_num_warps(8 * _WORDS))
    return out.view(shape)


# ----------------------------------------------------------------------- normal codebook
# ``quantize.py`` ("normal codebook") defines rule and layout. A program holds ROWS whole
# groups in registers (BLOCK = the group size's power of two, with no cap: a group of
# more than MAX_BLOCK elements spills registers on a GPU; the defaults' groups are far
# smaller). Beyond (a)-(e) above: the mean and the deviation are float64 sums in the
# order of ``tl.sum`` (where that order can change a mean: ``quantize.py``, ``mu``), the
# square root is float64's ``tl.sqrt`` (``sqrt.rn.f64``), the outliers are two
# ``tl.argmax`` (ties to the lower offset) and their values are read back from memory,
# the decoded NaN of a non-finite group is float32's. A NaN mean or deviation is written as ``NAN_BF16``; torch's float64 ->
# bfloat16 conversion gives 0x7FC0 or 0xFFFF by the NaN's sign: either only marks the
# group as non-finite, which decodes to NaN whatever the pattern.
@triton.jit
def _normal_rows(x_ptr, rows, row_ok, numel, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """float32 (ROWS, BLOCK) of groups ``rows`` (the last group padded with the last
    element, columns past GROUP unused) and the columns."""
    col = tl.arange(0, BLOCK)
    idx = rows.to(tl.int64)[:, None] * GROUP + col[None, :]
    ok = row_ok[:, None] & (col < GROUP)[None, :]
    pos = tl.minimum(idx, numel - 1)  # padding repeats the last element
    return _to_f32(tl.load(x_ptr + pos, mask=ok, other=0.0)), col


@_jit_kernel
def _quantize_normal_kernel(
    x_ptr,  # contiguous input (fp32 / bf16 / fp16)
    thresholds_ptr,  # (2**BITS - 1,) fp32: the midpoints of the levels
    codes_ptr,  # (num_groups * GROUP * BITS / 8,) uint8 out
    stats_ptr,  # (2 * num_groups,) int16 out: the bfloat16 patterns mu, sigma of every group
    offsets_ptr,  # (num_groups, 2) uint8 / int16 out
    values_ptr,  # (num_groups, 2) int16 out: bfloat16 patterns
    numel,
    num_groups,
    nbytes,  # bytes of codes
    GROUP: tl.constexpr,  # elements per group, a multiple of 8 above 2
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # groups per program
    BLOCK: tl.constexpr,  # the power of two >= GROUP
    NAN_BF16: tl.constexpr,  # the bfloat16 NaN pattern of torch's conversion on this device
):
    """Codes, stats and outliers of ROWS groups (the rule of ``torch_quantize_normal``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    x, col = _normal_rows(x_ptr, rows, row_ok, numel, GROUP, BLOCK)
    inside = (col < GROUP)[None, :]
    mean = tl.sum(tl.where(inside, x.to(tl.float64), 0.0), axis=1) / GROUP
    mu_b = _f32_to_bf16(mean.to(tl.float32), NAN_BF16)
    mu = bf16_to_f32(mu_b)
    d = x - mu[:, None]
    far = tl.where(d != d, float("inf"), tl.abs(d))
    far = tl.where(inside, far, -2.0)  # never picked
    first = tl.argmax(far, axis=1, tie_break_left=True)
    far = tl.where(col[None, :] == first[:, None], -1.0, far)
    second = tl.argmax(far, axis=1, tie_break_left=True)
    kept = inside & (col[None, :] != first[:, None]) & (col[None, :] != second[:, None])
    dd = d.to(tl.float64)
    var = tl.sum(tl.where(kept, dd * dd, 0.0), axis=1) / (GROUP - 2)
    sigma_b = _f32_to_bf16(tl.sqrt(var).to(tl.float32), NAN_BF16)  # float64: sqrt.rn.f64
    sigma = bf16_to_f32(sigma_b)
    z = tl.div_rn(d, tl.where(sigma == 0.0, 1.0, sigma)[:, None])
    z = tl.where((sigma == 0.0)[:, None], 0.0, z)
    q = tl.zeros((ROWS, BLOCK), tl.int32)
    for j in tl.static_range((1 << BITS) - 1):
        q += (tl.load(thresholds_ptr + j) < z).to(tl.int32)  # NaN compares false: code 0
    q = tl.where(inside, q, 0)
    word = tl.arange(0, BLOCK // 8)
    byte0 = rows.to(tl.int64)[:, None] * (GROUP * BITS // 8) + (word * BITS)[None, :]
    ok = row_ok[:, None] & (word * 8 < GROUP)[None, :]
    WORDS: tl.constexpr = ROWS * BLOCK // 8
    _store_words(codes_ptr, tl.reshape(q, (WORDS, 8)), tl.reshape(byte0, (WORDS, )), tl.reshape(ok, (WORDS, )),
                 nbytes, BITS)
    tl.store(stats_ptr + 2 * rows, mu_b.to(tl.int16), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, sigma_b.to(tl.int16), mask=row_ok)
    for k in tl.static_range(2):
        at = first if k == 0 else second
        v = _to_f32(tl.load(x_ptr + tl.minimum(rows.to(tl.int64) * GROUP + at, numel - 1), mask=row_ok, other=0.0))
        tl.store(offsets_ptr + 2 * rows + k, at.to(offsets_ptr.dtype.element_ty), mask=row_ok)
        tl.store(values_ptr + 2 * rows + k, _f32_to_bf16(v, NAN_BF16).to(tl.int16), mask=row_ok)


@_jit_kernel
def _dequantize_normal_kernel(
    codes_ptr,  # (num_groups * GROUP * BITS / 8,) uint8
    stats_ptr,  # (2 * num_groups,) int16: bfloat16 patterns mu, sigma
    offsets_ptr,  # (num_groups, 2) uint8 / int16
    values_ptr,  # (num_groups, 2) int16: bfloat16 patterns
    levels_ptr,  # (2**BITS,) fp32
    out_ptr,  # (numel,) fp32 / bf16 / fp16 out
    numel,
    num_groups,
    nbytes,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    NAN_BF16: tl.constexpr,
):
    """Decoded values of ROWS groups (the rule of ``torch_dequantize_normal``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    word = tl.arange(0, BLOCK // 8)
    byte0 = rows.to(tl.int64)[:, None] * (GROUP * BITS // 8) + (word * BITS)[None, :]
    ok = row_ok[:, None] & (word * 8 < GROUP)[None, :]
    WORDS: tl.constexpr = ROWS * BLOCK // 8
    q = tl.reshape(_load_words(codes_ptr, tl.reshape(byte0, (WORDS, )), tl.reshape(ok, (WORDS, )), nbytes, BITS),
                   (ROWS, BLOCK))
    mu_b = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0)
    sigma_b = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0)
    mu, sigma = bf16_to_f32(mu_b), bf16_to_f32(sigma_b)
    vals = tl.load(levels_ptr + q) * sigma[:, None] + mu[:, None]  # no fma: see _launch
    col = tl.arange(0, BLOCK)
    for k in tl.static_range(2):
        at = tl.load(offsets_ptr + 2 * rows + k, mask=row_ok, other=0).to(tl.int32)
        v = bf16_to_f32(tl.load(values_ptr + 2 * rows + k, mask=row_ok, other=0))
        vals = tl.where(col[None, :] == at[:, None], v[:, None], vals)
    finite = ((mu_b & 0x7F80) != 0x7F80) & ((sigma_b & 0x7F80) != 0x7F80)
    vals = tl.where(finite[:, None], vals, float("nan"))
    idx = rows.to(tl.int64)[:, None] * GROUP + col[None, :]
    keep = row_ok[:, None] & (col < GROUP)[None, :] & (idx < numel)
    tl.store(out_ptr + idx, _from_f32(vals, out_ptr.dtype.element_ty, NAN_BF16), mask=keep)


def _normal_config(group_size: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of the normal-codebook kernels: whole groups per program."""
    block = triton.next_power_of_2(group_size)
    return max(1, _PROGRAM_ELEMS // block), block


def triton_quantize_normal(x: torch.Tensor, group_size: int, bits: int):
    """``(codes, stats, offsets, values)`` of ``x``; same contract as ``torch_quantize_normal``."""
    check_normal_args("quantize_normal", group_size, bits)
    _check(x, x.dtype, "inputs")
    n = x.numel()
    (nbytes,), (nstats,), (groups, m), odt = normal_shapes(n, group_size, bits)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    stats = torch.empty(nstats, dtype=torch.bfloat16, device=x.device)
    offsets = torch.empty(groups, m, dtype=odt, device=x.device)
    values = torch.empty(groups, m, dtype=torch.bfloat16, device=x.device)
    if groups == 0:
        return codes, stats, offsets, values
    _, thresholds = normal_levels(bits, x.device)
    rows, block = _normal_config(group_size)
    with on_device_of(x):
        _launch(_quantize_normal_kernel, (triton.cdiv(groups, rows), ), x.detach().contiguous(), thresholds, codes,
                stats.view(torch.int16), offsets, values.view(torch.int16), n, groups, nbytes, GROUP=group_size,
                BITS=bits, ROWS=rows, BLOCK=block, NAN_BF16=_BF16_NAN[x.device.type],
                num_warps=_num_warps(rows * block))
    return codes, stats, offsets, values


def triton_dequantize_normal(codes: torch.Tensor, stats: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                             shape: list[int], group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that the four parts encode."""
    check_normal_parts("dequantize_normal", codes, stats, offsets, values, shape, group_size, bits)
    _check(codes, dtype, "output dtypes")
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n == 0:
        return out.view(shape)
    groups = stats.numel() // 2
    levels, _ = normal_levels(bits, codes.device)
    rows, block = _normal_config(group_size)
    with on_device_of(codes):
        _launch(_dequantize_normal_kernel, (triton.cdiv(groups, rows), ), codes.contiguous(),
                stats.contiguous().view(torch.int16), offsets.contiguous(), values.contiguous().view(torch.int16),
                levels, out, n, groups, codes.numel(), GROUP=group_size, BITS=bits, ROWS=rows, BLOCK=block,
                NAN_BF16=_BF16_NAN[codes.device.type], num_warps=_num_warps(rows * block))
    return out.view(shape)
