"""pack-masks: save boolean masks for backward packed 8 per byte (target class "mask").

Runs on the AOTAutograd joint graph after ``compress_saved``. A boolean tensor that
the forward pass computes and backward reads (a dropout mask: ``native_dropout``'s
second output, or ``rand > p`` where Inductor decomposes dropout) is otherwise saved
as one byte per element. So is the mask of a ReLU-like backward (``x <= 0 | x >= 6``
of ReLU6): its pieces read forward values only, and the partitioner computes them in
forward and saves the mask once the float input is no longer saved dense (its copy
is compressed). A *root* is a boolean node that reads no tangent and that a
tangent-dependent node reads. For each root this pass inserts
``razor::pack_bits`` right after it in forward and one ``razor::unpack_bits`` right
before its first backward use, replays the forward view chain from the root to each
backward consumer on the unpacked tensor, and reroutes every backward use. Packing is
lossless: forward and backward compute exactly what they did before.

Left alone (and listed in the result's ``skipped``):

* graph inputs (the caller holds them) and roots a forward output exposes;
* masks computed from graph inputs and constants by light ops only (no random op,
  matmul, convolution or embedding: a causal or padding mask): the partitioner
  recomputes those in backward for free, a packed copy would add bytes;
* empty masks and masks whose shape has data-dependent (unbacked) sizes;
* layers outside the config's ``include`` / ``exclude`` globs, and roots the
  pipeline's retry excluded (``ctx.excluded_roots``).

The records (``records.PackedMask``) are the result's ``encoded``, so the saved-tensor
description and the post-partition check (``check_saved``) cover packed roots too. The graph surgery is ``rewrite.reroute`` with
``razor::pack_bits`` / ``razor::unpack_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

from .codecs import CODECS
from .common import VIEW_OPS, BailOut, forward_outputs, matches, module_path, strip_views
from .compress_saved import layer_label
from .context import PassContext
from .facts import GraphFacts
from .framework import GraphPass, Stage
from .records import EncodeResult, PackedMask
from .rewrite import Rewriter, Use
from .vocab import Encoding, OpClass, Skip, SkipReason

OP_CLASS = OpClass.MASK


@dataclass
class Plan:
    root: fx.Node
    module: str
    sites: list[Use] = field(default_factory=list)


def _walk_to_root(operand: fx.Node, bwd: set[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
    """The root of ``operand`` through forward views (views in backward are not walked)."""
    return strip_views(operand, through=lambda n: n.target in VIEW_OPS and n not in bwd)


def _forward_output_roots(gm: fx.GraphModule, ctx: PassContext, bwd: set[fx.Node]) -> set[fx.Node]:
    outs = forward_outputs(gm, ctx.num_fwd_outputs)[0]
    return {_walk_to_root(n, bwd)[0] for n in outs if isinstance(n, fx.Node)}


def analyse(gm: fx.GraphModule, ctx: PassContext) -> tuple[list[Plan], list[Skip]]:
    """One plan per boolean forward root that some backward op reads, and the roots
    left alone with why."""
    cfg = ctx.config
    if OP_CLASS not in cfg.target_classes:
        return [], []
    facts = ctx.facts(gm)
    bwd, dep = facts.backward, facts.tangent_dependent
    excluded = set(ctx.excluded_roots)
    exposed = _forward_output_roots(gm, ctx, bwd)
    plans: dict[fx.Node, Plan] = {}
    rejected: dict[fx.Node, Skip | None] = {}
    for node in gm.graph.nodes:
        if node not in bwd or node.op != "call_function":
            continue
        for operand in dict.fromkeys(node.all_input_nodes):
            # a forward value, or the tangent-free end of a backward formula's mask
            # (not its pieces, which only other tangent-free pieces read)
            if operand in dep or (operand in bwd and node not in dep):
                continue
            root, chain = _walk_to_root(operand, bwd)
            val = root.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.layout != torch.strided:
                continue
            if root in plans:
                plans[root].sites.append(Use(node, chain, operand=operand))
                continue
            if root in rejected:
                continue
            reason = _reject_reason(root, val, node, facts, exposed, excluded, cfg)
            if reason is not False:
                rejected[root] = reason
                continue
            plan = plans[root] = Plan(root, module_path(root) or module_path(node))
            plan.sites.append(Use(node, chain, operand=operand))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(plans.values(), key=lambda p: order[p.root]), [why for why in rejected.values() if why]


def _reject_reason(root, val, consumer, facts: GraphFacts, exposed, excluded, cfg) -> Skip | None | bool:
    """Why ``root`` is not packed (None when silently out of scope), or False to pack it."""
    def skip(reason: SkipReason, detail: str = "") -> Skip:
        return Skip(root.name, reason, detail)

    if root.op != "call_function":
        return None if root.op == "placeholder" else skip(SkipReason.NOT_COMPUTED, root.op)
    if root.name in excluded:
        return skip(SkipReason.RETRY_DENSE)
    path = module_path(root) or module_path(consumer)
    if not matches(path, cfg.include, cfg.exclude):
        return None
    if root in exposed:
        return skip(SkipReason.EXPOSED)
    if free_unbacked_symbols(val.shape):
        return skip(SkipReason.DATA_DEPENDENT_SHAPE, str(tuple(val.shape)))
    if statically_known_true(val.numel() == 0):
        return skip(SkipReason.EMPTY)
    if facts.light_inputs(root) is not None:  # the partitioner recomputes it for free
        return skip(SkipReason.RECOMPUTABLE_FROM_INPUTS)
    return False


def apply(gm: fx.GraphModule, ctx: PassContext, plans: list[Plan]) -> list[PackedMask]:
    records = []
    codec = CODECS[Encoding.PACKED_MASK]
    with Rewriter(gm) as rw:
        for plan in plans:
            done = rw.reroute(plan.root, plan.sites, codec, (), lambda enc, sizes: (enc[0], sizes))
            left = [s.consumer.name for s in plan.sites if s.operand in s.consumer.all_input_nodes]
            if left:
                raise BailOut(f"pack_masks: {plan.root.name} is still read dense in backward by {left}")
            records.append(PackedMask(**done.record_fields(), layer=layer_label([plan.module]), modules=(plan.module,),
                                      op_classes=(OP_CLASS,), consumers=len(plan.sites)))
    return records


def run(gm: fx.GraphModule, ctx: PassContext) -> EncodeResult:
    plans, skipped = analyse(gm, ctx)
    encoded = apply(gm, ctx, plans) if plans else []
    return EncodeResult(count=len(encoded), encoded=encoded, skipped=skipped)


PASS = GraphPass("pack_masks", Stage.JOINT, run)
