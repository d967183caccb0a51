"""inline-codecs: after partitioning, give the compiler each codec op that has a plain-op
form (``Codec.inline_encode`` / ``inline_decode`` in the registry) as those ops, so that
it fuses them into the kernels around them.

Runs on the partitioned forward and backward graphs, after ``check_saved`` and after
the saved tensors were described, and only when the inner compiler is Inductor. Which
ops it swaps is the config's ``codec_form`` and, under "auto", the registry's
``Codec.generated_on`` for the op's device: the lossless bit packing
(``razor::pack_bits``: the mask and its bytes in one kernel, so the one-byte-per-element
boolean tensor is never written; ``razor::unpack_bits``: folded into the kernel that
reads the mask), the GELU derivative's codes (``razor::quantize_uniform`` written by the
kernel that computes the derivative, ``razor::dequantize_uniform`` folded into the GELU
backward's multiply), and the per-group quantizers (``razor::quantize_group`` /
``_centered`` written by the kernel that computes the activation,
``razor::dequantize_group`` read by the kernels that use it). Top-k stays an op: a
selection is no pointwise code. Only float32 codecs are generated: a bfloat16 / float16
activation or decoded tensor keeps the op, whose values are the rounded ones.

Invariants: what crosses from forward to backward is unchanged (the partition was
decided with the ops opaque, and the encoded bytes are still the forward output); the
values are the op's, bit for bit (the same integer ops on the same layout; the tests
compare); every created node gets ``meta["val"]`` from tracing under the graph's own
fake mode. A node that cannot be traced keeps its op, with a log line: slower, never
different.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

from .codecs import codec_of
from .common import fake_mode_of
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .vocab import CodecForm, Compiler

__all__ = ["run", "inline", "PASS"]

log = logging.getLogger("razorpass")


def inline(graph: fx.Graph, node: fx.Node, fn: Callable, fake_mode) -> None:
    """Replace ``node`` by ``fn(*node.args)`` traced to aten ops under ``fake_mode`` (the
    graph's). The arguments that are graph nodes (tensors, or symbolic ints inside a
    shape list) become the traced function's inputs; ``fn`` returns one tensor, or a
    tuple where the op has several outputs (its users, ``getitem`` nodes, then read the
    traced outputs directly)."""
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
                out = n.args[0]
                break
            env[n] = graph.node_copy(n, lambda a: env[a])
    if isinstance(out, (tuple, list)):  # an op of several outputs: its users are getitems
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise RuntimeError(f"{node.name} of {len(out)} outputs has a user that is no getitem")
            user.replace_all_uses_with(env[out[user.args[1]]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(env[out])
    graph.erase_node(node)


def _float32_values(node: fx.Node, direction: str) -> bool:
    """The values the codec turns into codes (an encode's inputs) or gives back (a
    decode's output) are float32, or not floating at all (masks). bfloat16 / float16
    values keep the op: fused with its producer or consumer, Inductor keeps a 16-bit
    value in float32 and elides its rounding, so the generated codes (or the values a
    consumer reads) would part from the op's. (The bfloat16 bounds are storage, exact.)"""
    if direction == "encode":
        vals = [a.meta.get("val") for a in node.all_input_nodes]
    else:
        vals = [node.meta.get("val")]
    return all(v.dtype == torch.float32 for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point())


def _inline_form(node: fx.Node, form: CodecForm) -> Callable | None:
    codec = codec_of(node.target) if node.op == "call_function" and not node.kwargs else None
    if codec is None:
        return None
    direction = "encode" if node.target is codec.encode else "decode"
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    devices = {v.device.type for v in vals if isinstance(v, torch.Tensor)}
    if len(devices) != 1 or not _float32_values(node, direction):
        return None
    return codec.generated(direction, devices.pop(), form)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.config.compiler is not Compiler.INDUCTOR:
        return PassResult()
    fake_mode = fake_mode_of(gm)  # bails out on a graph without fake metadata
    done = 0
    for node in list(gm.graph.nodes):
        fn = _inline_form(node, ctx.config.codec_form)
        if fn is None:
            continue
        try:
            inline(gm.graph, node, fn, fake_mode)
            done += 1
        except Exception as e:  # noqa: BLE001 - the op stays: correct, only slower
            log.info("razorpass: inline_codecs kept %s as an op (%s: %s)", node.name, type(e).__name__, e)
    return PassResult(done)


PASS = GraphPass("inline_codecs", Stage.POST_PARTITION, run)
