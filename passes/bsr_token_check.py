"""bsr-token-check: refuse ``drop_layers`` that reached the backend without the token
selection that ``razorpass.compile`` installs before tracing (pre-autograd check).

Token dropping changes how many tokens every later layer sees; Dynamo has already
baked those counts into the graph's reshapes, so a backend cannot add it afterwards.
``razorpass.compile`` applies it to the model first (``razorpass.bsr``), and every
selection block then puts a ``razor::rank_tokens`` node into the graph. A graph that
arrives with ``drop_layers`` set and no such node came from
``torch.compile(model, backend="razor", options={"drop_layers": ...})``: compiling it
would silently train on all tokens, so this check raises instead.

Mutates nothing.
"""

from __future__ import annotations

import torch.fx as fx

from ..kernels.ops import RANK_TOKENS_OP
from .context import PreAutogradContext
from .framework import GraphPass, PassResult, Stage

__all__ = ["run", "PASS"]


class TokenSelectionMissing(ValueError):
    """drop_layers is set but the traced model has no token selection in it."""


def run(gm: fx.GraphModule, ctx: PreAutogradContext) -> PassResult:
    config = ctx.config
    if not config.drop_layers or any(n.op == "call_function" and n.target is RANK_TOKENS_OP for n in gm.graph.nodes):
        return PassResult()
    raise TokenSelectionMissing(
        f"RazorConfig.drop_layers={config.drop_layers} drops tokens, which changes tensor shapes after the "
        "selection blocks, so it must be applied to the model before tracing: use "
        "razorpass.compile(model, drop_layers=..., keep_rate=..., ...) instead of "
        "torch.compile(model, backend='razor', options={'drop_layers': ...}) (trainable_blocks and the "
        "sparsity options work with either). If you did call razorpass.compile, this graph has no selection "
        "block because of a graph break; compile with fullgraph=True to see where."
    )


PASS = GraphPass("bsr_token_check", Stage.PRE_AUTOGRAD, run)
