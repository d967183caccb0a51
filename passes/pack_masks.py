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

Left alone (and listed in ``ctx.stats["pack_skipped"]``):

* graph inputs (the caller holds them) and roots a forward output exposes;
* masks computed from graph inputs and constants by light ops only (no random op,
  matmul, convolution or embedding: a causal or padding mask): the partitioner
  recomputes those in backward for free, a packed copy would add bytes;
* empty masks and masks whose shape has data-dependent (unbacked) sizes;
* layers outside the config's ``include`` / ``exclude`` globs, and roots the
  pipeline's retry excluded (``ctx.stats["exclude_roots"]``).

Records go to ``ctx.stats["packed"]`` with the fields of compress-saved's records
(``outputs`` names the packed node), so the saved-tensor description and the
post-partition check (``check_saved``) cover packed roots too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

from .common import (VIEW_OPS, BailOut, PassContext, backward_nodes, fake_mode_of, light_inputs, matches,
                     module_path, replay_chain, size_args, tangent_closure)
from .compress_saved import layer_label

OP_CLASS = "mask"


@dataclass
class Site:
    """``consumer`` (a backward node) reads ``operand``, the root seen through ``chain``."""

    consumer: fx.Node
    operand: fx.Node
    chain: list[fx.Node]  # forward views from the root (exclusive) to the operand (inclusive)


@dataclass
class Plan:
    root: fx.Node
    module: str
    sites: list[Site] = field(default_factory=list)


def _walk_to_root(operand: fx.Node, bwd: set[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
    chain: list[fx.Node] = []
    n = operand
    while n.op == "call_function" and n.target in VIEW_OPS and n not in bwd and isinstance(n.args[0], fx.Node):
        chain.append(n)
        n = n.args[0]
    chain.reverse()
    return n, chain


def _forward_output_roots(gm: fx.GraphModule, ctx: PassContext, bwd: set[fx.Node]) -> set[fx.Node]:
    out = next(iter(gm.graph.find_nodes(op="output")))
    flat = torch.utils._pytree.arg_tree_leaves(*out.args)
    return {_walk_to_root(n, bwd)[0] for n in flat[: ctx.num_fwd_outputs] if isinstance(n, fx.Node)}


def analyse(gm: fx.GraphModule, ctx: PassContext) -> list[Plan]:
    """One plan per boolean forward root that some backward op reads."""
    cfg = ctx.config
    if OP_CLASS not in cfg.targets:
        return []
    bwd = backward_nodes(gm)
    dep = tangent_closure(gm)
    excluded = set(ctx.stats.get("exclude_roots", ()))
    exposed = _forward_output_roots(gm, ctx, bwd)
    plans: dict[fx.Node, Plan] = {}
    rejected: dict[fx.Node, str] = {}
    memo: dict[fx.Node, bool] = {}
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
                plans[root].sites.append(Site(node, operand, chain))
                continue
            if root in rejected:
                continue
            reason = _reject_reason(root, val, node, dep, exposed, excluded, memo, cfg)
            if reason is not None:
                rejected[root] = reason
                continue
            plan = plans[root] = Plan(root, module_path(root) or module_path(node))
            plan.sites.append(Site(node, operand, chain))
    ctx.stats["pack_skipped"] = [f"{r.name}: {why}" for r, why in rejected.items() if why]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(plans.values(), key=lambda p: order[p.root])


def _reject_reason(root, val, consumer, dep, exposed, excluded, memo, cfg) -> str | None:
    """Why ``root`` is not packed ("" when silently out of scope), or None to pack it."""
    if root.op != "call_function":
        return "" if root.op == "placeholder" else f"not a computed tensor ({root.op})"
    if root.name in excluded:
        return "saved dense by the partitioner (retry)"
    path = module_path(root) or module_path(consumer)
    if not matches(path, cfg.include, cfg.exclude):
        return ""
    if root in exposed:
        return "a forward output exposes it"
    if free_unbacked_symbols(val.shape):
        return f"data-dependent shape {tuple(val.shape)}"
    if statically_known_true(val.numel() == 0):
        return "empty"
    if light_inputs(root, dep, memo) is not None:  # the partitioner recomputes it for free
        return "recomputable from graph inputs"
    return None


def apply(gm: fx.GraphModule, ctx: PassContext, plans: list[Plan]) -> list[dict]:
    graph = gm.graph
    fake_mode = fake_mode_of(gm)
    order = {n: i for i, n in enumerate(graph.nodes)}
    records = []
    for plan in plans:
        root, val = plan.root, plan.root.meta["val"]
        # -- forward: pack right after the root
        with graph.inserting_after(root):
            packed = graph.call_function(torch.ops.razor.pack_bits.default, (root,))
        with graph.inserting_after(packed):
            sizes = size_args(graph, root, val)
        with fake_mode:
            pval = torch.ops.razor.pack_bits.default(val)
        packed.meta["val"] = pval
        packed.meta["partitioner_tag"] = "is_forward"
        if "nn_module_stack" in root.meta:
            packed.meta["nn_module_stack"] = root.meta["nn_module_stack"]
        # -- backward: one unpack before the first consumer
        first = min((s.consumer for s in plan.sites), key=order.__getitem__)
        with graph.inserting_before(first):
            dense = graph.call_function(torch.ops.razor.unpack_bits.default, (packed, sizes))
        with fake_mode:
            dense.meta["val"] = torch.ops.razor.unpack_bits.default(pval, list(val.shape))
        dense.meta["partitioner_tag"] = "must_be_in_backward"
        dense.meta["fwd_nn_module_stack"] = first.meta.get("fwd_nn_module_stack", {})
        for site in plan.sites:
            with graph.inserting_before(site.consumer):
                cur = replay_chain(graph, fake_mode, site.chain, dense, root)
            site.consumer.replace_input_with(site.operand, cur)
        left = [s.consumer.name for s in plan.sites if s.operand in s.consumer.all_input_nodes]
        if left:
            raise BailOut(f"pack_masks: {root.name} is still read dense in backward by {left}")
        records.append(
            {
                "root": root.name,
                "op_classes": [OP_CLASS],
                "modules": [plan.module],
                "consumers": len(plan.sites),
                "shape": tuple(val.shape),
                "dtype": val.dtype,
                "mask": packed.name,
                "outputs": (packed.name,),
                "layer": layer_label([plan.module]),
                "dense_bytes": val.numel() * val.element_size(),
            }
        )
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return records


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plans = analyse(gm, ctx)
    ctx.stats["packed"] = apply(gm, ctx, plans) if plans else []
    return gm
