"""The custom ops of razorpass, ``razor::*``:

* top-k: ``compress`` / ``decompress`` (packed-mask layout) and ``compress_offsets`` /
  ``decompress_offsets`` (offsets layout);
* per-group quantization: ``quantize_group``, ``quantize_group_centered``,
  ``quantize_group_stochastic`` and ``dequantize_group``; on one fixed range: ``quantize_uniform`` / ``dequantize_uniform``;
* on a normal codebook per group, outliers apart: ``quantize_normal`` / ``dequantize_normal``;
* lossless masks: ``pack_bits`` / ``unpack_bits``;
* ``rank_tokens`` (BSR's token order).

All have static output shapes (no host sync): a fake kernel computes them from sizes
with ceil-division only, so they trace under dynamic shapes.

Every codec op (top-k and quantization) has three kernels, bit-identical to each other:
the PyTorch kernel (``topk_compress.py``, ``quantize.py``: the definition; chunked, any
device), the native CPU kernel (C++, ``*_cpu.py``, built on first use) and the Triton
kernel (``*_triton.py``). Its last argument ``backend`` picks one (``BACKENDS``):

* ``"auto"`` (the default): a CUDA tensor runs the Triton kernel where Triton is
  installed, else the PyTorch kernel; a CPU tensor runs the native kernel where it
  builds, else the PyTorch kernel; any other device the PyTorch kernel;
* ``"torch"``: the PyTorch kernel;
* ``"native"``: the native kernel (CPU tensors only; a dtype it does not handle takes
  the PyTorch kernel; a kernel that cannot be built is an error);
* ``"triton"``: the Triton kernel, on CUDA, or on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1`` before Triton is imported: the tests).

``pack_bits`` / ``unpack_bits`` and ``rank_tokens`` are plain PyTorch on every device,
as are the ``fused_*`` forms here and in ``fused_quantize.py`` (the quantizers), which a
compiler inlines into the kernels around them (``RazorConfig.codec_form``).
Importing this module imports no Triton and builds nothing: a native kernel is built on
its first use, a Triton module imported when one of its kernels first runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import torch

from . import quantize_cpu, topk_compress_cpu
from .fused_quantize import fused_dequantize_uniform  # noqa: F401  (re-exported: a fused_* form)
from .quantize import (check_args, check_normal_args, check_normal_parts, check_stochastic, normal_shapes, torch_dequantize_normal,
                       torch_quantize_normal, check_uniform_codes, check_group_args, check_group_shapes, group_quantized_shapes, quantized_numel, torch_dequantize_group,
                       torch_dequantize_uniform, torch_quantize_group, torch_quantize_uniform)
from .topk_compress import offsets_dtype, torch_compress, torch_decompress, torch_decompress_offsets, torch_mask_to_offsets

__all__ = ["BACKENDS", "compress", "decompress", "compressed_shapes", "compress_offsets", "decompress_offsets", "offsets_dtype", "pack_bits", "unpack_bits", "packed_numel", "fused_pack_bits", "fused_dequantize_uniform",
           "fused_unpack_bits", "rank_tokens",
           "RANK_TOKENS_OP", "VALUE_DTYPES", "value_dtype_of", "quantize_uniform", "dequantize_uniform", "quantized_numel",
           "quantize_group", "quantize_group_centered", "quantize_group_stochastic", "dequantize_group",
           "quantize_normal", "dequantize_normal", "normal_shapes", "group_quantized_shapes"]

# The dtypes a config's ``value_dtype`` names ("same": the activation's own dtype).
VALUE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def value_dtype_of(config, activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype kept values are stored in for an activation of ``activation_dtype``
    under ``config`` (anything with a ``value_dtype`` field: a RazorConfig)."""
    return activation_dtype if config.value_dtype == "same" else VALUE_DTYPES[config.value_dtype]


def compressed_shapes(numel, group_size, k):
    """(mask shape, values shape) of a compressed tensor; ceil-div only (SymInt-safe)."""
    groups = (numel + group_size - 1) // group_size
    return (groups, (group_size + 7) // 8), (groups, k)


def _check_group(group_size: int, k: int) -> None:
    # before any kernel runs: the native kernel divides by the group size
    if group_size <= 0 or not 0 <= k <= group_size:
        raise ValueError(f"razor::compress needs group_size > 0 and 0 <= k <= group_size, got {group_size}, {k}")


BACKENDS = ("auto", "torch", "native", "triton")


def _kernel(op: str, device: torch.device, backend: str) -> str:
    """The kernel ``backend`` picks for a tensor on ``device``: "torch", "native" or
    "triton" (the module docstring has the rule); a clear error for a bad choice."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"{op}: backend='native' is the CPU kernel, got a tensor on {device}; "
                         "use 'auto', 'triton' or 'torch'")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton" if _triton_available() else "torch"
    return "native" if device.type == "cpu" else "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _Kernels(NamedTuple):
    """The native and Triton kernel modules of one codec family."""

    native: ModuleType  # a ``*_cpu`` module; ``load()`` builds its kernel (None if it cannot)
    triton: str  # the Triton module's name, imported only when a Triton kernel runs


_TOPK = _Kernels(topk_compress_cpu, "topk_compress_triton")
_QUANT = _Kernels(quantize_cpu, "quantize_triton")


def _run(op: str, device: torch.device, backend: str, kernels: _Kernels, *, torch_kernel, native, triton):
    """Run the kernel ``backend`` picks: ``torch_kernel()``, ``native(cpu_module)`` (None
    where the native kernel does not handle the case: the PyTorch kernel then runs) or
    ``triton(triton_module)``."""
    kind = _kernel(op, device, backend)
    if kind == "triton":
        return triton(importlib.import_module(f".{kernels.triton}", __package__))
    if kind == "native":
        if backend == "native" and kernels.native.load() is None:
            raise RuntimeError(f"{op}: the native CPU kernel is not available (no C++ compiler, or "
                               "RAZORPASS_CPU_KERNEL=torch); use backend='auto' or 'torch'")
        out = native(kernels.native)
        if out is not None:
            return out
    return torch_kernel()


@torch.library.custom_op("razor::compress", mutates_args=())
def compress(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest |x| of every group of ``group_size`` elements (see the format doc)."""
    _check_group(group_size, k)
    return _run("razor::compress", x.device, backend, _TOPK,
                torch_kernel=lambda: torch_compress(x, group_size, k, value_dtype),
                native=lambda cpu: cpu.cpu_compress(x, group_size, k, value_dtype),
                triton=lambda tk: tk.triton_compress(x, group_size, k, value_dtype))


@compress.register_fake
def _(x, group_size, k, value_dtype, backend="auto"):
    _kernel("razor::compress", x.device, backend)
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
    _check_group(group_size, values.shape[-1] if values.dim() == 2 else 0)
    return _run("razor::decompress", values.device, backend, _TOPK,
                torch_kernel=lambda: torch_decompress(mask, values, shape, group_size, dtype),
                native=lambda cpu: cpu.cpu_decompress(mask, values, shape, group_size, dtype),
                triton=lambda tk: tk.triton_decompress(mask, values, shape, group_size, dtype))


@decompress.register_fake
def _(mask, values, shape, group_size, dtype, backend="auto"):
    _kernel("razor::decompress", values.device, backend)
    return values.new_empty(shape, dtype=dtype)


@torch.library.custom_op("razor::compress_offsets", mutates_args=())
def compress_offsets(
    x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``razor::compress`` in the offsets layout: ``(offsets, values)``, the positions of
    the kept elements in their group instead of the packed mask (the same selection
    and values; ``topk_compress.py`` documents the layout). Cheaper than the mask when
    ``k < group_size / 16``. ``backend`` picks the kernels of both steps (the top-k,
    then the mask's conversion)."""
    _check_group(group_size, k)
    mask, values = compress(x, group_size, k, value_dtype, backend)
    offsets = _run("razor::compress_offsets", x.device, backend, _TOPK,
                   torch_kernel=lambda: torch_mask_to_offsets(mask, group_size, k),
                   native=lambda cpu: cpu.cpu_mask_to_offsets(mask, group_size, k, offsets_dtype(group_size)),
                   triton=lambda tk: tk.triton_mask_to_offsets(mask, group_size, k))
    return offsets, values


@compress_offsets.register_fake
def _(x, group_size, k, value_dtype, backend="auto"):
    _kernel("razor::compress_offsets", x.device, backend)
    (groups, _), vshape = compressed_shapes(x.numel(), group_size, k)
    return x.new_empty((groups, k), dtype=offsets_dtype(group_size)), x.new_empty(vshape, dtype=value_dtype)


@torch.library.custom_op("razor::decompress_offsets", mutates_args=())
def decompress_offsets(
    offsets: torch.Tensor,
    values: torch.Tensor,
    shape: list[int],
    group_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> torch.Tensor:
    """The dense tensor ``razor::decompress`` gives from the mask layout, bit for bit."""
    k = values.shape[-1] if values.dim() == 2 else -1
    _check_group(group_size, k)
    if offsets.shape != values.shape or offsets.dtype != offsets_dtype(group_size):
        raise ValueError(
            f"razor::decompress_offsets expects {offsets_dtype(group_size)} offsets of the values' shape "
            f"{tuple(values.shape)}, got {offsets.dtype} of shape {tuple(offsets.shape)}"
        )
    return _run("razor::decompress_offsets", values.device, backend, _TOPK,
                torch_kernel=lambda: torch_decompress_offsets(offsets, values, shape, group_size, dtype),
                native=lambda cpu: cpu.cpu_decompress_offsets(offsets, values, shape, group_size, dtype),
                triton=lambda tk: tk.triton_decompress_offsets(offsets, values, shape, group_size, dtype))


@decompress_offsets.register_fake
def _(offsets, values, shape, group_size, dtype, backend="auto"):
    _kernel("razor::decompress_offsets", values.device, backend)
    return values.new_empty(shape, dtype=dtype)


def packed_numel(numel):
    """Bytes of a packed boolean tensor of ``numel`` elements; ceil-div only (SymInt-safe)."""
    return (numel + 7) // 8


def _bit_weights(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


# The packed mask layout is bit-planar. With n elements in the flattened (logical,
# row-major) order and P = ceil(n / 8) bytes, element i is bit i // P of byte i % P:
# bit plane j holds elements jP .. jP + P - 1, and the 8P - n padding bits are 0.
# Why planar and not 8 consecutive elements per byte: a compiled kernel that reads
# (or writes) the mask beside a dense tensor then loads contiguous bytes with one
# shift per plane, and vectorizes. With consecutive bits every element needs its own
# shift and byte index i // 8, and Inductor's C++ kernels around a ReLU6 mask run as
# scalar loops.
@torch.library.custom_op("razor::pack_bits", mutates_args=())
def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor 8 elements per byte, bit-planar: with ``n`` elements in
    the flattened (logical, row-major) order and ``P = ceil(n / 8)`` bytes, element
    ``i`` is bit ``i // P`` of byte ``i % P``; the padding bits are 0. Lossless."""
    if x.dtype != torch.bool:
        raise ValueError(f"razor::pack_bits expects a bool tensor, got {x.dtype}")
    flat = x.reshape(-1)  # logical order, whatever the strides
    n = flat.numel()
    nbytes = packed_numel(n)
    if nbytes * 8 != n:
        flat = torch.cat([flat, flat.new_zeros(nbytes * 8 - n)])
    planes = flat.view(8, nbytes).to(torch.uint8)
    # distinct powers of two: the sum is the bitwise or and never exceeds 255
    return (planes * _bit_weights(x.device).unsqueeze(1)).sum(dim=0, dtype=torch.uint8)


@pack_bits.register_fake
def _(x):
    return x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


@torch.library.custom_op("razor::unpack_bits", mutates_args=())
def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that ``pack_bits`` packed (contiguous)."""
    n = 1
    for s in shape:
        n *= s
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_numel(n):
        raise ValueError(
            f"razor::unpack_bits expects {packed_numel(n)} uint8 bytes for shape {list(shape)}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    planes = (packed.unsqueeze(0) & _bit_weights(packed.device).unsqueeze(1)) != 0
    return planes.view(-1)[:n].clone().view(shape)


@unpack_bits.register_fake
def _(packed, shape):
    return packed.new_empty(shape, dtype=torch.bool)


def _plane_shape(shape: list) -> list | None:
    """``[m // 8, *shape[k + 1:]]`` for the first ``k`` whose prefix ``m = prod(shape[:k + 1])``
    is a multiple of 8 (a bit plane is then ``m // 8`` rows of the leading dims and
    every later dim whole), or None if there is none (``numel % 8 != 0``) or a dim of
    the prefix is symbolic (the flat form then, without a guard on its value)."""
    m = 1
    for k, s in enumerate(shape):
        if not isinstance(s, int):  # symbolic: a test of it would guard the graph on it
            return None
        m *= s
        if m % 8 == 0:
            return [m // 8, *shape[k + 1:]]
    return None


def fused_pack_bits(x: torch.Tensor) -> torch.Tensor:
    """``razor::pack_bits`` as plain pointwise ops (no loop, no reduction): what a compiler
    fuses into the kernel that computes the mask, so the boolean tensor is never written.
    Bit-identical to the op (the same layout; integer ops only). The planes are split
    along the leading dims where they allow it, so that the compiled kernel indexes
    the trailing dims contiguously."""
    rows = _plane_shape(list(x.shape))
    if rows is None:
        flat = x.reshape(-1)
        n = flat.numel()
        nbytes = packed_numel(n)
        planes = torch.constant_pad_nd(flat.to(torch.uint8), (0, nbytes * 8 - n)).view(8, nbytes) != 0
    else:
        planes = x.reshape(8, *rows)
    # a select-into-byte per plane: kept as a where on the mask (not a bool -> uint8
    # cast), which Inductor's C++ backend vectorizes
    out = torch.where(planes[0], 1, 0)
    for j in range(1, 8):
        out = out | torch.where(planes[j], 1 << j, 0)
    return out.to(torch.uint8).reshape(-1)


def fused_unpack_bits(packed: torch.Tensor, shape: list) -> torch.Tensor:
    """``razor::unpack_bits`` as plain pointwise ops: fused into the kernel that reads the
    mask. Bit-identical to the op. The bit is compared as a float, so that a compiled
    kernel selects with a float vector mask (Inductor's C++ cast of a byte mask to a
    float mask runs element by element)."""
    n = 1
    for s in shape:
        n *= s
    rows = _plane_shape(list(shape))
    if rows is None:
        rows = [packed_numel(n)]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device).view(8, *([1] * len(rows)))
    bits = (packed.view(rows).unsqueeze(0) >> shifts) & 1
    return bits.reshape(-1)[:n].view(shape).to(torch.float32) != 0


@torch.library.custom_op("razor::quantize_uniform", mutates_args=())
def quantize_uniform(x: torch.Tensor, bits: int, lo: float, hi: float, backend: str = "auto") -> torch.Tensor:
    """Round every element of ``x`` to the nearest of ``2**bits`` uniform levels on
    ``[lo, hi]`` (half to even, clamped) and pack the codes, ``bits`` bits each, into
    ``ceil(numel * bits / 8)`` uint8 bytes (``quantize.py`` documents rule and layout)."""
    check_args("razor::quantize_uniform", bits, lo, hi)
    return _run("razor::quantize_uniform", x.device, backend, _QUANT,
                torch_kernel=lambda: torch_quantize_uniform(x, bits, lo, hi),
                native=lambda cpu: cpu.cpu_quantize_uniform(x, bits, lo, hi),
                triton=lambda tq: tq.triton_quantize_uniform(x, bits, lo, hi))


@quantize_uniform.register_fake
def _(x, bits, lo, hi, backend="auto"):
    check_args("razor::quantize_uniform", bits, lo, hi)
    _kernel("razor::quantize_uniform", x.device, backend)
    return x.new_empty((quantized_numel(x.numel(), bits),), dtype=torch.uint8)


@torch.library.custom_op("razor::dequantize_uniform", mutates_args=())
def dequantize_uniform(codes: torch.Tensor, shape: list[int], bits: int, lo: float, hi: float,
                       dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The tensor of ``shape`` / ``dtype`` (contiguous) whose levels ``codes`` store."""
    check_uniform_codes("razor::dequantize_uniform", codes, shape, bits, lo, hi)
    return _run("razor::dequantize_uniform", codes.device, backend, _QUANT,
                torch_kernel=lambda: torch_dequantize_uniform(codes, shape, bits, lo, hi, dtype),
                native=lambda cpu: cpu.cpu_dequantize_uniform(codes, shape, bits, lo, hi, dtype),
                triton=lambda tq: tq.triton_dequantize_uniform(codes, shape, bits, lo, hi, dtype))


@dequantize_uniform.register_fake
def _(codes, shape, bits, lo, hi, dtype, backend="auto"):
    check_args("razor::dequantize_uniform", bits, lo, hi)
    _kernel("razor::dequantize_uniform", codes.device, backend)
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("razor::quantize_group", mutates_args=())
def quantize_group(x: torch.Tensor, group_size: int, bits: int,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize every ``group_size`` consecutive elements of ``x`` to ``2**bits`` uniform
    levels on the group's own [min, max] (bfloat16 bounds, rounded outwards): ``(codes,
    bounds)``, ``bits`` bits per element plus 4 bytes per group (``quantize.py``
    documents rule and layout)."""
    check_group_args("razor::quantize_group", group_size, bits)
    return _run("razor::quantize_group", x.device, backend, _QUANT,
                torch_kernel=lambda: torch_quantize_group(x, group_size, bits),
                native=lambda cpu: cpu.cpu_quantize_group(x, group_size, bits),
                triton=lambda tq: tq.triton_quantize_group(x, group_size, bits))


def _fake_group_codes(op: str, x: torch.Tensor, group_size: int, bits: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (codes, bounds) of the shapes a per-group quantization of ``x`` gives."""
    check_group_args(op, group_size, bits)
    _kernel(op, x.device, backend)
    codes, bounds = group_quantized_shapes(x.numel(), group_size, bits)
    return x.new_empty(codes, dtype=torch.uint8), x.new_empty(bounds, dtype=torch.bfloat16)


@quantize_group.register_fake
def _(x, group_size, bits, backend="auto"):
    return _fake_group_codes("razor::quantize_group", x, group_size, bits, backend)


@torch.library.custom_op("razor::quantize_group_stochastic", mutates_args=())
def quantize_group_stochastic(x: torch.Tensor, seed: torch.Tensor, group_size: int, bits: int,
                              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_group`` with each level rounded up or down at random, so that the
    decoded tensor is an unbiased estimate of ``x``: the noise of element ``i`` is a hash
    of (``seed``, ``i``), ``seed`` an int64 tensor of one element (``quantize.py``,
    "stochastic rounding"). The same seed gives the same codes on every kernel; decode
    with ``dequantize_group``."""
    check_group_args("razor::quantize_group_stochastic", group_size, bits)
    check_stochastic("razor::quantize_group_stochastic", x, seed)
    return _run("razor::quantize_group_stochastic", x.device, backend, _QUANT,
                torch_kernel=lambda: torch_quantize_group(x, group_size, bits, seed),
                native=lambda cpu: cpu.cpu_quantize_group_stochastic(x, seed, group_size, bits),
                triton=lambda tq: tq.triton_quantize_group_stochastic(x, seed, group_size, bits))


@quantize_group_stochastic.register_fake
def _(x, seed, group_size, bits, backend="auto"):
    check_stochastic("razor::quantize_group_stochastic", x, seed)
    return _fake_group_codes("razor::quantize_group_stochastic", x, group_size, bits, backend)


def _channel_view(center: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return center.reshape(1, -1, *([1] * (x.dim() - 2)))


def _check_center(x: torch.Tensor, center: torch.Tensor) -> None:
    if x.dim() < 2 or center.numel() != x.shape[1]:
        raise ValueError(f"razor::quantize_group_centered: the center needs x.shape[1] elements (x of 2+ dims), got "
                         f"x of shape {tuple(x.shape)} and a center of {center.numel()}")


@torch.library.custom_op("razor::quantize_group_centered", mutates_args=())
def quantize_group_centered(x: torch.Tensor, center: torch.Tensor, group_size: int, bits: int,
                            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_group(x - center)`` for a center per index of dim 1 (``center.numel() ==
    x.shape[1]``, a BatchNorm's per-channel mean): the same codes and bounds, bit for bit.
    The Triton kernel centers each element as it reads it (any of the three float
    dtypes, the difference rounded to the promoted dtype); the native kernel does for
    float32 x and center; otherwise the difference is materialized and quantized."""
    _check_center(x, center)
    check_group_args("razor::quantize_group_centered", group_size, bits)

    def subtract_first(kernel: str):
        return quantize_group(x - _channel_view(center, x), group_size, bits, kernel)

    return _run("razor::quantize_group_centered", x.device, backend, _QUANT,
                torch_kernel=lambda: subtract_first("torch"),
                native=lambda cpu: (cpu.cpu_quantize_group_centered(x, center, group_size, bits)
                                    if x.dtype == center.dtype == torch.float32 else subtract_first(backend)),
                triton=lambda tq: tq.triton_quantize_group_centered(x, center, group_size, bits))


@quantize_group_centered.register_fake
def _(x, center, group_size, bits, backend="auto"):
    _check_center(x, center)
    return _fake_group_codes("razor::quantize_group_centered", x, group_size, bits, backend)


@torch.library.custom_op("razor::dequantize_group", mutates_args=())
def dequantize_group(codes: torch.Tensor, bounds: torch.Tensor, shape: list[int], group_size: int, bits: int,
                     dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The tensor of ``shape`` / ``dtype`` (contiguous) that ``(codes, bounds)`` encode."""
    check_group_shapes("razor::dequantize_group", codes, bounds, shape, group_size, bits)
    return _run("razor::dequantize_group", codes.device, backend, _QUANT,
                torch_kernel=lambda: torch_dequantize_group(codes, bounds, shape, group_size, bits, dtype),
                native=lambda cpu: cpu.cpu_dequantize_group(codes, bounds, shape, group_size, bits, dtype),
                triton=lambda tq: tq.triton_dequantize_group(codes, bounds, shape, group_size, bits, dtype))


@dequantize_group.register_fake
def _(codes, bounds, shape, group_size, bits, dtype, backend="auto"):
    check_group_args("razor::dequantize_group", group_size, bits)
    _kernel("razor::dequantize_group", codes.device, backend)
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("razor::quantize_normal", mutates_args=())
def quantize_normal(x: torch.Tensor, group_size: int, bits: int,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code every ``group_size`` consecutive elements of ``x`` on the Lloyd-Max levels of a
    unit Gaussian scaled by the group's mean and deviation, its two elements farthest
    from the mean kept apart in bfloat16: ``(codes, stats, offsets, values)``
    (``quantize.py``, "normal codebook")."""
    check_normal_args("razor::quantize_normal", group_size, bits)
    return _run("razor::quantize_normal", x.device, backend, _QUANT,
                torch_kernel=lambda: torch_quantize_normal(x, group_size, bits),
                native=lambda cpu: cpu.cpu_quantize_normal(x, group_size, bits),
                triton=lambda tq: tq.triton_quantize_normal(x, group_size, bits))


@quantize_normal.register_fake
def _(x, group_size, bits, backend="auto"):
    check_normal_args("razor::quantize_normal", group_size, bits)
    _kernel("razor::quantize_normal", x.device, backend)
    (nbytes,), (nstats,), outliers, odt = normal_shapes(x.numel(), group_size, bits)
    return (x.new_empty(nbytes, dtype=torch.uint8), x.new_empty(nstats, dtype=torch.bfloat16),
            x.new_empty(outliers, dtype=odt), x.new_empty(outliers, dtype=torch.bfloat16))


@torch.library.custom_op("razor::dequantize_normal", mutates_args=())
def dequantize_normal(codes: torch.Tensor, stats: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                      shape: list[int], group_size: int, bits: int, dtype: torch.dtype,
                      backend: str = "auto") -> torch.Tensor:
    """The tensor of ``shape`` / ``dtype`` (contiguous) that ``quantize_normal`` encoded."""
    check_normal_parts("razor::dequantize_normal", codes, stats, offsets, values, shape, group_size, bits)

    def plain():
        return torch_dequantize_normal(codes, stats, offsets, values, shape, group_size, bits, dtype)

    return _run("razor::dequantize_normal", codes.device, backend, _QUANT, torch_kernel=plain,
                native=lambda cpu: cpu.cpu_dequantize_normal(codes, stats, offsets, values, shape, group_size, bits,
                                                             dtype),
                triton=lambda tq: tq.triton_dequantize_normal(codes, stats, offsets, values, shape, group_size, bits,
                                                              dtype))


@dequantize_normal.register_fake
def _(codes, stats, offsets, values, shape, group_size, bits, dtype, backend="auto"):
    check_normal_args("razor::dequantize_normal", group_size, bits)
    _kernel("razor::dequantize_normal", codes.device, backend)
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("razor::rank_tokens", mutates_args=())
def rank_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Positions along the last dim in descending score order, ties to the lower position
    (BSR's token ranking; an op so that graph passes can find it)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


@rank_tokens.register_fake
def _(scores):
    return torch.empty(scores.shape, dtype=torch.long, device=scores.device)


RANK_TOKENS_OP = torch.ops.razor.rank_tokens.default
