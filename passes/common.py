"""What every razorpass graph pass shares: the bail-out exception, the pass context,
the op tables, and small helpers over AOTAutograd joint graphs.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

aten = torch.ops.aten

__all__ = ["BailOut", "PassContext", "PreAutogradContext", "VIEW_OPS", "ORDER_PRESERVING", "HEAVY_OPS", "module_path",
           "matches", "fake_mode_of", "size_args", "replay_chain", "backward_nodes", "clean_fqn", "tangent_closure",
           "is_random", "light_inputs", "recomputable_from_caller", "strip_views", "primals", "forward_outputs",
           "order_preserving", "dim0", "SAMPLE_DIM0_META"]


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


@dataclass
class PreAutogradContext:
    """What a pass on the Dynamo (pre-autograd) graph sees: the config and the example
    inputs (``nn.Parameter`` objects for the lifted parameters)."""

    config: Any  # RazorConfig
    example_inputs: Sequence[Any]
    # set by freeze_blocks: parameters that trainable_blocks freezes at every use
    frozen_params: list[Any] = field(default_factory=list)


@dataclass
class PassContext:
    """Facts about one joint graph that the partitioner knows, and the typed records the
    passes leave for the pipeline, the post-partition check and ``record_compiles()``.

    ``compressed`` / ``packed`` / ``quantized`` and the skip lists are rewritten by each
    partition attempt; ``excluded_roots`` accumulates across the pipeline's retries
    (roots the partitioner saved dense, left uncompressed on the next attempt).
    """

    config: Any  # RazorConfig
    num_fwd_outputs: int
    static_lifetime_input_indices: list[int]
    excluded_roots: list[str] = field(default_factory=list)
    compressed: list[Any] = field(default_factory=list)  # records.CompressedRoot
    packed: list[Any] = field(default_factory=list)  # records.PackedMask
    skipped: list[str] = field(default_factory=list)  # compress_saved: "root: why"
    pack_skipped: list[str] = field(default_factory=list)  # pack_masks: "root: why"
    recomputed_in_backward: list[str] = field(default_factory=list)  # set by check_saved
    dense_kept: list[str] = field(default_factory=list)  # set by check_saved
    joint: fx.GraphModule | None = None  # the rewritten joint graph, for the post-partition check
    quantized: list[Any] = field(default_factory=list)  # records.QuantizedDerivative (encode_derivative)
    quantize_skipped: list[str] = field(default_factory=list)  # encode_derivative: "node: why"
    inlined: int = 0  # inline_codecs: bit-packing ops handed to the compiler as plain ops
    split_decodes: int = 0  # split_decodes: decodes added so none lives across a heavy op
    backward_packs_dropped: int = 0  # drop_backward_packs: pack/unpack pairs removed from backward
    centered_quantizes: int = 0  # center_quantize: BatchNorm inputs quantized without writing x - mean
    folded_affines: int = 0  # fold_affine: weight gradients read x̂, not a replayed γ·x̂ + β
    hoisted_decodes: int = 0  # hoist_decodes: decodes run with their weight gradients, right after dY
    # memory_budget: root -> bits (0: dense), kept across attempts like excluded_roots
    budget_bits: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget what an attempt recorded (not the excluded roots)."""
        self.compressed, self.packed, self.skipped, self.pack_skipped = [], [], [], []
        self.recomputed_in_backward, self.dense_kept, self.joint = [], [], None
        self.quantized, self.quantize_skipped, self.inlined, self.split_decodes = [], [], 0, 0
        self.backward_packs_dropped, self.centered_quantizes, self.folded_affines, self.hoisted_decodes = 0, 0, 0, 0

    def primals(self, gm: fx.GraphModule) -> list[fx.Node]:
        return primals(gm)

    def held_by_caller(self, gm: fx.GraphModule) -> set[fx.Node]:
        """Graph inputs that get no gradient (the batch): the caller holds them anyway."""
        return {p for p, g in self.grad_outputs(gm) if g is None}

    def static_primals(self, gm: fx.GraphModule) -> set[fx.Node]:
        prim = self.primals(gm)
        return {prim[i] for i in self.static_lifetime_input_indices if i < len(prim)}

    def grad_outputs(self, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node | None]]:
        """(primal, its gradient output node or None) for every primal input."""
        grads = forward_outputs(gm, self.num_fwd_outputs)[1]
        prim = self.primals(gm)
        return list(zip(prim, grads + [None] * (len(prim) - len(grads))))


def backward_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The joint graph's backward part: nodes that depend on a tangent, and nodes that
    AOTAutograd traced as part of a backward formula (``partitioner_tag="is_backward"``)
    even where they read forward values only (e.g. erf(x) inside a GELU backward)."""
    bwd: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if "tangents" in str(n.target):
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
        if (n.op == "placeholder" and "tangents" in str(n.target)) or (
            n.op not in ("placeholder", "output") and any(a in dep for a in n.all_input_nodes)
        ):
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


def recomputable_from_caller(root: fx.Node, dep: set[fx.Node], memo: dict, held: set[fx.Node],
                             static: set[fx.Node]) -> bool:
    """True when ``root`` is computed by light ops from what the caller holds (``held``,
    at least one of them) and parameters: the partitioner recomputes it in backward for
    free, so an encoded copy would only lose precision (e.g. a padded copy of the batch)."""
    src = light_inputs(root, dep, memo)
    return src is not None and bool(src & held) and src <= held | static


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
