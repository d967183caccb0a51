"""The compressed format as a library: ``razorpass.compress`` / ``razorpass.decompress``.

A :class:`Compressed` holds the packed 1-bit mask and the kept values (static shapes)
plus what is needed to rebuild the dense tensor. The byte arithmetic here is the
analytic size the tests check the measured saved bytes against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import RazorConfig

__all__ = ["Compressed", "compress", "decompress", "group_size_for", "compressed_nbytes", "value_dtype_of"]

def value_dtype_of(config: RazorConfig, activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype kept values are stored in for an activation of ``activation_dtype``."""
    from .kernels.ops import value_dtype_of as of

    return of(config, activation_dtype)


def group_size_for(shape, granularity: str, block_size: int):
    """Elements per group: ``block_size``, or one sample (all but dim 0) for "sample"."""
    if granularity == "block":
        return block_size
    if len(shape) == 0:
        return 1
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def compressed_nbytes(shape, config: RazorConfig, activation_dtype: torch.dtype) -> int:
    """Exact bytes of the top-k copy razorpass saves for a tensor of ``shape``: the
    packed mask, or the offsets where ``config.topk_layout`` picks them, plus the
    values. (:func:`compress` returns the mask layout whatever the config.)"""
    numel = math.prod(shape)
    g = group_size_for(shape, config.granularity, config.block_size)
    k = config.keep_count(g)
    groups = -(-numel // g) if g else 0
    vbytes = torch.empty((), dtype=value_dtype_of(config, activation_dtype)).element_size()
    index = config.topk_index_bytes(g, k) if g else 0
    return groups * index + groups * k * vbytes


class Compressed(NamedTuple):
    """A compressed activation: ``mask`` (uint8) and ``values`` plus how to rebuild it."""

    mask: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.mask.numel() * self.mask.element_size() + self.values.numel() * self.values.element_size()


def compress(
    x: torch.Tensor,
    sparsity: float = 0.9,
    granularity: str = "block",
    block_size: int = 1024,
    value_dtype: str = "bfloat16",
    backend: str = "auto",
) -> Compressed:
    """Compress ``x`` by razorpass's rule (top-k magnitudes per group, packed bitmask).

    ``backend`` picks the kernel as the ``razor::`` ops do (``razorpass.kernels.ops``):
    "auto" (the native kernel on CPU, Triton on CUDA, else PyTorch), "torch", "native"
    or "triton".
    """
    from .kernels import ops

    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if not x.is_floating_point():
        raise ValueError(f"razorpass.compress takes a floating-point tensor, got {x.dtype}")
    cfg = RazorConfig(sparsity=sparsity, granularity=granularity, block_size=block_size, value_dtype=value_dtype)
    # A "sample" of a zero-size tensor ((3, 0) and the like) has 0 elements; the
    # kernels divide by the group size (the native one dies of SIGFPE). With no
    # elements there are no groups whatever the size, so take groups of 1.
    g = max(group_size_for(tuple(x.shape), granularity, block_size), 1)
    mask, values = ops.compress(x, g, cfg.keep_count(g), value_dtype_of(cfg, x.dtype), backend)
    return Compressed(mask, values, tuple(x.shape), x.dtype, g)


def decompress(c: Compressed, backend: str = "auto") -> torch.Tensor:
    """The dense sparsified tensor: kept values (rounded through the value dtype), 0 elsewhere."""
    from .kernels import ops

    return ops.decompress(c.mask, c.values, list(c.shape), c.group_size, c.dtype, backend)
