"""What every razorpass graph pass shares: the bail-out exception, the op tables, and
small helpers over AOTAutograd joint graphs.

Invariants every pass keeps (checked by the pipeline and the post-partition check):

* ``node.meta["val"]`` is set on every node a pass creates (computed under the
  graph's fake mode), so the partitioner and Inductor see valid fake metadata.
* Passes add nodes and reroute uses; they never mutate an existing node's target or
  arguments in place, and never create aliasing between forward and backward.
* New forward nodes are tagged ``partitioner_tag="is_forward"``; the decompress that
  must run in backward is tagged ``"must_be_in_backward"`` (the min-cut partitioner
  then keeps it, and everything after it, in the backward graph).
"""

from __future__ import annotations

import fnmatch
import re

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

aten = torch.ops.aten

__all__ = ["BailOut", "VIEW_OPS", "ORDER_PRESERVING", "module_path", "matches", "fake_mode_of", "size_args",
           "replay_chain", "clean_fqn", "strip_views", "primals", "forward_outputs", "order_preserving", "dim0",
           "SAMPLE_DIM0_META"]


class BailOut(Exception):
    """Raised by a pass that cannot apply to a graph; the pipeline logs it and the graph
    compiles unmodified (never a crash, never a wrong gradient)."""


# Ops that only reinterpret their first argument (logical element mapping preserved,
# independent of strides): a decompressed, contiguous copy can replay them exactly.
VIEW_OPS = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.permute.default,
        aten.t.default,
        aten.transpose.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.alias.default,
        aten.detach.default,
        aten.expand.default,
        aten.clone.default,
        aten.contiguous.default,
    }
)


# Of those, the reshapes that keep the flattened (logical) element order: walking back
# through them in forward does not change which elements form a block. (Permutes,
# transposes, expands and layout copies reorder elements or memory, so they are not.)
ORDER_PRESERVING = VIEW_OPS - {aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
                               aten.contiguous.default}


def order_preserving(n: fx.Node) -> bool:
    """A reshape that keeps the flattened order of its input (``ORDER_PRESERVING``, or
    an expand to the same shape, which matmul decompositions emit)."""
    if n.target in ORDER_PRESERVING:
        return True
    if n.target is aten.expand.default:
        a, b = n.args[0].meta.get("val"), n.meta.get("val")
        return a is not None and b is not None and tuple(a.shape) == tuple(b.shape)
    return False


def dim0(n: fx.Node):
    """Dim 0 of the tensor ``n`` computes (an int or a SymInt), or None."""
    v = n.meta.get("val")
    return v.shape[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else None


# ``node.meta`` key of ``mark_samples``: {argument index: the smallest dim 0 the argument
# was read through, before Inductor's joint-graph passes folded reshapes}.
SAMPLE_DIM0_META = "razor_sample_dim0"


def strip_views(node: fx.Node, ops: frozenset = VIEW_OPS, through=None) -> tuple[fx.Node, list[fx.Node]]:
    """Walk ``node`` back through single-tensor view ops (``ops``, or any node for which
    ``through(n)`` is true) to its root: ``(root, chain)`` where ``chain`` lists the
    walked nodes from the root (exclusive) to ``node`` (inclusive), i.e. in replay order."""
    chain: list[fx.Node] = []
    n = node
    while (n.op == "call_function" and isinstance(n.args[0] if n.args else None, fx.Node)
           and (n.target in ops if through is None else through(n))):
        chain.append(n)
        n = n.args[0]
    chain.reverse()
    return n, chain


def primals(gm: fx.GraphModule) -> list[fx.Node]:
    """The joint graph's primal inputs (not tangents, not RNG seeds/offsets), in order."""
    return [n for n in gm.graph.find_nodes(op="placeholder") if "tangents" not in str(n.target)
            and not str(n.target).startswith(("fwd_seed", "fwd_base_offset", "bwd_seed", "bwd_base_offset"))]


def forward_outputs(gm: fx.GraphModule, num_fwd_outputs: int) -> tuple[list, list]:
    """(forward outputs, the rest) of a joint graph's (or a forward graph's) output node."""
    out = next(iter(gm.graph.find_nodes(op="output")))
    flat = torch.utils._pytree.arg_tree_leaves(*out.args)
    return flat[:num_fwd_outputs], flat[num_fwd_outputs:]


_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


_CONTAINERS = re.compile(r"\.(?:__dict__|_modules)(?=\.|$)")


def clean_fqn(raw: str) -> str:
    """A module path from Dynamo's source name: "L['self'].encoder.layer[0]",
    "L['self']._modules['encoder']" and (modules reached through ``__getattr__``
    overrides, as in PEFT) "L['self'].__dict__['_modules']['base_model']" all become
    plain dotted paths ("encoder.layer.0", "base_model")."""
    s = re.sub(r"^L\['[^']*'\]", "", raw)
    s = _INDEX.sub(lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), s)
    s = _CONTAINERS.sub("", s)
    return s.lstrip(".")


def module_path(node: fx.Node) -> str:
    """Path of the innermost module that produced ``node`` (forward or backward node)."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    return clean_fqn(raw)


def matches(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in include) and not any(
        fnmatch.fnmatchcase(path, p) for p in exclude
    )


def fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch._subclasses.fake_tensor.FakeTensor):
            return v.fake_mode
    raise BailOut("no fake tensor metadata on the joint graph")


def size_args(graph: fx.Graph, root: fx.Node, val: torch.Tensor) -> list:
    """The sizes of ``root`` as op arguments: ints where static, forward
    ``sym_size`` nodes (inserted at the current insertion point) where symbolic."""
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


def replay_chain(graph: fx.Graph, fake_mode, chain: list[fx.Node], start: fx.Node, root: fx.Node) -> fx.Node:
    """Replay ``chain`` (single-tensor-input nodes from ``root``, exclusive, to some
    operand) on ``start`` at the current insertion point, as backward nodes; returns
    the last replayed node (``start`` for an empty chain)."""
    cur, prev = start, root
    for link in chain:
        # every link has one tensor input: the previous link (or the root)
        args, kwargs = fx.node.map_arg((link.args, link.kwargs), lambda a: cur if a is prev else a)
        new = graph.call_function(link.target, args, kwargs)
        new.meta.update({k: v for k, v in link.meta.items() if k != "val"})
        with fake_mode:
            fargs, fkwargs = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
            new.meta["val"] = link.target(*fargs, **fkwargs)
        new.meta["partitioner_tag"] = "is_backward"
        cur, prev = new, link
    return cur
