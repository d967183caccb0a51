"""mark-samples: keep the sample dim of ``granularity="sample"`` through Inductor's
joint-graph passes.

A "sample" is one index of dim 0 of an activation as its layer receives it. Inductor
runs its own joint-graph passes (no-op removal, pattern matching) before the
partitioner hook where ``compress_saved`` runs, and they fold a reshape pair such as
``(B*T, C) -> (B, T, C) -> (B*T, C)`` between two Linears: the second Linear's weight
gradient then reads the first one's 2-D output directly, and the sample dim (B) is in
no node that ``compress_saved`` can still see. Its group would be a row of C
elements instead of a sample of T*C, and the gradient would differ from
``razorpass.reference`` without a word.

This pass runs as Inductor's ``joint_custom_pre_pass``, before any of those passes,
and only under ``granularity="sample"``. For every backward node and each tensor
argument it walks the path ``compress_saved`` walks (backward-side views, then
order-preserving reshapes) and writes the smallest dim 0 on it to
``meta[SAMPLE_DIM0_META]`` ({argument index: dim 0}). ``compress_saved`` takes the
sample dim from there where it is smaller than what it finds itself. On a graph that
nothing folds, the walk here is a prefix of ``compress_saved``'s own, so it changes
nothing.

Invariants: the graph is not changed, only node metadata; a node that a later pass
replaces loses its entry, and the group is then what ``compress_saved`` sees.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .common import SAMPLE_DIM0_META, dim0, order_preserving
from .facts import backward_nodes

__all__ = ["MarkSamples", "mark"]


def _smallest_dim0(operand: fx.Node, bwd: set[fx.Node]):
    """The smallest dim 0 (an int or a SymInt) on the walk from ``operand``."""
    n = operand
    while n in bwd and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    if n in bwd:
        return None
    best = dim0(n)
    while n.op == "call_function" and order_preserving(n):
        n = n.args[0]
        d = dim0(n)
        if d is not None and (best is None or statically_known_true(d < best)):
            best = d
    return best


def mark(gm: fx.GraphModule) -> int:
    """Annotate every backward node of the joint graph ``gm``; returns how many."""
    bwd = backward_nodes(gm)
    count = 0
    for node in gm.graph.nodes:
        if node not in bwd or node.op != "call_function":
            continue
        dims = {i: d for i, a in enumerate(node.args)
                if isinstance(a, fx.Node) and (d := _smallest_dim0(a, bwd)) is not None}
        if dims:
            node.meta[SAMPLE_DIM0_META] = dims
            count += 1
    return count


class MarkSamples(CustomGraphPass):
    """The pass as Inductor's ``joint_custom_pre_pass`` (its ``uuid`` enters the compile
    cache key)."""

    def __call__(self, graph: fx.Graph) -> None:
        mark(graph.owning_module)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
