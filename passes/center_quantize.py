"""center-quantize: a BatchNorm input is quantized centered without writing the centered
tensor out.

Runs on the partitioned forward graph. ``compress_saved`` stores a BatchNorm's input as
``quantize_group(x - mean)`` (the backward reads it only centered). The subtraction is a
pointwise op the compiler would fuse into its consumers, but the quantizer is opaque, so
the compiler writes the whole centered tensor to memory for it, once per BatchNorm.

Each ``quantize_group(sub(x, mean), group, bits)`` whose ``mean`` is one value per
index of dim 1 (shape ``[1, C, 1, ...]``, float32 like ``x`` and the difference) becomes
``quantize_group_centered(x, mean, group, bits)``: the same codes and bounds, bit for
bit (the kernel subtracts in float32, in registers or a scratch buffer), so the backward
and what crosses to it are unchanged. The subtraction stays where other forward ops
read it (dead code is removed). The result counts the replacements.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import CODECS
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .rewrite import Rewriter
from .vocab import Encoding

__all__ = ["run", "PASS"]

aten = torch.ops.aten


def _channel_center(sub: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, mean) of ``sub = x - mean`` with a float32 per-dim-1 ``mean``, or None."""
    if sub.op != "call_function" or sub.target is not aten.sub.Tensor or sub.kwargs or len(sub.args) != 2:
        return None
    x, mean = sub.args
    if not (isinstance(x, fx.Node) and isinstance(mean, fx.Node)):
        return None
    xv, mv, sv = x.meta.get("val"), mean.meta.get("val"), sub.meta.get("val")
    if not all(isinstance(v, torch.Tensor) for v in (xv, mv, sv)):
        return None
    if not (xv.dtype == mv.dtype == sv.dtype == torch.float32) or xv.dim() < 2 or mv.dim() > xv.dim():
        return None
    channels = xv.shape[1]
    want = [1, channels] + [1] * (xv.dim() - 2)
    shape = [1] * (xv.dim() - mv.dim()) + list(mv.shape)
    # plain ints only: comparing a symbolic size would guard the graph on it
    if not all(isinstance(d, int) for d in (*shape, channels)) or shape != want:
        return None
    if list(sv.shape) != list(xv.shape):
        return None
    return x, mean


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    quantize, fused = CODECS[Encoding.GROUP].encode, CODECS[Encoding.GROUP_CENTERED].encode
    centered = 0
    with Rewriter(gm) as rw:  # on exit: a subtraction left unread is removed
        for node in list(rw.graph.nodes):
            if node.op != "call_function" or node.target is not quantize or not isinstance(node.args[0], fx.Node):
                continue
            found = _channel_center(node.args[0])
            if found is None:
                continue
            rw.replace(node, fused, (*found, *node.args[1:]))
            centered += 1
    return PassResult(centered)


PASS = GraphPass("center_quantize", Stage.POST_PARTITION, run)
