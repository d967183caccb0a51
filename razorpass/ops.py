"""The ``razor::compress`` / ``razor::decompress`` custom ops.

Both have static output shapes (no host sync): a fake kernel computes them from sizes
with ceil-division only, so they trace under dynamic shapes. CPU runs the chunked
PyTorch kernel; CUDA runs the Triton kernels where Triton is installed.
"""

from __future__ import annotations

import torch

from triton_kernels import topk_compress_cpu
from triton_kernels.topk_compress import torch_compress, torch_decompress

__all__ = ["compress", "decompress", "compressed_shapes"]

_TRITON_BACKEND: dict[str, str] = {"default": "auto"}


def compressed_shapes(numel, group_size, k):
    """(mask shape, values shape) of a compressed tensor; ceil-div only (SymInt-safe)."""
    groups = (numel + group_size - 1) // group_size
    return (groups, (group_size + 7) // 8), (groups, k)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.library.custom_op("razor::compress", mutates_args=())
def compress(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest |x| of every group of ``group_size`` elements (see the format doc)."""
    if _use_triton(x, backend):
        from triton_kernels import topk_compress_triton as tk

        return tk.triton_compress(x, group_size, k, value_dtype)
    if x.device.type == "cpu" and backend != "torch":
        out = topk_compress_cpu.cpu_compress(x, group_size, k, value_dtype)
        if out is not None:
            return out
    return torch_compress(x, group_size, k, value_dtype)


@compress.register_fake
def _(x, group_size, k, value_dtype, backend="auto"):
    mshape, vshape = compressed_shapes(x.numel(), group_size, k)
    return x.new_empty(mshape, dtype=torch.uint8), x.new_empty(vshape, dtype=value_dtype)


@torch.library.custom_op("razor::decompress", mutates_args=())
def decompress(
    mask: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense tensor with the kept values at their positions and exact zeros elsewhere."""
    if _use_triton(values, backend):
        from triton_kernels import topk_compress_triton as tk

        return tk.triton_decompress(mask, values, shape, group_size, dtype)
    if values.device.type == "cpu" and backend != "torch":
        out = topk_compress_cpu.cpu_decompress(mask, values, shape, group_size, dtype)
        if out is not None:
            return out
    return torch_decompress(mask, values, shape, group_size, dtype)


@decompress.register_fake
def _(mask, values, shape, group_size, dtype, backend="auto"):
    return values.new_empty(shape, dtype=dtype)
