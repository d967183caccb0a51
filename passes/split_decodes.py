"""split-decodes: decode again rather than keep a decoded activation alive across a
convolution backward or a batched matmul that does not read it.

Runs on the partitioned backward graph. ``rewrite.reroute`` decodes a root once, before
its first backward use; when a code serves uses far apart (a norm's x̂ that the next
layer's weight gradient reads through a replayed affine / ReLU6 / padding, and the
norm's own backward much later), the dense decoded tensor stays alive across the
convolution backward between them: on EfficientNet-Lite0 that raised the step
peak by 32 MiB; an attention's softmax output, likewise, across the bmm of dP. Here
the uses of each decode are grouped in graph order, a new group starting after a
heavy op that does not read it, and every group after the first gets its own copy of
the decode, placed right before the group. A decode is deterministic, so values are
unchanged; the cost is one more decode per extra group. Runs after partitioning because the partitioner's CSE would
merge the copies back.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .common import PassContext

__all__ = ["run", "DECODE_OPS"]

aten = torch.ops.aten

DECODE_OPS = frozenset({torch.ops.razor.dequantize_group.default, torch.ops.razor.decompress.default,
                        torch.ops.razor.decompress_offsets.default,
                        torch.ops.razor.dequantize_uniform.default})
# A convolution backward, and a batched matmul. On MiniLM and ViT-B/16 a LayerNorm's x̂
# decoded once lives across one matmul backward (its qkv weight gradient, then the
# norm's backward) and splitting it there measured no lower peak (ViT-B/16: 387 and 403
# MiB in two runs without, 394 with: run-to-run noise) for 2-6% of step time; on
# EfficientNet-Lite0 the split across a convolution backward took the peak from 192 to
# 159 MiB. The softmax output P of an attention serves dV = Pᵀ·dO and the softmax
# backward, with dP = dO·Vᵀ (a bmm) between them: kept decoded across it, P and dP
# (B·H·T² elements each) are live at once; decoded again after it, ViT-B/16's step peak
# went from 414.3 to 407.5 MiB for one more top-k decode per layer.
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


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    heavy_before = [0]  # heavy_before[i]: heavy ops among nodes[:i]
    for n in nodes:
        heavy_before.append(heavy_before[-1] + (n.op == "call_function" and n.target in _HEAVY))
    split = 0
    for d in [n for n in nodes if n.op == "call_function" and n.target in DECODE_OPS]:
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
    if split:
        gm.graph.lint()
        gm.recompile()
    ctx.split_decodes += split
    return gm
