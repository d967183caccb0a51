"""compress-saved: route every targeted weight-gradient use of a saved activation
through ``razor::compress`` (forward) / ``razor::decompress`` (backward).

Runs on the AOTAutograd joint graph, before the min-cut partitioner. Three phases:

analyse  Find each backward consumer that computes a weight gradient (an ``mm``/``bmm``
         whose result reaches the gradient of a parameter through gradient plumbing only,
         or the weight output of ``convolution_backward``) and the forward activation
         it reads. Walk that operand back to its *root*: through any view in backward,
         then through order-preserving reshapes in forward, stopping at the tensor the
         layer actually receives. Groups ("block" / "sample") are formed over the root.
plan     One compressed copy per root (q, k and v projections reading the same input
         share it), one decompress right before the first consumer in backward.
apply    Insert compress after the root in forward, decompress before the first
         consumer, and replay the view chain from root to each consumer on the
         decompressed tensor. Only the weight-gradient operand is rerouted: the
         forward pass and every input gradient keep the dense, exact tensors.

After the rewrite no backward use of a compressed root remains unless some other,
untargeted backward op needs it dense (that one is then saved dense, as before); the
post-partition check (``check_saved``) proves nothing else keeps it alive.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .common import VIEW_OPS, BailOut, PassContext, backward_nodes, fake_mode_of, matches, module_path

aten = torch.ops.aten
prims = torch.ops.prims

# Reshapes that keep the flattened (logical) element order: walking back through them
# in forward does not change which elements form a block.
ORDER_PRESERVING = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.alias.default,
        aten.detach.default,
    }
)

# Ops through which a weight gradient flows to the graph output unchanged in kind:
# reshapes, accumulation of several uses of one weight and dtype casts (autocast).
# Reductions are not plumbing: the bias gradient of a LayerNorm is a sum of an input
# gradient. The batch sum of a batched (bmm) weight gradient is handled on its own.
GRAD_PLUMBING = VIEW_OPS | {
    aten.add.Tensor,
    aten._to_copy.default,
    prims.convert_element_type.default,
}
BATCH_SUMS = frozenset({aten.sum.dim_IntList})

MATMULS = frozenset({aten.mm.default, aten.bmm.default})
CONV_BACKWARD = aten.convolution_backward.default


@dataclass
class Site:
    """One rerouted use: ``consumer.args[arg_index]`` reads the (sparsified) root."""

    consumer: fx.Node
    arg_index: int
    chain: list[fx.Node]  # view nodes from the root (exclusive) to the operand (inclusive)
    op_class: str
    module: str


@dataclass
class Plan:
    root: fx.Node
    sites: list[Site] = field(default_factory=list)
    group_size: int = 0
    keep: int = 0


def _reaches_param_grad(gm: fx.GraphModule, ctx: PassContext, bwd: set[fx.Node]) -> set[fx.Node]:
    """Backward nodes whose value flows to a parameter's gradient through plumbing only."""
    static = ctx.static_primals(gm)
    sinks = [g for p, g in ctx.grad_outputs(gm) if g is not None and p in static]
    seen: set[fx.Node] = set()
    todo = list(sinks)
    while todo:
        n = todo.pop()
        if n in seen or n not in bwd:
            continue
        seen.add(n)
        if n.op != "call_function":
            continue
        if n.target in GRAD_PLUMBING:
            todo.extend(a for a in n.all_input_nodes if a in bwd)
        elif n.target in BATCH_SUMS and n.args[1] in ([0], (0,)):
            src = n.args[0]
            if isinstance(src, fx.Node) and src.target is aten.bmm.default:
                todo.append(src)
    return seen


def _weight_grad_operands(node: fx.Node, reach: set[fx.Node], bwd: set[fx.Node], static: set[fx.Node]) -> list[tuple[int, str]]:
    """(argument index, op class) of the saved-activation operands of a backward node."""
    if node.target in MATMULS and node in reach:
        return [(i, "linear") for i in (0, 1) if _is_activation_operand(node.args[i], bwd, static)]
    if node.target is CONV_BACKWARD:
        mask = node.args[10]
        if mask[1] and any(u.target is operator.getitem and u.args[1] == 1 and u in reach for u in node.users):
            if _is_activation_operand(node.args[1], bwd, static):
                return [(1, "conv")]
    return []


def _is_activation_operand(n, bwd: set[fx.Node], static: set[fx.Node]) -> bool:
    """True when ``n`` is a forward value seen through views (no tangent in it) whose
    storage is not a parameter (the other operand of an input-gradient matmul is a
    transposed weight: that is not an activation)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in VIEW_OPS:
        n = n.args[0]
    return isinstance(n, fx.Node) and n not in bwd and n not in static


def _inside(path: str, layer: str) -> bool:
    return bool(layer) and (path == layer or path.startswith(layer + "."))


def _walk_to_root(operand: fx.Node, bwd: set[fx.Node], layer: str) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    """(root, view chain root->operand, the node as the layer received it).

    The root is the deepest node reachable through order-preserving reshapes, so that
    every consumer of one tensor shares one compressed copy; ``received`` is the last
    node on that path produced outside the consuming layer (its dim 0 is the sample
    dim of the "sample" granularity, even where the graph flattens it to (B*T, C)).
    """
    chain: list[fx.Node] = []
    n = operand
    while n in bwd:  # backward-side views (e.g. the transpose of X in grad_W = gᵀ X)
        chain.append(n)
        n = n.args[0]
    received = None
    while True:
        if received is None and not _inside(module_path(n), layer):
            received = n
        if not (n.op == "call_function" and n.target in ORDER_PRESERVING):
            break
        chain.append(n)
        n = n.args[0]
    chain.reverse()
    return n, chain, received if received is not None else n


def analyse(gm: fx.GraphModule, ctx: PassContext) -> list[Plan]:
    cfg = ctx.config
    if not cfg.targets:
        return []
    bwd = backward_nodes(gm)
    reach = _reaches_param_grad(gm, ctx, bwd)
    static = ctx.static_primals(gm)
    plans: dict[fx.Node, Plan] = {}
    skipped: list[str] = []
    for node in gm.graph.nodes:
        if node not in bwd or node.op != "call_function":
            continue
        for idx, op_class in _weight_grad_operands(node, reach, bwd, static):
            if op_class not in cfg.targets:
                continue
            path = module_path(node)
            if not matches(path, cfg.include, cfg.exclude):
                continue
            root, chain, received = _walk_to_root(node.args[idx], bwd, path)
            val = root.meta.get("val")
            if root in static or not isinstance(val, torch.Tensor) or not val.is_floating_point():
                continue
            if cfg.granularity == "sample":
                shape = received.meta["val"].shape
                group = math.prod(shape[1:]) if len(shape) > 1 else 1
                if not is_concrete_int(group):
                    skipped.append(f"{root.name}: per-sample size {group} is symbolic")
                    continue
                group = int(group)
            else:
                group = cfg.block_size
            plan = plans.setdefault((root, group), Plan(root, group_size=group, keep=int(cfg.keep_count(group))))
            plan.sites.append(Site(node, idx, chain, op_class, path))
    out = list(plans.values())
    ctx.stats["skipped"] = skipped
    return out


def _size_args(graph: fx.Graph, root: fx.Node, val: torch.Tensor) -> list:
    sizes = []
    for d, s in enumerate(val.shape):
        if is_concrete_int(s):
            sizes.append(int(s))
        else:
            node = graph.call_function(aten.sym_size.int, (root, d))
            node.meta["val"] = s
            node.meta["partitioner_tag"] = "is_forward"
            sizes.append(node)
    return sizes


def apply(gm: fx.GraphModule, ctx: PassContext, plans: list[Plan]) -> list[dict]:
    from razorpass.format import value_dtype_of

    graph = gm.graph
    fake_mode = fake_mode_of(gm)
    order = {n: i for i, n in enumerate(graph.nodes)}
    records = []
    for plan in plans:
        root, val = plan.root, plan.root.meta["val"]
        vdtype = value_dtype_of(ctx.config, val.dtype)
        # -- forward: compress right after the root
        anchor = root if root.op != "placeholder" else next(
            n for n in graph.nodes if n.op != "placeholder"
        ).prev
        with graph.inserting_after(anchor):
            comp = graph.call_function(torch.ops.razor.compress.default, (root, plan.group_size, plan.keep, vdtype))
        with graph.inserting_after(comp):
            mask = graph.call_function(operator.getitem, (comp, 0))
        with graph.inserting_after(mask):
            values = graph.call_function(operator.getitem, (comp, 1))
        with graph.inserting_after(values):
            sizes = _size_args(graph, root, val)
        with fake_mode:
            mval, vval = torch.ops.razor.compress.default(val, plan.group_size, plan.keep, vdtype)
        comp.meta["val"] = (mval, vval)
        mask.meta["val"], values.meta["val"] = mval, vval
        for n in (comp, mask, values):
            n.meta["partitioner_tag"] = "is_forward"
            if "nn_module_stack" in root.meta:
                n.meta["nn_module_stack"] = root.meta["nn_module_stack"]
        # -- backward: one decompress before the first consumer
        first = min((s.consumer for s in plan.sites), key=order.__getitem__)
        with graph.inserting_before(first):
            dense = graph.call_function(
                torch.ops.razor.decompress.default, (mask, values, sizes, plan.group_size, val.dtype)
            )
        with fake_mode:
            dense.meta["val"] = torch.ops.razor.decompress.default(mval, vval, list(val.shape), plan.group_size, val.dtype)
        dense.meta["partitioner_tag"] = "must_be_in_backward"
        dense.meta["fwd_nn_module_stack"] = first.meta.get("fwd_nn_module_stack", {})
        for site in plan.sites:
            cur, cur_val = dense, dense.meta["val"]
            with graph.inserting_before(site.consumer):
                for link in site.chain:
                    args = (cur, *link.args[1:])
                    new = graph.call_function(link.target, args, dict(link.kwargs))
                    new.meta.update({k: v for k, v in link.meta.items() if k != "val"})
                    with fake_mode:
                        fargs = torch.fx.node.map_arg(args[1:], lambda a: a.meta["val"])
                        cur_val = link.target(cur_val, *fargs, **link.kwargs)
                    new.meta["val"] = cur_val
                    new.meta["partitioner_tag"] = "is_backward"
                    cur = new
            site.consumer.update_arg(site.arg_index, cur)
        records.append(
            {
                "root": root.name,
                "op_classes": sorted({s.op_class for s in plan.sites}),
                "modules": [s.module for s in plan.sites],
                "consumers": len(plan.sites),
                "shape": tuple(val.shape),
                "dtype": val.dtype,
                "group_size": plan.group_size,
                "keep": plan.keep,
                "mask": comp.name,
                "outputs": (mask.name, values.name),
                "layer": layer_label([s.module for s in plan.sites]),
                "dense_bytes": val.numel() * val.element_size(),
            }
        )
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return records


def layer_label(modules: list[str]) -> str:
    """One label for the layers that share a compressed tensor: "a.b.{query,key,value}"."""
    mods = sorted(set(modules))
    if len(mods) <= 1:
        return mods[0] if mods else ""
    split = [m.split(".") for m in mods]
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    tails = ",".join(".".join(p[len(prefix):]) for p in split)
    return ".".join(prefix + ["{" + tails + "}"])


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plans = analyse(gm, ctx)
    ctx.stats["compressed"] = apply(gm, ctx, plans) if plans else []
    return gm
