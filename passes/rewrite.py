"""The one rewrite every encoding shares: encode a forward root right after it is
computed, decode it right before its first backward use, replay the views between
the root and each use on the decoded tensor, and reroute those uses.

An encoding is a codec of the registry (``codecs.py``): a pair of custom ops,
``encode(root, *args) -> tensor(s)`` (forward) and ``decode(*encoded, sizes, *args) ->
dense`` (backward); :meth:`Rewriter.reroute` does the graph surgery for any codec, so a
new encoding is an analysis plus one call.

Decodes are contiguous. Where the root was dense in memory but not in row-major order
(channels-last, a permuted view), the decoded tensor is copied back into the root's
layout: the backward graph was traced against those strides (a convolution's input
gradient takes its input's memory format, a later ``view`` relies on it).

Invariants (see ``common``): every created node gets ``meta["val"]`` under the graph's
fake mode; encode nodes are tagged ``partitioner_tag="is_forward"`` (the min-cut
partitioner keeps them in forward and saves their outputs), the decode is tagged
``"must_be_in_backward"`` (it and everything after it stay in backward); no existing
node's target changes, only the rerouted arguments of the listed uses.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._prims_common import (compute_elementwise_output_logical_to_physical_perm,
                                is_non_overlapping_and_dense_or_false)
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .codecs import Codec
from .common import fake_mode_of, replay_chain, size_args

__all__ = ["Use", "Rewritten", "Rewriter"]


@dataclass
class Use:
    """A backward read of the root: ``consumer`` reads it as ``operand`` (the root seen
    through ``chain``). ``arg_index`` names the positional argument to reroute; None
    reroutes every read of ``operand`` by ``consumer``."""

    consumer: fx.Node
    chain: list[fx.Node]  # nodes from the root (exclusive) to the operand (inclusive)
    operand: fx.Node | None = None
    arg_index: int | None = None


@dataclass
class Rewritten:
    root: fx.Node
    codec: Codec
    encode: fx.Node  # the encode op's node
    encoded: list[fx.Node]  # its tensor outputs (what forward saves)
    decode: fx.Node  # the decode op's node in backward (contiguous; its uses may see a copy in the root's layout)

    def record_fields(self) -> dict:
        """The fields every ``records.EncodedRoot`` takes from the rewrite itself."""
        val = self.root.meta["val"]
        return dict(root=self.root.name, encoding=self.codec.encoding, shape=tuple(val.shape), dtype=val.dtype,
                    dense_bytes=val.numel() * val.element_size(), encode_node=self.encode.name,
                    outputs=tuple(n.name for n in self.encoded))


def _after_inputs(graph: fx.Graph, root: fx.Node) -> fx.Node:
    if root.op != "placeholder":
        return root
    return next(n for n in graph.nodes if n.op != "placeholder").prev  # after the last input


def layout_perm(val: torch.Tensor) -> list[int] | None:
    """The permutation ``p`` for which ``val.permute(p)`` is contiguous, where ``val`` is
    dense in memory but not row-major (channels-last, a transposed view); None where a
    contiguous tensor already has ``val``'s strides, or they are symbolic."""
    if not all(is_concrete_int(d) for d in (*val.shape, *val.stride())):
        return None
    if val.is_contiguous() or not is_non_overlapping_and_dense_or_false(val):
        return None
    perm, _ = compute_elementwise_output_logical_to_physical_perm(val)
    return None if perm == list(range(val.dim())) else list(perm)


def _in_layout_of(graph: fx.Graph, fake_mode, dense: fx.Node, val: torch.Tensor) -> fx.Node:
    """``dense`` (contiguous) copied into ``val``'s memory layout, at the current
    insertion point: permute to the physical order, copy, permute back."""
    perm = layout_perm(val)
    if perm is None:
        return dense
    inverse = [perm.index(i) for i in range(len(perm))]
    cur = dense
    for target, args, kwargs in ((torch.ops.aten.permute.default, (perm,), {}),
                                 (torch.ops.aten.clone.default, (), {"memory_format": torch.contiguous_format}),
                                 (torch.ops.aten.permute.default, (inverse,), {})):
        new = graph.call_function(target, (cur, *args), kwargs)
        with fake_mode:
            new.meta["val"] = target(cur.meta["val"], *args, **kwargs)
        new.meta["partitioner_tag"] = "is_backward"
        cur = new
    got = cur.meta["val"]
    # a size-1 dim's stride is arbitrary (never read): only the others must agree
    assert all(a == b for a, b, n in zip(got.stride(), val.stride(), val.shape) if n != 1), (got.stride(), val.stride())
    return cur


class Rewriter:
    """One rewrite of a graph: ``with Rewriter(gm) as rw: rw.reroute(...)``. On a clean
    exit, dead code is removed (the pass runner lints and recompiles)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.graph = gm, gm.graph
        self.fake_mode = fake_mode_of(gm)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}  # positions before the rewrite

    def __enter__(self) -> Rewriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.graph.eliminate_dead_code()

    def replace(self, node: fx.Node, target, args: tuple) -> fx.Node:
        """Put ``target(*args)`` in ``node``'s place: same position, same metadata (the
        same value, computed another way), every user rerouted; ``node`` is erased."""
        with self.graph.inserting_before(node):
            new = self.graph.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def reroute(self, root: fx.Node, uses: Sequence[Use], codec: Codec, encode_args: tuple,
                decode_args: Callable[[list[fx.Node], list], tuple]) -> Rewritten:
        """Insert ``codec.encode(root, *encode_args)`` after ``root`` and
        ``codec.decode(*decode_args(encoded, sizes))`` before the first of ``uses``; replay
        each use's chain on the decoded tensor and reroute the use to it."""
        graph, fake_mode, val = self.graph, self.fake_mode, root.meta["val"]
        encode, decode = codec.encode, codec.decode
        with graph.inserting_after(_after_inputs(graph, root)):
            enc = graph.call_function(encode, (root, *encode_args))
        with fake_mode:
            fval = encode(val, *encode_args)
        enc.meta["val"] = fval
        encoded = [enc]
        if isinstance(fval, (tuple, list)):
            encoded, prev = [], enc
            for i, v in enumerate(fval):
                with graph.inserting_after(prev):
                    prev = graph.call_function(operator.getitem, (enc, i))
                prev.meta["val"] = v
                encoded.append(prev)
        for n in (enc, *encoded):
            n.meta["partitioner_tag"] = "is_forward"
            if "nn_module_stack" in root.meta:
                n.meta["nn_module_stack"] = root.meta["nn_module_stack"]
        with graph.inserting_after(encoded[-1]):
            sizes = size_args(graph, root, val)
        # -- backward: one decode before the first use
        first = min((u.consumer for u in uses), key=self.order.__getitem__)
        args = decode_args(encoded, sizes)
        with graph.inserting_before(first):
            dense = graph.call_function(decode, args)
        with fake_mode:
            dense.meta["val"] = decode(*fx.node.map_arg(args, lambda a: a.meta["val"]))
        dense.meta["partitioner_tag"] = "must_be_in_backward"
        dense.meta["fwd_nn_module_stack"] = first.meta.get("fwd_nn_module_stack", {})
        with graph.inserting_before(first):
            laid_out = _in_layout_of(graph, fake_mode, dense, val)
        for use in uses:
            with graph.inserting_before(use.consumer):
                cur = replay_chain(graph, fake_mode, use.chain, laid_out, root)
            if use.arg_index is not None:
                use.consumer.update_arg(use.arg_index, cur)
            else:
                use.consumer.replace_input_with(use.operand, cur)
        return Rewritten(root, codec, enc, encoded, dense)
