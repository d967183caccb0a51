"""Typed records that the passes leave behind: what was encoded, what stays saved, and
why a graph fell back. The pipeline collects them into one :class:`PartitionRecord`
per partitioned graph; ``razorpass.record_compiles()`` yields those, and the memory
report and the tests read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .framework import PassConfig, PassResult
from .vocab import Encoding, OpClass, Skip, TopkLayout

__all__ = ["EncodedRoot", "CompressedRoot", "QuantizedRoot", "PackedMask", "QuantizedDerivative", "SavedTensor",
           "BudgetChoice", "BudgetRecord", "EncodeResult", "CheckResult", "PartitionRecord"]


@dataclass(frozen=True)
class EncodedRoot:
    """One forward tensor that backward reads through an encoded copy."""

    root: str  # the joint-graph node that was encoded
    layer: str  # one label for the layers that read it ("a.b.{query,key,value}")
    modules: tuple[str, ...]  # module path of each backward use
    op_classes: tuple[OpClass, ...]  # target classes of its uses
    encoding: Encoding  # its codec (``passes/codecs.py``)
    consumers: int  # backward uses rerouted to the decoded copy
    shape: tuple  # the root's shape (ints or SymInts)
    dtype: torch.dtype  # the root's dtype
    dense_bytes: Any  # bytes the root takes dense (int, or a SymInt under dynamic shapes)
    encode_node: str  # the encode op's node in the joint graph
    outputs: tuple[str, ...]  # the encoded tensors the forward graph saves instead


@dataclass(frozen=True)
class CompressedRoot(EncodedRoot):
    """Top-k compressed (``razor::compress``): ``keep`` of every ``group_size`` elements;
    ``layout`` says how the kept positions are stored, "mask" or "offsets"
    (``razor::compress_offsets``)."""

    group_size: int = 0
    keep: Any = 0

    @property
    def layout(self) -> TopkLayout:
        """How the kept positions are stored: ``TopkLayout.MASK`` or ``TopkLayout.OFFSETS``."""
        return TopkLayout.OFFSETS if self.encoding is Encoding.TOPK_OFFSETS else TopkLayout.MASK


@dataclass(frozen=True)
class QuantizedRoot(EncodedRoot):
    """Quantized per group (``razor::quantize_group``): ``bits`` bits per element, each
    ``group_size`` elements on their own bfloat16 [min, max]."""

    group_size: int = 0
    bits: int = 0
    # dense bytes of the layer inputs computed pointwise from the root that its code
    # serves too (a norm's output read by the next Linear): saved as well if it is dense
    derived_bytes: Any = 0


@dataclass(frozen=True)
class PackedMask(EncodedRoot):
    """A boolean tensor packed 8 per byte (``razor::pack_bits``); lossless."""


@dataclass(frozen=True)
class QuantizedDerivative(EncodedRoot):
    """The tangent-free factor of a pointwise backward (gelu'(x) of a GELU) quantized to
    ``bits`` bits per element on ``[lo, hi]`` (``razor::quantize_uniform``); the root is
    that factor, ``source`` the activation it replaces (the GELU input), whose dense
    size ``dense_bytes`` is."""

    bits: int = 0
    lo: float = 0.0
    hi: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class SavedTensor:
    """One tensor the partitioned forward graph saves for backward."""

    name: str
    shape: tuple
    dtype: torch.dtype
    input: bool  # a graph input or a view of one (held by the caller anyway)
    layer: str
    op_class: str  # "dense", or the classes of the encoded root it belongs to ("linear+matmul", "mask")
    dense_bytes: Any  # the dense size this entry stands for (0 for a compressed root's values)
    nbytes: Any = 0  # bytes of its storage (what holding it costs: less than its size when expanded)


@dataclass(frozen=True)
class BudgetChoice:
    """How ``memory_budget`` stores one quantizable root: ``bits`` per element (0: kept
    dense), taking ``nbytes``; ``error`` is the allocator's proxy for the gradient error
    it costs (uses x relative quantization noise, 0 dense); ``options`` every
    (bits, bytes, error) it was chosen from."""

    root: str
    layer: str
    modules: tuple[str, ...]  # module path of each backward use
    numel: int
    dense_bytes: int
    bits: int
    nbytes: int
    error: float
    options: tuple[tuple[int, int, float], ...]


@dataclass
class BudgetRecord:
    """What ``memory_budget`` chose for one graph, and why.

    The graph's saved tensors take ``dense_bytes`` dense (graph inputs excluded); the
    budget allows ``target_bytes`` = budget x that. ``fixed_bytes`` are saved bytes the
    allocator does not choose (top-k softmax codes, packed masks, GELU derivative codes,
    statistics and tensors no class covers); the quantizable roots share the rest. Each
    choice minimises ``error + price * bytes`` over its options at the smallest ``price``
    whose choices fit (so no allocation of no more bytes has a smaller total error);
    ``saved_bytes`` is what the final partition saves."""

    budget: float
    dense_bytes: int
    fixed_bytes: int
    target_bytes: int
    planned_bytes: int
    price: float
    choices: tuple[BudgetChoice, ...]
    saved_bytes: int = 0
    unplanned: int = 0  # of fixed_bytes: what an earlier plan's partition saved beyond it

    @property
    def met(self) -> bool:
        return self.saved_bytes <= self.target_bytes

    @property
    def error(self) -> float:
        return sum(c.error for c in self.choices)

    def reference_choices(self) -> dict[tuple[str, int], int]:
        """(module path, numel) -> bits (0: dense) of every use: what
        ``razorpass.reference.apply(..., choices=...)`` needs to follow this graph."""
        out: dict[tuple[str, int], int] = {}
        for c in self.choices:
            for m in c.modules:
                if out.setdefault((m, c.numel), c.bits) != c.bits:
                    raise ValueError(f"memory_budget chose different bits for two tensors of {c.numel} elements "
                                     f"used by {m!r}: the reference cannot tell them apart")
        return out


@dataclass
class EncodeResult(PassResult):
    """What an encoding pass did: the roots it encoded (``count`` of them) and the ones
    it left alone, with why."""

    encoded: list[EncodedRoot] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class CheckResult(PassResult):
    """What the post-partition check found besides the invariant it enforces."""

    # encoded roots whose encode the partitioner moved into backward (recomputed there
    # from tensors saved anyway: correct, and free in memory)
    recomputed_in_backward: list[str] = field(default_factory=list)
    dense_kept: list[str] = field(default_factory=list)  # encoded roots an untargeted backward op still reads


@dataclass
class PartitionRecord:
    """Everything razorpass did to one partitioned graph: each pass's result under its
    name (``passes``), what the forward graph saves, and why it fell back if it did."""

    config: PassConfig
    fallback: str | None = None  # why the graph compiled without compression, else None
    passes: dict[str, PassResult] = field(default_factory=dict)
    saved: list[SavedTensor] = field(default_factory=list)
    excluded_roots: list[str] = field(default_factory=list)  # left dense after a retry
    budget: BudgetRecord | None = None  # memory_budget's choices, when one is set

    def count(self, name: str) -> int:
        """How many rewrites the pass ``name`` made (0 where it did not run)."""
        r = self.passes.get(name)
        return r.count if r is not None else 0

    def _all(self, attr: str) -> list:
        return [x for r in self.passes.values() for x in getattr(r, attr, ())]

    @property
    def encoded(self) -> list[EncodedRoot]:
        """Every encoded root, in the order the passes ran."""
        return self._all("encoded")

    @property
    def skipped(self) -> list[Skip]:
        """Every tensor a pass left alone, with why."""
        return self._all("skipped")

    def encoded_as(self, kind: type) -> list:
        return [r for r in self.encoded if isinstance(r, kind)]

    @property
    def compressed(self) -> list[EncodedRoot]:
        """The activations ``compress_saved`` encoded (top-k or per-group quantized)."""
        return self.encoded_as((CompressedRoot, QuantizedRoot))

    @property
    def packed(self) -> list[PackedMask]:
        return self.encoded_as(PackedMask)

    @property
    def quantized(self) -> list[QuantizedDerivative]:
        return self.encoded_as(QuantizedDerivative)

    @property
    def recomputed_in_backward(self) -> list[str]:
        return self._all("recomputed_in_backward")

    @property
    def dense_kept(self) -> list[str]:
        return self._all("dense_kept")
