"""canonicalize: common-subexpression elimination on the joint graph.

A decomposed backward often recomputes what forward already computed (the LayerNorm
backward recomputes x̂ = (x - mean) * rstd). Inductor's joint-graph passes merge such
duplicates before partitioning, the plain AOTAutograd path does not; running CSE here
makes compress-saved see the same graph under both compilers (so "eager" and
"inductor" compress the same tensors and give the same gradients). The min-cut
partitioner runs the same CSE afterwards, so this changes no result.

One duplicate CSE cannot see: over a non-contiguous input (a transposed or permuted
activation, as Swin's patch embedding and Whisper's whole residual stream are), the
LayerNorm forward centers a contiguous ``clone(x)`` while its backward centers ``x``
itself. The two ``x - mean`` are equal value for value; ``x - mean`` of the backward is
rerouted to read the clone, so that CSE merges the backward's x̂ into the forward's and
the backward reads x̂ (the "layernorm" class), not the raw input.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._functorch.compile_utils import fx_graph_cse

from .context import PassContext
from .framework import GraphPass, PassResult, Stage


aten = torch.ops.aten


def _center_on_clones(graph: fx.Graph) -> None:
    """Reroute ``sub(x, m)`` to ``sub(clone(x), m)``'s operand where a contiguous clone
    of ``x`` is centered on the same ``m``."""
    for c in graph.nodes:
        if c.op != "call_function" or c.target is not aten.clone.default or not isinstance(c.args[0], fx.Node):
            continue
        if c.kwargs.get("memory_format", torch.contiguous_format) is not torch.contiguous_format:
            continue
        x = c.args[0]
        means = {u.args[1] for u in c.users if u.target is aten.sub.Tensor and u.args[0] is c}
        for u in list(x.users):
            if u.target is aten.sub.Tensor and u.args[0] is x and u.args[1] in means and not u.kwargs:
                u.update_arg(0, c)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    _center_on_clones(gm.graph)
    gm.graph.eliminate_dead_code()
    before = len(gm.graph.nodes)
    gm.graph = fx_graph_cse(gm.graph)
    return PassResult(before - len(gm.graph.nodes))


PASS = GraphPass("canonicalize", Stage.JOINT, run)
