"""The reference's byte rules, restated independently of the compiled path: how many
values a top-k group keeps, how large a group is, and the size rules that keep a tensor
dense when its compressed copy would not be smaller."""

from __future__ import annotations

import math

import torch

from ..config import RazorConfig


_VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _keep(group: int, sparsity: float) -> int:
    # Independent of RazorConfig.keep_count: ceil((1 - s) * g) with exact rationals.
    from fractions import Fraction

    s = Fraction(sparsity).limit_denominator(1_000_000)
    return -((-(1 - s) * group).__floor__())  # ceil


def _group(shape, config: RazorConfig) -> int:
    n = math.prod(shape)
    if config.granularity == "sample":
        return n // shape[0] if len(shape) > 0 and shape[0] else max(n, 1)
    return config.block_size


def not_smaller(shape, dtype: torch.dtype, config: RazorConfig) -> bool:
    """The size rule: True when the compressed copy of a ``dtype`` tensor of ``shape``
    (one bit per element of every group, padded to whole bytes per group, or two bytes
    per kept element, four for groups of 32768 and more, whichever ``topk_layout``
    takes, plus the kept values) is not smaller than the tensor itself, which then stays
    dense (exact)."""
    n = math.prod(shape)
    group = _group(shape, config)
    if n == 0 or group == 0:
        return True
    groups = -(-n // group)
    itemsize = torch.empty((), dtype=dtype).element_size()
    vdtype = dtype if config.value_dtype == "same" else _VALUE_DTYPES[config.value_dtype]
    value_bytes = torch.empty((), dtype=vdtype).element_size()
    k = _keep(group, config.sparsity)
    mask, offsets = -(-group // 8), k * (2 if group < 32768 else 4)
    index = {"mask": mask, "offsets": offsets}.get(config.topk_layout, min(mask, offsets))
    return groups * index + groups * k * value_bytes >= n * itemsize


def not_smaller_quantized(shape, dtype: torch.dtype, group: int, bits: int, codebook: str = "uniform") -> bool:
    """The size rule of a quantized copy: whole groups of ``bits`` per element plus two
    bfloat16 bounds per group (the normal codebook: a bfloat16 mean and deviation, and
    two outliers of a bfloat16 value and a 1-byte offset, 2-byte above 256 elements),
    against the tensor dense."""
    n = math.prod(shape)
    rows = -(-n // group)
    extra = 4 if codebook == "uniform" else 4 + 2 * (2 + (1 if group <= 256 else 2))
    return n == 0 or rows * group * bits // 8 + rows * extra >= n * torch.empty((), dtype=dtype).element_size()
