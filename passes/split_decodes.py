"""split-decodes: decode again rather than keep a decoded activation alive across a
convolution backward or a batched matmul that does not read it.

Runs on the partitioned backward graph. ``Rewriter.reroute`` decodes a root once, before
its first backward use; when a code serves uses far apart (a norm's x̂ that the next
layer's weight gradient reads through a replayed affine / ReLU6 / padding, and the
norm's own backward much later), the dense decoded tensor stays alive across the
convolution backward between them; an attention's softmax output, likewise, across
the bmm of dP. Here the uses of each decoded activation (``codecs.value_decode_ops``)
are grouped in graph order, a new group starting after a heavy op that does not read
it, and every group after the first gets its own copy of the decode, placed right
before the group. A decode is deterministic, so values are unchanged; the cost is one
more decode per extra group. Runs after partitioning because the partitioner's CSE
would merge the copies back. The result counts the copies added.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import value_decode_ops
from .context import PassContext
from .framework import GraphPass, PassResult, Stage

__all__ = ["run", "PASS"]

aten = torch.ops.aten

# A convolution backward, and a batched matmul (the softmax output P of an attention
# serves dV = Pᵀ·dO and the softmax backward, with dP = dO·Vᵀ between them: kept decoded
# across it, P and dP, B·H·T² elements each, would be live at once). A plain matmul is
# not one: a LayerNorm's x̂ kept across its qkv weight gradient costs less than a second
# decode (bench/README.md has the measurements behind both choices).
_HEAVY = frozenset({aten.convolution_backward.default, aten.bmm.default})


def _groups(users: list[fx.Node], order: dict, heavy_before: list[int]) -> list[list[fx.Node]]:
    """``users`` in graph order, split wherever a heavy op lies between two of them."""
    groups = [[users[0]]]
    for u in users[1:]:
        prev = groups[-1][-1]
        if heavy_before[order[u]] - heavy_before[order[prev] + 1] > 0:
            groups.append([u])
        else:
            groups[-1].append(u)
    return groups


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    decodes = value_decode_ops()
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    heavy_before = [0]  # heavy_before[i]: heavy ops among nodes[:i]
    for n in nodes:
        heavy_before.append(heavy_before[-1] + (n.op == "call_function" and n.target in _HEAVY))
    split = 0
    for d in [n for n in nodes if n.op == "call_function" and n.target in decodes]:
        users = sorted(d.users, key=order.__getitem__)
        if len(users) < 2:
            continue
        for group in _groups(users, order, heavy_before)[1:]:
            with gm.graph.inserting_before(group[0]):
                copy = gm.graph.call_function(d.target, d.args, d.kwargs)
            copy.meta.update(d.meta)
            for u in group:
                u.replace_input_with(d, copy)
            split += 1
    return PassResult(split)


PASS = GraphPass("split_decodes", Stage.POST_PARTITION, run)
