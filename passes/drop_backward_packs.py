"""drop-backward-packs: a mask that the partitioner recomputes in backward is used there
as it is, not packed and unpacked again.

Runs on the partitioned backward graph, before ``inline_codecs``. ``pack_masks`` puts
``razor::pack_bits`` after a boolean mask and ``razor::unpack_bits`` before its backward
uses, on the joint graph; when the min-cut partitioner then recomputes the mask in
backward (from a tensor saved anyway: on a CNN under Back Razor's rule, the BatchNorm
input the ReLU6 mask is computed from), both ops land in the backward graph and pack a
mask only to unpack it again. Measured on EfficientNet-Lite0 (``targets=("mask",)``,
batch 32, 112 px), 33 of the 34 packed masks were such pairs and cost about 0.2 s a step
on two CPU cores, inside kernels Inductor could not vectorize.

Each ``unpack_bits(pack_bits(m), shape)`` of the backward graph is replaced by ``m``:
packing is lossless, so every value is unchanged (``m`` is boolean and of ``shape``; a
non-contiguous ``m`` is fine for the pointwise ops that read masks). The forward graph
and what crosses to backward are untouched; a pack whose bytes are saved by the forward
is not in the backward graph and is never matched. Each replaced pair is counted in
``ctx.backward_packs_dropped``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .common import PassContext

__all__ = ["run"]


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.razor.unpack_bits.default:
            continue
        packed, shape = node.args
        if not (isinstance(packed, fx.Node) and packed.target is torch.ops.razor.pack_bits.default):
            continue
        mask = packed.args[0]
        val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if val is None or val.dtype != torch.bool or list(val.shape) != list(shape):
            continue
        node.replace_all_uses_with(mask)
        gm.graph.erase_node(node)
        if not packed.users:
            gm.graph.erase_node(packed)
        dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    ctx.backward_packs_dropped += dropped
    return gm
