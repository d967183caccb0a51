"""hoist-decodes: a decode read only by weight-gradient matmuls runs, with them, as soon
as their other operand exists.

Runs on the partitioned backward graph, after ``split_decodes``. A Linear's backward
computes two matmuls from the output gradient dY: the input gradient ``dY · W`` and the
weight gradient ``dYᵀ · x``, where ``x`` is decoded from its code. The graph computes
the input gradient first, so the decoded ``x`` and the input gradient are live at
once (a transformer MLP's second Linear: its 4x-wide decoded input and its 4x-wide
input gradient). Moved right after dY, the decode and the weight gradient finish (and
the decoded tensor is freed) before the input gradient is allocated.

Only decodes whose every reader, through reshapes and permutes, is an ``aten.mm``: a
decode that a normalization's backward also reads stays where it is (moving it would
keep it alive longer). The order of independent nodes changes; what each computes does
not. The result counts the moves.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import value_decode_ops
from .common import VIEW_OPS
from .context import PassContext
from .framework import GraphPass, PassResult, Stage

__all__ = ["run", "PASS"]

aten = torch.ops.aten


def _readers(decode: fx.Node) -> list[fx.Node] | None:
    """``decode``, the views between it and its matmuls, and the matmuls, in graph
    order; None when anything other than a view or an ``aten.mm`` reads it."""
    group, todo = [decode], [decode]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op != "call_function":
                return None
            if u.target is aten.mm.default:
                group.append(u)
            elif u.target in VIEW_OPS and u.args[0] is n:
                group.append(u)
                todo.append(u)
            else:
                return None
    if not any(n.target is aten.mm.default for n in group):
        return None
    return group


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    decodes = value_decode_ops()
    moved = 0
    for decode in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in decodes]:
        group = _readers(decode)
        if group is None:
            continue
        members = set(group)
        todo = list(group)
        while todo:  # the views of dY the matmuls read move along (a view costs nothing)
            for a in todo.pop().all_input_nodes:
                if a not in members and a.op == "call_function" and a.target in VIEW_OPS:
                    members.add(a)
                    todo.append(a)
        group = sorted(members, key=order.__getitem__)
        others = [a for n in group for a in n.all_input_nodes if a not in members]
        anchor = max(others, key=order.__getitem__)
        if anchor.op == "placeholder":  # no call among the graph's inputs
            anchor = list(gm.graph.find_nodes(op="placeholder"))[-1]
        first_mm = next(n for n in group if n.target is aten.mm.default)
        nodes = list(gm.graph.nodes)
        if all(n in members for n in nodes[order[anchor] + 1:order[first_mm]]):
            continue  # nothing to move past
        if any(order[u] <= order[anchor] for n in group for u in n.users if u not in members):
            continue  # a node read before the new place (cannot move)
        for n in group:
            anchor.append(n)  # moves n right after anchor
            anchor = n
        moved += 1
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return PassResult(moved)


PASS = GraphPass("hoist_decodes", Stage.POST_PARTITION, run)
