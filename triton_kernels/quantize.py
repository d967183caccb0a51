"""Uniform scalar quantization to a few bits: the PyTorch kernel (every device) and the
reference the ``razor::quantize_uniform`` / ``razor::dequantize_uniform`` ops run.

Rule (``bits`` in {2, 3, 4, 8}, ``L = 2**bits`` levels on ``[lo, hi]``):

* ``step = (hi - lo) / (L - 1)`` (a Python float);
* code ``q = clamp(round((float32(x) - lo) / step), 0, L - 1)``: the input is cast to
  float32 first (whatever its dtype), ``torch.round`` rounds half to even, values
  outside ``[lo, hi]`` clamp to the end levels, NaN gives code 0;
* decoded value ``float32(q) * step + lo``, cast to the requested dtype.

All arithmetic is float32 on ``float32(lo)`` and ``float32(step)``, one IEEE rounding
per operation: a true division (never a multiply by the reciprocal), the product and
the sum rounded separately (no fused multiply-add). The native and Triton kernels
compute the same operations.

Layout: one little-endian bit stream over the flattened (logical, row-major) order:
element ``i``'s code occupies stream bits ``[bits*i, bits*i + bits)``, stream bit
``8*j + b`` is bit ``b`` of byte ``j``. The codes take ``ceil(numel * bits / 8)`` uint8
bytes (1-D); the padding bits of the last byte are 0. For bits 2, 4 and 8 every byte
holds 4, 2 or 1 whole codes (low bits first); for 3 bits eight codes fill three bytes
and codes straddle bytes. Static shape: a function of ``numel`` and ``bits`` only.

Both functions process a bounded number of elements at a time, so temporaries stay
within ``_CHUNK_ELEMS`` elements (int64) regardless of the tensor's size.
"""

from __future__ import annotations

import math

import torch

# The range [lo, hi] of gelu'(x) per ``approximate`` mode, the codebook of the derivN
# encodings. gelu'(-x) = 1 - gelu'(x), so lo = -c and hi = 1 + c. Exact GELU:
# gelu''(x) = phi(x) (2 - x^2), extrema at x = -+sqrt(2), where gelu'(-sqrt(2)) =
# 1 - Phi(sqrt(2)) - sqrt(2) phi(sqrt(2)) = -0.1289041452. The tanh approximation has no
# closed form: golden-section search in float64 on its derivative gives extrema at
# x = -+1.418504, value -0.1289930687. The constants are rounded outwards at the 6th
# decimal, so that aten's float32 gelu_backward (off by up to 3e-8 near the extrema)
# stays inside them; bfloat16 values beyond them clamp to the end levels.
GELU_DERIVATIVE_RANGE: dict[str, tuple[float, float]] = {
    "none": (-0.128905, 1.128905),
    "tanh": (-0.128994, 1.128994),
}

__all__ = ["GELU_DERIVATIVE_RANGE", "torch_quantize_uniform", "torch_dequantize_uniform", "quantized_numel", "QUANT_BITS", "check_args",
           "check_uniform_codes"]

QUANT_BITS = (2, 3, 4, 8)

# Elements per chunk; a multiple of 8 so that every chunk starts on a byte boundary.
_CHUNK_ELEMS = 1 << 20


def quantized_numel(numel, bits: int):
    """Bytes of ``numel`` codes of ``bits`` bits; ceil-div only (SymInt-safe)."""
    return (numel * bits + 7) // 8


def check_args(op: str, bits: int, lo: float, hi: float) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"{op}: bits must be one of {QUANT_BITS}, got {bits!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{op}: need finite lo < hi, got lo={lo!r}, hi={hi!r}")


def check_uniform_codes(op: str, codes: torch.Tensor, shape, bits: int, lo: float, hi: float) -> None:
    """Refuse codes that do not encode ``shape`` at ``bits`` (before any kernel reads them)."""
    check_args(op, bits, lo, hi)
    n = math.prod(shape)
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != quantized_numel(n, bits):
        raise ValueError(
            f"{op}: expects {quantized_numel(n, bits)} uint8 bytes for shape {list(shape)} at "
            f"{bits} bits, got {codes.dtype} of shape {tuple(codes.shape)}"
        )


def _step(bits: int, lo: float, hi: float) -> float:
    return (hi - lo) / ((1 << bits) - 1)


def _divisor(value: float, device) -> torch.Tensor:
    """``value`` as a float32 0-dim tensor on ``device``, to divide by. aten's CUDA kernel
    multiplies by the reciprocal of a Python-number divisor (one rounding more than the
    division it stands for); a device tensor divides, on every device."""
    return torch.full((), value, dtype=torch.float32, device=device)


def _codes(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """The int64 code of every element of a flat tensor (the rule above)."""
    t = (x.to(torch.float32) - lo) / _divisor(_step(bits, lo, hi), x.device)
    t = torch.where(torch.isnan(t), torch.zeros((), dtype=t.dtype, device=t.device), t)
    return torch.round(t).clamp_(0, (1 << bits) - 1).to(torch.int64)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int64 codes (a multiple of 8 of them) into ``len * bits / 8`` bytes."""
    if bits == 8:
        return codes.to(torch.uint8)
    groups = codes.view(-1, 8)  # eight codes = one word of 8 * bits <= 32 bits
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)  # disjoint bit ranges: the sum is the bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes of whole bytes (a multiple of ``bits`` of them): the inverse of ``_pack``."""
    if bits == 8:
        return packed.to(torch.int64)
    groups = packed.to(torch.int64).view(-1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def torch_quantize_uniform(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Codes of ``x`` (see the module docstring): ``ceil(numel * bits / 8)`` uint8 bytes."""
    check_args("quantize_uniform", bits, lo, hi)
    flat = x.detach().reshape(-1)  # logical order, whatever the strides
    n = flat.numel()
    out = torch.empty(quantized_numel(n, bits), dtype=torch.uint8, device=x.device)
    for e0 in range(0, n, _CHUNK_ELEMS):
        e1 = min(n, e0 + _CHUNK_ELEMS)
        codes = _codes(flat[e0:e1], bits, lo, hi)
        pad = -(e1 - e0) % 8
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        b0 = e0 * bits // 8  # chunks start on a byte boundary (e0 is a multiple of 8)
        out[b0:quantized_numel(e1, bits)] = _pack(codes, bits)[: quantized_numel(e1 - e0, bits)]
    return out


def torch_dequantize_uniform(codes: torch.Tensor, shape: list[int], bits: int, lo: float, hi: float,
                             dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that ``codes`` encode."""
    check_uniform_codes("dequantize_uniform", codes, shape, bits, lo, hi)
    n = math.prod(shape)
    step = _step(bits, lo, hi)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    for e0 in range(0, n, _CHUNK_ELEMS):
        e1 = min(n, e0 + _CHUNK_ELEMS)
        b0, b1 = e0 * bits // 8, quantized_numel(e1, bits)
        chunk = codes[b0:b1]
        pad = -chunk.numel() % bits  # whole groups of eight codes
        if pad:
            chunk = torch.cat([chunk, chunk.new_zeros(pad)])
        q = _unpack(chunk, bits)[: e1 - e0]
        out[e0:e1] = (q.to(torch.float32) * step + lo).to(dtype)
    return out.view(shape)


# ---------------------------------------------------------------- per-group quantization
# ``razor::quantize_group`` / ``razor::dequantize_group``: every ``group_size``
# consecutive elements of the flattened (logical, row-major) tensor share one uniform
# codebook of ``L = 2**bits`` levels on their own range:
#
# * bounds: ``lo`` = min, ``hi`` = max of the group's elements (the padding of the last
#   group is not an element), stored as bfloat16 rounded *outwards* (``lo`` down,
#   ``hi`` up: the nearest bfloat16, stepped once with ``nextafter`` when rounding went
#   inwards), so that every element lies in ``[lo, hi]``; a zero bound is +0 (which of a
#   -0 and a +0 a min keeps depends on the order a kernel visits them);
# * ``step = (float32(hi) - float32(lo)) / (L - 1)``; code ``q = clamp(round((float32(x)
#   - lo) / step), 0, L - 1)`` (round half to even; code 0 when ``step`` is 0 or the
#   quotient is NaN); decoded value ``float32(q) * step + lo``, cast to the dtype;
# * a group with a non-finite bound (a NaN, an infinity, or a value beyond bfloat16's
#   range) decodes to NaN everywhere: a non-finite activation is never turned into a
#   finite one.
#
# Layout: ``codes`` is the bit stream of ``quantize_uniform`` over ``groups * group_size``
# codes (the padding's codes are 0), ``groups * group_size * bits / 8`` uint8 bytes;
# ``bounds`` is a flat bfloat16 tensor of ``2 * groups`` values, ``lo, hi`` of group 0,
# then of group 1, ... (flat rather than ``(groups, 2)``: a dimension that may be 1 makes
# the compiler specialize a dynamic batch on it). ``group_size`` is
# a positive multiple of 8, so every group owns whole bytes. Static shapes: a function of
# ``numel``, ``group_size`` and ``bits`` only.

GROUP_BITS = (2, 3, 4, 8)

__all__ += ["GROUP_BITS", "torch_quantize_group", "torch_dequantize_group", "group_quantized_shapes",
            "check_group_args", "check_group_shapes"]


def check_group_args(op: str, group_size: int, bits: int) -> None:
    if bits not in GROUP_BITS:
        raise ValueError(f"{op}: bits must be one of {GROUP_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ValueError(f"{op}: group_size must be a positive multiple of 8, got {group_size!r}")


def check_group_shapes(op: str, codes: torch.Tensor, bounds: torch.Tensor, shape, group_size: int,
                       bits: int) -> None:
    """Refuse codes / bounds that do not encode ``shape`` (before any kernel reads them)."""
    check_group_args(op, group_size, bits)
    (nbytes,), (nbounds,) = group_quantized_shapes(math.prod(shape), group_size, bits)
    if (codes.dtype != torch.uint8 or tuple(codes.shape) != (nbytes,) or bounds.dtype != torch.bfloat16
            or tuple(bounds.shape) != (nbounds,)):
        raise ValueError(
            f"{op}: expects {nbytes} uint8 code bytes and {nbounds} bfloat16 bounds for shape "
            f"{list(shape)}, group_size {group_size}, {bits} bits; got codes {codes.dtype} {tuple(codes.shape)}, "
            f"bounds {bounds.dtype} {tuple(bounds.shape)}"
        )


def group_quantized_shapes(numel, group_size: int, bits: int):
    """((code bytes,), (2 * groups,)): the shapes of ``codes`` and ``bounds``; SymInt-safe."""
    groups = (numel + group_size - 1) // group_size
    return (groups * (group_size * bits // 8),), (2 * groups,)


def _outward_bounds(g: torch.Tensor) -> torch.Tensor:
    """(m, 2) bfloat16 ``[lo, hi]`` of the float32 rows of ``g``, rounded outwards."""
    lo, hi = g.amin(dim=1) + 0.0, g.amax(dim=1) + 0.0  # NaN propagates; -0 + 0 is +0
    lo_b, hi_b = lo.to(torch.bfloat16), hi.to(torch.bfloat16)
    down = torch.full_like(lo_b, -math.inf)
    lo_b = torch.where(lo_b.to(torch.float32) > lo, torch.nextafter(lo_b, down), lo_b)
    hi_b = torch.where(hi_b.to(torch.float32) < hi, torch.nextafter(hi_b, -down), hi_b)
    return torch.stack([lo_b, hi_b], dim=1)


def _group_step(bounds: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) as float32 columns (m, 1) of the bfloat16 bounds."""
    b = bounds.to(torch.float32)
    lo, hi = b[:, :1], b[:, 1:]
    return lo, (hi - lo) / _divisor((1 << bits) - 1, b.device)


def torch_quantize_group(x: torch.Tensor, group_size: int, bits: int,
                         seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, bounds)`` of ``x`` (see the rule above); with a ``seed``, its levels are
    rounded stochastically (the rule below)."""
    check_group_args("quantize_group", group_size, bits)
    if seed is not None:
        check_stochastic("quantize_group_stochastic", x, seed)
        key = mix32(seed.detach().to(device=x.device, dtype=torch.int64) & _MASK32)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    (nbytes,), (nbounds,) = group_quantized_shapes(n, group_size, bits)
    groups = nbounds // 2
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    bounds = torch.empty(groups, 2, dtype=torch.bfloat16, device=x.device)
    per_chunk = max(1, _CHUNK_ELEMS // group_size)  # whole groups per chunk
    gbytes = group_size * bits // 8
    for g0 in range(0, groups, per_chunk):
        g1 = min(groups, g0 + per_chunk)
        seg = flat[g0 * group_size: min(n, g1 * group_size)].to(torch.float32)
        pad = (g1 - g0) * group_size - seg.numel()
        rows = torch.cat([seg, seg[-1:].expand(pad)]).view(g1 - g0, group_size)  # padding repeats an element
        bnd = _outward_bounds(rows)
        lo, step = _group_step(bnd, bits)
        t = (rows - lo) / step
        t = torch.where(torch.isnan(t) | (step == 0), torch.zeros((), dtype=t.dtype, device=t.device), t)
        if seed is None:
            q = torch.round(t).clamp_(0, (1 << bits) - 1).to(torch.int64)
        else:
            index = torch.arange(g0 * group_size, g1 * group_size, device=x.device).view(g1 - g0, group_size)
            q = stochastic_levels(t, uniform_noise(key, index), bits)
        if pad:
            q.view(-1)[q.numel() - pad:] = 0
        codes[g0 * gbytes: g1 * gbytes] = _pack(q.reshape(-1), bits)
        bounds[g0:g1] = bnd
    return codes, bounds.view(-1)


def torch_dequantize_group(codes: torch.Tensor, bounds: torch.Tensor, shape: list[int], group_size: int, bits: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that ``(codes, bounds)`` encode."""
    check_group_shapes("dequantize_group", codes, bounds, shape, group_size, bits)
    n = math.prod(shape)
    groups = group_quantized_shapes(n, group_size, bits)[1][0] // 2
    rows = bounds.view(groups, 2)

    def levels(q, g0, g1):
        lo, step = _group_step(rows[g0:g1], bits)
        return q.to(torch.float32) * step + lo

    return _decode_groups(codes, rows, shape, group_size, bits, dtype, levels)


def _decode_groups(codes: torch.Tensor, params: torch.Tensor, shape, group_size: int, bits: int, dtype: torch.dtype,
                   values) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` from per-group codes, chunk by chunk
    of whole groups: ``values(q, g0, g1)`` gives the float32 values (rows of ``group_size``)
    of groups ``g0 .. g1`` from their int64 codes ``q``; a group whose ``params`` (a row
    per group: bounds, or mean and deviation) are not all finite decodes to NaN."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    per_chunk = max(1, _CHUNK_ELEMS // group_size)
    gbytes = group_size * bits // 8
    for g0 in range(0, params.shape[0], per_chunk):
        g1 = min(params.shape[0], g0 + per_chunk)
        q = _unpack(codes[g0 * gbytes: g1 * gbytes], bits).view(g1 - g0, group_size)
        vals = values(q, g0, g1)
        finite = torch.isfinite(params[g0:g1].to(torch.float32)).all(dim=1, keepdim=True)
        vals = torch.where(finite, vals, torch.full((), math.nan, device=vals.device))
        e0 = g0 * group_size
        out[e0: min(n, g1 * group_size)] = vals.reshape(-1)[: min(n, g1 * group_size) - e0].to(dtype)
    return out.view(shape)


# ---------------------------------------------------------------- stochastic rounding
# ``razor::quantize_group_stochastic``: the codes, bounds and layout of
# ``quantize_group``, with each level rounded up or down at random so that the decoded
# value is an unbiased estimate of the element (ActNN's case for 2-bit codes):
#
# * ``t = (float32(x) - lo) / step`` as above (0 when the step is 0 or ``t`` is NaN),
#   clamped to ``[0, L - 1]``; code ``q = min(floor(t + u), L - 1)``, the sum rounded
#   to float32, with ``u`` in ``[0, 1)`` the noise of the element. ``floor(t + u)`` is
#   ``floor(t) + 1`` with probability ``frac(t)`` (up to the float32 rounding of the
#   sum, within 2**-20 of it below 8 levels), so ``E[q] = t``.
# * The noise is a counter-based hash of (seed, flat element index ``i``), nothing
#   stored and no pass over memory: with ``mix`` the 32-bit integer hash ``x ^= x >> 16;
#   x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16`` (products modulo
#   2**32), ``h = mix(mix(seed mod 2**32) ^ i)`` and ``u = (h >> 8) * 2**-24``, a float32
#   with 24 random bits. The seed is an int64 tensor of one element (a step draws it
#   from PyTorch's generator, so ``torch.manual_seed`` reproduces the codes); ``i`` runs
#   over the flattened tensor, which must have fewer than 2**32 elements.
#
# Same seed and tensor, same codes, on every kernel: the PyTorch kernel computes the
# 32-bit products in int64 as two 16-bit halves (no overflow), the native and Triton
# kernels in uint32.

_MASK32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x846CA68B)

__all__ += ["check_stochastic", "mix32", "uniform_noise", "stochastic_levels"]


def check_stochastic(op: str, x: torch.Tensor, seed: torch.Tensor) -> None:
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"{op}: the seed is an int64 tensor of one element, got {seed.dtype} of shape "
                         f"{tuple(seed.shape)}")
    n = x.numel()
    if isinstance(n, int) and n >= 1 << 32:  # a symbolic size is checked by the kernel that runs
        raise ValueError(f"{op}: stochastic rounding indexes elements with 32 bits; got {x.numel()} elements")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32): two products below 2**48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash ``mix`` of int64 ``x`` in [0, 2**32) (values in the same range)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX[1])
    return x ^ (x >> 16)


def uniform_noise(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float32 ``u`` in [0, 1) of the int64 element indices ``index`` for ``key =
    mix(seed mod 2**32)``."""
    h = mix32(key ^ index)
    return (h >> 8).to(torch.float32) * (2.0 ** -24)


def stochastic_levels(t: torch.Tensor, u: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ``min(floor(clamp(t, 0, L-1) + u), L-1)`` (``t`` without NaN)."""
    top = (1 << bits) - 1
    return torch.floor(t.clamp(0, top) + u).clamp_(max=top).to(torch.int64)


# ---------------------------------------------------------------- normal codebook
# ``razor::quantize_normal`` / ``razor::dequantize_normal``: every ``group_size``
# consecutive elements of the flattened tensor (the last group padded by repeating its
# last element) are coded on the Lloyd-Max levels of a unit Gaussian, shifted and
# scaled by the group's own mean and deviation, and its ``OUTLIERS`` elements farthest
# from the mean are kept apart, exactly up to bfloat16:
#
# * ``mu``: the float64 mean of the group, rounded to bfloat16 (nearest even). The
#   kernels sum in their own orders (PyTorch's cascade, the native element order,
#   Triton's tree), which give the same mean unless the group's values cancel beyond
#   float64's precision (-3e38 and 3e38 beside values near 1): there the kernels'
#   means, and so their codes, differ. The tests leave such groups out;
# * outliers: the ``OUTLIERS`` largest ``|float32(x) - float32(mu)|``, ties to the lower
#   offset (NaN counts as the largest); their offsets (uint8 below 257 elements per
#   group, else int16) and values (bfloat16, nearest even) are stored;
# * ``sigma``: the square root of the float64 mean of ``(x - mu)**2`` over the other
#   elements (the difference a float32 one, squared in float64), rounded to bfloat16;
# * code ``q`` of an element: how many of the ``2**bits - 1`` thresholds (midpoints of
#   the levels, float32) lie strictly below ``z = (float32(x) - mu) / sigma``, a float32
#   true division (``z`` NaN gives code 0, ``sigma`` 0 gives the code of 0);
# * decoded value ``float32(level[q]) * sigma + mu`` (a product, then a sum, float32),
#   the outliers' stored values put back, cast to the dtype; a group with a non-finite
#   element decodes to NaN everywhere.
#
# Layout: ``codes`` is the bit stream of ``quantize_group`` (``groups * group_size * bits
# / 8`` bytes), ``stats`` a flat bfloat16 tensor ``mu, sigma`` per group, ``offsets``
# ``(groups, OUTLIERS)`` and ``values`` ``(groups, OUTLIERS)`` bfloat16. Static shapes.

# Lloyd-Max quantizers of N(0, 1) (the levels minimizing the mean square error),
# rounded to 4 decimals: Max (1960), Table I.
NORMAL_LEVELS: dict[int, tuple[float, ...]] = {
    2: (-1.5104, -0.4528, 0.4528, 1.5104),
    3: (-2.1520, -1.3440, -0.7560, -0.2451, 0.2451, 0.7560, 1.3440, 2.1520),
    4: (-2.7326, -2.0690, -1.6180, -1.2562, -0.9423, -0.6568, -0.3881, -0.1284,
        0.1284, 0.3881, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326),
}
NORMAL_BITS = tuple(NORMAL_LEVELS)
OUTLIERS = 2  # elements per group kept apart

__all__ += ["NORMAL_LEVELS", "NORMAL_BITS", "OUTLIERS", "normal_shapes", "check_normal_args", "check_normal_parts",
            "torch_quantize_normal", "torch_dequantize_normal", "normal_levels"]


def check_normal_args(op: str, group_size: int, bits: int) -> None:
    if bits not in NORMAL_BITS:
        raise ValueError(f"{op}: bits must be one of {NORMAL_BITS}, got {bits!r}")
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size % 8
            or not OUTLIERS < group_size <= 1 << 15):
        raise ValueError(f"{op}: group_size must be a multiple of 8 in ({OUTLIERS}, 32768], got {group_size!r}")


def check_normal_parts(op: str, codes, stats, offsets, values, shape, group_size: int, bits: int) -> None:
    """Refuse parts that do not encode ``shape`` (before any kernel reads them)."""
    check_normal_args(op, group_size, bits)
    (nbytes,), (nstats,), (groups, m), odt = normal_shapes(math.prod(shape), group_size, bits)
    if (codes.dtype != torch.uint8 or tuple(codes.shape) != (nbytes,) or stats.dtype != torch.bfloat16
            or tuple(stats.shape) != (nstats,) or offsets.dtype != odt or tuple(offsets.shape) != (groups, m)
            or values.dtype != torch.bfloat16 or tuple(values.shape) != (groups, m)):
        raise ValueError(f"{op}: the parts do not encode shape {list(shape)} at group_size {group_size}, {bits} bits")


def _offset_dtype(group_size: int) -> torch.dtype:
    return torch.uint8 if group_size <= 256 else torch.int16


def normal_shapes(numel, group_size: int, bits: int):
    """((code bytes,), (2 * groups,), (groups, OUTLIERS), offset dtype); SymInt-safe."""
    groups = (numel + group_size - 1) // group_size
    return (groups * (group_size * bits // 8),), (2 * groups,), (groups, OUTLIERS), _offset_dtype(group_size)


def normal_levels(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (levels, thresholds) of ``bits``."""
    levels = torch.tensor(NORMAL_LEVELS[bits], dtype=torch.float32, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


def _normal_rows(rows: torch.Tensor, bits: int):
    """Codes (int64), stats (m, 2) bfloat16, offsets (m, OUTLIERS) int64 and values
    (m, OUTLIERS) bfloat16 of the float32 groups ``rows`` (m, group)."""
    mu = rows.to(torch.float64).mean(dim=1).to(torch.bfloat16)
    d = rows - mu.to(torch.float32).unsqueeze(1)
    far = torch.where(torch.isnan(d), math.inf, d.abs())
    picked = []
    for _ in range(OUTLIERS):  # argmax gives the first of equal maxima: ties to the lower offset
        i = far.argmax(dim=1, keepdim=True)
        picked.append(i)
        far.scatter_(1, i, -1.0)
    order = torch.cat(picked, dim=1)
    kept = torch.ones_like(rows, dtype=torch.bool).scatter_(1, order, False)
    dd = d.to(torch.float64)
    var = torch.where(kept, dd * dd, 0.0).sum(dim=1) / kept.sum(dim=1)
    sigma = var.sqrt().to(torch.bfloat16)
    z = torch.where((sigma == 0).unsqueeze(1), 0.0, d / sigma.to(torch.float32).unsqueeze(1))
    _, thresholds = normal_levels(bits, rows.device)
    q = (z.unsqueeze(2) > thresholds).sum(dim=2)  # NaN compares false: code 0
    values = torch.gather(rows, 1, order).to(torch.bfloat16)
    return q, torch.stack([mu, sigma], dim=1), order, values


def torch_quantize_normal(x: torch.Tensor, group_size: int, bits: int):
    """``(codes, stats, offsets, values)`` of ``x`` (the rule above)."""
    check_normal_args("quantize_normal", group_size, bits)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    (nbytes,), (nstats,), (groups, _), odt = normal_shapes(n, group_size, bits)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    stats = torch.empty(groups, 2, dtype=torch.bfloat16, device=x.device)
    offsets = torch.empty(groups, OUTLIERS, dtype=odt, device=x.device)
    values = torch.empty(groups, OUTLIERS, dtype=torch.bfloat16, device=x.device)
    per_chunk = max(1, _CHUNK_ELEMS // group_size // 8)
    gbytes = group_size * bits // 8
    for g0 in range(0, groups, per_chunk):
        g1 = min(groups, g0 + per_chunk)
        seg = flat[g0 * group_size: min(n, g1 * group_size)].to(torch.float32)
        pad = (g1 - g0) * group_size - seg.numel()
        rows = torch.cat([seg, seg[-1:].expand(pad)]).view(g1 - g0, group_size)
        q, st, off, val = _normal_rows(rows, bits)
        codes[g0 * gbytes: g1 * gbytes] = _pack(q.reshape(-1), bits)
        stats[g0:g1], offsets[g0:g1], values[g0:g1] = st, off.to(odt), val
    return codes, stats.view(-1), offsets, values


def torch_dequantize_normal(codes, stats, offsets, values, shape: list[int], group_size: int, bits: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """The contiguous tensor of ``shape`` / ``dtype`` that the four parts encode."""
    check_normal_parts("dequantize_normal", codes, stats, offsets, values, shape, group_size, bits)
    groups = normal_shapes(math.prod(shape), group_size, bits)[2][0]
    levels, _ = normal_levels(bits, codes.device)
    st = stats.view(groups, 2)

    def scaled(q, g0, g1):
        mu, sigma = st[g0:g1, :1].to(torch.float32), st[g0:g1, 1:].to(torch.float32)
        vals = levels[q] * sigma + mu
        return vals.scatter_(1, offsets[g0:g1].to(torch.int64), values[g0:g1].to(torch.float32))

    return _decode_groups(codes, st, shape, group_size, bits, dtype, scaled)
