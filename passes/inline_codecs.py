"""inline-codecs: after partitioning, give the compiler the lossless bit packing as
plain ops, so that it fuses them into the kernels around them.

Runs on the partitioned forward and backward graphs, after ``check_saved`` and after
the saved tensors were described, and only when the inner compiler is Inductor. Each
``razor::pack_bits`` becomes ``fused_pack_bits`` (pointwise integer ops): Inductor
computes the mask and its bytes in one kernel, so the one-byte-per-element boolean
tensor is never written. Each ``razor::unpack_bits`` becomes ``fused_unpack_bits``,
which Inductor folds into the kernel that reads the mask. Each
``razor::dequantize_uniform`` (a GELU's 3-bit derivative) becomes
``fused_dequantize_uniform``, which Inductor folds into the GELU backward's multiply:
on ViT-B/16 at batch 16 that is a 36.9 MiB buffer per layer not written, at the point
of the backward where the MLP's input gradient is live too.

Invariants: what crosses from forward to backward is unchanged (the partition was
decided with the ops opaque, and the packed bytes are still the forward output); the
bytes are the op's, bit for bit (integer ops on the same layout; the tests compare);
every created node gets ``meta["val"]`` from tracing under the graph's own fake mode.
A node that cannot be traced keeps its op, with a log line: slower, never different.

The quantizers (``razor::quantize_group`` and friends) and the per-group decode stay
opaque: written as plain ops, Inductor's C++ code for their per-group scalars and
straddling 3-bit codes runs 2-3x slower than the native kernel (measured on a 38 MB
activation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..kernels.ops import fused_dequantize_uniform, fused_pack_bits, fused_unpack_bits
from .common import PassContext, fake_mode_of

__all__ = ["run", "inline"]

log = logging.getLogger("razorpass")


def inline(graph: fx.Graph, node: fx.Node, fn: Callable, args: list, fake_mode) -> None:
    """Replace ``node`` by ``fn(*args)`` traced to aten ops under ``fake_mode`` (the
    graph's). ``args`` are graph nodes (tensors or symbolic ints) or plain ints; ``fn``
    must return one tensor."""
    nodes = [a for a in args if isinstance(a, fx.Node)]

    def traced(*node_vals):
        it = iter(node_vals)
        return fn(*[next(it) if isinstance(a, fx.Node) else a for a in args])

    from torch._inductor.decomposition import select_decomp_table

    with fake_mode:  # Inductor's decompositions: the ops its lowering expects
        sub = make_fx(traced, select_decomp_table(), tracing_mode="real")(*[a.meta["val"] for a in nodes])
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(nodes) or any(n.op == "get_attr" for n in sub.graph.nodes):
        raise RuntimeError(f"tracing {fn.__name__} gave an unexpected graph")
    env.update(zip(placeholders, nodes))
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = env[n.args[0]]
                break
            env[n] = graph.node_copy(n, lambda a: env[a])
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.config.compiler != "inductor":
        return gm
    fake_mode = fake_mode_of(gm)  # bails out on a graph without fake metadata
    done = 0
    for node in list(gm.graph.nodes):
        try:
            if node.target is torch.ops.razor.pack_bits.default:
                inline(gm.graph, node, fused_pack_bits, [node.args[0]], fake_mode)
            elif node.target is torch.ops.razor.unpack_bits.default:
                packed, shape = node.args
                inline(gm.graph, node, lambda p, *s: fused_unpack_bits(p, list(s)), [packed, *shape], fake_mode)
            elif node.target is torch.ops.razor.dequantize_uniform.default:
                codes, shape, bits, lo, hi, dtype = node.args
                inline(gm.graph, node, lambda c, *s: fused_dequantize_uniform(c, list(s), bits, lo, hi, dtype),
                       [codes, *shape], fake_mode)
            else:
                continue
            done += 1
        except Exception as e:  # noqa: BLE001 - the op stays: correct, only slower
            log.info("razorpass: inline_codecs kept %s as an op (%s: %s)", node.name, type(e).__name__, e)
    if done:
        gm.graph.lint()
        gm.recompile()
    ctx.inlined += done
    return gm
