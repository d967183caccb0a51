"""The quantizers of ``quantize.py`` as plain tensor ops: the form a compiler generates.

``inline_codecs`` swaps these in for ``razor::quantize_group``,
``razor::quantize_group_centered``, ``razor::dequantize_group`` and
``razor::quantize_uniform`` where the config's ``codec_form`` asks for it, so that
Inductor writes the encode into the kernel that produces the activation and the decode
into the kernels that read it: no dense copy is written just to be encoded, no decoded
copy just to be read once.

The rule and the layout are ``quantize.py``'s, bit for bit, on Inductor's C++ backend
(the tests compare every form against the PyTorch kernel, eager and compiled, on the
native kernels' edge cases). What keeps them identical:

* bounds rounded outwards to bfloat16 by integer ops on the float32 bit pattern
  (truncate the low 16 bits, step one away from zero where the rounding went inwards)
  rather than ``nextafter``, which the compiler evaluates in float32; a -0 bound becomes
  +0 on the bit pattern too, where a compiler free to ignore the sign of zero could not
  drop the test;
* the padding of the last group never enters its range: ``+inf`` for the min, ``-inf``
  for the max, code 0;
* a true division by the step, the product and the sum of the decode rounded apart:
  Inductor's C++ backend keeps both (it turns a division by a constant into a product by
  its reciprocal only on other devices, and compiles without floating-point
  contraction). On CUDA neither is promised, which is why the generated form is not
  the CUDA default (``passes/codecs.py``).

A bfloat16 / float16 input is the exception: fused with the op that computes it, Inductor
keeps it in float32 and drops the rounding to its dtype (a cast there and back, or a bit
cast, alike), so the codes would be those of the unrounded values; ``inline_codecs``
generates float32 values only.

The functions take the ops' arguments without ``backend`` and trace under fake tensors
and symbolic sizes (no data-dependent control flow).
"""

from __future__ import annotations

import math

import torch

from .quantize import group_quantized_shapes

__all__ = ["fused_quantize_group", "fused_quantize_group_centered", "fused_dequantize_group",
           "fused_quantize_uniform", "fused_dequantize_uniform"]

_INT32_MIN = -(2**31)


def _pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 codes (a multiple of 8 of them) as the ``bits``-per-code little-endian
    stream: eight codes make one word of ``8 * bits`` bits, written as ``bits`` bytes."""
    if bits == 8:
        return q.to(torch.uint8)
    eight = q.view(-1, 8)
    word = eight[:, 0]
    for j in range(1, 8):
        word = word | (eight[:, j] << (bits * j))  # 4 bits: the last shift reaches bit 31
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(bits)], dim=1).reshape(-1).to(torch.uint8)


def _unpack_words(codes: torch.Tensor, count, bits: int) -> torch.Tensor:
    """The first ``count`` int32 codes of a stream of whole bytes (a multiple of ``bits``)."""
    if bits == 8:
        return codes[:count].to(torch.int32)
    words = codes.view(-1, bits).to(torch.int32)
    word = words[:, 0]
    for b in range(1, bits):
        word = word | (words[:, b] << (8 * b))
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * bits
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _bfloat16_outward(v: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 ``v`` rounded to bfloat16 towards -inf (``up``: towards +inf); NaN stays
    NaN, a zero becomes +0. Equal to rounding to nearest and stepping once with
    ``nextafter`` where that went inwards (``quantize.py``), infinities and overflow
    included."""
    b = v.view(torch.int32)
    b = torch.where(b == _INT32_MIN, 0, b)  # -0 -> +0
    inexact = (b & 0xFFFF) != 0
    top = b >> 16  # arithmetic: truncation towards zero in magnitude
    away = inexact & ((b >= 0) if up else (b < 0))
    r = (top + away.to(torch.int32)).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(v), math.nan, r)


def _group_rows(flat32: torch.Tensor, group_size: int):
    """(rows, lo, hi): the float32 elements as ``(groups, group_size)`` rows padded with
    0, and each group's bfloat16 bounds."""
    n = flat32.numel()
    groups = (n + group_size - 1) // group_size
    pad = groups * group_size - n
    lo = torch.constant_pad_nd(flat32, (0, pad), math.inf).view(groups, group_size).amin(dim=1)
    hi = torch.constant_pad_nd(flat32, (0, pad), -math.inf).view(groups, group_size).amax(dim=1)
    rows = torch.constant_pad_nd(flat32, (0, pad), 0.0).view(groups, group_size)
    return rows, _bfloat16_outward(lo, up=False), _bfloat16_outward(hi, up=True)


def fused_quantize_group(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``razor::quantize_group`` as plain ops: ``(codes, bounds)``, bit-identical."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    rows, lo_b, hi_b = _group_rows(flat, group_size)
    lo, hi = lo_b.to(torch.float32).unsqueeze(1), hi_b.to(torch.float32).unsqueeze(1)
    step = (hi - lo) / float((1 << bits) - 1)
    t = (rows - lo) / step
    t = torch.where(torch.isnan(t) | (step == 0), 0.0, t)
    q = torch.round(t).clamp(0, (1 << bits) - 1).to(torch.int32)
    index = torch.arange(rows.numel(), device=x.device).view(rows.shape)
    q = torch.where(index < n, q, 0)  # the padding's codes are 0
    return _pack_words(q.reshape(-1), bits), torch.stack([lo_b, hi_b], dim=1).reshape(-1)


def fused_quantize_group_centered(x: torch.Tensor, center: torch.Tensor, group_size: int,
                                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``razor::quantize_group_centered`` as plain ops: the difference rounded to the
    promoted dtype, then quantized, as the op defines it."""
    dtype = torch.promote_types(x.dtype, center.dtype)
    c = center.reshape(1, -1, *([1] * (x.dim() - 2)))
    return fused_quantize_group(x - c.to(dtype), group_size, bits)


def fused_dequantize_group(codes: torch.Tensor, bounds: torch.Tensor, shape: list, group_size: int, bits: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """``razor::dequantize_group`` as plain ops: what a consumer's kernel computes in
    place of reading a decoded tensor. Bit-identical."""
    n = 1
    for s in shape:
        n *= s
    (_,), (nbounds,) = group_quantized_shapes(n, group_size, bits)
    groups = nbounds // 2
    q = _unpack_words(codes, groups * group_size, bits).view(groups, group_size)
    b = bounds.view(groups, 2).to(torch.float32)
    lo, hi = b[:, :1], b[:, 1:]
    step = (hi - lo) / float((1 << bits) - 1)
    vals = q.to(torch.float32) * step + lo
    vals = torch.where(torch.isfinite(lo) & torch.isfinite(hi), vals, math.nan)
    return vals.reshape(-1)[:n].to(dtype).view(shape)


def fused_quantize_uniform(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """``razor::quantize_uniform`` as plain ops (a GELU's derivative codes written by the
    kernel that computes the derivative). Bit-identical."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    words = (n + 7) // 8
    t = (flat - lo) / ((hi - lo) / ((1 << bits) - 1))
    t = torch.where(torch.isnan(t), 0.0, t)
    q = torch.round(t).clamp(0, (1 << bits) - 1).to(torch.int32)
    q = torch.constant_pad_nd(q, (0, words * 8 - n))
    return _pack_words(q, bits)[: (n * bits + 7) // 8]


def fused_dequantize_uniform(codes: torch.Tensor, shape: list, bits: int, lo: float, hi: float,
                             dtype: torch.dtype) -> torch.Tensor:
    """``razor::dequantize_uniform`` as plain pointwise ops: a compiler fuses the decode
    into the kernel that reads it (a GELU backward multiplies it into the incoming
    gradient), so the decoded tensor is never written. Bit-identical to the op: the
    same integer unpacking of each ``bits``-byte word of eight codes, then
    ``float32(q) * step + lo`` in float32."""
    n = 1
    for s in shape:
        n *= s
    words_n = (n + 7) // 8
    padded = codes if bits == 8 else torch.constant_pad_nd(codes, (0, words_n * bits - codes.numel()))
    q = _unpack_words(padded, n, bits)
    return (q.to(torch.float32) * ((hi - lo) / ((1 << bits) - 1)) + lo).to(dtype).view(shape)
