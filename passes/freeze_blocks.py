"""freeze-blocks: BSR's ``trainable_blocks`` as a stop-gradient on the Dynamo graph
(pre-autograd, torch-level).

On the graph Dynamo hands a backend every parameter is a placeholder (``example_inputs``
holds the ``nn.Parameter`` itself). A parameter *use* trains when the node that uses it
runs inside a trainable block, or after the last block (final norm, pooler, head);
every other use reads ``param.detach()`` instead. AOTAutograd then sees no path from
the loss to a frozen use, so:

* a parameter with no training use gets no gradient (its ``.grad`` stays ``None``);
* below the first trainable block nothing requires grad (the model input does not):
  no backward op is traced and nothing is saved for backward there;
* a frozen block between trainable ones keeps its input-gradient ops (the gradient
  must reach the earlier trainable block) and saves only what those need; its
  weight-gradient matmuls are pruned.

Deciding per use, not per parameter, keeps tied weights right: an embedding tied to an
LM head is frozen where the embedding reads it and trains where the head reads it.

Invariants: the pass adds one ``detach`` node per frozen parameter (right before its
first frozen use, with ``example_value`` set) and reroutes frozen uses to it; it never
changes a node's target and never touches non-parameter inputs. Block membership and
order come from ``passes.blocks.find_blocks_in_graph`` (``nn_module_stack``). The
pass raises (a ``BlockError``, i.e. ``ValueError``) instead of bailing out: silently
skipping it would train parameters the user froze.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .blocks import BlockError, find_blocks_in_graph
from .common import clean_fqn
from .context import PreAutogradContext
from .framework import GraphPass, PassResult, Stage

log = logging.getLogger("razorpass")

__all__ = ["run", "plan", "PASS"]


def plan(gm: fx.GraphModule, example_inputs: Sequence, config) -> dict[fx.Node, list[fx.Node]]:
    """frozen parameter placeholder -> its uses that must read a detached copy."""
    for node in gm.graph.find_nodes(op="get_attr"):
        value = _attr(gm, str(node.target))
        if isinstance(value, nn.Parameter) and value.requires_grad:
            raise BlockError(f"parameter {node.target!r} is a graph attribute, not a graph input "
                             "(torch._dynamo.config.inline_inbuilt_nn_modules=False?): trainable_blocks "
                             "can only freeze parameters that Dynamo lifts to inputs")
    found = find_blocks_in_graph(gm, example_inputs, config.blocks)
    trainable = set(found.blocks.resolve(config.trainable_blocks, "trainable_blocks"))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after_blocks = found.last_position(order)

    def trains(use: fx.Node) -> bool:
        block = found.member.get(use)
        if block is not None:
            return block in trainable
        return order[use] > after_blocks

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    frozen: dict[fx.Node, list[fx.Node]] = {}
    for node, value in zip(placeholders, example_inputs):
        if getattr(value, "_razor_frozen", False) and any(trains(u) for u in node.users):
            raise BlockError(
                f"trainable_blocks: parameter {_param_name(node)!r} is registered before the block list "
                f"({found.blocks.describe()}) but used after the last block, so razorpass.compile froze it "
                "although the traced graph trains it. Register it after the blocks, or freeze and unfreeze "
                "parameters yourself and compile without trainable_blocks.")
        if isinstance(value, nn.Parameter) and value.requires_grad:
            uses = [u for u in node.users if not trains(u)]
            if uses:
                frozen[node] = sorted(uses, key=order.__getitem__)
    return frozen


def run(gm: fx.GraphModule, ctx: PreAutogradContext) -> PassResult:
    config = ctx.config
    if config.trainable_blocks is None:
        return PassResult()
    frozen = plan(gm, ctx.example_inputs, config)
    graph = gm.graph
    values = dict(zip((n for n in graph.nodes if n.op == "placeholder"), ctx.example_inputs))
    # parameters that no use trains: the caller freezes them (requires_grad=False) so
    # that an eager run, the optimizer and every later graph agree
    ctx.frozen_params = [values[p] for p, uses in frozen.items() if len(uses) == len(p.users)]
    for param, uses in frozen.items():
        with graph.inserting_before(uses[0]):
            detached = graph.call_method("detach", (param,))
        example = param.meta.get("example_value")
        if isinstance(example, torch.Tensor):
            detached.meta["example_value"] = example.detach()
        for use in uses:
            use.replace_input_with(param, detached)
    log.info("razorpass freeze_blocks: %d parameter inputs frozen at %d uses",
             len(frozen), sum(len(u) for u in frozen.values()))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("razorpass freeze_blocks: frozen %s", ", ".join(_param_name(p) for p in frozen))
    return PassResult(len(frozen))


PASS = GraphPass("freeze_blocks", Stage.PRE_AUTOGRAD, run)


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value


def _param_name(node: fx.Node) -> str:
    """The parameter's path in the model, from Dynamo's source of the placeholder."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    return clean_fqn(source.name).replace("._parameters.", ".") if source is not None else node.name
