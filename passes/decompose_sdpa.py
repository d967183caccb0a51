"""decompose-sdpa: run ``scaled_dot_product_attention`` as explicit math when the
"sdpa" target is on (pre-autograd, on the Dynamo graph).

The fused op saves q, k, v, its output and the log-sum-exp, and its backward
recomputes the probabilities from them; compressing those would break that
recomputation. Replacing the call with ``razorpass.attention.math_sdpa`` (same
signature and result) lets compress-saved handle attention with the "matmul" and
"softmax" classes, as Back Razor does. Nothing else in the graph changes.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})


def run(gm: fx.GraphModule, example_inputs, config) -> fx.GraphModule:
    if "sdpa" not in config.targets:
        return gm
    from razorpass.attention import math_sdpa

    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            node.target = math_sdpa
            changed += 1
    if changed:
        gm.recompile()
    return gm
