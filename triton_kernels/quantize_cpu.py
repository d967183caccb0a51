"""Uniform quantize / dequantize, per group and on one fixed range: the native CPU
kernels (C++, parallel over groups / chunks).

Built on first use like the top-k kernel (``topk_compress_cpu.build``) from
``csrc/quantize_group_cpu.cpp``; bit-identical to ``torch_quantize_group`` /
``torch_dequantize_group`` and ``torch_quantize_uniform`` / ``torch_dequantize_uniform``
in ``quantize.py``. ``load()`` returns None when it cannot
be built: the caller then uses the PyTorch kernel.
"""

from __future__ import annotations

import contextlib
import math
import pathlib

import torch

from .quantize import NORMAL_LEVELS
from .topk_compress_cpu import build

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "quantize_group_cpu.cpp"


def load():
    return build("razorpass_quantize_cpu", _SOURCE)


def wide_available() -> bool:
    """Whether the native kernels take their AVX-512 / BMI2 path on this CPU (float32,
    2-4 bits, whole 16-element blocks); elsewhere they run the portable code."""
    ext = load()
    return ext is not None and ext.simd_available() > 0


@contextlib.contextmanager
def simd_cap(cap: int):
    """Inside the block the native kernels take at most the path ``cap`` names: 0 the
    portable code, 1 the AVX-512 / BMI2 path where the CPU has it (the default). Both
    give the same bits; the tests run both."""
    ext = load()
    previous = ext.set_simd(cap)
    try:
        yield
    finally:
        ext.set_simd(previous)


def cpu_quantize_group(x: torch.Tensor, group_size: int, bits: int):
    """(codes, bounds), or None if the native kernel does not handle this case."""
    if x.dtype not in SUPPORTED or (ext := load()) is None:
        return None
    codes, bounds = ext.quantize_group(x.detach(), group_size, bits)
    return codes, bounds


def cpu_quantize_group_stochastic(x: torch.Tensor, seed: torch.Tensor, group_size: int, bits: int):
    """(codes, bounds) with stochastic rounding keyed by ``seed``, or None."""
    if x.dtype not in SUPPORTED or (ext := load()) is None:
        return None
    codes, bounds = ext.quantize_group_stochastic(x.detach(), int(seed.item()), group_size, bits)
    return codes, bounds


def cpu_quantize_group_centered(x: torch.Tensor, center: torch.Tensor, group_size: int, bits: int):
    """(codes, bounds) of ``x - center`` (float32, center along dim 1), or None."""
    if (ext := load()) is None:
        return None
    codes, bounds = ext.quantize_group_centered(x.detach(), center.detach(), group_size, bits)
    return codes, bounds


def cpu_dequantize_group(codes, bounds, shape, group_size: int, bits: int, dtype: torch.dtype):
    if dtype not in SUPPORTED or (ext := load()) is None:
        return None
    return ext.dequantize_group(codes, bounds, math.prod(shape), group_size, bits, dtype).view(shape)


def cpu_quantize_uniform(x: torch.Tensor, bits: int, lo: float, hi: float):
    if x.dtype not in SUPPORTED or (ext := load()) is None:
        return None
    return ext.quantize_uniform(x.detach(), bits, lo, hi)


def cpu_dequantize_uniform(codes, shape, bits: int, lo: float, hi: float, dtype: torch.dtype):
    if dtype not in SUPPORTED or (ext := load()) is None:
        return None
    return ext.dequantize_uniform(codes, math.prod(shape), bits, lo, hi, dtype).view(shape)


def cpu_quantize_normal(x: torch.Tensor, group_size: int, bits: int):
    """(codes, stats, offsets, values) of the normal codebook, or None."""
    if x.dtype not in SUPPORTED or (ext := load()) is None:
        return None
    levels = NORMAL_LEVELS[bits]
    thresholds = [float(t) for t in (torch.tensor(levels[1:]) + torch.tensor(levels[:-1])) / 2]
    return tuple(ext.quantize_normal(x.detach(), group_size, bits, thresholds))


def cpu_dequantize_normal(codes, stats, offsets, values, shape, group_size: int, bits: int, dtype: torch.dtype):
    if dtype not in SUPPORTED or (ext := load()) is None:
        return None
    levels = [float(v) for v in torch.tensor(NORMAL_LEVELS[bits], dtype=torch.float32)]
    return ext.dequantize_normal(codes, stats, offsets, values, math.prod(shape), group_size, bits, levels,
                                 dtype).view(shape)
