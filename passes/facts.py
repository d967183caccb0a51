"""Facts about a joint graph, computed once per partition attempt and read by every pass.

:class:`GraphFacts` holds what the joint passes ask of the graph: which nodes belong to
backward, which depend on a tangent, which inputs are parameters and which the caller
holds (the batch), and which tensors light ops rebuild from those inputs. The pipeline
builds it from the joint graph as the encoding passes receive it
(``PassContext.facts``); the sets name that graph's nodes. A pass that rewrites the
graph adds nodes the facts do not list: the encoding passes read facts about the
original nodes only (the roots they encode, the backward ops that read them), and the
post-partition check builds facts of the rewritten graph it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .common import forward_outputs, primals

__all__ = ["GraphFacts", "backward_nodes", "tangent_closure", "light_inputs", "is_random", "HEAVY_OPS"]

aten = torch.ops.aten


def _is_tangent(n: fx.Node) -> bool:
    return n.op == "placeholder" and "tangents" in str(n.target)


def backward_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The joint graph's backward part: nodes that depend on a tangent, and nodes that
    AOTAutograd traced as part of a backward formula (``partitioner_tag="is_backward"``)
    even where they read forward values only (e.g. erf(x) inside a GELU backward)."""
    bwd: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if _is_tangent(n):
                bwd.add(n)
        elif n.op != "output" and (
            n.meta.get("partitioner_tag") == "is_backward" or any(a in bwd for a in n.all_input_nodes)
        ):
            bwd.add(n)
    return bwd


def tangent_closure(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a tangent (what the partitioner must place in
    backward). Unlike :func:`backward_nodes`, pieces of a backward formula that read
    forward values only (the ``x <= 0`` of a ReLU backward) are not in it."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if _is_tangent(n) or (n.op not in ("placeholder", "output") and any(a in dep for a in n.all_input_nodes)):
            dep.add(n)
    return dep


# Ops that make a value expensive (or impossible) to recompute in backward from the
# graph inputs.
HEAVY_OPS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
                       aten.convolution.default, aten.embedding.default})


def is_random(n: fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())


def light_inputs(root: fx.Node, dep: set[fx.Node], memo: dict[fx.Node, frozenset | None]) -> frozenset | None:
    """The graph inputs ``root`` is computed from when it is computed through light ops
    alone (no tangent, random op, matmul, convolution or embedding on the way), so the
    partitioner can recompute it in backward for free from them; else None. ``memo``
    carries the answers for ancestors across calls on one graph."""
    todo = [(root, False)]
    while todo:  # iterative post-order: a node is decided after all of its inputs
        n, inputs_done = todo.pop()
        if n in memo:
            continue
        if n.op == "call_function" and not inputs_done:
            todo.append((n, True))
            todo.extend((a, False) for a in n.all_input_nodes if a not in memo)
        elif n.op == "placeholder":
            memo[n] = None if n in dep else frozenset({n})
        elif n.op == "get_attr":
            memo[n] = frozenset()
        elif n.op != "call_function" or n in dep or is_random(n) or n.target in HEAVY_OPS:
            memo[n] = None
        else:
            parts = [memo[a] for a in n.all_input_nodes]
            memo[n] = None if any(p is None for p in parts) else frozenset().union(*parts)
    return memo[root]


@dataclass
class GraphFacts:
    """What the passes ask of one joint graph (see the module docstring)."""

    graph: fx.Graph
    primals: list[fx.Node]  # the primal inputs (not tangents, not RNG seeds), in order
    static: set[fx.Node]  # primals of static lifetime: the parameters
    grad_outputs: list[tuple[fx.Node, fx.Node | None]]  # (primal, its gradient output or None)
    held_by_caller: set[fx.Node]  # primals that get no gradient (the batch): held anyway
    backward: set[fx.Node]  # backward_nodes
    tangent_dependent: set[fx.Node]  # tangent_closure
    _light: dict[fx.Node, frozenset | None] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, gm: fx.GraphModule, num_fwd_outputs: int, static_lifetime_input_indices) -> GraphFacts:
        prim = primals(gm)
        grads = forward_outputs(gm, num_fwd_outputs)[1]
        grad_outputs = list(zip(prim, grads + [None] * (len(prim) - len(grads))))
        return cls(graph=gm.graph, primals=prim,
                   static={prim[i] for i in static_lifetime_input_indices if i < len(prim)},
                   grad_outputs=grad_outputs, held_by_caller={p for p, g in grad_outputs if g is None},
                   backward=backward_nodes(gm), tangent_dependent=tangent_closure(gm))

    def light_inputs(self, root: fx.Node) -> frozenset | None:
        """:func:`light_inputs` of ``root``, memoized across passes."""
        return light_inputs(root, self.tangent_dependent, self._light)

    def recomputable_from_caller(self, root: fx.Node) -> bool:
        """True when ``root`` is computed by light ops from what the caller holds (at
        least one such input) and parameters: the partitioner recomputes it in backward
        for free, so an encoded copy would only lose precision (a padded copy of the batch)."""
        src = self.light_inputs(root)
        return src is not None and bool(src & self.held_by_caller) and src <= self.held_by_caller | self.static
