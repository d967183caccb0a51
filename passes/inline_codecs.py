"""inline-codecs: after partitioning, give the compiler each codec op that has a plain-op
form (``Codec.inline_encode`` / ``inline_decode`` in the registry) as those ops, so that
it fuses them into the kernels around them.

Runs on the partitioned forward and backward graphs, after ``check_saved`` and after
the saved tensors were described, and only when the inner compiler is Inductor. Today
that is the lossless bit packing (``razor::pack_bits``: the mask and its bytes in one
kernel, so the one-byte-per-element boolean tensor is never written;
``razor::unpack_bits``: folded into the kernel that reads the mask) and the decode of a
GELU's derivative codes (``razor::dequantize_uniform``: folded into the GELU backward's
multiply, so the decoded derivative is never written). The per-group quantizers and
their decode stay opaque ops with native and Triton kernels.

Invariants: what crosses from forward to backward is unchanged (the partition was
decided with the ops opaque, and the encoded bytes are still the forward output); the
values are the op's, bit for bit (the same integer ops on the same layout; the tests
compare); every created node gets ``meta["val"]`` from tracing under the graph's own
fake mode. A node that cannot be traced keeps its op, with a log line: slower, never
different.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

from .codecs import codec_of
from .common import fake_mode_of
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .vocab import Compiler

__all__ = ["run", "inline", "PASS"]

log = logging.getLogger("razorpass")


def inline(graph: fx.Graph, node: fx.Node, fn: Callable, fake_mode) -> None:
    """Replace ``node`` by ``fn(*node.args)`` traced to aten ops under ``fake_mode`` (the
    graph's). The arguments that are graph nodes (tensors, or symbolic ints inside a
    shape list) become the traced function's inputs; ``fn`` must return one tensor."""
    flat, spec = pytree.tree_flatten(node.args)
    nodes = [a for a in flat if isinstance(a, fx.Node)]

    def traced(*node_vals):
        it = iter(node_vals)
        return fn(*pytree.tree_unflatten([next(it) if isinstance(a, fx.Node) else a for a in flat], spec))

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


def _inline_form(node: fx.Node) -> Callable | None:
    codec = codec_of(node.target) if node.op == "call_function" and not node.kwargs else None
    if codec is None:
        return None
    return codec.inline_encode if node.target is codec.encode else codec.inline_decode


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.config.compiler is not Compiler.INDUCTOR:
        return PassResult()
    fake_mode = fake_mode_of(gm)  # bails out on a graph without fake metadata
    done = 0
    for node in list(gm.graph.nodes):
        fn = _inline_form(node)
        if fn is None:
            continue
        try:
            inline(gm.graph, node, fn, fake_mode)
            done += 1
        except Exception as e:  # noqa: BLE001 - the op stays: correct, only slower
            log.info("razorpass: inline_codecs kept %s as an op (%s: %s)", node.name, type(e).__name__, e)
    return PassResult(done)


PASS = GraphPass("inline_codecs", Stage.POST_PARTITION, run)
