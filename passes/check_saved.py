"""check-saved: the post-partition invariant of compress-saved, encode-derivative and
pack-masks.

No dense activation may be saved for backward only to feed a weight gradient that was
meant to be compressed, and no boolean mask that was packed may be saved unpacked.
Concretely: every saved tensor of the forward graph is walked back through views to
its root; a root that compress-saved compressed (or pack-masks packed) may be saved
dense only if some *untargeted* backward op still reads it in the rewritten joint
graph.
The min-cut partitioner can break this (e.g. under ``activation_memory_budget < 1``,
or a ``MUST_RECOMPUTE`` tag, it may move the compress into backward and save the dense
input instead); the pipeline then compiles the graph unmodified.
"""

from __future__ import annotations

import torch.fx as fx

from .codecs import encode_ops
from .common import VIEW_OPS, BailOut, forward_outputs, strip_views
from .context import PassContext
from .facts import backward_nodes
from .framework import GraphPass, Stage
from .records import CheckResult


class DenseSaved(BailOut):
    """Some compressed roots were still saved dense; the pipeline retries without them."""

    def __init__(self, roots: list[str]):
        super().__init__(f"dense activation(s) {roots} saved for backward although compressed")
        self.roots = roots


def still_read_dense(joint: fx.GraphModule, roots: set[str]) -> set[str]:
    """Encoded roots that some backward op of the rewritten joint graph reads dense (an
    encode op reading its root is not such a read: the encodes of every codec)."""
    bwd = backward_nodes(joint)
    encoders = encode_ops()
    keep = set()
    for n in joint.graph.nodes:
        if n.name not in roots:
            continue
        todo = [n]
        while todo:
            cur = todo.pop()
            for u in cur.users:
                if u in bwd or u.meta.get("partitioner_tag") in ("is_backward", "must_be_in_backward"):
                    if u.target not in encoders:
                        keep.add(n.name)
                elif u.op == "call_function" and u.target in VIEW_OPS:
                    todo.append(u)
    return keep


def saved_nodes(fw_module: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The tensors a partitioned forward graph saves for backward (its outputs after the
    user outputs)."""
    return [n for n in forward_outputs(fw_module, num_fwd_outputs)[1] if isinstance(n, fx.Node)]


def root_of(n: fx.Node) -> fx.Node:
    return strip_views(n)[0]


def run(fw_module: fx.GraphModule, ctx: PassContext) -> CheckResult:
    """Check the partitioned forward graph against ``ctx.joint`` (the rewritten joint graph)."""
    records = ctx.encoded
    if not records:
        return CheckResult()
    roots = {r.root for r in records}
    allowed = still_read_dense(ctx.joint, roots)
    saved = saved_nodes(fw_module, ctx.num_fwd_outputs)
    bad = sorted({root_of(n).name for n in saved if root_of(n).name in roots - allowed})
    if bad:
        raise DenseSaved(bad)
    # A compress the partitioner moved into backward recomputes its root there from
    # tensors saved anyway (e.g. a LayerNorm output from the saved LayerNorm input):
    # correct and free in memory, so it is recorded, not rejected.
    fw_names = {n.name for n in fw_module.graph.nodes}
    return CheckResult(recomputed_in_backward=sorted(r.root for r in records if r.encode_node not in fw_names),
                       dense_kept=sorted(allowed))


PASS = GraphPass("check_saved", Stage.CHECK, run)
