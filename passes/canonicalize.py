"""canonicalize: common-subexpression elimination on the joint graph.

A decomposed backward often recomputes what forward already computed (the LayerNorm
backward recomputes x̂ = (x - mean) * rstd). Inductor's joint-graph passes merge such
duplicates before partitioning, the plain AOTAutograd path does not; running CSE here
makes compress-saved see the same graph under both compilers (so "eager" and
"inductor" compress the same tensors and give the same gradients). The min-cut
partitioner runs the same CSE afterwards, so this changes no result.
"""

from __future__ import annotations

import torch.fx as fx
from torch._functorch.compile_utils import fx_graph_cse

from .common import PassContext


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    new = fx.GraphModule(gm, fx_graph_cse(gm.graph))
    return new
