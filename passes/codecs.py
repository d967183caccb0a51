"""The codec registry: one entry per encoding, and the one place that says what an
encoding is.

A codec turns a saved tensor into fixed-size codes in forward (its *encode* op) and
back into a dense tensor right before backward reads it (its *decode* op). Each entry
declares:

* ``encode`` / ``decode``: the ``razor::`` custom ops (``razorpass.kernels.ops``);
* ``record``: the type of record a pass leaves for a root it encodes this way;
* ``lossless``: whether the decode gives back the tensor bit for bit;
* ``values``: whether it stores floating values (an activation) rather than a boolean
  mask; the backward passes that move or repeat decodes (``split_decodes``,
  ``hoist_decodes``, ``fold_affine``) work on decoded values only;
* ``nbytes``: the byte rule, the bytes of the encoded form of ``numel`` elements
  (ceil-division only, so it holds for symbolic sizes);
* ``inline_encode`` / ``inline_decode``: the op as plain tensor ops (its *generated
  form*), which the compiler fuses into the kernels around it (``inline_codecs`` swaps
  them in under Inductor); None where the op stays opaque;
* ``generated_on``: per device type, which of ``"encode"`` / ``"decode"``
  ``codec_form="auto"`` gives in the generated form (the others run their kernel); the
  module's last section says why for each;
* ``kernels``: per device type, the kernels the op's ``backend="auto"`` runs, in order of
  preference (the op falls back to the next where one declines a case).

The passes and the post-partition check ask the registry (``encode_ops``,
``value_decode_ops``, ``codec_of``); a new encoding is one more ``register(Codec(...))``.
``register`` refuses a second entry for an encoding or an op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch._ops import OpOverload

from ..kernels import fused_quantize as fq
from ..kernels import ops
from ..kernels.ops import (compressed_shapes, group_quantized_shapes, normal_shapes, offsets_dtype, packed_numel,
                           quantized_numel)
from .records import CompressedRoot, PackedMask, QuantizedDerivative, QuantizedRoot
from .vocab import CodecForm, Encoding

__all__ = ["Codec", "register", "CODECS", "codec_of", "encode_ops", "value_decode_ops"]

razor = torch.ops.razor


@dataclass(frozen=True)
class Codec:
    encoding: Encoding
    encode: OpOverload
    decode: OpOverload
    record: type
    lossless: bool
    values: bool
    nbytes: Callable[..., object]
    kernels: Mapping[str, tuple[str, ...]]
    inline_encode: Callable | None = None
    inline_decode: Callable | None = None
    generated_on: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))

    def generated(self, direction: str, device_type: str, form: CodecForm) -> Callable | None:
        """The plain-op form of the encode (``direction`` "encode") or decode that
        ``inline_codecs`` swaps in under ``form`` for a tensor on ``device_type``; None:
        the op stays."""
        fn = self.inline_encode if direction == "encode" else self.inline_decode
        if fn is None or form is CodecForm.KERNEL:
            return None
        if form is CodecForm.AUTO and direction not in self.generated_on.get(device_type, ()):
            return None
        return fn


CODECS: dict[Encoding, Codec] = {}
_BY_OP: dict[OpOverload, Codec] = {}


def register(codec: Codec) -> Codec:
    """Add ``codec``; an encoding or an encode op registered twice is an error (a decode
    op may serve several encodings: the centered quantizer decodes as the plain one)."""
    if codec.encoding in CODECS:
        raise ValueError(f"codec {codec.encoding} is registered already")
    if codec.encode in _BY_OP:
        raise ValueError(f"{codec.encode} is the encode op of {_BY_OP[codec.encode].encoding} already")
    CODECS[codec.encoding] = codec
    _BY_OP[codec.encode] = codec
    _BY_OP.setdefault(codec.decode, codec)
    return codec


def codec_of(op) -> Codec | None:
    """The codec whose encode or decode op ``op`` is (None for any other target)."""
    return _BY_OP.get(op) if isinstance(op, OpOverload) else None


def encode_ops() -> frozenset[OpOverload]:
    return frozenset(c.encode for c in CODECS.values())


def value_decode_ops() -> frozenset[OpOverload]:
    """The decodes that give an activation's values back (not a boolean mask)."""
    return frozenset(c.decode for c in CODECS.values() if c.values)


# ---------------------------------------------------------------- byte rules
def topk_mask_bytes(numel, group_size: int, keep, value_dtype: torch.dtype):
    """A packed mask of ``ceil(group_size / 8)`` bytes and ``keep`` values per group."""
    (groups, mask_bytes), (_, k) = compressed_shapes(numel, group_size, keep)
    return groups * mask_bytes + groups * k * value_dtype.itemsize


def topk_offsets_bytes(numel, group_size: int, keep, value_dtype: torch.dtype):
    """``keep`` offsets (int16 below 2**15 elements per group) and values per group."""
    (groups, _), (_, k) = compressed_shapes(numel, group_size, keep)
    return groups * (k * offsets_dtype(group_size).itemsize) + groups * k * value_dtype.itemsize


def group_bytes(numel, group_size: int, bits: int):
    """``bits`` per element of whole groups, and two bfloat16 bounds per group."""
    (code_bytes,), (nbounds,) = group_quantized_shapes(numel, group_size, bits)
    return code_bytes + nbounds * 2


def normal_bytes(numel, group_size: int, bits: int):
    """``bits`` per element of whole groups; per group a bfloat16 mean and deviation and
    two outliers (an offset and a bfloat16 value each)."""
    (code_bytes,), (nstats,), (groups, m), odt = normal_shapes(numel, group_size, bits)
    return code_bytes + nstats * 2 + groups * m * (odt.itemsize + 2)


def uniform_bytes(numel, bits: int):
    return quantized_numel(numel, bits)


def packed_mask_bytes(numel):
    return packed_numel(numel)


# CPU: the native C++ kernel where it builds, else the PyTorch one; CUDA: Triton where it
# is installed, else the PyTorch one (``ops.py`` dispatches).
_NATIVE_FIRST = {"cpu": ("native", "torch"), "cuda": ("triton", "torch")}
_PLAIN = {"cpu": ("torch",), "cuda": ("torch",)}

# Where ``codec_form="auto"`` generates a codec. The lossless bit packing and the GELU
# derivative's decode are integer ops and one multiply-add: generated on every device.
# The quantizers' generated form is bit-identical to their kernels on Inductor's C++
# backend (tested), and on CPU it loses: on ViT-B/16 it raised the step peak and the step
# time against the native kernels (``bench/README.md``, "Codec forms"), so "auto" keeps
# their kernels there. On CUDA too: Inductor's CUDA lowering turns a division by a
# constant into a product by its reciprocal and its Triton code may contract the
# decode's multiply-add, so the generated form need not be the kernels' rule bit for bit,
# and neither form has been timed on a GPU (the GPU proof's codecs section times both
# and says whether they agree).
_BOTH = frozenset({"encode", "decode"})
_EVERYWHERE = MappingProxyType({"cpu": _BOTH, "cuda": _BOTH})
_DECODE_EVERYWHERE = MappingProxyType({"cpu": frozenset({"decode"}), "cuda": frozenset({"decode"})})

register(Codec(Encoding.TOPK_MASK, razor.compress.default, razor.decompress.default, CompressedRoot,
               lossless=False, values=True, nbytes=topk_mask_bytes, kernels=_NATIVE_FIRST))
register(Codec(Encoding.TOPK_OFFSETS, razor.compress_offsets.default, razor.decompress_offsets.default,
               CompressedRoot, lossless=False, values=True, nbytes=topk_offsets_bytes, kernels=_NATIVE_FIRST))
register(Codec(Encoding.GROUP, razor.quantize_group.default, razor.dequantize_group.default, QuantizedRoot,
               lossless=False, values=True, nbytes=group_bytes, kernels=_NATIVE_FIRST,
               inline_encode=fq.fused_quantize_group, inline_decode=fq.fused_dequantize_group))
register(Codec(Encoding.GROUP_CENTERED, razor.quantize_group_centered.default, razor.dequantize_group.default,
               QuantizedRoot, lossless=False, values=True, nbytes=group_bytes, kernels=_NATIVE_FIRST,
               inline_encode=fq.fused_quantize_group_centered, inline_decode=fq.fused_dequantize_group))
register(Codec(Encoding.GROUP_STOCHASTIC, razor.quantize_group_stochastic.default, razor.dequantize_group.default,
               QuantizedRoot, lossless=False, values=True, nbytes=group_bytes, kernels=_NATIVE_FIRST,
               inline_decode=fq.fused_dequantize_group))  # no generated encode: the noise is the kernels'
register(Codec(Encoding.GROUP_NORMAL, razor.quantize_normal.default, razor.dequantize_normal.default, QuantizedRoot,
               lossless=False, values=True, nbytes=normal_bytes, kernels=_NATIVE_FIRST))
register(Codec(Encoding.UNIFORM, razor.quantize_uniform.default, razor.dequantize_uniform.default,
               QuantizedDerivative, lossless=False, values=True, nbytes=uniform_bytes, kernels=_NATIVE_FIRST,
               inline_encode=fq.fused_quantize_uniform, inline_decode=fq.fused_dequantize_uniform,
               generated_on=_DECODE_EVERYWHERE))
register(Codec(Encoding.PACKED_MASK, razor.pack_bits.default, razor.unpack_bits.default, PackedMask,
               lossless=True, values=False, nbytes=packed_mask_bytes, kernels=_PLAIN,
               inline_encode=ops.fused_pack_bits, inline_decode=ops.fused_unpack_bits, generated_on=_EVERYWHERE))
