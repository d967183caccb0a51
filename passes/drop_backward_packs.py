"""drop-backward-packs: a mask that the partitioner recomputes in backward is used there
as it is, not packed and unpacked again.

Runs on the partitioned backward graph, before ``inline_codecs``. ``pack_masks`` puts
``razor::pack_bits`` after a boolean mask and ``razor::unpack_bits`` before its backward
uses, on the joint graph; when the min-cut partitioner then recomputes the mask in
backward (from a tensor saved anyway: on a CNN under Back Razor's rule, the BatchNorm
input the ReLU6 mask is computed from), both ops land in the backward graph and pack a
mask only to unpack it again (on a CNN under that rule, nearly every packed mask).

Each ``unpack_bits(pack_bits(m), shape)`` of the backward graph is replaced by ``m``:
packing is lossless, so every value is unchanged (``m`` is boolean and of ``shape``; a
non-contiguous ``m`` is fine for the pointwise ops that read masks). The forward graph
and what crosses to backward are untouched; a pack whose bytes are saved by the forward
is not in the backward graph and is never matched. The result counts the pairs removed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import CODECS
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .vocab import Encoding

__all__ = ["run", "PASS"]


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    codec = CODECS[Encoding.PACKED_MASK]
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not codec.decode:
            continue
        packed, shape = node.args
        if not (isinstance(packed, fx.Node) and packed.target is codec.encode):
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
    return PassResult(dropped)


PASS = GraphPass("drop_backward_packs", Stage.POST_PARTITION, run)
