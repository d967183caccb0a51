"""Typed records that the passes leave behind: what was encoded, what stays saved, and
why a graph fell back. The pipeline collects them into one :class:`PartitionRecord`
per partitioned graph; ``razorpass.record_compiles()`` yields those, and the memory
report and the tests read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EncodedRoot", "CompressedRoot", "QuantizedRoot", "PackedMask", "QuantizedDerivative", "SavedTensor",
           "BudgetChoice", "BudgetRecord", "PartitionRecord"]


@dataclass(frozen=True)
class EncodedRoot:
    """One forward tensor that backward reads through an encoded copy."""

    root: str  # the joint-graph node that was encoded
    layer: str  # one label for the layers that read it ("a.b.{query,key,value}")
    modules: tuple[str, ...]  # module path of each backward use
    op_classes: tuple[str, ...]  # target classes of its uses ("linear", "mask", ...)
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
    layout: str = "mask"


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
class PartitionRecord:
    """Everything razorpass did to one partitioned graph."""

    config: Any  # the RazorConfig
    fallback: str | None = None  # why the graph compiled without compression, else None
    compressed: list[CompressedRoot] = field(default_factory=list)
    packed: list[PackedMask] = field(default_factory=list)
    quantized: list[QuantizedDerivative] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # compress_saved: "root: why"
    pack_skipped: list[str] = field(default_factory=list)  # pack_masks: "root: why"
    quantize_skipped: list[str] = field(default_factory=list)  # encode_derivative: "node: why"
    excluded_roots: list[str] = field(default_factory=list)  # left dense after a retry
    recomputed_in_backward: list[str] = field(default_factory=list)
    dense_kept: list[str] = field(default_factory=list)  # encoded roots an untargeted backward op still reads
    saved: list[SavedTensor] = field(default_factory=list)
    inlined: int = 0  # pack / unpack ops handed to Inductor as plain ops (inline_codecs)
    split_decodes: int = 0  # extra decodes so that no decoded tensor lives across a heavy op
    # masks the partitioner recomputes in backward, used there unpacked (drop_backward_packs);
    # they stay in ``packed`` (packed on the joint graph) and in ``recomputed_in_backward``
    backward_packs_dropped: int = 0
    centered_quantizes: int = 0  # BatchNorm inputs quantized centered in one op (center_quantize)
    folded_affines: int = 0  # weight gradients computed from x̂, the norm's affine folded in (fold_affine)
    hoisted_decodes: int = 0  # decodes moved, with their weight-gradient matmuls, right after dY (hoist_decodes)
    budget: BudgetRecord | None = None  # memory_budget's choices, when one is set

    @property
    def encoded(self) -> list[EncodedRoot]:
        return [*self.compressed, *self.packed, *self.quantized]
