"""What backward reads of a saved tensor, as dense tensors (no custom op, no packing):
top-k sparsification, per-group quantization, the GELU derivative's levels, and the
encodings a saved tensor can take."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..config import RazorConfig
from .rules import _VALUE_DTYPES, _group, _keep


def sparsify(x: torch.Tensor, config: RazorConfig | None) -> torch.Tensor:
    """The dense tensor razorpass's compress + decompress produce for ``x``
    (``config=None``: ``x`` itself, for tensors that are not compressed)."""
    if config is None:
        return x.detach()
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    group = _group(tuple(x.shape), config)
    groups = -(-n // group)
    k = _keep(group, config.sparsity)
    vdtype = x.dtype if config.value_dtype == "same" else _VALUE_DTYPES[config.value_dtype]
    out = torch.zeros(groups * group, dtype=x.dtype)
    for g in range(groups):
        seg = flat[g * group : (g + 1) * group]
        # torch.sort orders NaN above every number; stable keeps lower indices first.
        order = torch.sort(seg.abs().to(torch.float64), descending=True, stable=True).indices[:k]
        out[g * group + order] = seg[order].to(vdtype).to(x.dtype)
    return out[:n].view(x.shape)


class _Quantized:
    """The "accurate" policy's per-group quantization of one tensor (its own code: no
    custom op, no packing); ``seed(device)`` gives the step's seed when it rounds
    stochastically (None: to nearest)."""

    def __init__(self, group: int, bits: int, seed: Callable[[torch.device], int] | None = None,
                 codebook: str = "uniform"):
        self.group, self.bits, self.seed, self.codebook = group, bits, seed, codebook


def _mix(x: np.ndarray) -> np.ndarray:
    """The 32-bit integer hash of stochastic rounding, in numpy's wrapping uint32."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def stochastic_noise(seed: int, n: int) -> torch.Tensor:
    """float32 ``u`` in [0, 1) of elements ``0 .. n-1`` under ``seed``: the top 24 bits of
    ``mix(mix(seed mod 2**32) ^ i)``, times 2**-24."""
    key = _mix(np.array([seed & 0xFFFFFFFF], dtype=np.uint32))
    h = _mix(np.arange(n, dtype=np.uint64).astype(np.uint32) ^ key)
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24))


def quantize_group(x: torch.Tensor, group: int, bits: int, seed: int | None = None) -> torch.Tensor:
    """The dense tensor razorpass's quantize_group + dequantize_group produce for ``x``:
    per group of ``group`` consecutive elements (flattened), ``2**bits`` uniform levels
    from the group's min to its max, both rounded outwards to bfloat16; level
    ``round((x - lo) / step)`` in float32 (half to even, clamped; 0 when the step is 0 or
    the quotient NaN); a group whose bounds are not finite decodes to NaN.

    With a ``seed`` (quantize_group_stochastic), the level is ``floor(t + u)`` for ``t``
    the quotient clamped to the levels and ``u`` the element's noise
    (``stochastic_noise``), clamped to the top level."""
    flat = x.detach().contiguous().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        return x.detach().clone()
    rows = -(-n // group)
    padded = torch.full((rows * group,), math.nan)
    padded[:n] = flat
    g = padded.view(rows, group)
    real = ~torch.isnan(g)
    real[:-1] = True  # only the last row has padding; a NaN element elsewhere is an element
    real.view(-1)[:n] = True
    lo = torch.where(real, g, torch.tensor(math.inf)).min(1).values
    hi = torch.where(real, g, torch.tensor(-math.inf)).max(1).values
    has_nan = (torch.isnan(g) & real).any(1)
    lo_b, hi_b = lo.to(torch.bfloat16), hi.to(torch.bfloat16)
    lo_b = torch.where(lo_b.float() > lo, torch.nextafter(lo_b, torch.tensor(-math.inf, dtype=torch.bfloat16)), lo_b)
    hi_b = torch.where(hi_b.float() < hi, torch.nextafter(hi_b, torch.tensor(math.inf, dtype=torch.bfloat16)), hi_b)
    lo32, hi32 = lo_b.float().unsqueeze(1), hi_b.float().unsqueeze(1)
    step = (hi32 - lo32) / (2**bits - 1)
    t = (g - lo32) / step
    t = torch.where(t.isnan() | (step == 0), torch.zeros_like(t), t)
    if seed is None:
        levels = torch.round(t).clamp(0, 2**bits - 1)
    else:
        u = stochastic_noise(seed, rows * group).view(rows, group)
        levels = torch.floor(t.clamp(0, 2**bits - 1) + u).clamp(max=2**bits - 1)
    out = levels * step + lo32
    bad = has_nan | ~torch.isfinite(lo32.squeeze(1)) | ~torch.isfinite(hi32.squeeze(1))
    out[bad] = math.nan
    return out.reshape(-1)[:n].to(x.dtype).view(x.shape)


# Lloyd-Max levels of N(0, 1) (Max, 1960), as the normal codebook stores them.
_NORMAL = {2: (-1.5104, -0.4528, 0.4528, 1.5104),
           3: (-2.1520, -1.3440, -0.7560, -0.2451, 0.2451, 0.7560, 1.3440, 2.1520),
           4: (-2.7326, -2.0690, -1.6180, -1.2562, -0.9423, -0.6568, -0.3881, -0.1284,
               0.1284, 0.3881, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326)}


def quantize_normal(x: torch.Tensor, group: int, bits: int, outliers: int = 2) -> torch.Tensor:
    """The dense tensor razorpass's quantize_normal + dequantize_normal produce for ``x``:
    per group of ``group`` elements (flattened; the last padded with copies of the last
    element), mean ``mu`` (float64, to bfloat16); the ``outliers`` elements farthest from
    it (ties to the lower offset, NaN farthest) kept as bfloat16; deviation ``sigma`` of
    the others (float64, to bfloat16); every other element the Lloyd-Max level of a unit
    Gaussian nearest to ``(x - mu) / sigma`` (float32; ties to the lower level), decoded
    as ``level * sigma + mu``; a group with a non-finite mean or deviation decodes NaN."""
    flat = x.detach().contiguous().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        return x.detach().clone()
    rows = -(-n // group)
    g = torch.cat([flat, flat[-1:].expand(rows * group - n)]).view(rows, group).numpy()
    levels = np.array(_NORMAL[bits], dtype=np.float32)
    bf16 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy()  # noqa: E731
    mu = bf16(g.astype(np.float64).mean(axis=1, keepdims=True))  # float64 to bfloat16 (nearest even)
    with np.errstate(invalid="ignore"):
        dist = np.abs(g - mu)
    dist[np.isnan(dist)] = np.inf
    # the farthest first, ties to the lower offset
    order = np.lexsort((np.broadcast_to(np.arange(group), g.shape), -dist), axis=1)[:, :outliers]
    rest = np.ones(g.shape, dtype=bool)
    np.put_along_axis(rest, order, False, axis=1)
    with np.errstate(invalid="ignore"):
        diff = (g - mu).astype(np.float64)  # the difference in float32, squared and summed in float64
    dev = np.where(rest, diff ** 2, 0.0).sum(1, keepdims=True) / rest.sum(1, keepdims=True)
    sigma = bf16(np.sqrt(dev))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sigma == 0, np.float32(0), (g - mu) / sigma).astype(np.float32)
    mids = (levels[1:] + levels[:-1]) / np.float32(2)
    q = (z[:, :, None] > mids).sum(2)
    out = levels[q] * sigma.astype(np.float32) + mu.astype(np.float32)
    np.put_along_axis(out, order, bf16(np.take_along_axis(g, order, axis=1)), axis=1)
    out[~(np.isfinite(mu) & np.isfinite(sigma))[:, 0]] = np.nan
    out = torch.from_numpy(out)
    return out.reshape(-1)[:n].to(x.dtype).view(x.shape)


def quantize_levels(d: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Level index of every element of ``d``: ``round((d - lo) / step)`` with
    ``step = (hi - lo) / (2**bits - 1)``, in float32, half to even, clamped to the
    levels, NaN to level 0; one uint8 per element (no packing)."""
    top = 2**bits - 1
    t = (d.to(torch.float32) - lo) / ((hi - lo) / top)
    t = torch.where(t.isnan(), torch.zeros_like(t), t)
    return torch.round(t).clamp(0, top).to(torch.uint8)


def dequantize_levels(q: torch.Tensor, bits: int, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """The level values ``q * step + lo`` (float32), cast to ``dtype``."""
    return (q.to(torch.float32) * ((hi - lo) / (2**bits - 1)) + lo).to(dtype)


class _Derived:
    """A layer input computed pointwise from a normalization's quantized x̂ (its affine
    part, a ReLU / ReLU6, a cast): backward reads that computation on the decoded x̂,
    ``value``, rather than a code of its own."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _encode(x: torch.Tensor, enc) -> torch.Tensor:
    """``x`` as backward reads it: exact (None), top-k (a RazorConfig), quantized, or
    derived from a normalization's quantized x̂."""
    if isinstance(enc, _Derived):
        return enc.value.to(x.dtype)
    if isinstance(enc, _Quantized) and enc.codebook == "normal":
        return quantize_normal(x, enc.group, enc.bits)
    if isinstance(enc, _Quantized):
        return quantize_group(x, enc.group, enc.bits, None if enc.seed is None else enc.seed(x.device))
    return sparsify(x, enc)
