"""Per-group quantize / dequantize: the native CPU kernel (C++, parallel over groups).

Built on first use like the top-k kernel (``topk_compress_cpu.build``) from
``csrc/quantize_group_cpu.cpp``; bit-identical to ``torch_quantize_group`` /
``torch_dequantize_group`` in ``quantize.py``. ``load()`` returns None when it cannot
be built: the caller then uses the PyTorch kernel.
"""

from __future__ import annotations

import math
import pathlib

import torch

from .topk_compress_cpu import build

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "quantize_group_cpu.cpp"


def load():
    return build("razorpass_quantize_cpu", _SOURCE)


def cpu_quantize_group(x: torch.Tensor, group_size: int, bits: int):
    """(codes, bounds), or None if the native kernel does not handle this case."""
    if x.dtype not in SUPPORTED or (ext := load()) is None:
        return None
    codes, bounds = ext.quantize_group(x.detach(), group_size, bits)
    return codes, bounds


def cpu_dequantize_group(codes, bounds, shape, group_size: int, bits: int, dtype: torch.dtype):
    if dtype not in SUPPORTED or (ext := load()) is None:
        return None
    return ext.dequantize_group(codes, bounds, math.prod(shape), group_size, bits, dtype).view(shape)
